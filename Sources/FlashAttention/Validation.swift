import CFlashAttention
import FlashAttentionKernels

/// Turns a caller's `flash_attention_params` into a trusted `AttentionProblem`, or throws an error that
/// names the offending argument. Everything a kernel relies on is checked here, before any memory is
/// touched: sizes, options, NULLs, alignment, every stride's addressed range (with overflow checks), that
/// outputs do not overlap themselves or other tensors.

/// Byte interval [lower, upper) that a tensor view addresses.
struct AddressRange {
    let lower: UInt
    let upper: UInt
    func overlaps(_ other: AddressRange) -> Bool { lower < other.upper && other.lower < upper }
}

/// One strided tensor argument as the caller described it: a name for messages, its pointer, and its
/// (size, stride, field name) per axis, head_dim last.
struct TensorArgument {
    let name: String
    let pointer: UnsafeRawPointer?
    let axes: [(size: Int, stride: Int, field: String)]

    var elementCount: Int? {
        var count = 1
        for axis in axes {
            let (product, overflow) = count.multipliedReportingOverflow(by: axis.size)
            if overflow { return nil }
            count = product
        }
        return count
    }

    /// Checks the pointer and strides; returns the addressed bytes, or nil for a tensor with no elements
    /// (whose pointer may then be NULL).
    func validate() throws(FlashAttentionError) -> AddressRange? {
        guard let count = elementCount else {
            throw .invalidShape("\(name) has more elements than int64 can count")
        }
        if count == 0 { return nil }
        guard let pointer else { throw .nullPointer("\(name) is NULL but has \(count) elements") }
        let address = UInt(bitPattern: pointer)
        if address % UInt(MemoryLayout<Float>.alignment) != 0 {
            throw .invalidArgument("\(name) (0x\(String(address, radix: 16))) is not aligned to 4 bytes")
        }
        // Lowest and highest element offsets over all indices, from the per-axis extremes.
        var low = 0
        var high = 0
        for axis in axes {
            let (extent, overflow) = (axis.size - 1).multipliedReportingOverflow(by: axis.stride)
            if overflow {
                throw .invalidStride("\(axis.field) (\(axis.stride)) × \(axis.size - 1) overflows int64")
            }
            let (sum, sumOverflow) = extent < 0 ? low.addingReportingOverflow(extent) : high.addingReportingOverflow(extent)
            if sumOverflow { throw .invalidStride("\(name): the strides address a range that overflows int64") }
            if extent < 0 { low = sum } else { high = sum }
        }
        let elementSize = MemoryLayout<Float>.size
        let (lowBytes, lowOverflow) = low.multipliedReportingOverflow(by: elementSize)
        let (highBytes, highOverflow) = high.multipliedReportingOverflow(by: elementSize)
        let (lower, underflow) = address.subtractingReportingOverflow(lowBytes.magnitude)
        let (lastByte, beyond) = address.addingReportingOverflow(UInt(highBytes) + UInt(elementSize))
        if lowOverflow || highOverflow || underflow || beyond {
            throw .invalidStride("\(name): the strides address memory outside the address space")
        }
        return AddressRange(lower: lower, upper: lastByte)
    }

    /// Checks that no two distinct elements share an address, so concurrent writes never collide. Sufficient
    /// rule: sorted by |stride|, each axis steps past everything the smaller axes reach.
    func validateNoSelfOverlap() throws(FlashAttentionError) {
        let moving = axes.filter { $0.size > 1 }.sorted { $0.stride.magnitude < $1.stride.magnitude }
        var reach: UInt = 0
        for axis in moving {
            if axis.stride.magnitude <= reach {
                throw .invalidStride(
                    "\(axis.field) (\(axis.stride)) makes distinct elements of \(name) overlap; an output needs"
                        + " non-overlapping strides")
            }
            reach += UInt(axis.size - 1) * axis.stride.magnitude
        }
    }

    func sameView(as other: TensorArgument) -> Bool {
        pointer == other.pointer && axes.map(\.stride) == other.axes.map(\.stride)
            && axes.map(\.size) == other.axes.map(\.size)
    }
}

/// Params fields that are not tensors, checked and normalised.
struct ForwardOptions {
    let numThreads: Int
    let algorithm: Int32
}

/// A stand-in address for tensors with no elements: never dereferenced, and their strides become 0.
nonisolated(unsafe) private let emptyTensor = UnsafeMutablePointer<Float>.allocate(capacity: 1)

extension AttentionProblem {
    /// Validates `params` (already widened to the current struct) into a problem and its options.
    static func validated(_ params: flash_attention_params) throws(FlashAttentionError) -> (
        AttentionProblem, ForwardOptions
    ) {
        let batch = Int(params.batch), seqlenQ = Int(params.seqlen_q), seqlenK = Int(params.seqlen_k)
        let headsQ = Int(params.heads_q), headsKV = Int(params.heads_kv), headDim = Int(params.head_dim)
        for (value, name) in [(batch, "batch"), (seqlenQ, "seqlen_q"), (seqlenK, "seqlen_k")] where value < 0 {
            throw .invalidShape("\(name) (\(value)) must be >= 0")
        }
        if headsKV < 1 { throw .invalidShape("heads_kv (\(headsKV)) must be >= 1") }
        if headsQ < 1 { throw .invalidShape("heads_q (\(headsQ)) must be >= 1") }
        if headsQ % headsKV != 0 {
            throw .invalidShape("heads_q (\(headsQ)) is not a multiple of heads_kv (\(headsKV))")
        }
        if headDim < 1 || headDim > Int(FA_MAX_HEAD_DIM) {
            throw .invalidShape("head_dim (\(headDim)) must be in 1...\(FA_MAX_HEAD_DIM)")
        }
        if params.num_threads < 0 {
            throw .invalidArgument("num_threads (\(params.num_threads)) must be >= 0 (0 = all online cores)")
        }
        let algorithms = [FA_ALGORITHM_AUTO, FA_ALGORITHM_REFERENCE, FA_ALGORITHM_TILED]
        if !algorithms.contains(params.algorithm) {
            throw .invalidArgument(
                "algorithm (\(params.algorithm)) must be FA_ALGORITHM_AUTO (0), FA_ALGORITHM_REFERENCE (1)"
                    + " or FA_ALGORITHM_TILED (2)")
        }
        if !params.softmax_scale.isFinite {
            throw .invalidArgument("softmax_scale (\(params.softmax_scale)) must be finite")
        }

        func tensor(
            _ name: String, _ pointer: UnsafeRawPointer?, seqlen: Int, heads: Int,
            _ strides: (Int64, Int64, Int64, Int64)
        ) throws(FlashAttentionError) -> TensorArgument {
            if strides.3 != 1 { throw .invalidStride("\(name)_dim_stride (\(strides.3)) must be 1") }
            return TensorArgument(
                name: name, pointer: pointer,
                axes: [
                    (batch, Int(strides.0), "\(name)_batch_stride"),
                    (seqlen, Int(strides.1), "\(name)_row_stride"),
                    (heads, Int(strides.2), "\(name)_head_stride"), (headDim, 1, "\(name)_dim_stride"),
                ])
        }
        let q = try tensor(
            "q", params.q, seqlen: seqlenQ, heads: headsQ,
            (params.q_batch_stride, params.q_row_stride, params.q_head_stride, params.q_dim_stride))
        let k = try tensor(
            "k", params.k, seqlen: seqlenK, heads: headsKV,
            (params.k_batch_stride, params.k_row_stride, params.k_head_stride, params.k_dim_stride))
        let v = try tensor(
            "v", params.v, seqlen: seqlenK, heads: headsKV,
            (params.v_batch_stride, params.v_row_stride, params.v_head_stride, params.v_dim_stride))
        let out = try tensor(
            "out", UnsafeRawPointer(params.out), seqlen: seqlenQ, heads: headsQ,
            (params.out_batch_stride, params.out_row_stride, params.out_head_stride, params.out_dim_stride))
        let lse: TensorArgument? = params.lse.map {
            TensorArgument(
                name: "lse", pointer: UnsafeRawPointer($0),
                axes: [
                    (batch, Int(params.lse_batch_stride), "lse_batch_stride"),
                    (headsQ, Int(params.lse_head_stride), "lse_head_stride"),
                    (seqlenQ, Int(params.lse_row_stride), "lse_row_stride"),
                ])
        }

        let qRange = try q.validate(), kRange = try k.validate(), vRange = try v.validate()
        let outRange = try out.validate()
        let lseRange = try lse?.validate()
        if outRange != nil { try out.validateNoSelfOverlap() }
        if lseRange != nil { try lse?.validateNoSelfOverlap() }
        if let outRange {
            for (input, range) in [(k, kRange), (v, vRange)] where range.map(outRange.overlaps) == true {
                throw .invalidArgument("out overlaps \(input.name); outputs must not alias k or v")
            }
            if let qRange, outRange.overlaps(qRange), !out.sameView(as: q) {
                throw .invalidArgument("out partially overlaps q; it must be either the same view as q or disjoint")
            }
        }
        if let lseRange {
            for (other, range) in [(q, qRange), (k, kRange), (v, vRange), (out, outRange)]
            where range.map(lseRange.overlaps) == true {
                throw .invalidArgument("lse overlaps \(other.name); outputs must not alias other tensors")
            }
        }

        // A tensor with no elements is never read or written; its view is pinned to a dummy address with
        // zero strides so that no offset computed from the caller's (unchecked) strides can overflow.
        func strided(_ t: TensorArgument, _ range: AddressRange?) -> (UnsafeMutablePointer<Float>, [Int]) {
            guard range != nil, let pointer = t.pointer else { return (emptyTensor, [0, 0, 0]) }
            return (UnsafeMutablePointer(mutating: pointer.assumingMemoryBound(to: Float.self)), t.axes.map(\.stride))
        }
        func view(_ t: TensorArgument, _ range: AddressRange?) -> TensorView {
            let (base, s) = strided(t, range)
            return TensorView(base: base, batchStride: s[0], rowStride: s[1], headStride: s[2])
        }
        let lseView = lse.map { t -> LSEView in
            let (base, s) = strided(t, lseRange)
            return LSEView(base: base, batchStride: s[0], headStride: s[1], rowStride: s[2])
        }
        let scale = params.softmax_scale == 0 ? 1 / Float(headDim).squareRoot() : params.softmax_scale
        let problem = AttentionProblem(
            batch: batch, seqlenQ: seqlenQ, seqlenK: seqlenK, headsQ: headsQ, headsKV: headsKV, headDim: headDim,
            q: view(q, qRange), k: view(k, kRange), v: view(v, vRange), out: view(out, outRange), lse: lseView, scale: scale,
            causal: params.causal != 0)
        return (problem, ForwardOptions(numThreads: Int(params.num_threads), algorithm: params.algorithm))
    }
}

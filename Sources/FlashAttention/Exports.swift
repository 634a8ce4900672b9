import CFlashAttention
import FlashAttentionCore

/// The C entry points declared in include/flash_attention.h. `@c @implementation` makes the compiler check
/// each signature against the header. Each function is a thin layer: read and widen the params, validate
/// into a problem (Validation.swift), run it (Dispatch.swift), report errors (Errors.swift).

@c @implementation
public func flash_attention_version() -> Int32 {
    FA_VERSION_MAJOR * 10000 + FA_VERSION_MINOR * 100 + FA_VERSION_PATCH
}

@c @implementation
public func flash_attention_version_string() -> UnsafePointer<CChar>! {
    // Kept equal to FA_VERSION_MAJOR.MINOR.PATCH by a test.
    cString("0.6.0")
}

@c @implementation
public func flash_attention_abi_version() -> Int32 {
    FA_ABI_VERSION
}

@c @implementation
public func flash_attention_status_string(_ status: flash_attention_status) -> UnsafePointer<CChar>! {
    cString(statusDescription(status))
}

@c @implementation
public func flash_attention_last_error() -> UnsafePointer<CChar>! {
    LastError.current()
}

/// Params struct sizes this library accepts: every size a released header has had (fields are only
/// appended, so a smaller struct is a prefix of the current one).
let knownParamsSizes: [Int] = [
    Int(FA_PARAMS_SIZE_V1), Int(FA_PARAMS_SIZE_V2), Int(FA_PARAMS_SIZE_V3), Int(FA_PARAMS_SIZE_V4),
    Int(FA_PARAMS_SIZE_V5), MemoryLayout<flash_attention_params>.size,
]

@c @implementation
public func flash_attention_params_init(
    _ params: UnsafeMutablePointer<flash_attention_params>!, _ struct_size: Int
) -> flash_attention_status {
    withStatus { () throws(FlashAttentionError) in
        guard let params else { throw .nullPointer("params is NULL") }
        guard knownParamsSizes.contains(struct_size) else {
            throw .unsupported(
                "struct_size (\(struct_size)) is not a flash_attention_params size this library knows"
                    + " (\(knownParamsSizes.map(String.init).joined(separator: ", ")))")
        }
        var defaults = defaultParams()
        defaults.struct_size = UInt64(struct_size)
        UnsafeMutableRawPointer(params).copyMemory(from: &defaults, byteCount: struct_size)
    }
}

@c @implementation
public func flash_attention_forward(_ params: UnsafePointer<flash_attention_params>!) -> flash_attention_status {
    forward(params, entry: .dense)
}

@c @implementation
public func flash_attention_forward_varlen(_ params: UnsafePointer<flash_attention_params>!) -> flash_attention_status {
    forward(params, entry: .varlen)
}

@c @implementation
public func flash_attention_forward_kvcache(_ params: UnsafePointer<flash_attention_params>!) -> flash_attention_status {
    forward(params, entry: .kvcache)
}

/// The three forward entry points differ only in how the params describe the sequences.
func forward(_ params: UnsafePointer<flash_attention_params>?, entry: Entry) -> flash_attention_status {
    withStatus { () throws(FlashAttentionError) in
        let (problem, options, append, _) = try AttentionProblem.validated(try widen(params), entry: entry)
        try runForward(problem, options: options, append: append)
    }
}

@c @implementation
public func flash_attention_merge(
    _ rows: Int64, _ head_dim: Int64, _ out_a: UnsafePointer<Float>!, _ out_a_row_stride: Int64,
    _ lse_a: UnsafePointer<Float>!, _ lse_a_stride: Int64, _ out_b: UnsafePointer<Float>!,
    _ out_b_row_stride: Int64, _ lse_b: UnsafePointer<Float>!, _ lse_b_stride: Int64,
    _ out: UnsafeMutablePointer<Float>!, _ out_row_stride: Int64, _ lse: UnsafeMutablePointer<Float>!,
    _ lse_stride: Int64
) -> flash_attention_status {
    withStatus { () throws(FlashAttentionError) in
        if rows < 0 { throw .invalidShape("rows (\(rows)) must be >= 0") }
        if head_dim < 1 { throw .invalidShape("head_dim (\(head_dim)) must be >= 1") }
        let (n, d) = (Int(rows), Int(head_dim))
        func matrix(_ name: StaticString, _ p: UnsafeRawPointer?, _ stride: Int64, _ field: StaticString, columns: Int) -> TensorArgument {
            let unit = Axis(size: 1, stride: 0, field: "")
            return TensorArgument(name, p, unit, unit, Axis(size: n, stride: Int(stride), field: field),
                                  Axis(size: columns, stride: 1, field: ""))
        }
        let outA = matrix("out_a", out_a, out_a_row_stride, "out_a_row_stride", columns: d)
        let outB = matrix("out_b", out_b, out_b_row_stride, "out_b_row_stride", columns: d)
        let lseA = matrix("lse_a", lse_a, lse_a_stride, "lse_a_stride", columns: 1)
        let lseB = matrix("lse_b", lse_b, lse_b_stride, "lse_b_stride", columns: 1)
        let target = matrix("out", out, out_row_stride, "out_row_stride", columns: d)
        let targetLSE = matrix("lse", lse, lse_stride, "lse_stride", columns: 1)
        let ranges = (try outA.validate(), try outB.validate(), try lseA.validate(), try lseB.validate())
        guard let outRange = try target.validate(), let lseRange = try targetLSE.validate() else { return }
        try target.validateNoSelfOverlap()
        try targetLSE.validateNoSelfOverlap()
        // In place over side a is allowed; any other overlap would let a write change a value still to be read.
        if outRange.overlaps(ranges.0) && !target.sameView(as: outA) {
            throw .invalidArgument("out partially overlaps out_a; it must be either out_a itself or disjoint")
        }
        if lseRange.overlaps(ranges.2) && !targetLSE.sameView(as: lseA) {
            throw .invalidArgument("lse partially overlaps lse_a; it must be either lse_a itself or disjoint")
        }
        for (name, range) in [("out_b", ranges.1), ("lse_b", ranges.3)] where outRange.overlaps(range) || lseRange.overlaps(range) {
            throw .invalidArgument("the merged outputs overlap \(name)")
        }
        if outRange.overlaps(lseRange) || outRange.overlaps(ranges.2) || lseRange.overlaps(ranges.0) {
            throw .invalidArgument("out and lse overlap each other or the other side's tensors")
        }
        mergeAttentionStates(
            rows: n, headDim: d, outA: out_a, outAStride: Int(out_a_row_stride), lseA: lse_a, lseAStride: Int(lse_a_stride),
            outB: out_b, outBStride: Int(out_b_row_stride), lseB: lse_b, lseBStride: Int(lse_b_stride), out: out,
            outStride: Int(out_row_stride), lse: lse, lseStride: Int(lse_stride))
    }
}

@c @implementation
public func flash_attention_backward_params_init(
    _ params: UnsafeMutablePointer<flash_attention_backward_params>!, _ struct_size: Int
) -> flash_attention_status {
    withStatus { () throws(FlashAttentionError) in
        guard let params else { throw .nullPointer("params is NULL") }
        guard struct_size == MemoryLayout<flash_attention_backward_params>.size else {
            throw .unsupported(
                "struct_size (\(struct_size)) is not a flash_attention_backward_params size this library knows"
                    + " (\(MemoryLayout<flash_attention_backward_params>.size))")
        }
        var defaults = flash_attention_backward_params()
        defaults.struct_size = UInt64(struct_size)
        (defaults.dout_dim_stride, defaults.dq_dim_stride, defaults.dk_dim_stride, defaults.dv_dim_stride) = (1, 1, 1, 1)
        params.pointee = defaults
    }
}

@c @implementation
public func flash_attention_backward(_ params: UnsafePointer<flash_attention_backward_params>!) -> flash_attention_status {
    withStatus { () throws(FlashAttentionError) in
        guard let params else { throw .nullPointer("params is NULL") }
        let size = params.pointee.struct_size
        guard size == UInt64(MemoryLayout<flash_attention_backward_params>.size) else {
            throw .unsupported(
                "params->struct_size (\(size)) is not a flash_attention_backward_params size this library knows;"
                    + " initialise params with flash_attention_backward_params_init(&params, sizeof params)")
        }
        let (problem, options) = try BackwardProblem.validated(params.pointee)
        try runBackward(problem, options: options)
    }
}

@c @implementation
public func flash_attention_kernel_isa() -> UnsafePointer<CChar>! {
    cString(KernelSelection.reportedName)
}

@c @implementation
public func flash_attention_available_isas() -> UnsafePointer<CChar>! {
    KernelSelection.availableNames
}

@c @implementation
public func flash_attention_default_num_threads() -> Int32 {
    Int32(clamping: ThreadPool.onlineCores)
}

/// Defaults of every field: zero, except the dim strides (1).
func defaultParams() -> flash_attention_params {
    var params = flash_attention_params()
    params.struct_size = UInt64(MemoryLayout<flash_attention_params>.size)
    params.q_dim_stride = 1
    params.k_dim_stride = 1
    params.v_dim_stride = 1
    params.out_dim_stride = 1
    params.k_new_dim_stride = 1
    params.v_new_dim_stride = 1
    params.window_left = -1
    params.window_right = -1
    params.kv_new_dtype = -1
    params.attn_mask_col_stride = 1
    return params
}

/// Copies a caller's params of any known size over the defaults, so fields the caller's header did not
/// have take their default values.
func widen(_ params: UnsafePointer<flash_attention_params>?) throws(FlashAttentionError) -> flash_attention_params {
    guard let params else { throw .nullPointer("params is NULL") }
    let size = UnsafeRawPointer(params).load(as: UInt64.self)
    guard let known = knownParamsSizes.first(where: { UInt64($0) == size }) else {
        throw .unsupported(
            "params->struct_size (\(size)) is not a flash_attention_params size this library knows"
                + " (\(knownParamsSizes.map(String.init).joined(separator: ", "))); initialise params with"
                + " flash_attention_params_init(&params, sizeof params)")
    }
    var widened = defaultParams()
    withUnsafeMutableBytes(of: &widened) { $0.baseAddress!.copyMemory(from: params, byteCount: known) }
    return widened
}

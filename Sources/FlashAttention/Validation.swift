import CFlashAttention
import FlashAttentionCore

/// Turns a caller's `flash_attention_params` into a trusted `AttentionProblem`, or throws an error that
/// names the offending argument and value. Everything a kernel relies on is checked here, before any
/// memory is read or written: sizes, options, NULLs, alignment, every stride's addressed range (with
/// overflow checks), every index read from caller memory, and that outputs overlap neither themselves nor
/// any input. The success path allocates nothing: names are static strings, messages are built only when
/// an error is thrown.

/// Which entry point the params came through.
enum Entry {
    case dense, varlen, kvcache
}

/// Byte interval [lower, upper) that an argument addresses.
/// Where a validated forward call's tensors and arrays lie, for a caller that adds outputs of its own (the
/// backward). Plain fields, so the forward's small calls pay nothing for it; `named` lists them on demand.
struct InputRanges {
    var q, k, v, out, lse, alibi, sinks, mask: AddressRange?
    var indices: (AddressRange?, AddressRange?, AddressRange?)
    var varlen: Bool

    var named: [(String, AddressRange?)] {
        [("q", q), ("k", k), ("v", v), ("out", out), ("lse", lse), ("alibi_slopes", alibi), ("sinks", sinks),
         ("attn_mask", mask),
         (varlen ? "cu_seqlens_q" : "cache_seqlens", indices.0), (varlen ? "cu_seqlens_k" : "cache_batch_idx", indices.1),
         ("block_table", indices.2)]
    }
}

struct AddressRange {
    let lower: UInt
    let upper: UInt
    func overlaps(_ other: AddressRange?) -> Bool { other.map { lower < $0.upper && $0.lower < upper } ?? false }
}

/// The end of the addresses a process's buffers can have: x86-64 Linux and macOS hand out user addresses below
/// 2^47 (Linux above it only on request), aarch64 Linux below 2^48. A range reaching past it is no buffer but a
/// stride too large for its elements: with 1-byte elements (masks, 8-bit caches) a stride of 2^62 does not
/// overflow int64 bytes, yet its addresses are not canonical and the first read would fault.
#if arch(arm64) && os(Linux)
let userAddressLimit: UInt = 1 << 48
#else
let userAddressLimit: UInt = 1 << 47
#endif

/// One axis of a strided argument: its size, its stride in elements, and the stride's field name.
struct Axis {
    var size: Int
    var stride: Int
    var field: StaticString
}

/// One strided argument as the caller described it (up to four axes, innermost last).
struct TensorArgument {
    let name: StaticString
    let pointer: UnsafeRawPointer?
    let elementSize: Int
    let axes: (Axis, Axis, Axis, Axis)

    init(_ name: StaticString, _ pointer: UnsafeRawPointer?, elementSize: Int = 4, _ a: Axis, _ b: Axis, _ c: Axis, _ d: Axis) {
        self.name = name
        self.pointer = pointer
        self.elementSize = elementSize
        axes = (a, b, c, d)
    }

    /// A 1-D argument of `count` contiguous elements.
    init(_ name: StaticString, _ pointer: UnsafeRawPointer?, elementSize: Int = 4, count: Int) {
        let unit = Axis(size: 1, stride: 0, field: "")
        self.init(name, pointer, elementSize: elementSize, unit, unit, unit, Axis(size: count, stride: 1, field: ""))
    }

    func axis(_ i: Int) -> Axis {
        switch i {
        case 0: return axes.0
        case 1: return axes.1
        case 2: return axes.2
        default: return axes.3
        }
    }

    /// Checks the pointer and strides; returns the addressed bytes, or nil for an argument with no elements
    /// (whose pointer may then be NULL and whose strides are never used).
    func validate() throws(FlashAttentionError) -> AddressRange? {
        var count = 1
        for i in 0..<4 {
            let (product, overflow) = count.multipliedReportingOverflow(by: axis(i).size)
            if overflow { throw .invalidShape("\(name) has more elements than int64 can count") }
            count = product
        }
        if count == 0 { return nil }
        guard let pointer else { throw .nullPointer("\(name) is NULL but has \(count) elements") }
        let address = UInt(bitPattern: pointer)
        if address % UInt(elementSize) != 0 {
            throw .invalidArgument("\(name) (0x\(String(address, radix: 16))) is not aligned to \(elementSize) bytes")
        }
        // Lowest and highest element offsets over all indices, from the per-axis extremes.
        var low = 0, high = 0
        for i in 0..<4 {
            let a = axis(i)
            let (extent, overflow) = (a.size - 1).multipliedReportingOverflow(by: a.stride)
            if overflow { throw .invalidStride("\(a.field) (\(a.stride)) × \(a.size - 1) overflows int64") }
            let (sum, sumOverflow) = extent < 0 ? low.addingReportingOverflow(extent) : high.addingReportingOverflow(extent)
            if sumOverflow { throw .invalidStride("\(name): its strides address a range that overflows int64") }
            if extent < 0 { low = sum } else { high = sum }
        }
        // Every step is checked before its result is used: a wrapped value must never reach a conversion.
        let outside = FlashAttentionError.invalidStride("\(name): its strides address memory outside the address space")
        let (lowBytes, lowOverflow) = low.multipliedReportingOverflow(by: elementSize)
        let (highBytes, highOverflow) = high.multipliedReportingOverflow(by: elementSize)
        if lowOverflow || highOverflow { throw outside }
        let (lower, underflow) = address.subtractingReportingOverflow(lowBytes.magnitude)
        let (upper, beyond) = address.addingReportingOverflow(highBytes.magnitude + UInt(elementSize))
        if underflow || beyond || upper > userAddressLimit { throw outside }
        return AddressRange(lower: lower, upper: upper)
    }

    /// Checks that no two distinct elements share an address, so concurrent writes never collide. Sufficient
    /// rule: sorted by |stride|, each axis steps past everything the smaller axes reach.
    func validateNoSelfOverlap() throws(FlashAttentionError) {
        var order = (0, 1, 2, 3)
        withUnsafeMutableBytes(of: &order) { raw in
            let o = raw.bindMemory(to: Int.self)
            for i in 1..<4 {  // insertion sort by |stride|
                var j = i
                while j > 0 && axis(o[j - 1]).stride.magnitude > axis(o[j]).stride.magnitude {
                    o.swapAt(j - 1, j)
                    j -= 1
                }
            }
        }
        var reach: UInt = 0
        for position in 0..<4 {
            let a = axis(withUnsafeBytes(of: order) { $0.load(fromByteOffset: position * MemoryLayout<Int>.stride, as: Int.self) })
            if a.size <= 1 { continue }
            if a.stride.magnitude <= reach {
                throw .invalidStride(
                    "\(a.field) (\(a.stride)) makes distinct elements of \(name) overlap; an output needs"
                        + " non-overlapping strides")
            }
            reach += UInt(a.size - 1) * a.stride.magnitude
        }
    }

    func sameView(as other: TensorArgument) -> Bool {
        pointer == other.pointer && (0..<4).allSatisfy { axis($0).stride == other.axis($0).stride && axis($0).size == other.axis($0).size }
    }
}

/// A stand-in address for tensors with no elements: never dereferenced, and their strides become 0.
nonisolated(unsafe) private let emptyTensor = UnsafeMutablePointer<Float>.allocate(capacity: 1)

/// A [batch, rows, heads, dim] tensor argument; `ignoreBatch` (varlen) pins the batch stride to 0.
func tensor4(
    _ name: StaticString, _ pointer: UnsafeRawPointer?, _ element: ElementType, _ batch: Int, _ rows: Int,
    _ heads: Int, _ dim: Int,
    _ batchStride: Int64, _ rowStride: Int64, _ headStride: Int64, _ dimStride: Int64,
    _ fields: (StaticString, StaticString, StaticString, StaticString), ignoreBatch: Bool = false
) -> TensorArgument {
    TensorArgument(
        name, pointer, elementSize: element.size, Axis(size: batch, stride: ignoreBatch ? 0 : Int(batchStride), field: fields.0),
        Axis(size: rows, stride: Int(rowStride), field: fields.1), Axis(size: heads, stride: Int(headStride), field: fields.2),
        Axis(size: dim, stride: Int(dimStride), field: fields.3))
}

/// A tensor with no elements is never read or written; its view is pinned to a dummy address with zero
/// strides so that no offset computed from the caller's (unchecked) strides can overflow.
func strided(_ t: TensorArgument, _ range: AddressRange?) -> (UnsafeMutablePointer<Float>, Int, Int, Int, Int) {
    guard range != nil, let pointer = t.pointer else { return (emptyTensor, 0, 0, 0, 0) }
    return (UnsafeMutablePointer(mutating: pointer.assumingMemoryBound(to: Float.self)),
            t.axes.0.stride, t.axes.1.stride, t.axes.2.stride, t.axes.3.stride)
}

func view(_ t: TensorArgument, _ range: AddressRange?, _ element: ElementType, scale: ScaleView? = nil) -> TensorView {
    let (base, b, r, h, _) = strided(t, range)
    return TensorView(
        base: UnsafeMutableRawPointer(base), element: element, batchStride: b, rowStride: r, headStride: h, scale: scale)
}

/// A float element type (q, out, gradients, dense and varlen k/v, k_new/v_new).
func floatType(_ code: flash_attention_dtype, _ field: StaticString) throws(FlashAttentionError) -> ElementType {
    guard let type = ElementType(rawValue: code), !type.isQuantized else {
        throw .invalidArgument(
            "\(field) (\(code)) must be FA_DTYPE_FLOAT32 (0), FA_DTYPE_FLOAT16 (1) or FA_DTYPE_BFLOAT16 (2)"
                + (code == FA_DTYPE_INT8 || code == FA_DTYPE_FLOAT8_E4M3 ? "; 8-bit types are for KV caches only" : ""))
    }
    return type
}

/// A KV cache's element type: a float type or an 8-bit one.
func cacheType(_ code: flash_attention_dtype) throws(FlashAttentionError) -> ElementType {
    guard let type = ElementType(rawValue: code) else {
        throw .invalidArgument(
            "kv_dtype (\(code)) must be FA_DTYPE_FLOAT32 (0), FA_DTYPE_FLOAT16 (1), FA_DTYPE_BFLOAT16 (2), FA_DTYPE_INT8 (3)"
                + " or FA_DTYPE_FLOAT8_E4M3 (4)")
    }
    return type
}

func checkDimStride(_ t: TensorArgument) throws(FlashAttentionError) {
    if t.axes.3.stride != 1 { throw .invalidStride("\(t.axes.3.field) (\(t.axes.3.stride)) must be 1") }
}

/// ALiBi slopes and sinks must be finite: a NaN or infinite bias would silently poison or empty rows.
func checkFinite(_ t: TensorArgument, _ name: StaticString) throws(FlashAttentionError) {
    guard let base = t.pointer?.assumingMemoryBound(to: Float.self) else { return }
    // A zero batch stride repeats one row for every batch entry (and batch may be huge when nothing else is).
    let rows = t.axes.2.stride == 0 ? min(t.axes.2.size, 1) : t.axes.2.size
    for outer in 0..<rows {
        for i in 0..<t.axes.3.size {
            let x = base[outer * t.axes.2.stride + i * t.axes.3.stride]
            if !x.isFinite { throw .invalidArgument("\(name) has a non-finite value (\(x)) at index \(outer * t.axes.3.size + i)") }
        }
    }
}

import CFlashAttention
import FlashAttentionCore

/// The value types of the Swift API (SwiftAPI.swift): a dense tensor, the options, the results and the typed
/// error. They hold Swift arrays, so the C pointers and status codes never reach the caller.

/// A float32 tensor [batch, seqlen, heads, headDim] stored densely in that order, FlashAttention's layout, so
/// it is handed to the library without a copy.
public struct AttentionTensor: Equatable, Sendable {
    public let batch: Int
    public let seqlen: Int
    public let heads: Int
    public let headDim: Int
    /// Element (b, s, h, d) is at ((b · seqlen + s) · heads + h) · headDim + d. Settable only through the
    /// subscript, so the count always matches the shape: the library trusts it when it reads or writes.
    public private(set) var values: [Float]

    /// Wraps `values` laid out as [batch, seqlen, heads, headDim]; throws `.invalidShape` if a size is negative
    /// or the count does not match.
    public init(batch: Int, seqlen: Int, heads: Int, headDim: Int, values: [Float]) throws(AttentionError) {
        let count = try elementCount([batch, seqlen, heads, headDim])
        guard values.count == count else {
            throw .invalidShape(
                "values has \(values.count) elements but the shape [\(batch), \(seqlen), \(heads), \(headDim)] needs \(count)")
        }
        (self.batch, self.seqlen, self.heads, self.headDim) = (batch, seqlen, heads, headDim)
        self.values = values
    }

    /// A tensor with every element `value`; traps on a negative size, as `Array(repeating:count:)` does.
    public init(batch: Int, seqlen: Int, heads: Int, headDim: Int, repeating value: Float = 0) {
        (self.batch, self.seqlen, self.heads, self.headDim) = (batch, seqlen, heads, headDim)
        values = [Float](repeating: value, count: checkedElementCount([batch, seqlen, heads, headDim]))
    }

    /// [batch, seqlen, heads, headDim].
    public var shape: [Int] { [batch, seqlen, heads, headDim] }

    public subscript(b: Int, s: Int, h: Int, d: Int) -> Float {
        get { values[denseIndex((batch, seqlen, heads, headDim), b, s, h, d)] }
        set { values[denseIndex((batch, seqlen, heads, headDim), b, s, h, d)] = newValue }
    }

    /// Write access for the library (outputs and an appended KV cache); the count cannot change.
    mutating func withMutableValues<R>(_ body: (UnsafeMutableBufferPointer<Float>) -> R) -> R {
        values.withUnsafeMutableBufferPointer { body($0) }
    }
}

/// An 8-bit KV-cache tensor [batch, seqlen, heads, headDim] with one float32 scale per row of headDim values:
/// element (b, s, h, d) stands for its value × scale(b, s, h). A quarter of a float32 cache's memory, read by
/// the library as it is (dense, in that order, no copy) and dequantized in registers.
public struct QuantizedTensor: Equatable, Sendable {
    /// How the bytes encode values; the C header's FA_DTYPE_INT8 and FA_DTYPE_FLOAT8_E4M3.
    public enum Format: Equatable, Sendable {
        /// Symmetric int8: scale = max|x| / 127, values rounded to nearest even and clamped to ±127.
        case int8
        /// OCP FP8 E4M3FN (no infinities): scale = max|x| / 448, values rounded to nearest even.
        case float8E4M3
    }

    public let format: Format
    public let batch: Int
    public let seqlen: Int
    public let heads: Int
    public let headDim: Int
    /// The elements' bytes, densely [batch, seqlen, heads, headDim]: two's-complement int8 or E4M3FN bit
    /// patterns. Settable only through appends, so the count always matches the shape (the library trusts it).
    public private(set) var values: [UInt8]
    /// The row scales, densely [batch, seqlen, heads]; an append writes those of its rows.
    public private(set) var scales: [Float]

    /// Wraps quantized `values` and their row `scales`; throws `.invalidShape` if a size is negative or a count
    /// does not match the shape.
    public init(
        format: Format, batch: Int, seqlen: Int, heads: Int, headDim: Int, values: [UInt8], scales: [Float]
    ) throws(AttentionError) {
        let rows = try elementCount([batch, seqlen, heads])
        let count = try elementCount([rows, headDim])
        guard values.count == count, scales.count == rows else {
            throw .invalidShape(
                "values and scales have \(values.count) and \(scales.count) elements but the shape [\(batch), \(seqlen), "
                    + "\(heads), \(headDim)] needs \(count) and \(rows)")
        }
        self.init(format, [batch, seqlen, heads, headDim], values, scales)
    }

    /// An empty cache (every value and scale 0) to append to; traps on a negative size, as `Array` does.
    public init(format: Format, batch: Int, seqlen: Int, heads: Int, headDim: Int) {
        let rows = checkedElementCount([batch, seqlen, heads])
        self.init(format, [batch, seqlen, heads, headDim], [UInt8](repeating: 0, count: checkedElementCount([rows, headDim])),
                  [Float](repeating: 0, count: rows))
    }

    /// Quantizes `tensor` row by row exactly as the library quantizes the rows it appends (the same function),
    /// so a cache filled here and one filled by appends hold the same bytes.
    public init(quantizing tensor: AttentionTensor, as format: Format) {
        var quantized = QuantizedTensor(
            format: format, batch: tensor.batch, seqlen: tensor.seqlen, heads: tensor.heads, headDim: tensor.headDim)
        let (rows, dim) = (quantized.scales.count, tensor.headDim)
        quantized.withMutableStorage { values, scales in
            tensor.values.withUnsafeBufferPointer { source in
                for row in 0..<rows where dim > 0 {
                    scales![row] = quantizeRow(source.baseAddress! + row * dim, count: dim, element: format.element,
                                               into: values! + row * dim)
                }
            }
        }
        self = quantized
    }

    private init(_ format: Format, _ shape: [Int], _ values: [UInt8], _ scales: [Float]) {
        (self.format, self.batch, self.seqlen, self.heads, self.headDim) = (format, shape[0], shape[1], shape[2], shape[3])
        (self.values, self.scales) = (values, scales)
    }

    /// [batch, seqlen, heads, headDim].
    public var shape: [Int] { [batch, seqlen, heads, headDim] }

    /// Element (b, s, h, d) dequantized: its value × its row's scale.
    public subscript(b: Int, s: Int, h: Int, d: Int) -> Float {
        let index = denseIndex((batch, seqlen, heads, headDim), b, s, h, d)
        return values.withUnsafeBytes { format.element.load($0.baseAddress! + index) } * scales[index / headDim]
    }

    /// The float32 tensor this one stands for (what the attention is exact over).
    public func dequantized() -> AttentionTensor {
        var out = AttentionTensor(batch: batch, seqlen: seqlen, heads: heads, headDim: headDim)
        for b in 0..<batch { for s in 0..<seqlen { for h in 0..<heads { for d in 0..<headDim {
            out[b, s, h, d] = self[b, s, h, d]
        } } } }
        return out
    }

    /// Write access for the library (an append): the values' and scales' base addresses.
    mutating func withMutableStorage<R>(_ body: (UnsafeMutableRawPointer?, UnsafeMutablePointer<Float>?) -> R) -> R {
        values.withUnsafeMutableBytes { v in scales.withUnsafeMutableBufferPointer { body(v.baseAddress, $0.baseAddress) } }
    }
}

extension QuantizedTensor.Format {
    /// The library's element type (its FA_DTYPE_* code is the raw value).
    var element: ElementType {
        switch self {
        case .int8: .int8
        case .float8E4M3: .float8e4m3
        }
    }
}

/// What `Attention.forwardKVCache` needs of a cache tensor, so that one implementation serves float32 and 8-bit
/// caches: its shape, its FA_DTYPE_* and write access to its elements and row scales (nil for float32).
protocol KVCacheStorage {
    var batch: Int { get }
    var seqlen: Int { get }
    var heads: Int { get }
    var headDim: Int { get }
    var shape: [Int] { get }
    var dtype: flash_attention_dtype { get }
    mutating func withMutableStorage<R>(_ body: (UnsafeMutableRawPointer?, UnsafeMutablePointer<Float>?) -> R) -> R
}

extension AttentionTensor: KVCacheStorage {
    var dtype: flash_attention_dtype { FA_DTYPE_FLOAT32 }

    mutating func withMutableStorage<R>(_ body: (UnsafeMutableRawPointer?, UnsafeMutablePointer<Float>?) -> R) -> R {
        withMutableValues { body(UnsafeMutableRawPointer($0.baseAddress), nil) }
    }
}

extension QuantizedTensor: KVCacheStorage {
    var dtype: flash_attention_dtype { format.element.rawValue }
}

/// The element count of a tensor of `sizes`; throws `.invalidShape` for a negative size or an overflow.
private func elementCount(_ sizes: [Int]) throws(AttentionError) -> Int {
    var count = 1
    for size in sizes {
        guard size >= 0 else { throw .invalidShape("tensor sizes \(sizes) must be >= 0") }
        let (product, overflow) = count.multipliedReportingOverflow(by: size)
        guard !overflow else { throw .invalidShape("tensor sizes \(sizes) have more elements than Int can count") }
        count = product
    }
    return count
}

/// `elementCount` for the non-throwing initialisers, which trap as `Array(repeating:count:)` does.
private func checkedElementCount(_ sizes: [Int]) -> Int {
    do { return try elementCount(sizes) } catch { preconditionFailure(error.message) }
}

/// The offset of element (b, s, h, d) of a dense [batch, seqlen, heads, headDim] tensor; traps when out of range.
@inline(__always)
private func denseIndex(_ shape: (Int, Int, Int, Int), _ b: Int, _ s: Int, _ h: Int, _ d: Int) -> Int {
    precondition(
        0 <= b && b < shape.0 && 0 <= s && s < shape.1 && 0 <= h && h < shape.2 && 0 <= d && d < shape.3,
        "index (\(b), \(s), \(h), \(d)) out of range for shape \([shape.0, shape.1, shape.2, shape.3])")
    return ((b * shape.1 + s) * shape.2 + h) * shape.3 + d
}

/// A mask over the scores, added after softcap and ALiBi: values [batch or 1, heads or 1, rows, cols], row-major
/// (an axis of 1 is shared by every batch entry or head). 0 keeps a score, −∞ hides it, other values bias it.
/// Rows and columns are query and key positions within a sequence (for a KV cache, cache positions).
public struct ScoreMask: Equatable, Sendable {
    public let batch: Int
    public let heads: Int
    public let rows: Int
    public let cols: Int
    public let values: [Float]

    public init(batch: Int = 1, heads: Int = 1, rows: Int, cols: Int, values: [Float]) throws(AttentionError) {
        guard batch >= 1, heads >= 1, rows >= 0, cols >= 0, values.count == batch * heads * rows * cols else {
            throw .invalidShape(
                "ScoreMask [\(batch), \(heads), \(rows), \(cols)] needs \(batch * heads * rows * cols) values, got \(values.count)")
        }
        (self.batch, self.heads, self.rows, self.cols, self.values) = (batch, heads, rows, cols, values)
    }

    /// A boolean mask: true attends (0), false hides (−∞).
    public init(batch: Int = 1, heads: Int = 1, rows: Int, cols: Int, attends: [Bool]) throws(AttentionError) {
        try self.init(batch: batch, heads: heads, rows: rows, cols: cols, values: attends.map { $0 ? 0 : -.infinity })
    }
}

/// Everything about an attention call except its tensors. The defaults are plain softmax attention over every
/// key on every core.
public struct AttentionOptions: Equatable, Sendable {
    /// Which implementation runs; `.reference` is the slow float64-accumulating loop, for testing.
    public enum Algorithm: Equatable, Sendable {
        /// The tiled SIMD kernel where the CPU has AVX2 + FMA, the reference loop elsewhere.
        case auto
        case reference
        /// The tiled kernel, or `AttentionError.unsupported` on a CPU without its instructions.
        case tiled
    }

    /// Multiplies Q Kᵀ; nil means 1 / √headDim.
    public var scale: Float?
    /// Bottom-right aligned causal mask: query i sees key j iff j ≤ i + seqlenK − seqlenQ.
    public var causal: Bool
    /// Sliding window around that diagonal: key j is visible iff
    /// i + seqlenK − seqlenQ − windowLeft ≤ j ≤ i + seqlenK − seqlenQ + windowRight; nil is unbounded.
    public var windowLeft: Int?
    public var windowRight: Int?
    /// score ← softcap · tanh(score / softcap) before ALiBi and masking; nil (or 0) is off.
    public var softcap: Float?
    /// ALiBi slopes, [headsQ] shared by every batch or [batch, headsQ]; adds −slope · |i + seqlenK − seqlenQ − j|.
    public var alibiSlopes: [Float]?
    /// Attention-sink logits [headsQ]: they join each row's softmax denominator and contribute no value.
    public var sinks: [Float]?
    /// 0: every online core; 1: the calling thread only. Results are bitwise identical for every value.
    public var numThreads: Int
    public var algorithm: Algorithm
    /// A mask over the scores (see `ScoreMask`), combined with every option above; nil is none.
    public var mask: ScoreMask?
    /// Attention dropout in [0, 1) (forward and backward, not the KV cache): probabilities kept with probability
    /// 1 − dropout and scaled by 1 / (1 − dropout); the mask is a function of `dropoutSeed` and each element's
    /// (batch, head, query, key) only. Pass the forward's options to `backward`.
    public var dropout: Float
    public var dropoutSeed: UInt64

    public init(
        scale: Float? = nil, causal: Bool = false, windowLeft: Int? = nil, windowRight: Int? = nil,
        softcap: Float? = nil, alibiSlopes: [Float]? = nil, sinks: [Float]? = nil, numThreads: Int = 0,
        algorithm: Algorithm = .auto, mask: ScoreMask? = nil, dropout: Float = 0, dropoutSeed: UInt64 = 0
    ) {
        self.mask = mask
        self.dropout = dropout
        self.dropoutSeed = dropoutSeed
        self.scale = scale
        self.causal = causal
        self.windowLeft = windowLeft
        self.windowRight = windowRight
        self.softcap = softcap
        self.alibiSlopes = alibiSlopes
        self.sinks = sinks
        self.numThreads = numThreads
        self.algorithm = algorithm
    }
}

/// What a forward call returns; also the input of the backward pass, which recomputes from it.
public struct AttentionResult: Equatable, Sendable {
    /// [batch, seqlenQ, headsQ, headDim], like q. A row that sees no key is 0.
    public var out: AttentionTensor
    /// Natural-log log-sum-exp of each row's scaled scores, [batch, headsQ, seqlenQ] densely; −inf for a row that
    /// sees no key (and no sink).
    public var lse: [Float]

    public init(out: AttentionTensor, lse: [Float]) {
        self.out = out
        self.lse = lse
    }

    /// The LSE of query row `row` of head `head` in batch entry `batch`.
    public func lse(batch: Int, head: Int, row: Int) -> Float {
        precondition(0 <= head && head < out.heads && 0 <= row && row < out.seqlen, "lse index out of range")
        return lse[(batch * out.heads + head) * out.seqlen + row]
    }
}

/// Gradients of a loss with respect to a forward call's inputs.
public struct AttentionGradients: Equatable, Sendable {
    /// Shaped like q.
    public var dq: AttentionTensor
    /// Shaped like k and v; a kv head shared by several query heads (GQA) sums their gradients.
    public var dk: AttentionTensor
    public var dv: AttentionTensor
    /// [headsQ], the gradient of the sink logits; nil when the options have no sinks.
    public var dsinks: [Float]?
}

/// A rejected or failed call. Each case is one status code of the C API and carries the library's message,
/// which names the argument and the reason (e.g. "heads_q (12) is not a multiple of heads_kv (5)"). Checks
/// only the Swift layer can make (array counts against shapes) use the same cases with Swift names.
public enum AttentionError: Error, Equatable, Sendable, CustomStringConvertible {
    /// A required input is missing. The corresponding C constant is `FA_ERROR_NULL_POINTER`.
    case nullPointer(String)
    /// A size is negative, out of range or inconsistent with another. C: `FA_ERROR_INVALID_SHAPE`.
    case invalidShape(String)
    /// A stride or addressed range is not allowed. C: `FA_ERROR_INVALID_STRIDE`.
    case invalidStride(String)
    /// An option is not allowed (e.g. a non-finite scale). C: `FA_ERROR_INVALID_ARGUMENT`.
    case invalidArgument(String)
    /// A path this CPU cannot run (e.g. `.tiled` without AVX2). C: `FA_ERROR_UNSUPPORTED`.
    case unsupported(String)
    /// Scratch memory could not be allocated. C: `FA_ERROR_OUT_OF_MEMORY`.
    case outOfMemory(String)
    /// A bug in the library. C: `FA_ERROR_INTERNAL`.
    case internalError(String)
    /// An index array (sequence offsets, cache lengths, block table) is out of range or out of order.
    /// C: `FA_ERROR_INVALID_INDEX`.
    case invalidIndex(String)
    /// A status code newer than this Swift layer.
    case unknown(status: Int32, message: String)

    /// The error of a failed C call: its status code and the calling thread's last-error message.
    init(status: flash_attention_status, message: String) {
        switch status {
        case FA_ERROR_NULL_POINTER: self = .nullPointer(message)
        case FA_ERROR_INVALID_SHAPE: self = .invalidShape(message)
        case FA_ERROR_INVALID_STRIDE: self = .invalidStride(message)
        case FA_ERROR_INVALID_ARGUMENT: self = .invalidArgument(message)
        case FA_ERROR_UNSUPPORTED: self = .unsupported(message)
        case FA_ERROR_OUT_OF_MEMORY: self = .outOfMemory(message)
        case FA_ERROR_INTERNAL: self = .internalError(message)
        case FA_ERROR_INVALID_INDEX: self = .invalidIndex(message)
        default: self = .unknown(status: status, message: message)
        }
    }

    /// The C status code (`FA_ERROR_*`), for logs shared with C or Python callers.
    public var status: Int32 {
        switch self {
        case .nullPointer: FA_ERROR_NULL_POINTER
        case .invalidShape: FA_ERROR_INVALID_SHAPE
        case .invalidStride: FA_ERROR_INVALID_STRIDE
        case .invalidArgument: FA_ERROR_INVALID_ARGUMENT
        case .unsupported: FA_ERROR_UNSUPPORTED
        case .outOfMemory: FA_ERROR_OUT_OF_MEMORY
        case .internalError: FA_ERROR_INTERNAL
        case .invalidIndex: FA_ERROR_INVALID_INDEX
        case .unknown(let status, _): status
        }
    }

    /// Which argument was rejected and why.
    public var message: String {
        switch self {
        case .nullPointer(let m), .invalidShape(let m), .invalidStride(let m), .invalidArgument(let m),
            .unsupported(let m), .outOfMemory(let m), .internalError(let m), .invalidIndex(let m):
            m
        case .unknown(_, let m): m
        }
    }

    /// "<the code's fixed description>: <message>".
    public var description: String { "\(String(cString: flash_attention_status_string(status))): \(message)" }
}

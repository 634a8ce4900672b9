import CFlashAttention

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
        let count = try Self.elementCount(batch, seqlen, heads, headDim)
        guard values.count == count else {
            throw .invalidShape(
                "values has \(values.count) elements but the shape [\(batch), \(seqlen), \(heads), \(headDim)] needs \(count)")
        }
        (self.batch, self.seqlen, self.heads, self.headDim) = (batch, seqlen, heads, headDim)
        self.values = values
    }

    /// A tensor with every element `value`; traps on a negative size, as `Array(repeating:count:)` does.
    public init(batch: Int, seqlen: Int, heads: Int, headDim: Int, repeating value: Float = 0) {
        let count: Int
        do { count = try Self.elementCount(batch, seqlen, heads, headDim) } catch { preconditionFailure(error.message) }
        (self.batch, self.seqlen, self.heads, self.headDim) = (batch, seqlen, heads, headDim)
        values = [Float](repeating: value, count: count)
    }

    /// [batch, seqlen, heads, headDim].
    public var shape: [Int] { [batch, seqlen, heads, headDim] }

    public subscript(b: Int, s: Int, h: Int, d: Int) -> Float {
        get { values[index(b, s, h, d)] }
        set { values[index(b, s, h, d)] = newValue }
    }

    @inline(__always)
    private func index(_ b: Int, _ s: Int, _ h: Int, _ d: Int) -> Int {
        precondition(
            0 <= b && b < batch && 0 <= s && s < seqlen && 0 <= h && h < heads && 0 <= d && d < headDim,
            "index (\(b), \(s), \(h), \(d)) out of range for shape \(shape)")
        return ((b * seqlen + s) * heads + h) * headDim + d
    }

    /// Write access for the library (outputs and an appended KV cache); the count cannot change.
    mutating func withMutableValues<R>(_ body: (UnsafeMutableBufferPointer<Float>) -> R) -> R {
        values.withUnsafeMutableBufferPointer { body($0) }
    }

    private static func elementCount(_ sizes: Int...) throws(AttentionError) -> Int {
        var count = 1
        for size in sizes {
            guard size >= 0 else { throw .invalidShape("tensor sizes \(sizes) must be >= 0") }
            let (product, overflow) = count.multipliedReportingOverflow(by: size)
            guard !overflow else { throw .invalidShape("tensor sizes \(sizes) have more elements than Int can count") }
            count = product
        }
        return count
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

    public init(
        scale: Float? = nil, causal: Bool = false, windowLeft: Int? = nil, windowRight: Int? = nil,
        softcap: Float? = nil, alibiSlopes: [Float]? = nil, sinks: [Float]? = nil, numThreads: Int = 0,
        algorithm: Algorithm = .auto
    ) {
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

/// Storage element types and their scalar conversions. Tensors may be stored as float32, float16 or bfloat16,
/// and a KV cache also as int8 or float8 (E4M3FN) with a float32 scale per row; all arithmetic is float32. The kernel copies convert a vector at a time (their Elements.swift); the
/// scalar forms here serve the reference loop, the state merges and the kernels' row tails.

/// The element types of the C header's FA_DTYPE_* codes.
public enum ElementType: Int32, Sendable {
    case float32 = 0
    case float16 = 1
    case bfloat16 = 2
    /// 8-bit cache elements: each row stands for its values × the row's scale (ScaleView).
    case int8 = 3
    case float8e4m3 = 4

    /// Bytes per element.
    @inlinable public var size: Int {
        switch self {
        case .float32: return 4
        case .float16, .bfloat16: return 2
        case .int8, .float8e4m3: return 1
        }
    }

    /// Whether rows of this type carry a scale (the 8-bit cache types).
    @inlinable public var isQuantized: Bool { self == .int8 || self == .float8e4m3 }

    /// The element at `p` as a float32.
    @inlinable @inline(__always)
    public func load(_ p: UnsafeRawPointer) -> Float {
        switch self {
        case .float32: return p.loadUnaligned(as: Float.self)
        case .float16: return Float(p.loadUnaligned(as: Float16.self))
        case .bfloat16: return bfloat16ToFloat(p.loadUnaligned(as: UInt16.self))
        case .int8: return Float(p.loadUnaligned(as: Int8.self))
        case .float8e4m3: return float8E4M3ToFloat(p.loadUnaligned(as: UInt8.self))
        }
    }

    /// Stores `x` at `p`, rounded to nearest even.
    @inlinable @inline(__always)
    public func store(_ x: Float, _ p: UnsafeMutableRawPointer) {
        switch self {
        case .float32: p.storeBytes(of: x, as: Float.self)
        case .float16: p.storeBytes(of: Float16(x), as: Float16.self)
        case .bfloat16: p.storeBytes(of: floatToBFloat16(x), as: UInt16.self)
        case .int8: p.storeBytes(of: floatToInt8(x), as: Int8.self)
        case .float8e4m3: p.storeBytes(of: floatToFloat8E4M3(x), as: UInt8.self)
        }
    }

    /// Converts `count` elements at `source` to float32 at `target`, times `scale`.
    @inlinable
    public func loadRow(_ source: UnsafeRawPointer, count: Int, scale: Float = 1, into target: UnsafeMutablePointer<Float>) {
        for c in 0..<count { target[c] = load(source + c * size) * scale }
    }

    /// Converts `count` float32 values at `source`, times `scale`, to elements at `target`.
    @inlinable
    public func storeRow(_ source: UnsafePointer<Float>, count: Int, scale: Float, into target: UnsafeMutableRawPointer) {
        for c in 0..<count { store(source[c] * scale, target + c * size) }
    }
}

/// bfloat16 is the top half of a float32: widening shifts the bits up.
@inlinable @inline(__always)
public func bfloat16ToFloat(_ bits: UInt16) -> Float { Float(bitPattern: UInt32(bits) << 16) }

/// Rounds to bfloat16, nearest even; NaN stays NaN (the quiet bit is set, so rounding cannot carry a NaN's
/// payload into infinity).
@inlinable @inline(__always)
public func floatToBFloat16(_ x: Float) -> UInt16 {
    let bits = x.bitPattern
    let rounded = x.isNaN ? (bits >> 16) | 0x40 : (bits &+ 0x7FFF &+ ((bits >> 16) & 1)) >> 16
    return UInt16(truncatingIfNeeded: rounded)
}

/// An E4M3FN byte as a float32: 1 sign, 4 exponent (bias 7) and 3 mantissa bits; exponent 0 is subnormal
/// (m × 2^−9); 0x7F and 0xFF are NaN; there are no infinities.
@inlinable @inline(__always)
public func float8E4M3ToFloat(_ byte: UInt8) -> Float {
    let magnitude = byte & 0x7F
    if magnitude == 0x7F { return .nan }
    let exponent = Int(magnitude >> 3), mantissa = Float(magnitude & 7)
    let value = exponent == 0 ? mantissa * 0x1p-9 : (1 + mantissa / 8) * Float(sign: .plus, exponent: exponent - 7, significand: 1)
    return byte & 0x80 != 0 ? -value : value
}

/// Rounds to E4M3FN, nearest even, saturating at ±448 (the format has no infinity); NaN stays NaN.
@inlinable
public func floatToFloat8E4M3(_ x: Float) -> UInt8 {
    if x.isNaN { return 0x7F }
    let sign: UInt8 = x.sign == .minus ? 0x80 : 0
    let a = min(abs(x), 448)
    // The representable magnitudes around a: step 2^(e − 3) for a ≥ 2^−6 (e = its exponent), 2^−9 below.
    let step: Float = a < 0x1p-6 ? 0x1p-9 : Float(sign: .plus, exponent: a.exponent - 3, significand: 1)
    let q = (a / step).rounded(.toNearestOrEven) * step  // exact: a power-of-two scaling
    if q == 0 { return sign }
    if q < 0x1p-6 { return sign | UInt8(q / 0x1p-9) }  // subnormal: m × 2^−9
    let exponent = Int(q.exponent), mantissa = Int((q / Float(sign: .plus, exponent: exponent, significand: 1) - 1) * 8)
    return sign | UInt8((exponent + 7) << 3 | mantissa)
}

/// Rounds to int8, nearest even, clamped to ±127 (the symmetric range); NaN becomes 0.
@inlinable @inline(__always)
public func floatToInt8(_ x: Float) -> Int8 {
    x.isNaN ? 0 : Int8(min(127, max(-127, x.rounded(.toNearestOrEven))))
}

/// The float32 scales of an 8-bit cache, [batch (or block), row, kv head], element strides: row (b, j, h) of the
/// cache stands for its values × scale(b, j, h).
public struct ScaleView: @unchecked Sendable {
    public var base: UnsafeMutablePointer<Float>
    public var batchStride: Int
    public var rowStride: Int
    public var headStride: Int

    public init(base: UnsafeMutablePointer<Float>, batchStride: Int, rowStride: Int, headStride: Int) {
        (self.base, self.batchStride, self.rowStride, self.headStride) = (base, batchStride, rowStride, headStride)
    }

    /// The scale of row (b, row, h).
    @inlinable @inline(__always)
    public func at(batch b: Int, head h: Int, row: Int) -> UnsafeMutablePointer<Float> {
        base + (b &* batchStride &+ row &* rowStride &+ h &* headStride)
    }
}

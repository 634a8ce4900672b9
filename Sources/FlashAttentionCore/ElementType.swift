/// Storage element types and their scalar conversions. Tensors may be stored as float32, float16 or bfloat16;
/// all arithmetic is float32. The kernel copies convert a vector at a time (their Elements.swift); the
/// scalar forms here serve the reference loop, the state merges and the kernels' row tails.

/// The element types of the C header's FA_DTYPE_* codes.
public enum ElementType: Int32, Sendable {
    case float32 = 0
    case float16 = 1
    case bfloat16 = 2

    /// Bytes per element.
    @inlinable public var size: Int { self == .float32 ? 4 : 2 }

    /// The element at `p` as a float32.
    @inlinable @inline(__always)
    public func load(_ p: UnsafeRawPointer) -> Float {
        switch self {
        case .float32: return p.loadUnaligned(as: Float.self)
        case .float16: return Float(p.loadUnaligned(as: Float16.self))
        case .bfloat16: return bfloat16ToFloat(p.loadUnaligned(as: UInt16.self))
        }
    }

    /// Stores `x` at `p`, rounded to nearest even.
    @inlinable @inline(__always)
    public func store(_ x: Float, _ p: UnsafeMutableRawPointer) {
        switch self {
        case .float32: p.storeBytes(of: x, as: Float.self)
        case .float16: p.storeBytes(of: Float16(x), as: Float16.self)
        case .bfloat16: p.storeBytes(of: floatToBFloat16(x), as: UInt16.self)
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

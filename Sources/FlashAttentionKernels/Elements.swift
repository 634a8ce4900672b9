import FlashAttentionShims

/// Storage element types. Tensors may be stored as float32, float16 or bfloat16; all arithmetic is
/// float32. Conversions happen where rows are packed or staged (loads) and in the epilogue (stores), eight
/// lanes at a time: F16C's vcvtph2ps / vcvtps2ph for float16, a 16-bit shift for bfloat16.

/// The element types of the C header's FA_DTYPE_* codes.
package enum ElementType: Int32, Sendable {
    case float32 = 0
    case float16 = 1
    case bfloat16 = 2

    /// Bytes per element.
    package var size: Int { self == .float32 ? 4 : 2 }
}

/// Loading and storing one storage type as float32. Generic code over this protocol is specialised per
/// type, so the float32 path stays plain loads and stores.
package protocol StorageElement {
    static var size: Int { get }
    static func load8(_ p: UnsafeRawPointer) -> SIMD8<Float>
    static func store8(_ x: SIMD8<Float>, _ p: UnsafeMutableRawPointer)
    static func load(_ p: UnsafeRawPointer) -> Float
    static func store(_ x: Float, _ p: UnsafeMutableRawPointer)
}

package enum Float32Storage: StorageElement {
    package static var size: Int { 4 }
    @inline(__always) package static func load8(_ p: UnsafeRawPointer) -> SIMD8<Float> { p.loadUnaligned(as: Vec.self) }
    @inline(__always) package static func store8(_ x: SIMD8<Float>, _ p: UnsafeMutableRawPointer) { p.storeBytes(of: x, as: Vec.self) }
    @inline(__always) package static func load(_ p: UnsafeRawPointer) -> Float { p.loadUnaligned(as: Float.self) }
    @inline(__always) package static func store(_ x: Float, _ p: UnsafeMutableRawPointer) { p.storeBytes(of: x, as: Float.self) }
}

/// IEEE binary16; stores round to nearest even (vcvtps2ph with the default rounding mode).
package enum Float16Storage: StorageElement {
    package static var size: Int { 2 }
    @inline(__always) package static func load8(_ p: UnsafeRawPointer) -> SIMD8<Float> {
        Vec(p.loadUnaligned(as: SIMD8<Float16>.self))
    }
    @inline(__always) package static func store8(_ x: SIMD8<Float>, _ p: UnsafeMutableRawPointer) {
        p.storeBytes(of: SIMD8<Float16>(x), as: SIMD8<Float16>.self)
    }
    @inline(__always) package static func load(_ p: UnsafeRawPointer) -> Float { Float(p.loadUnaligned(as: Float16.self)) }
    @inline(__always) package static func store(_ x: Float, _ p: UnsafeMutableRawPointer) {
        p.storeBytes(of: Float16(x), as: Float16.self)
    }
}

/// bfloat16: the top half of a float32. Loads shift the bits up; stores round to nearest even and keep
/// NaN a NaN (quiet bit set, so rounding cannot carry it into infinity). The vector forms come from the
/// shims' AVX2 helpers.
package enum BFloat16Storage: StorageElement {
    package static var size: Int { 2 }
    @inline(__always) package static func load8(_ p: UnsafeRawPointer) -> SIMD8<Float> { fa_load_bf16x8(p) }
    @inline(__always) package static func store8(_ x: SIMD8<Float>, _ p: UnsafeMutableRawPointer) {
        fa_store_bf16x8(x, p)
    }
    @inline(__always) package static func load(_ p: UnsafeRawPointer) -> Float {
        Float(bitPattern: UInt32(p.loadUnaligned(as: UInt16.self)) << 16)
    }
    @inline(__always) package static func store(_ x: Float, _ p: UnsafeMutableRawPointer) {
        let bits = x.bitPattern
        let rounded = x.isNaN ? (bits >> 16) | 0x40 : (bits &+ 0x7FFF &+ ((bits >> 16) & 1)) >> 16
        p.storeBytes(of: UInt16(truncatingIfNeeded: rounded), as: UInt16.self)
    }
}

/// Calls `body` with the storage type of `element`.
@inline(__always)
package func withStorage<Result>(_ element: ElementType, _ body: (any StorageElement.Type) -> Result) -> Result {
    switch element {
    case .float32: return body(Float32Storage.self)
    case .float16: return body(Float16Storage.self)
    case .bfloat16: return body(BFloat16Storage.self)
    }
}

/// Converts `count` elements at `source` to float32 at `target`, times `scale`.
@inline(__always)
package func loadRow<S: StorageElement>(
    _ storage: S.Type, _ source: UnsafeRawPointer, count: Int, scale: Float = 1, into target: UnsafeMutablePointer<Float>
) {
    var c = 0
    let factor = Vec(repeating: scale)
    while c + 8 <= count {
        store(S.load8(source + c * S.size) * factor, target + c)
        c += 8
    }
    while c < count {
        target[c] = S.load(source + c * S.size) * scale
        c += 1
    }
}

/// Converts `count` float32 values at `source`, times `scale`, to elements at `target`.
@inline(__always)
package func storeRow<S: StorageElement>(
    _ storage: S.Type, _ source: UnsafePointer<Float>, count: Int, scale: Float, into target: UnsafeMutableRawPointer
) {
    var c = 0
    let factor = Vec(repeating: scale)
    while c + 8 <= count {
        S.store8(load(source + c) * factor, target + c * S.size)
        c += 8
    }
    while c < count {
        S.store(source[c] * scale, target + c * S.size)
        c += 1
    }
}

import FlashAttentionCore

/// Loading and storing the storage types (float32, float16, bfloat16; int8 and float8 cache rows are only
/// loaded) as float32 vectors. Conversions happen
/// where rows are packed or staged (loads) and in the epilogue (stores), a vector at a time: F16C's
/// vcvtph2ps / vcvtps2ph for float16 where the copy has them, a 16-bit shift for bfloat16.

/// One storage type as float32. Generic code over this protocol is specialised per type, so the float32
/// path stays plain loads and stores.
protocol StorageElement {
    static var size: Int { get }
    static var element: ElementType { get }
    static func loadVector(_ p: UnsafeRawPointer) -> Vec
    static func storeVector(_ x: Vec, _ p: UnsafeMutableRawPointer)
}

extension StorageElement {
    @inline(__always) static var size: Int { element.size }
    @inline(__always) static func load(_ p: UnsafeRawPointer) -> Float { element.load(p) }
    @inline(__always) static func store(_ x: Float, _ p: UnsafeMutableRawPointer) { element.store(x, p) }
}

enum Float32Storage: StorageElement {
    @inline(__always) static var element: ElementType { .float32 }
    @inline(__always) static func loadVector(_ p: UnsafeRawPointer) -> Vec { p.loadUnaligned(as: Vec.self) }
    @inline(__always) static func storeVector(_ x: Vec, _ p: UnsafeMutableRawPointer) { p.storeBytes(of: x, as: Vec.self) }
}

/// IEEE binary16; stores round to nearest even (Vector.swift has the conversions).
enum Float16Storage: StorageElement {
    @inline(__always) static var element: ElementType { .float16 }
    @inline(__always) static func loadVector(_ p: UnsafeRawPointer) -> Vec { loadFloat16(p) }
    @inline(__always) static func storeVector(_ x: Vec, _ p: UnsafeMutableRawPointer) { storeFloat16(x, p) }
}

/// bfloat16: the top half of a float32 (Vector.swift has the conversions).
enum BFloat16Storage: StorageElement {
    @inline(__always) static var element: ElementType { .bfloat16 }
    @inline(__always) static func loadVector(_ p: UnsafeRawPointer) -> Vec { loadBFloat16(p) }
    @inline(__always) static func storeVector(_ x: Vec, _ p: UnsafeMutableRawPointer) { storeBFloat16(x, p) }
}

/// 8-bit cache rows: values only, to be multiplied by the row's scale (ElementType's ScaleView). The kernels
/// only read them; appends quantize through ElementType's scalar conversions.
enum Int8Storage: StorageElement {
    @inline(__always) static var element: ElementType { .int8 }
    @inline(__always) static func loadVector(_ p: UnsafeRawPointer) -> Vec { loadInt8(p) }
    static func storeVector(_ x: Vec, _ p: UnsafeMutableRawPointer) { preconditionFailure("8-bit rows are never stored") }
}

enum Float8Storage: StorageElement {
    @inline(__always) static var element: ElementType { .float8e4m3 }
    @inline(__always) static func loadVector(_ p: UnsafeRawPointer) -> Vec { loadFloat8(p) }
    static func storeVector(_ x: Vec, _ p: UnsafeMutableRawPointer) { preconditionFailure("8-bit rows are never stored") }
}

#if !FA_EMBEDDED  // Embedded Swift has no existential metatypes: Tests/arm64/EmbeddedDispatch.swift
/// Calls `body` with the storage type of `element`.
@inline(__always)
func withStorage<Result>(_ element: ElementType, _ body: (any StorageElement.Type) -> Result) -> Result {
    switch element {
    case .float32: return body(Float32Storage.self)
    case .float16: return body(Float16Storage.self)
    case .bfloat16: return body(BFloat16Storage.self)
    case .int8: return body(Int8Storage.self)
    case .float8e4m3: return body(Float8Storage.self)
    }
}
#endif

/// Converts `count` elements at `source` to float32 at `target`, times `scale`.
@inline(__always)
func loadRow<S: StorageElement>(
    _ storage: S.Type, _ source: UnsafeRawPointer, count: Int, scale: Float = 1, into target: UnsafeMutablePointer<Float>
) {
    var c = 0
    let factor = Vec(repeating: scale)
    while c + lanes <= count {
        store(S.loadVector(source + c * S.size) * factor, target + c)
        c += lanes
    }
    while c < count {
        target[c] = S.load(source + c * S.size) * scale
        c += 1
    }
}

/// Converts `count` float32 values at `source`, times `scale`, to elements at `target`.
@inline(__always)
func storeRow<S: StorageElement>(
    _ storage: S.Type, _ source: UnsafePointer<Float>, count: Int, scale: Float, into target: UnsafeMutableRawPointer
) {
    var c = 0
    let factor = Vec(repeating: scale)
    while c + lanes <= count {
        S.storeVector(load(source + c) * factor, target + c * S.size)
        c += lanes
    }
    while c < count {
        S.store(source[c] * scale, target + c * S.size)
        c += 1
    }
}

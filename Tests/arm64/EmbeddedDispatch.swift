import FlashAttentionCore

/// Embedded-Swift build only (compiled into the NEON kernel module by Tests/arm64/build.sh, with -D FA_EMBEDDED).
///
/// Embedded Swift has no existential metatypes, so the two run-time dispatchers of the kernel source —
/// `withStorage` (Elements.swift) and `withTileRows` (MicroKernels.swift), which hand their body
/// `any StorageElement.Type` / `any TileRows.Type` — are replaced here by one concrete type each that reads the
/// choice from a variable set for the duration of the body. Every kernel is then specialised for these types:
/// the vector conversions, micro-kernels and loops are the same code, but the storage type and row count are
/// run-time values inside them instead of compile-time constants (slower, equally correct; the emulated tests
/// check correctness only). The packed float32 paths (`Float32Storage`, `MicroRows`) are unaffected.

/// The storage type a `DynamicStorage` stands for; set by `withStorage` (single-threaded test binary).
nonisolated(unsafe) var currentElement = ElementType.float32

/// The storage type of `currentElement`.
enum DynamicStorage: StorageElement {
    static var element: ElementType { currentElement }

    @inline(__always) static func loadVector(_ p: UnsafeRawPointer) -> Vec {
        switch currentElement {
        case .float32: return Float32Storage.loadVector(p)
        case .float16: return Float16Storage.loadVector(p)
        case .bfloat16: return BFloat16Storage.loadVector(p)
        case .int8: return Int8Storage.loadVector(p)
        case .float8e4m3: return Float8Storage.loadVector(p)
        }
    }

    @inline(__always) static func storeVector(_ x: Vec, _ p: UnsafeMutableRawPointer) {
        switch currentElement {
        case .float32: Float32Storage.storeVector(x, p)
        case .float16: Float16Storage.storeVector(x, p)
        case .bfloat16: BFloat16Storage.storeVector(x, p)
        case .int8, .float8e4m3: preconditionFailure("8-bit rows are never stored")
        }
    }
}

/// Calls `body` with the storage type of `element` (Elements.swift's, without an existential).
@inline(__always)
func withStorage<Result>(_ element: ElementType, _ body: (DynamicStorage.Type) -> Result) -> Result {
    let saved = currentElement
    currentElement = element
    defer { currentElement = saved }
    return body(DynamicStorage.self)
}

/// The row count a `DynamicRows` stands for; set by `withTileRows`.
nonisolated(unsafe) var currentTileRows = 1

enum DynamicRows: TileRows {
    static var count: Int { currentTileRows }
}

/// Calls `body` with the smallest supported row count ≥ `rows` (MicroKernels.swift's, without an existential).
@inline(__always)
func withTileRows<Result>(_ rows: Int, _ body: (DynamicRows.Type) -> Result) -> Result {
    let saved = currentTileRows
    currentTileRows = rows <= 1 ? 1 : rows == 2 ? 2 : rows <= 4 ? 4 : rows <= 6 && microRows >= 6 ? 6 : microRows
    defer { currentTileRows = saved }
    return body(DynamicRows.self)
}

// swift-tools-version: 6.2
import PackageDescription

/// The tiled kernels are compiled for AVX2 + FMA (+ F16C) in a module of their own; everything else stays baseline
/// x86-64, so the library loads and validates on any x86-64 CPU and enters the AVX2 module only after a
/// `cpuid` check (see `Sources/FlashAttention/Dispatch.swift`).
#if arch(x86_64)
let kernelFlags: [String] = [
    "-Xcc", "-mavx2", "-Xcc", "-mfma", "-Xcc", "-mf16c", "-Ounchecked", "-enforce-exclusivity=unchecked",
]
#else
let kernelFlags: [String] = ["-Ounchecked", "-enforce-exclusivity=unchecked"]
#endif

/// Keeps `nm -D libFlashAttention.so` down to the `flash_attention_*` functions of the header.
let exportsMap = Context.packageDirectory + "/Sources/FlashAttention/exports.map"

let package = Package(
    name: "FlashAttention",
    products: [
        .library(name: "FlashAttention", type: .dynamic, targets: ["FlashAttention"]),
        // The same module for Swift packages (`import FlashAttention`, SwiftAPI.swift), linked into the client:
        // the shared library exports only the C functions (exports.map), so the Swift API cannot come from it.
        .library(name: "FlashAttentionSwift", targets: ["FlashAttention"]),
        .executable(name: "flash-attention", targets: ["flash-attention"]),
    ],
    targets: [
        // The one declaration of the C ABI; Swift implements it with `@c @implementation`.
        .target(name: "CFlashAttention", path: "include", publicHeadersPath: "."),
        // What Swift cannot express: the `cpuid`/`xgetbv` probe (compiled without ISA flags), a prefetch,
        // and an unload hook.
        .target(name: "FlashAttentionShims"),
        .target(
            name: "FlashAttentionKernels",
            dependencies: ["FlashAttentionShims"],
            swiftSettings: [.unsafeFlags(kernelFlags)]
        ),
        .target(
            name: "FlashAttention",
            dependencies: ["CFlashAttention", "FlashAttentionShims", "FlashAttentionKernels"],
            exclude: ["exports.map"],
            // nodelete: dlclose never unmaps the code the pool's workers sleep in (they stop at exit).
            linkerSettings: [.unsafeFlags(["-Xlinker", "--version-script=\(exportsMap)", "-Xlinker", "-z", "-Xlinker", "nodelete"])]
        ),
        .executableTarget(name: "flash-attention", dependencies: ["FlashAttention", "CFlashAttention"]),
        .testTarget(name: "FlashAttentionTests", dependencies: ["FlashAttention", "FlashAttentionKernels", "CFlashAttention"]),
    ]
)

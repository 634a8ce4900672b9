// swift-tools-version: 6.2
import PackageDescription

/// One kernel source, several compiled copies.
///
/// `Sources/FlashAttentionKernels` holds the kernels once, written over a vector type whose width is a
/// property of the compiled copy. Each `FlashAttentionKernels<ISA>` directory is a symbolic link to it, so
/// SwiftPM builds the same files as one module per instruction set, each with that set's flags and a
/// `FA_KERNEL_<ISA>` define that picks the vector type and tile shapes (Vector.swift). Why links: SwiftPM
/// lets no two targets share a source file, and the other route — generic `@inlinable` kernels in a flag-free
/// module specialised by thin per-ISA modules — leaves where the specialised code lands (and with which
/// flags) to the optimiser's cross-module inlining decisions; a compiled copy per module makes it certain.
///
/// Everything that is not ISA-specific (the validated problem, the work decomposition, the thread pool, the
/// reference loop, merging attention states) lives in `FlashAttentionCore`, compiled without ISA flags, and
/// the C boundary in `FlashAttention` picks one copy's table of entry points when the library loads
/// (Dispatch.swift): no baseline code path can reach an AVX instruction without the CPU check (nor through a
/// compiler-generated helper that modules share: see `kernelModule`).
let optimise = ["-Ounchecked", "-enforce-exclusivity=unchecked"]

/// (module suffix, define, compiler flags) of each compiled copy on this architecture.
#if arch(x86_64)
let avx512Flags = [
    "-Xcc", "-mavx512f", "-Xcc", "-mavx512bw", "-Xcc", "-mavx512dq", "-Xcc", "-mavx512vl",
    "-Xcc", "-mavx2", "-Xcc", "-mfma", "-Xcc", "-mf16c",
]
let allKernelCopies: [(String, String, [String])] = [
    // The avx512 copy again with AMX tiles: FA_AMX gives bfloat16 q/k/v both products in AMX tiles (tdpbf16ps).
    ("AVX512BF16AMX", "FA_KERNEL_AVX512", avx512Flags + [
        "-Xcc", "-mavx512bf16", "-Xcc", "-mamx-tile", "-Xcc", "-mamx-bf16", "-D", "FA_BF16_PAIRS", "-D", "FA_AMX",
    ]),
    // The avx512 copy again, with AVX512_BF16: FA_BF16_PAIRS gives bfloat16 q/k/v its pair products.
    ("AVX512BF16", "FA_KERNEL_AVX512", avx512Flags + ["-Xcc", "-mavx512bf16", "-D", "FA_BF16_PAIRS"]),
    ("AVX512", "FA_KERNEL_AVX512", avx512Flags),
    ("AVX2", "FA_KERNEL_AVX2", ["-Xcc", "-mavx2", "-Xcc", "-mfma", "-Xcc", "-mf16c"]),
    // No ISA flags: SSE2 on x86-64, whatever the target's baseline is elsewhere.
    ("Portable", "FA_KERNEL_PORTABLE", []),
]
#elseif arch(arm64)
let allKernelCopies: [(String, String, [String])] = [
    // ARMv8.0 Advanced SIMD is the baseline of every aarch64 target (Apple Silicon, Linux/ARM servers): no
    // flags, no CPU check. Tests/arm64 compiles this copy for aarch64 with Embedded Swift and runs it under
    // qemu (`make test-arm64`), since the machines this package is tested on are x86-64.
    ("NEON", "FA_KERNEL_NEON", []),
    ("Portable", "FA_KERNEL_PORTABLE", []),
]
#else
let allKernelCopies: [(String, String, [String])] = [("Portable", "FA_KERNEL_PORTABLE", [])]
#endif

/// `FLASH_ATTENTION_KERNEL_COPIES=AVX512BF16,Portable` (module suffixes) builds only the copies it names, and the
/// library then offers only their paths. The sanitizer builds of `make test` use it: every copy compiles the same
/// source, so the copies this CPU runs (less those another one contains) cover it at a fraction of the build time.
let chosenCopies = Context.environment["FLASH_ATTENTION_KERNEL_COPIES"].map { Set($0.split(separator: ",").map(String.init)) }
let kernelCopies = allKernelCopies.filter { chosenCopies?.contains($0.0) ?? true }

/// A copy's module: `_FlashAttentionKernels<suffix>` where it has ISA flags, so that it links after every baseline
/// module (SwiftPM lists objects by module name), and the suffixes sort as the instruction sets contain each
/// other (AVX2 < AVX512 < AVX512BF16 < AVX512BF16AMX). Modules share compiler-generated helpers under one name
/// (value witnesses such as `__swift_memcpy88_8`, specialisations of the standard library), weak symbols of which
/// the linker keeps the first it meets, and every module that calls one defines it: so the one kept comes from a
/// module whose instructions every caller's CPU runs. Linked first, the AMX copy's zmm helpers served the whole
/// library and crashed a Zen 3. `Tests/isa/check_baseline_code.py` (make test) checks the linked binaries, and
/// `make test-isa-emulated` runs them on emulated CPUs without AVX-512 and without AVX. The shared library is
/// closed (it exports only the C functions); a Swift client of `FlashAttentionSwift` links these modules into its
/// own binary, where a client module named in lower case sorts after the copies: one that defines a helper
/// which only a copy also defines would get the copy's (none is known; Swift clients should name modules in
/// capitals, as Swift's convention has it).
func kernelModule(_ suffix: String, _ flags: [String]) -> String {
    (flags.isEmpty ? "" : "_") + "FlashAttentionKernels" + suffix
}

let kernelTargets: [Target] = kernelCopies.map { suffix, define, flags in
    .target(
        name: kernelModule(suffix, flags),
        dependencies: ["FlashAttentionCore", "FlashAttentionShims"],
        path: "Sources/FlashAttentionKernels\(suffix)",
        swiftSettings: [.define(define), .unsafeFlags(flags + optimise)]
    )
}
let kernelModules: [Target.Dependency] = kernelCopies.map { .target(name: kernelModule($0.0, $0.2)) }

// The order the link relies on: the flagged copies, listed widest first, sort narrowest first.
let flaggedCopies = allKernelCopies.filter { !$0.2.isEmpty }.map { kernelModule($0.0, $0.2) }
precondition(flaggedCopies.sorted() == flaggedCopies.reversed(), "kernel copies must sort as their ISAs contain each other")

/// Keeps `nm -D libFlashAttention.so` down to the `flash_attention_*` functions of the header: a GNU ld version
/// script on Linux, an exported-symbols list for Apple's linker.
let exportsMap = Context.packageDirectory + "/Sources/FlashAttention/exports.map"
let exportsList = Context.packageDirectory + "/Sources/FlashAttention/exports.darwin.txt"

let package = Package(
    name: "FlashAttention",
    // Synchronization's Atomic (the thread pool) needs macOS 15; Float16 needs Apple Silicon on macOS (the
    // x86-64 slice of a macOS build has no Float16, so macOS builds are arm64 only).
    platforms: [.macOS(.v15)],
    products: [
        .library(name: "FlashAttention", type: .dynamic, targets: ["FlashAttention"]),
        // The same module for Swift packages (`import FlashAttention`, SwiftAPI.swift), linked into the client:
        // the shared library exports only the C functions (exports.map), so the Swift API cannot come from it.
        .library(name: "FlashAttentionSwift", targets: ["FlashAttention"]),
        .executable(name: "flash-attention", targets: ["FlashAttentionCLI"]),
    ],
    targets: kernelTargets + [
        // The one declaration of the C ABI; Swift implements it with `@c @implementation`.
        .target(name: "CFlashAttention", path: "include", publicHeadersPath: "."),
        // What Swift cannot express: the `cpuid`/`xgetbv` probe (compiled without ISA flags), a prefetch,
        // per-ISA vector helpers (each behind its own target attribute), and an unload hook.
        .target(name: "FlashAttentionShims"),
        // ISA-neutral: problem, work decomposition, pool, reference loop, state merging. No ISA flags.
        .target(
            name: "FlashAttentionCore",
            dependencies: ["CFlashAttention", "FlashAttentionShims"]
        ),
        .target(
            name: "FlashAttention",
            dependencies: ["CFlashAttention", "FlashAttentionShims", "FlashAttentionCore"] + kernelModules,
            exclude: ["exports.map", "exports.darwin.txt"],
            linkerSettings: [
                // nodelete: dlclose never unmaps the code the pool's workers sleep in (they stop at exit).
                .unsafeFlags(
                    ["-Xlinker", "--version-script=\(exportsMap)", "-Xlinker", "-z", "-Xlinker", "nodelete"],
                    .when(platforms: [.linux])),
                // Darwin never unloads an image that contains Swift code, so it needs no nodelete.
                .unsafeFlags(["-Xlinker", "-exported_symbols_list", "-Xlinker", exportsList], .when(platforms: [.macOS])),
            ]
        ),
        // Named in capitals, as every module of this package: it links before the ISA copies (kernelModule).
        .executableTarget(
            name: "FlashAttentionCLI", dependencies: ["FlashAttention", "CFlashAttention"], path: "Sources/flash-attention"),
        .testTarget(
            name: "FlashAttentionTests",
            dependencies: ["FlashAttention", "FlashAttentionCore", "CFlashAttention"]),
    ]
)

import CFlashAttention
import FlashAttentionCore
import FlashAttentionShims
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#elseif canImport(Musl)
import Musl
#endif

#if canImport(_FlashAttentionKernelsAVX512BF16AMX)
import _FlashAttentionKernelsAVX512BF16AMX
#endif
#if canImport(_FlashAttentionKernelsAVX512BF16)
import _FlashAttentionKernelsAVX512BF16
#endif
#if canImport(_FlashAttentionKernelsAVX512)
import _FlashAttentionKernelsAVX512
#endif
#if canImport(_FlashAttentionKernelsAVX2)
import _FlashAttentionKernelsAVX2
#endif
#if canImport(FlashAttentionKernelsNEON)
import FlashAttentionKernelsNEON
#endif
import FlashAttentionKernelsPortable

/// Chooses which compiled kernel copy runs: once, from `cpuid`/`xgetbv` and the FLASH_ATTENTION_ISA override,
/// into one table of entry points. Nothing outside a kernel copy uses an ISA extension, and a copy is only
/// entered once the probe has said the CPU and the OS can run it.

/// What this CPU can run, probed once (the probe is compiled without ISA flags, so it runs anywhere).
enum CPU {
    static let features = fa_cpu_features()

    #if arch(arm64)
    static let arch64 = true
    #else
    static let arch64 = false
    #endif

    /// Whether the CPU and the OS can run `isa`.
    static func supports(_ isa: KernelISA) -> Bool {
        switch isa {
        case .amxbf16: return features & FA_CPU_AMX_BF16 != 0
        case .avx512bf16: return features & FA_CPU_AVX512_BF16 != 0
        case .avx512: return features & FA_CPU_AVX512 != 0
        case .avx2: return features & FA_CPU_AVX2_FMA != 0
        // Advanced SIMD is in every aarch64 CPU; the NEON copy is only compiled there.
        case .neon: return arch64
        case .portable, .reference: return true
        }
    }
}

/// The kernel copies compiled into this build, widest first, each behind an accessor. A copy's globals (its
/// table among them) are initialised by code compiled with that copy's ISA flags, which may use its registers
/// (the AMX copy's geometry is stored with zmm moves), so a table is only read once the probe has said the CPU
/// can run its copy: reading them all crashed a Zen 3 with an illegal instruction.
private let compiledCopies: [(isa: KernelISA, table: @Sendable () -> KernelTable)] = {
    var copies: [(isa: KernelISA, table: @Sendable () -> KernelTable)] = []
    #if canImport(_FlashAttentionKernelsAVX512BF16AMX)
    copies.append((.amxbf16, { _FlashAttentionKernelsAVX512BF16AMX.kernelTable }))
    #endif
    #if canImport(_FlashAttentionKernelsAVX512BF16)
    copies.append((.avx512bf16, { _FlashAttentionKernelsAVX512BF16.kernelTable }))
    #endif
    #if canImport(_FlashAttentionKernelsAVX512)
    copies.append((.avx512, { _FlashAttentionKernelsAVX512.kernelTable }))
    #endif
    #if canImport(_FlashAttentionKernelsAVX2)
    copies.append((.avx2, { _FlashAttentionKernelsAVX2.kernelTable }))
    #endif
    #if canImport(FlashAttentionKernelsNEON)
    copies.append((.neon, { FlashAttentionKernelsNEON.kernelTable }))
    #endif
    copies.append((.portable, { FlashAttentionKernelsPortable.kernelTable }))
    return copies
}()

/// The tables of the compiled copies this CPU can run, widest first.
private let runnableTables: [KernelTable] = compiledCopies.filter { CPU.supports($0.isa) }.map { $0.table() }

/// The kernels one call runs: a compiled copy's table, and whether the forward takes the reference loop.
package struct Kernels: Sendable {
    package let table: KernelTable
    package let reference: Bool
    package var isa: KernelISA { reference ? .reference : table.isa }
}

/// The instruction set selection.
package enum KernelSelection {
    /// The paths this CPU can run, the default first: widest first (the reference loop last), except that
    /// avx512bf16 follows avx512 where vdpbf16ps does half the FLOPs of a float32 FMA (Intel cores: bfloat16
    /// prefill ran at 0.5–0.9× the float32 speed on that path on Emerald and Sapphire Rapids, bench/RESULTS.md):
    /// there it is offered (FLASH_ATTENTION_ISA) but not chosen.
    package static let available: [KernelISA] = {
        let runnable = KernelISA.allCases.filter { isa in
            CPU.supports(isa) && (isa == .reference || runnableTables.contains { $0.isa == isa })
        }
        guard let pairs = runnable.firstIndex(of: .avx512bf16), CPU.features & FA_CPU_BF16_FULL_RATE == 0 else {
            return runnable
        }
        var ordered = runnable
        ordered.swapAt(pairs, pairs + 1)  // avx512 follows avx512bf16 wherever both are
        return ordered
    }()

    /// The widest available path, or the one FLASH_ATTENTION_ISA names; read once, the first time any call
    /// needs it. An override the CPU cannot run is an error every call reports.
    static let chosen: Result<Kernels, FlashAttentionError> = {
        guard let value = getenv("FLASH_ATTENTION_ISA").map({ String(cString: $0) }), !value.isEmpty else {
            return .success(kernels(for: available[0]))
        }
        return select(value)
    }()

    /// Forces `isa` for the calls `body` makes on this task (for tests that run every path in one process);
    /// the environment variable does the same for a whole process.
    @TaskLocal package static var override: KernelISA?

    /// The kernels for this call.
    static func current() throws(FlashAttentionError) -> Kernels {
        if let isa = override {
            guard available.contains(isa) else { throw unavailable(isa.name) }
            return kernels(for: isa)
        }
        return try chosen.get()
    }

    /// The name `flash_attention_kernel_isa()` reports: the chosen path, or "invalid".
    static var reportedName: StaticString {
        switch chosen {
        case .success(let kernels):
            switch kernels.isa {
            case .amxbf16: return "amxbf16"
            case .avx512bf16: return "avx512bf16"
            case .avx512: return "avx512"
            case .avx2: return "avx2"
            case .neon: return "neon"
            case .portable: return "portable"
            case .reference: return "reference"
            }
        case .failure: return "invalid"
        }
    }

    /// The available names joined by commas, NUL-terminated, for `flash_attention_available_isas()`.
    nonisolated(unsafe) static let availableNames: UnsafePointer<CChar> = {
        let text = available.map(\.name).joined(separator: ",")
        let buffer = UnsafeMutablePointer<CChar>.allocate(capacity: text.utf8.count + 1)
        text.withCString { buffer.initialize(from: $0, count: text.utf8.count + 1) }
        return UnsafePointer(buffer)
    }()

    private static func select(_ name: String) -> Result<Kernels, FlashAttentionError> {
        guard let isa = KernelISA(name: name), available.contains(isa) else { return .failure(unavailable(name)) }
        return .success(kernels(for: isa))
    }

    private static func unavailable(_ name: String) -> FlashAttentionError {
        let known = KernelISA.allCases.map(\.name)
        let why = known.contains(name) ? "this CPU cannot run it" : "it is not one of \(known.joined(separator: ", "))"
        return .unsupported(
            "FLASH_ATTENTION_ISA=\(name) cannot be used: \(why); available here: \(available.map(\.name).joined(separator: ", "))")
    }

    /// The kernels of an available path.
    package static func kernels(for isa: KernelISA) -> Kernels {
        // The reference forward comes with the portable kernels for the backward.
        let copy = isa == .reference ? KernelISA.portable : isa
        return Kernels(table: runnableTables.first { $0.isa == copy }!, reference: isa == .reference)
    }
}

/// The thread count of a call: 0 means every online core; more than that is clamped.
func threadCount(_ requested: Int) -> Int {
    let cores = ThreadPool.onlineCores
    return requested == 0 ? cores : min(requested, cores)
}

/// Runs a validated forward problem on the selected kernels with the requested algorithm.
func runForward(_ problem: AttentionProblem, options: ForwardOptions, append: CacheAppend?) throws(FlashAttentionError) {
    let kernels = try KernelSelection.current()
    let reference = options.algorithm == FA_ALGORITHM_REFERENCE || (options.algorithm == FA_ALGORITHM_AUTO && kernels.reference)
    try FlashAttentionCore.runForward(
        problem, kernels: kernels.table, reference: reference, threads: threadCount(options.numThreads), append: append)
}

/// Runs a validated backward problem on the selected kernels.
func runBackward(_ problem: BackwardProblem, options: ForwardOptions) throws(FlashAttentionError) {
    let kernels = try KernelSelection.current()
    try FlashAttentionCore.runBackward(problem, kernels: kernels.table, threads: threadCount(options.numThreads))
}

import CFlashAttention
import FlashAttentionShims
import FlashAttentionKernels

/// Chooses the path of a call once, from the options and the CPU, and runs it on the pool.

/// What this CPU can run, probed once with `cpuid`/`xgetbv` (compiled without ISA flags, so the probe
/// itself runs anywhere).
enum CPU {
    static let features = fa_cpu_features()
    static var hasTiledKernel: Bool { features & FA_CPU_AVX2_FMA != 0 }
    /// Name of the instruction set the tiled kernel uses here, or "none".
    static var kernelISA: StaticString { hasTiledKernel ? "avx2+fma" : "none" }
}

extension TiledForward: WorkPlan {}

/// Runs a validated forward problem with the requested algorithm and thread count.
func runForward(_ problem: AttentionProblem, options: ForwardOptions) throws(FlashAttentionError) {
    if problem.batch == 0 || problem.seqlenQ == 0 { return }
    let cores = ThreadPool.onlineCores
    let threads = options.numThreads == 0 ? cores : min(options.numThreads, cores)
    switch options.algorithm {
    case FA_ALGORITHM_REFERENCE:
        try ThreadPool.shared.run(ReferenceForward(problem: problem), threads: threads)
    case FA_ALGORITHM_TILED where !CPU.hasTiledKernel:
        throw .unsupported("algorithm FA_ALGORITHM_TILED needs a CPU with AVX2 and FMA; this one has neither")
    default:
        if CPU.hasTiledKernel {
            try ThreadPool.shared.run(TiledForward(problem), threads: threads)
        } else {
            try ThreadPool.shared.run(ReferenceForward(problem: problem), threads: threads)
        }
    }
}

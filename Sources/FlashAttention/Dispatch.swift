import CFlashAttention
import FlashAttentionKernels
import FlashAttentionShims
import Glibc

/// Chooses the path of a call once, from the options and the CPU, and runs it on the pool: the reference
/// loop, or the tiled kernel — in one phase, or, for shapes split along the keys, a phase of splits and a
/// phase that merges them in a fixed order.

/// What this CPU can run, probed once with `cpuid`/`xgetbv` (compiled without ISA flags, so the probe
/// itself runs anywhere).
enum CPU {
    static let features = fa_cpu_features()
    static var hasTiledKernel: Bool { features & FA_CPU_AVX2_FMA != 0 }
    /// Name of the instruction set the tiled kernel uses here, or "none".
    static var kernelISA: StaticString { hasTiledKernel ? "avx2+fma+f16c" : "none" }
}

extension TiledForward: WorkPlan {}

/// The second phase of a split problem: one item per unsplit item, merging its splits.
struct SplitMerge: WorkPlan {
    let tiled: TiledForward
    var itemCount: Int { tiled.unsplitItems }
    var scratchBytes: Int { 0 }
    func run(item: Int, scratch: UnsafeMutableRawPointer) { tiled.mergeSplits(item: item) }
}

/// Runs a validated problem with the requested algorithm and thread count, after writing any new keys and
/// values into the cache.
func runForward(_ problem: AttentionProblem, options: ForwardOptions, append: CacheAppend?) throws(FlashAttentionError) {
    if options.algorithm == FA_ALGORITHM_TILED && !CPU.hasTiledKernel {
        throw .unsupported("algorithm FA_ALGORITHM_TILED needs a CPU with AVX2, FMA and F16C; this one lacks them")
    }
    if let append { appendToCache(problem, append) }
    let cores = ThreadPool.onlineCores
    let threads = options.numThreads == 0 ? cores : min(options.numThreads, cores)
    if options.algorithm == FA_ALGORITHM_REFERENCE || !CPU.hasTiledKernel {
        return try ThreadPool.shared.run(ReferenceForward(problem: problem), threads: threads)
    }
    var tiled = TiledForward(problem)
    if tiled.splits == 1 {
        return try ThreadPool.shared.run(tiled, threads: threads)
    }
    let bytes = tiled.partialFloats * MemoryLayout<Float>.size
    guard let partials = malloc(bytes) else {
        throw .outOfMemory("could not allocate \(bytes) bytes for split-KV partial results")
    }
    defer { free(partials) }
    tiled.partials = partials.assumingMemoryBound(to: Float.self)
    try ThreadPool.shared.run(tiled, threads: threads)
    try ThreadPool.shared.run(SplitMerge(tiled: tiled), threads: threads)
}

/// Writes k_new/v_new into the cache at positions cache_seqlens[b] ..< + count, in batch order.
private func appendToCache(_ p: AttentionProblem, _ append: CacheAppend) {
    guard case .cache(let seqlens, _, _) = p.layout else { return }
    for b in 0..<p.batch {
        let sequence = p.sequence(b)
        for j in 0..<append.count {
            for h in 0..<p.headsKV {
                let position = Int(seqlens[b]) + j
                let bytes = p.headDim * p.k.element.size  // k_new/v_new have the cache's element type
                p.keyRow(p.k, sequence, head: h, position: position)
                    .copyMemory(from: append.keys.row(batch: b, head: h, row: j), byteCount: bytes)
                p.keyRow(p.v, sequence, head: h, position: position)
                    .copyMemory(from: append.values.row(batch: b, head: h, row: j), byteCount: bytes)
            }
        }
    }
}

extension BackwardRows: WorkPlan {}
extension BackwardKeyValue: WorkPlan {}
extension BackwardQuery: WorkPlan {}

/// Runs a validated backward problem: row statistics, then dK/dV with per-chunk dQ partials, then dQ
/// (each phase's items write disjoint outputs), then the sink gradient summed over the batch in a fixed
/// order. The partials come from calloc: fresh zero pages, faulted in by the threads that first use them.
func runBackward(_ problem: BackwardProblem, options: ForwardOptions) throws(FlashAttentionError) {
    let f = problem.forward
    if f.batch == 0 || f.seqlenQ == 0 {
        // No query rows: dQ is empty, and dK, dV and the sinks' gradient are sums over nothing. (heads_q
        // may then be any multiple of heads_kv, so nothing below may count per query head.)
        // Only tensors with elements are walked: batch may be huge when seqlen_k is 0.
        var kvBatch = f.seqlenK == 0 ? 0 : 1
        if case .dense = f.layout, f.seqlenK > 0 { kvBatch = f.batch }
        for t in [problem.dk, problem.dv] {
            for b in 0..<kvBatch { for r in 0..<f.seqlenK { for h in 0..<f.headsKV {
                t.row(batch: b, head: h, row: r).initializeMemory(as: UInt8.self, repeating: 0, count: f.headDim * t.element.size)
            } } }
        }
        problem.dsinks?.update(repeating: 0, count: f.headsQ)
        return
    }
    guard CPU.hasTiledKernel else {
        throw .unsupported("the backward pass needs a CPU with AVX2, FMA and F16C; this one lacks them")
    }
    let cores = ThreadPool.onlineCores
    let threads = options.numThreads == 0 ? cores : min(options.numThreads, cores)
    let shares = f.batch * f.headsQ
    let bytes = (max(1, problem.rowDotCount) + max(1, shares)) * MemoryLayout<Float>.size
    guard let memory = malloc(bytes) else { throw .outOfMemory("could not allocate \(bytes) bytes of row statistics") }
    defer { free(memory) }
    var problem = problem
    problem.rowDots = memory.assumingMemoryBound(to: Float.self)
    problem.sinkShares = problem.rowDots! + max(1, problem.rowDotCount)
    problem.sinkShares!.update(repeating: 0, count: shares)
    let partialBytes = problem.partialFloats * MemoryLayout<Float>.size
    guard let partials = calloc(problem.partialFloats, MemoryLayout<Float>.size) else {
        throw .outOfMemory("could not allocate \(partialBytes) bytes for the dQ partial sums")
    }
    defer { free(partials) }
    problem.partials = partials.assumingMemoryBound(to: Float.self)
    try ThreadPool.shared.run(BackwardRows(problem), threads: threads)
    try ThreadPool.shared.run(BackwardKeyValue(problem), threads: threads)
    try ThreadPool.shared.run(BackwardQuery(problem), threads: threads)
    if let dsinks = problem.dsinks {
        for h in 0..<f.headsQ {
            var sum: Float = 0
            for b in 0..<f.batch { sum += problem.sinkShares![b * f.headsQ + h] }
            dsinks[h] = sum
        }
    }
}

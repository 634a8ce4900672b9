#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#elseif canImport(Musl)
import Musl
#endif

/// Runs validated problems on the pool with one kernel copy's entry points: the forward in one phase, or,
/// for shapes split along the keys, a phase of splits and a phase that merges them in a fixed order; the
/// backward in its three phases. Scratch and partial-result buffers are allocated here.

/// A forward problem's work items on one kernel copy.
struct ForwardItems: WorkPlan {
    let plan: ForwardPlan
    let kernels: KernelTable
    var itemCount: Int { plan.itemCount }
    var scratchBytes: Int { kernels.forwardScratchBytes(plan.problem.headDim, plan.problem.headDimV) }
    func run(item: Int, scratch: UnsafeMutableRawPointer) { kernels.forward(plan, item, scratch) }
}

/// The second phase of a split problem: one item per unsplit item, merging its splits.
struct SplitMerge: WorkPlan {
    let plan: ForwardPlan
    var itemCount: Int { plan.unsplitItems }
    var scratchBytes: Int { 0 }
    func run(item: Int, scratch: UnsafeMutableRawPointer) { plan.mergeSplits(item: item) }
}

/// One phase of a backward problem on one kernel copy.
struct BackwardItems: WorkPlan {
    let problem: BackwardProblem
    let phase: BackwardPhase
    let body: BackwardItemRunner
    let scratchBytes: Int
    var itemCount: Int { problem.itemCount(phase) }
    func run(item: Int, scratch: UnsafeMutableRawPointer) { body(problem, item, scratch) }
}

/// New keys and values to write into a KV cache before attending.
public struct CacheAppend {
    let keys: TensorView
    let values: TensorView
    let count: Int

    public init(keys: TensorView, values: TensorView, count: Int) {
        self.keys = keys
        self.values = values
        self.count = count
    }
}

/// Runs a validated forward problem on `threads` threads, after writing any new keys and values into the
/// cache: with `kernels`, or with the reference loop when `reference` is set.
public func runForward(
    _ problem: AttentionProblem, kernels: KernelTable, reference: Bool, threads: Int, append: CacheAppend?
) throws(FlashAttentionError) {
    if let append { appendToCache(problem, append) }
    // No output rows, no work. (Sizes are then unbounded by any allocation: a plan's item counts could
    // overflow.)
    if problem.batch == 0 || problem.seqlenQ == 0 { return }
    if reference {
        return try ThreadPool.shared.run(ReferenceForward(problem: problem), threads: threads)
    }
    var plan = ForwardPlan(problem, geometry: kernels.geometry)
    if plan.splits == 1 {
        return try ThreadPool.shared.run(ForwardItems(plan: plan, kernels: kernels), threads: threads)
    }
    try withCallMemory(bytes: plan.partialFloats * MemoryLayout<Float>.size, for: "split-KV partial results") {
        (partials) throws(FlashAttentionError) in
        plan.partials = partials.assumingMemoryBound(to: Float.self)
        try ThreadPool.shared.run(ForwardItems(plan: plan, kernels: kernels), threads: threads)
        try ThreadPool.shared.run(SplitMerge(plan: plan), threads: threads)
    }
}

/// Writes k_new/v_new into the cache at positions cache_seqlens[b] ..< + count, in batch order: copied when
/// the types agree, converted otherwise, quantized (with the row's scale written) into an 8-bit cache.
private func appendToCache(_ p: AttentionProblem, _ append: CacheAppend) {
    guard case .cache(let seqlens, _, _) = p.layout else { return }
    withUnsafeTemporaryAllocation(of: Float.self, capacity: max(p.headDim, p.headDimV)) { buffer in
        let row = buffer.baseAddress!
        for b in 0..<p.batch {
            let sequence = p.sequence(b)
            for j in 0..<append.count {
                for h in 0..<p.headsKV {
                    let position = Int(seqlens[b]) + j
                    for (cache, new, width) in [(p.k, append.keys, p.headDim), (p.v, append.values, p.headDimV)] {
                        let source = new.row(batch: b, head: h, row: j)
                        let target = p.keyRow(cache, sequence, head: h, position: position)
                        if cache.element == new.element {
                            target.copyMemory(from: source, byteCount: width * cache.element.size)
                            continue
                        }
                        new.element.loadRow(source, count: width, into: row)
                        if cache.element.isQuantized {
                            p.keyScale(cache, sequence, head: h, position: position).pointee =
                                quantizeRow(row, count: width, element: cache.element, into: target)
                        } else {
                            cache.element.storeRow(row, count: width, scale: 1, into: target)
                        }
                    }
                }
            }
        }
    }
}

/// Quantizes one row of `count` floats into `element` (an 8-bit type) at `target` and returns its scale: the one
/// definition of quantization, shared by cache appends and the Swift API's `QuantizedTensor(quantizing:)`, so
/// that a row quantized ahead of time and one appended by the library are the same bytes.
@inlinable
public func quantizeRow(
    _ row: UnsafePointer<Float>, count: Int, element: ElementType, into target: UnsafeMutableRawPointer
) -> Float {
    let scale = quantizationScale(row, count: count, element: element)
    element.storeRow(row, count: count, scale: scale == 0 ? 0 : 1 / scale, into: target)
    return scale
}

/// The scale of one row quantized to an 8-bit type: max|x| / 127 (int8) or / 448 (float8 E4M3), 0 for a row
/// of zeros. Stored values are round(x · (1 / scale)), so that dequantizing gives back x within half a step.
@inlinable
public func quantizationScale(_ row: UnsafePointer<Float>, count: Int, element: ElementType) -> Float {
    var largest: Float = 0
    for c in 0..<count { largest = max(largest, abs(row[c])) }
    return largest / (element == .int8 ? 127 : 448)
}

/// Runs a validated backward problem: row statistics, then dK/dV with per-chunk dQ partials, then dQ
/// (each phase's items write disjoint outputs), then the sink gradient summed over the batch in a fixed
/// order.
public func runBackward(_ problem: BackwardProblem, kernels: KernelTable, threads: Int) throws(FlashAttentionError) {
    let f = problem.forward
    if f.batch == 0 || f.seqlenQ == 0 { return zeroGradients(problem) }
    var problem = problem
    let g = kernels.geometry
    problem.cut(keyBlock: g.backwardKeyBlock, rowStride: (f.headDim + g.microCols - 1) / g.microCols * g.microCols)
    // One block of call memory: row dots, sink shares, then (64-byte aligned) the dQ partials, which the
    // key-value phase's items zero region by region (each item owns its chunk's rows).
    let shares = f.batch * f.headsQ
    let statistics = (max(1, problem.rowDotCount) + max(1, shares) + 15) / 16 * 16
    let floats = statistics + problem.partialFloats
    try withCallMemory(bytes: floats * MemoryLayout<Float>.size, for: "the backward's row statistics and dQ partials") {
        (memory) throws(FlashAttentionError) in
        problem.rowDots = memory.assumingMemoryBound(to: Float.self)
        problem.sinkShares = problem.rowDots! + max(1, problem.rowDotCount)
        problem.sinkShares!.update(repeating: 0, count: shares)
        problem.partials = problem.rowDots! + statistics
        for phase in [BackwardPhase.rows, .keyValue, .query] {
            let items = BackwardItems(
                problem: problem, phase: phase, body: kernels.backward(phase),
                scratchBytes: kernels.backwardScratchBytes(problem, phase))
            try ThreadPool.shared.run(items, threads: threads)
        }
        if let dsinks = problem.dsinks {
            for h in 0..<f.headsQ {
                var sum: Float = 0
                for b in 0..<f.batch { sum += problem.sinkShares![b * f.headsQ + h] }
                dsinks[h] = sum
            }
        }
    }
}

/// No query rows: dQ is empty, and dK, dV and the sinks' gradient are sums over nothing. (heads_q may then
/// be any multiple of heads_kv, so nothing here may count per query head.) Only tensors with elements are
/// walked: batch may be huge when seqlen_k is 0.
private func zeroGradients(_ problem: BackwardProblem) {
    let f = problem.forward
    var kvBatch = f.seqlenK == 0 ? 0 : 1
    if case .dense = f.layout, f.seqlenK > 0 { kvBatch = f.batch }
    for (t, width) in [(problem.dk, f.headDim), (problem.dv, f.headDimV)] {
        for b in 0..<kvBatch { for r in 0..<f.seqlenK { for h in 0..<f.headsKV {
            t.row(batch: b, head: h, row: r).initializeMemory(as: UInt8.self, repeating: 0, count: width * t.element.size)
        } } }
    }
    problem.dsinks?.update(repeating: 0, count: f.headsQ)
}

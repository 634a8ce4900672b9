import ARM64Harness
import FlashAttentionCore
import FlashAttentionKernelsNEON

/// Embedded-Swift build only: C entry points that run the NEON kernel copy's table (`kernelTable`, the same
/// value the library's dispatch registers) on raw buffers, one thread, the way FlashAttentionCore's drivers
/// (Drivers.swift) do with the pool: plan, work items, split merge; the backward's three phases. Validation and
/// the thread pool are not compiled here; the C driver (driver.c) only builds valid problems.

private func view(_ base: UnsafeMutableRawPointer, _ element: ElementType, rows: Int64, heads: Int64, dim: Int64) -> TensorView {
    TensorView(
        base: base, element: element, batchStride: Int(rows * heads * dim), rowStride: Int(heads * dim),
        headStride: Int(dim))
}

private func problem(_ a: fa_arm64_problem) -> AttentionProblem {
    let element = ElementType(rawValue: a.dtype)!, kvElement = ElementType(rawValue: a.kv_dtype)!
    let dv = a.head_dim_v == 0 ? a.head_dim : a.head_dim_v
    var k = view(a.k, kvElement, rows: a.seqlen_k, heads: a.heads_kv, dim: a.head_dim)
    var v = view(a.v, kvElement, rows: a.seqlen_k, heads: a.heads_kv, dim: dv)
    if let ks = a.k_scale, let vs = a.v_scale {
        k.scale = ScaleView(base: ks, batchStride: Int(a.seqlen_k * a.heads_kv), rowStride: Int(a.heads_kv), headStride: 1)
        v.scale = ScaleView(base: vs, batchStride: Int(a.seqlen_k * a.heads_kv), rowStride: Int(a.heads_kv), headStride: 1)
    }
    return AttentionProblem(
        batch: Int(a.batch), seqlenQ: Int(a.seqlen_q), seqlenK: Int(a.seqlen_k), headsQ: Int(a.heads_q),
        headsKV: Int(a.heads_kv), headDim: Int(a.head_dim), headDimV: Int(dv),
        q: view(a.q, element, rows: a.seqlen_q, heads: a.heads_q, dim: a.head_dim), k: k, v: v,
        out: view(a.out, element, rows: a.seqlen_q, heads: a.heads_q, dim: dv),
        lse: LSEView(base: a.lse, batchStride: Int(a.heads_q * a.seqlen_q), headStride: Int(a.seqlen_q), rowStride: 1),
        scale: a.scale, windowLeft: a.window_left < 0 ? nil : Int(a.window_left),
        windowRight: a.window_right < 0 ? nil : Int(a.window_right), alibiSlopes: nil, alibiBatchStride: 0,
        softcap: a.softcap, sinks: nil, layout: .dense, storage: .contiguous, maxSeqlenQ: Int(a.seqlen_q),
        maxSeqlenK: Int(a.seqlen_k))
}

/// Zeroed, 64-byte aligned memory (the pool's scratch is zeroed once, so padding lanes hold finite values).
private func zeroed(_ bytes: Int) -> UnsafeMutableRawPointer {
    let memory = UnsafeMutableRawPointer.allocate(byteCount: max(bytes, 64), alignment: 64)
    memory.initializeMemory(as: UInt8.self, repeating: 0, count: max(bytes, 64))
    return memory
}

@_cdecl("fa_arm64_forward")
public func arm64Forward(_ a: UnsafePointer<fa_arm64_problem>) -> Int32 {
    let p = problem(a.pointee)
    var plan = ForwardPlan(p, geometry: kernelTable.geometry)
    let scratch = zeroed(kernelTable.forwardScratchBytes(p.headDim, p.headDimV))
    defer { scratch.deallocate() }
    var partials: UnsafeMutableRawPointer? = nil
    if plan.splits > 1 {
        partials = zeroed(plan.partialFloats * MemoryLayout<Float>.size)
        plan.partials = partials!.assumingMemoryBound(to: Float.self)
    }
    for item in 0..<plan.itemCount { kernelTable.forward(plan, item, scratch) }
    if plan.splits > 1 {
        for item in 0..<plan.unsplitItems { plan.mergeSplits(item: item) }
        partials!.deallocate()
    }
    return Int32(plan.splits)
}

@_cdecl("fa_arm64_backward")
public func arm64Backward(_ a: UnsafePointer<fa_arm64_problem>) -> Int32 {
    let f = problem(a.pointee)
    let element = ElementType(rawValue: a.pointee.dtype)!, kvElement = ElementType(rawValue: a.pointee.kv_dtype)!
    let (sq, sk, hq, hkv, d) = (a.pointee.seqlen_q, a.pointee.seqlen_k, a.pointee.heads_q, a.pointee.heads_kv, a.pointee.head_dim)
    let dv = Int64(f.headDimV)
    var problem = BackwardProblem(
        forward: f, dout: view(a.pointee.dout, element, rows: sq, heads: hq, dim: dv),
        dq: view(a.pointee.dq, element, rows: sq, heads: hq, dim: d),
        dk: view(a.pointee.dk, kvElement, rows: sk, heads: hkv, dim: d),
        dv: view(a.pointee.dv, kvElement, rows: sk, heads: hkv, dim: dv), dsinks: nil)
    let g = kernelTable.geometry
    problem.cut(keyBlock: g.backwardKeyBlock, rowStride: (f.headDim + g.microCols - 1) / g.microCols * g.microCols)
    let shares = f.batch * f.headsQ
    let statistics = (max(1, problem.rowDotCount) + max(1, shares) + 15) / 16 * 16
    let memory = zeroed((statistics + problem.partialFloats) * MemoryLayout<Float>.size)
    defer { memory.deallocate() }
    problem.rowDots = memory.assumingMemoryBound(to: Float.self)
    problem.sinkShares = problem.rowDots! + max(1, problem.rowDotCount)
    problem.partials = problem.rowDots! + statistics
    for phase in [BackwardPhase.rows, .keyValue, .query] {
        let scratch = zeroed(kernelTable.backwardScratchBytes(problem, phase))
        let body = kernelTable.backward(phase)
        for item in 0..<problem.itemCount(phase) { body(problem, item, scratch) }
        scratch.deallocate()
    }
    return 0
}

@_cdecl("fa_arm64_exp2")
public func arm64Exp2(_ values: UnsafeMutablePointer<Float>, _ count: Int64) {
    kernelTable.exp2(values, Int(count))
}

@_cdecl("fa_arm64_lanes")
public func arm64Lanes() -> Int64 { Int64(kernelTable.geometry.lanes) }

@_cdecl("fa_arm64_micro_rows")
public func arm64MicroRows() -> Int64 { Int64(kernelTable.geometry.microRows) }

import FlashAttentionCore
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#elseif canImport(Musl)
import Musl
#endif

/// The backward pass's kernels (FlashAttention-2, recomputing the probabilities from the forward LSE), one
/// function per phase of `BackwardProblem`:
///
/// 1. `backwardRows`: D_i = rowsum(dO_i ∘ O_i), and the sink-gradient shares dsink_h = −Σ_i exp(sink_h −
///    LSE_i) · D_i.
/// 2. `backwardKeyValue`: for each key block of the chunk, every query head of the group and every query
///    block that sees the keys: S = Q Kᵀ, P = exp(S·scale − LSE), dP = dO Vᵀ, dS = P ∘ (dP − D);
///    dV += Pᵀ dO, dK += dSᵀ Q, and the chunk's own dQ partial += dS K. Five products per tile pair, as on a
///    GPU; dK · scale and dV are written when the key block is done.
/// 3. `backwardQuery`: dQ = scale · the sum of the chunks' partials, in chunk order.
///
/// Scores are recomputed exactly as the forward computed them (softcap, ALiBi, the causal/window mask);
/// under softcap dS carries the derivative 1 − tanh². The tiles reuse the forward's micro-kernels:
/// `scoreTile` with query rows against transposed key panels, and `outputTile` reading P and dS down
/// their columns (dV, dK) and dS transposed (dQ). bfloat16 q, k, v and dout on a copy with bfloat16 products
/// take them for all five (BackwardPairs.swift).

/// Queries per backward block: a multiple of `microRows` (score and output tiles) and of `transposeSize`.
let backwardQueryBlock = 96

/// Floats between the rows of a block in scratch: the larger of head_dim and head_dim_v rounded up to
/// `microCols`, plus 16 so that the rows of a column slab (read down by the output tiles) spread over the
/// L1 sets instead of sharing a few, as a power-of-two stride would.
func backwardRowStride(_ f: AttentionProblem) -> Int { Workspace.paddedDim(max(f.headDim, f.headDimV)) + 16 }

/// How one recomputed score becomes a probability and a score gradient: the forward's transforms and
/// mask for one query row (position `position` in a sequence with `offset` = seqlen_k − seqlen_q).
///
/// The scores arrive exactly as the forward computed them: the query rows are pre-multiplied by the scale
/// and dotted with the keys by the same micro-kernel, so S is bitwise the forward's. The exponent is
/// (S − LSE)·log2(e): the difference of two close numbers (exact, or nearly) converted to log2 units only
/// then, so P keeps its few-ulp accuracy for |logits| in the hundreds, where recomputing from unscaled
/// scores, or subtracting in log2 units, lost a few ulp of |logit|.
struct BackwardScores {
    let slope: Float  // ALiBi slope, 0 without ALiBi
    let softcap: Float  // 0 without softcap
    /// With dropout the stored P is the dropped one (P ∘ Z, for dV) and dS = P ∘ (Z ∘ dP − D), Z being 1/(1 − p)
    /// where kept and 0 where dropped: the forward's mask, regenerated per (query, key).
    let dropout: Dropout?
    /// A caller's mask, added after softcap and ALiBi as in the forward.
    let attnMask: AttentionMask?

    /// P and dS of one query row of a tile pair, in place: scores `s` become P = e^(s' − lse) and `dP` becomes
    /// dS = P ∘ (dP − D) (∘ the softcap derivative 1 − tanh²; with dropout as above), for `count` keys from
    /// `firstKey` (a whole number of vectors); keys outside `visible` get 0. `row` is the row's dropout state,
    /// `maskRow` its offset in the caller's mask.
    @inline(__always)
    func gradientRow(
        s: UnsafeMutablePointer<Float>, dP: UnsafeMutablePointer<Float>, count: Int, firstKey: Int,
        visible: Range<Int>, position: Int, lse: Float, dot: Float, row: DropoutRow?, maskRow: Int
    ) {
        let rowLSE = Vec(repeating: lse), rowDot = Vec(repeating: dot)
        if slope == 0 && softcap == 0 && dropout == nil && attnMask == nil && visible == firstKey..<(firstKey + count) {
            // Every key visible and no transform (most pairs): no masks.
            for k in stride(from: 0, to: count, by: lanes) {
                let p = exponential(load(s + k) - rowLSE)
                store(p, s + k)
                store(p * (load(dP + k) - rowDot), dP + k)
            }
            return
        }
        let low = Vec(repeating: Float(visible.lowerBound)), high = Vec(repeating: Float(visible.upperBound))
        let distance = Vec(repeating: Float(position - firstKey)) - laneIndices
        for k in stride(from: 0, to: count, by: lanes) {
            var x = load(s + k)
            var derivative = Vec(repeating: 1)
            if softcap > 0 {
                x = softcapped(x, softcap)
                let t = x / softcap
                derivative = Vec(repeating: 1) - t * t
            }
            let key = laneIndices + Vec(repeating: Float(firstKey + k))
            if slope != 0 {
                let d = distance - Vec(repeating: Float(k))
                x = x - Vec(repeating: slope) * maximum(d, -d)
            }
            if let attnMask {
                // Lanes past the visible keys read nothing (their keys may lie beyond the mask; p is 0 there).
                let lo = max(0, visible.lowerBound - firstKey - k), hi = min(lanes, visible.upperBound - firstKey - k)
                if lo < hi { x = x + attnMask.biases(at: maskRow &+ (firstKey + k) &* attnMask.colStride, lanes: lo..<hi) }
            }
            // Exactly 0 below e^−87, as in the forward's masked softmax: a key a caller's mask hides inside the
            // band would get exp2's 1e-38, whose products in the dV, dK and dQ tiles are subnormal (4.5× slower).
            let shifted = x - rowLSE
            let p = exponential(shifted).replacing(
                with: 0, where: (key .< low) .| (key .>= high) .| (shifted .< Vec(repeating: -87)))
            var z = Vec(repeating: 1)
            if let dropout, let row {
                let keys = laneBits &+ UInt32(truncatingIfNeeded: firstKey + k)
                let keep = kept(dropout, low: VecBits(repeating: row.low), high: VecBits(repeating: row.high), key: keys)
                z = Vec(repeating: dropout.scale).replacing(with: 0, where: .!keep)
            }
            store(p * z, s + k)
            store(p * (load(dP + k) * z - rowDot) * derivative, dP + k)
        }
    }
}

/// Scratch bytes of each phase, per thread.
func backwardScratchBytes(_ problem: BackwardProblem, _ phase: BackwardPhase) -> Int {
    let f = problem.forward
    switch phase {
    case .rows: return 2 * f.headDimV * MemoryLayout<Float>.size
    case .query: return Workspace.paddedDim(f.headDim) * MemoryLayout<Float>.size
    case .keyValue:
        // See `backwardKeyValue`.
        let kb = problem.keyBlock, qb = backwardQueryBlock, ld = backwardRowStride(f)
        return (5 * kb * ld + 3 * qb * ld + 3 * qb * kb + 2 * qb + 2 * microCols) * MemoryLayout<Float>.size
    }
}

/// The item runner of each phase.
func backwardRunner(_ phase: BackwardPhase) -> BackwardItemRunner {
    switch phase {
    case .rows: return backwardRows
    case .keyValue: return backwardKeyValue
    case .query: return backwardQuery
    }
}

/// Phase 1: D and the sink-gradient share of item (sequence, query head).
func backwardRows(_ problem: BackwardProblem, _ item: Int, _ scratch: UnsafeMutableRawPointer) {
    let f = problem.forward
    let s = f.sequence(item / f.headsQ), h = item % f.headsQ
    let d = f.headDimV
    let o = scratch.assumingMemoryBound(to: Float.self), g = o + d
    var share: Float = 0
    let sink = f.sinks.map { $0[h] }
    for i in 0..<s.seqlenQ {
        let row = s.qRow + i
        withStorage(f.out.element) { loadRow($0, f.out.row(batch: s.qBatch, head: h, row: row), count: d, into: o) }
        withStorage(problem.dout.element) {
            loadRow($0, problem.dout.row(batch: s.qBatch, head: h, row: row), count: d, into: g)
        }
        var dot: Float = 0
        for c in 0..<d { dot += o[c] * g[c] }
        problem.rowDots![problem.rowIndex(s, head: h, row: row)] = dot
        if let sink, let lse = f.lse {
            let l = lse.row(batch: s.qBatch, head: h, row: row).pointee
            if l > -.infinity { share -= exp(sink - l) * dot }
        }
    }
    problem.sinkShares?[s.batch * f.headsQ + h] = share
}

/// Phase 2: dK, dV and the chunk's dQ partials of item (key chunk, sequence, kv head).
///
/// Scratch, in floats (K = keyBlock keys, Q = `backwardQueryBlock` queries, D = `backwardRowStride`; rows
/// of values, dV and dO hold head_dim_v floats, the others head_dim):
///     kT, vT      K × D each      the key block's keys and values as transposed `microCols`-key panels
///     kRows       K × D           its keys as rows, for dQ += dS K
///     dK, dV      K × D each      the gradient accumulators
///     q, dO       Q × D each      a query block's rows (zero-padded to whole tiles)
///     s, dp       Q × K each      scores then P; dP then dS; [query][key]
///     dST         K × Q           dS transposed, [key][query]
///     dQ          Q × D           the query block's dQ += dS K, added to the chunk's partial after
///     lse, dots   Q each; ones, columnMax `microCols` each
func backwardKeyValue(_ problem: BackwardProblem, _ item: Int, _ scratch: UnsafeMutableRawPointer) {
    let f = problem.forward
    let units = f.batch * f.headsKV
    let chunk = item / units, s = f.sequence(item % units / f.headsKV), kvHead = item % f.headsKV
    let kb = problem.keyBlock, qb = backwardQueryBlock, d = f.headDim, dv = f.headDimV, ld = backwardRowStride(f)
    let base = scratch.assumingMemoryBound(to: Float.self)
    let kT = base, vT = kT + kb * ld, kRows = vT + kb * ld, dK = kRows + kb * ld, dV = dK + kb * ld
    let q = dV + kb * ld, dO = q + qb * ld, p = dO + qb * ld, dS = p + qb * kb
    let dST = dS + qb * kb, dQ = dST + kb * qb, lse = dQ + qb * ld, dots = lse + qb, ones = dots + qb
    let columnMax = ones + microCols
    ones.update(repeating: 1, count: microCols)
    let offset = s.seqlenK - s.seqlenQ
    let pairs = backwardPairProducts(problem)
    if pairs && hasAMXTiles { beginAMXItem() }
    defer { if pairs && hasAMXTiles { endAMXItem() } }
    // This item owns its chunk's dQ partial rows of the sequence for the group's heads: it zeroes them here
    // (the call memory is reused between calls, not fresh zero pages).
    for h in (kvHead * f.groupSize)..<((kvHead + 1) * f.groupSize) where s.seqlenQ > 0 {
        problem.partialRow(chunk: chunk, s, head: h, row: 0).update(repeating: 0, count: s.seqlenQ * problem.partialStride)
    }
    let firstBlock = chunk * problem.blocksPerChunk
    for block in firstBlock..<(firstBlock + problem.blocksPerChunk) {
        let firstKey = block * kb, keyCount = min(kb, s.seqlenK - firstKey)
        guard keyCount > 0 else { break }
        let panels = (keyCount + microCols - 1) / microCols
        if pairs {
            packKeyBlockPairs(f, s, head: kvHead, first: firstKey, count: keyCount, keyBlock: kb, into: (kT, vT, kRows))
        } else {
            packTransposed(f.k, s, head: kvHead, first: firstKey, count: keyCount, depth: d, into: kT, keys: true)
            packTransposed(f.v, s, head: kvHead, first: firstKey, count: keyCount, depth: dv, into: vT, keys: true)
            loadRows(f.k, s, head: kvHead, first: firstKey, count: keyCount, depth: d, into: kRows, stride: ld, padTo: keyCount, keys: true)
        }
        dK.update(repeating: 0, count: 2 * kb * ld)
        // Queries that see any of these keys: i + offset − left ≤ key ≤ i + offset + right.
        let lastKey = firstKey + keyCount - 1
        let qLow = max(0, f.windowRight.map { firstKey - offset - $0 } ?? 0)
        let qHigh = min(s.seqlenQ, f.windowLeft.map { lastKey - offset + $0 + 1 } ?? s.seqlenQ)
        for h in (kvHead * f.groupSize)..<((kvHead + 1) * f.groupSize) {
            let scores = BackwardScores(
                slope: f.alibiSlopes.map { $0[s.batch * f.alibiBatchStride + h] } ?? 0,
                softcap: f.softcap, dropout: f.dropout, attnMask: f.attnMask)
            for firstQuery in stride(from: qLow, to: qHigh, by: qb) {
                // The next block's rows come from DRAM or L3 (each key block rereads the queries):
                // requesting them now hides the misses behind this block's products.
                if firstQuery + qb < qHigh {
                    prefetchQueryRows(problem, s, head: h, first: firstQuery + qb, count: min(qb, qHigh - firstQuery - qb))
                } else if h + 1 < (kvHead + 1) * f.groupSize {
                    prefetchQueryRows(problem, s, head: h + 1, first: qLow, count: min(qb, qHigh - qLow))
                }
                let tiles = BackwardTiles(
                    problem: problem, pairs: pairs, sequence: s, head: h, chunk: chunk, firstQuery: firstQuery,
                    rows: min(qb, qHigh - firstQuery), firstKey: firstKey, keyCount: keyCount, panels: panels,
                    scratch: (kT, vT, kRows, dK, dV, q, dO, p, dS, dST, dQ, lse, dots, ones, columnMax))
                tiles.run(scores, offset: offset)
            }
        }
        // dK = scale · dSᵀQ: the float32 products accumulate against the queries × scale, the pair products against
        // the queries as given.
        let dKScale: Float = pairs ? f.scale : 1
        for key in 0..<keyCount {
            let row = s.kRow + firstKey + key
            withStorage(problem.dk.element) {
                storeRow($0, dK + key * ld, count: d, scale: dKScale, into: problem.dk.row(batch: s.kvBatch, head: kvHead, row: row))
            }
            withStorage(problem.dv.element) {
                storeRow($0, dV + key * ld, count: dv, scale: 1, into: problem.dv.row(batch: s.kvBatch, head: kvHead, row: row))
            }
        }
    }
}

/// One (query block, key block) pair of phase 2: the five products, in float32 or (`pairs`) from bfloat16 pairs.
struct BackwardTiles {
    let problem: BackwardProblem
    let pairs: Bool
    let sequence: Sequence
    let head: Int, chunk: Int, firstQuery: Int, rows: Int, firstKey: Int, keyCount: Int, panels: Int
    let scratch: (
        kT: UnsafeMutablePointer<Float>, vT: UnsafeMutablePointer<Float>, kRows: UnsafeMutablePointer<Float>,
        dK: UnsafeMutablePointer<Float>, dV: UnsafeMutablePointer<Float>, q: UnsafeMutablePointer<Float>,
        dO: UnsafeMutablePointer<Float>, p: UnsafeMutablePointer<Float>, dS: UnsafeMutablePointer<Float>,
        dST: UnsafeMutablePointer<Float>, dQ: UnsafeMutablePointer<Float>, lse: UnsafeMutablePointer<Float>,
        dots: UnsafeMutablePointer<Float>, ones: UnsafeMutablePointer<Float>, columnMax: UnsafeMutablePointer<Float>)

    func run(_ scores: BackwardScores, offset: Int) {
        let f = problem.forward, s = sequence
        let (_, _, _, _, _, _, _, _, _, _, dQ, lse, dots, _, _) = scratch
        let d = f.headDim, ld = backwardRowStride(f), ldQ = problem.partialStride
        // Rows up to a whole tile (pair products: a whole 32-row block), zero in every operand.
        let unit = pairs ? amxStepRows : microRows, padded = (rows + unit - 1) / unit * unit
        // This chunk's dQ partial rows of the block, added to last.
        let partial = problem.partialRow(chunk: chunk, s, head: head, row: firstQuery)
        prefetchRow(partial, bytes: rows * ldQ * MemoryLayout<Float>.size)
        for r in 0..<rows {
            let row = s.qRow + firstQuery + r
            lse[r] = f.lse!.row(batch: s.qBatch, head: head, row: row).pointee
            dots[r] = problem.rowDots![problem.rowIndex(s, head: head, row: row)]
        }
        if pairs { pairScores(padded: padded) } else { floatScores(padded: padded) }
        gradients(scores, offset: offset, padded: padded)
        // dV += Pᵀ dO and dK += dSᵀ Q (over the block's queries), then dQ = dS K (over the block's keys) in
        // scratch: accumulating into the partial directly waits on its misses at every tile (measured: that
        // product ran at 55 GFLOP/s, the others at 75–100).
        if pairs { pairGradientProducts(padded: padded) } else { floatGradientProducts(padded: padded) }
        for r in 0..<rows { addRow(dQ + r * ld, into: partial + r * ldQ, count: d) }
    }

    /// S = Q Kᵀ and dP = dO Vᵀ in float32, [query][key], from the queries × scale (rounded as the forward rounds
    /// them; see BackwardScores) and dout loaded as float32 rows: each key panel stays in L1 across the rows.
    private func floatScores(padded: Int) {
        let f = problem.forward, s = sequence
        let (kT, vT, _, _, _, q, dO, p, dS, _, _, _, _, _, columnMax) = scratch
        let kb = problem.keyBlock, d = f.headDim, dv = f.headDimV, ld = backwardRowStride(f)
        loadRows(f.q, s, head: head, first: firstQuery, count: rows, depth: d, into: q, stride: ld, padTo: padded, scale: f.scale)
        loadRows(problem.dout, s, head: head, first: firstQuery, count: rows, depth: dv, into: dO, stride: ld, padTo: padded)
        for panel in 0..<panels {
            for tile in 0..<(padded / microRows) {
                scoreTile(
                    keys: q + tile * microRows * ld, ldK: ld, queries: kT + panel * microCols * d, depth: d,
                    s: p + tile * microRows * kb + panel * microCols, ldS: kb, columnMax: columnMax, band: nil)
                scoreTile(
                    keys: dO + tile * microRows * ld, ldK: ld, queries: vT + panel * microCols * dv, depth: dv,
                    s: dS + tile * microRows * kb + panel * microCols, ldS: kb, columnMax: columnMax, band: nil)
            }
        }
    }

    /// P, and dS = P ∘ (dP − D) (∘ the softcap derivative), a vector of keys at a time; padding rows and
    /// keys get 0, so that whole tiles can be accumulated after.
    private func gradients(_ scores: BackwardScores, offset: Int, padded: Int) {
        let f = problem.forward, s = sequence
        let (_, _, _, _, _, _, _, p, dS, _, _, lse, dots, _, _) = scratch
        let kb = problem.keyBlock
        for r in 0..<padded {
            let i = firstQuery + r
            // A row whose LSE is −inf saw no key (its mask hid them all): its P is 0, not exp(−inf + inf).
            let visible = r < rows && lse[r] != -.infinity ? f.keyRange(position: i, seqlenQ: s.seqlenQ, seqlenK: s.seqlenK) : 0..<0
            scores.gradientRow(
                s: p + r * kb, dP: dS + r * kb, count: panels * microCols, firstKey: firstKey,
                visible: visible.clamped(to: firstKey..<(firstKey + keyCount)), position: i + offset,
                lse: r < rows ? lse[r] : 0, dot: r < rows ? dots[r] : 0,
                row: f.dropout?.row(batch: s.batch, head: head, position: i),
                maskRow: f.attnMask?.rowOffset(batch: s.batch, head: head, position: i) ?? 0)
        }
    }

    /// dV += Pᵀ dO, dK += dSᵀ Q and dQ = dS K with float32 micro-tiles, one column slab at a time for all three
    /// (dV's columns run to head_dim_v, the others' to head_dim).
    private func floatGradientProducts(padded: Int) {
        let f = problem.forward
        let (_, _, kRows, dK, dV, q, dO, p, dS, dST, dQ, _, _, ones, _) = scratch
        let kb = problem.keyBlock, qb = backwardQueryBlock, d = f.headDim, dv = f.headDimV, ld = backwardRowStride(f)
        // dSᵀ, so that the dQ tiles' broadcasts read adjacent queries.
        for r in stride(from: 0, to: padded, by: transposeSize) {
            for k in stride(from: 0, to: panels * microCols, by: transposeSize) {
                transposeBlock(dS + r * kb + k, kb, dST + k * qb + r, qb)
            }
        }
        dQ.update(repeating: 0, count: padded * ld)
        for column in stride(from: 0, to: max(d, dv), by: microCols) {
            for keyTile in 0..<((keyCount + microRows - 1) / microRows) {
                let k0 = keyTile * microRows
                if column < dv {
                    outputTile(
                        MicroRows.self, Float32Storage.self, Rescale.self, p: p + k0, ldP: kb, v: dO + column, ldV: ld,
                        count: rows, alpha: ones, o: dV + k0 * ld + column, ldO: ld)
                }
                if column < d {
                    outputTile(
                        MicroRows.self, Float32Storage.self, Rescale.self, p: dS + k0, ldP: kb, v: q + column, ldV: ld,
                        count: rows, alpha: ones, o: dK + k0 * ld + column, ldO: ld)
                }
            }
            for tile in 0..<(padded / microRows) where column < d {
                outputTile(
                    MicroRows.self, Float32Storage.self, Rescale.self, p: dST + tile * microRows, ldP: qb,
                    v: kRows + column, ldV: ld, count: keyCount, alpha: ones,
                    o: dQ + tile * microRows * ld + column, ldO: ld)
            }
        }
    }
}

/// Prefetches the q and dout rows of a query block.
private func prefetchQueryRows(_ problem: BackwardProblem, _ s: Sequence, head h: Int, first: Int, count: Int) {
    let f = problem.forward
    for r in first..<(first + count) {
        let row = s.qRow + r
        prefetchRow(f.q.row(batch: s.qBatch, head: h, row: row), bytes: f.headDim * f.q.element.size)
        prefetchRow(problem.dout.row(batch: s.qBatch, head: h, row: row), bytes: f.headDimV * problem.dout.element.size)
    }
}

/// Phase 3: dQ = scale · Σ over chunks of the partials, in chunk order, for item (sequence, query head).
func backwardQuery(_ problem: BackwardProblem, _ item: Int, _ scratch: UnsafeMutableRawPointer) {
    let f = problem.forward
    let s = f.sequence(item / f.headsQ), h = item % f.headsQ, d = f.headDim
    let sum = scratch.assumingMemoryBound(to: Float.self)
    for i in 0..<s.seqlenQ {
        sum.update(from: problem.partialRow(chunk: 0, s, head: h, row: i), count: d)
        for chunk in 1..<max(1, problem.chunks) {
            addRow(problem.partialRow(chunk: chunk, s, head: h, row: i), into: sum, count: d)
        }
        withStorage(problem.dq.element) {
            storeRow($0, sum, count: d, scale: f.scale, into: problem.dq.row(batch: s.qBatch, head: h, row: s.qRow + i))
        }
    }
}

/// target[c] += source[c] for c < count.
@inline(__always)
private func addRow(_ source: UnsafePointer<Float>, into target: UnsafeMutablePointer<Float>, count: Int) {
    var c = 0
    while c + lanes <= count {
        store(load(target + c) + load(source + c), target + c)
        c += lanes
    }
    while c < count {
        target[c] += source[c]
        c += 1
    }
}

/// The address of row `row` of query-shaped `tensor` (dq, dout, q), or of key-shaped one with `keys`.
@inline(__always)
func rowAddress(_ tensor: TensorView, _ s: Sequence, head h: Int, row: Int, keys: Bool) -> UnsafeMutableRawPointer {
    keys ? tensor.row(batch: s.kvBatch, head: h, row: s.kRow + row) : tensor.row(batch: s.qBatch, head: h, row: s.qRow + row)
}

/// Loads `count` rows from `first` as float32 rows `stride` apart, times `scale`, zero-filling the columns
/// past `depth` and the rows up to `padTo`.
private func loadRows(
    _ tensor: TensorView, _ s: Sequence, head h: Int, first: Int, count: Int, depth: Int,
    into target: UnsafeMutablePointer<Float>, stride: Int, padTo: Int, keys: Bool = false, scale: Float = 1
) {
    withStorage(tensor.element) { storage in
        for r in 0..<count {
            loadRow(
                storage, rowAddress(tensor, s, head: h, row: first + r, keys: keys), count: depth, scale: scale,
                into: target + r * stride)
            (target + r * stride + depth).update(repeating: 0, count: stride - depth)
        }
    }
    if padTo > count { (target + count * stride).update(repeating: 0, count: (padTo - count) * stride) }
}

/// Packs `count` rows from `first` transposed into `microCols`-row panels [panel][depth][microCols] (rows
/// past `count` zero), the layout `scoreTile` reads its columns from.
private func packTransposed(
    _ tensor: TensorView, _ s: Sequence, head h: Int, first: Int, count: Int, depth: Int,
    into target: UnsafeMutablePointer<Float>, keys: Bool
) {
    let panels = (count + microCols - 1) / microCols
    target.update(repeating: 0, count: panels * microCols * depth)
    withUnsafeTemporaryAllocation(of: Float.self, capacity: depth) { row in
        withStorage(tensor.element) { storage in
            for r in 0..<count {
                loadRow(storage, rowAddress(tensor, s, head: h, row: first + r, keys: keys), count: depth, into: row.baseAddress!)
                let panel = target + (r / microCols) * microCols * depth + r % microCols
                for c in 0..<depth { panel[c * microCols] = row[c] }
            }
        }
    }
}

import FlashAttentionShims
import Glibc

/// The backward pass (FlashAttention-2), recomputing the probabilities from the forward LSE, in three
/// phases with one owner per output element (no atomics; bitwise identical for every thread count):
///
/// 1. `BackwardRows`: D_i = rowsum(dO_i ∘ O_i) per query row, and each (sequence, head)'s share of the
///    sink gradient, dsink_h = −Σ_i exp(sink_h − LSE_i) · D_i.
/// 2. `BackwardKeyValue`: per (key chunk, sequence, kv head), for each 96-key block of the chunk, every
///    query head of the group and every 96-query block that sees the keys: S = Q Kᵀ,
///    P = exp(S·scale − LSE), dP = dO Vᵀ, dS = P ∘ (dP − D); dV += Pᵀ dO, dK += dSᵀ Q, and the chunk's
///    own dQ partial += dS K. Five products per tile pair, as on a GPU; dK · scale and dV are written
///    when the key block is done.
/// 3. `BackwardQuery`: dQ = scale · the sum of the chunks' partials, in chunk order.
///
/// The keys are cut into chunks so that there are enough items to share among threads; the chunk count
/// depends on the shape only (never on the thread count), which is what keeps the dQ sums deterministic.
/// Scores are recomputed exactly as the forward computed them (softcap, ALiBi, the causal/window mask);
/// under softcap dS carries the derivative 1 − tanh². The tiles reuse the forward's micro-kernels:
/// `scoreTile` with query rows against transposed key panels, and `outputTile` reading P and dS down
/// their columns (dV, dK) and dS transposed (dQ).

/// Keys per backward block: a multiple of 16 (score panels) and of 6 (output tiles).
let backwardKeyBlock = 96
/// Queries per backward block: a multiple of 6 (score and output tiles).
let backwardQueryBlock = 96

/// Floats between the rows of a block in scratch: head_dim rounded up to 16, plus 16 so that the rows of
/// a 16-column slab (read down by the output tiles) spread over the L1 sets instead of sharing a few, as
/// a power-of-two stride would.
func backwardRowStride(_ headDim: Int) -> Int { Workspace.paddedDim(headDim) + 16 }

/// A validated backward problem: the forward problem (with its `out` and `lse`) and the gradients.
package struct BackwardProblem: @unchecked Sendable {
    package var forward: AttentionProblem
    package var dout: TensorView
    package var dq: TensorView
    package var dk: TensorView
    package var dv: TensorView
    package var dsinks: UnsafeMutablePointer<Float>?
    /// Key chunks (phase 2 items per sequence and kv head) and 96-key blocks per chunk.
    package let chunks: Int
    package let blocksPerChunk: Int
    /// D per (query batch entry, head, row), [qBatches][headsQ][seqlenQ] with seqlenQ the q tensor's rows;
    /// set by the driver.
    package var rowDots: UnsafeMutablePointer<Float>?
    /// Each (sequence, head)'s share of the sink gradient, [batch][headsQ]; set by the driver.
    package var sinkShares: UnsafeMutablePointer<Float>?
    /// The chunks' dQ partials, `partialFloats` zero-filled floats; set by the driver.
    package var partials: UnsafeMutablePointer<Float>?

    package init(
        forward: AttentionProblem, dout: TensorView, dq: TensorView, dk: TensorView, dv: TensorView,
        dsinks: UnsafeMutablePointer<Float>?
    ) {
        self.forward = forward
        self.dout = dout
        self.dq = dq
        self.dk = dk
        self.dv = dv
        self.dsinks = dsinks
        // Enough chunks for 32 items, as long as the partials stay within max(64 MiB, 2 × dQ in float32).
        let keyBlocks = max(1, (forward.maxSeqlenK + backwardKeyBlock - 1) / backwardKeyBlock)
        let units = max(1, forward.batch * forward.headsKV)
        let chunkBytes = Self.chunkFloats(forward) * MemoryLayout<Float>.size
        let budget = max(64 << 20, 2 * chunkBytes)
        let wanted = min(keyBlocks, (32 + units - 1) / units, max(1, budget / max(1, chunkBytes)))
        blocksPerChunk = (keyBlocks + wanted - 1) / wanted
        chunks = (keyBlocks + blocksPerChunk - 1) / blocksPerChunk
    }

    /// Index of row `row` (q-tensor row) of head h in `rowDots`.
    @inline(__always) func rowIndex(_ s: Sequence, head h: Int, row: Int) -> Int {
        (s.qBatch * forward.headsQ + h) * forward.seqlenQ + row
    }

    /// Floats of `rowDots`.
    package var rowDotCount: Int { Self.qBatches(forward) * forward.headsQ * forward.seqlenQ }

    private static func qBatches(_ f: AttentionProblem) -> Int {
        if case .varlen = f.layout { return 1 } else { return f.batch }
    }

    private static func chunkFloats(_ f: AttentionProblem) -> Int {
        qBatches(f) * f.headsQ * f.seqlenQ * Workspace.paddedDim(f.headDim)
    }

    /// Floats of `partials`.
    package var partialFloats: Int { chunks * Self.chunkFloats(forward) }

    /// Row `row` of sequence `s`, head h, in chunk `chunk`'s dQ partial (rows head_dim rounded up to 16 apart).
    @inline(__always) func partialRow(chunk: Int, _ s: Sequence, head h: Int, row: Int) -> UnsafeMutablePointer<Float> {
        let f = forward
        let region = chunk * Self.qBatches(f) * f.headsQ + s.qBatch * f.headsQ + h
        return partials! + (region * f.seqlenQ + s.qRow + row) * Workspace.paddedDim(f.headDim)
    }
}

/// How one recomputed score becomes a probability and a score gradient: the forward's transforms and
/// mask for one query row (position `position` in a sequence with `offset` = seqlen_k − seqlen_q).
struct BackwardScores {
    let scaleLog2: Float
    let slope: Float  // ALiBi slope · log2(e), 0 without ALiBi
    let softcap: Float  // softcap · log2(e), 0 without softcap

    /// P and dS of one query row of a tile pair, in place: raw scores `s` (Q·K, unscaled) become
    /// P = 2^(s' − lse2) and `dP` becomes dS = P ∘ (dP − D) (∘ the softcap derivative 1 − tanh²), for
    /// `count` keys from `firstKey`; keys outside `visible` get 0.
    @inline(__always)
    func gradientRow(
        s: UnsafeMutablePointer<Float>, dP: UnsafeMutablePointer<Float>, count: Int, firstKey: Int,
        visible: Range<Int>, position: Int, lse2: Float, dot: Float
    ) {
        let rowLSE = Vec(repeating: -lse2), rowDot = Vec(repeating: dot), scale = Vec(repeating: scaleLog2)
        if slope == 0 && softcap == 0 && visible == firstKey..<(firstKey + count) {
            // Every key visible and no transform (most pairs): no masks.
            for k in stride(from: 0, to: count, by: 8) {
                let p = exp2(rowLSE.addingProduct(load(s + k), scale))
                store(p, s + k)
                store(p * (load(dP + k) - rowDot), dP + k)
            }
            return
        }
        let low = Vec(repeating: Float(visible.lowerBound)), high = Vec(repeating: Float(visible.upperBound))
        let distance = Vec(repeating: Float(position - firstKey)) - Vec(0, 1, 2, 3, 4, 5, 6, 7)
        for k in stride(from: 0, to: count, by: 8) {
            var x = load(s + k) * scale
            var derivative = Vec(repeating: 1)
            if softcap > 0 {
                x = softcapped(x, softcap)
                let t = x / softcap
                derivative = Vec(repeating: 1) - t * t
            }
            let key = Vec(0, 1, 2, 3, 4, 5, 6, 7) + Vec(repeating: Float(firstKey + k))
            if slope != 0 {
                let d = distance - Vec(repeating: Float(k))
                x = x - Vec(repeating: slope) * maximum(d, -d)
            }
            let p = exp2(x + rowLSE).replacing(with: 0, where: (key .< low) .| (key .>= high))
            store(p, s + k)
            store(p * (load(dP + k) - rowDot) * derivative, dP + k)
        }
    }
}

/// Phase 1: D and the sink-gradient shares, one item per (sequence, query head).
package struct BackwardRows: Sendable {
    package let problem: BackwardProblem
    package init(_ problem: BackwardProblem) { self.problem = problem }

    package var itemCount: Int { problem.forward.batch * problem.forward.headsQ }
    package var scratchBytes: Int { 2 * problem.forward.headDim * MemoryLayout<Float>.size }

    package func run(item: Int, scratch: UnsafeMutableRawPointer) {
        let f = problem.forward
        let s = f.sequence(item / f.headsQ), h = item % f.headsQ
        let d = f.headDim
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
}

/// Phase 2: dK, dV and the chunk's dQ partials, one item per (key chunk, sequence, kv head).
package struct BackwardKeyValue: Sendable {
    package let problem: BackwardProblem
    package init(_ problem: BackwardProblem) { self.problem = problem }

    package var itemCount: Int {
        let f = problem.forward
        return problem.chunks * f.batch * f.headsKV
    }

    /// Scratch, in floats (K = 96 keys, Q = 96 queries, D = `backwardRowStride`):
    ///     kT, vT      K × D each      the key block's keys and values as transposed 16-key panels
    ///     kRows       K × D           its keys as rows, for dQ += dS K
    ///     dK, dV      K × D each      the gradient accumulators
    ///     q, dO       Q × D each      a query block's rows (zero-padded to whole tiles)
    ///     s, dp       Q × K each      scores then P; dP then dS; [query][key]
    ///     dST         K × Q           dS transposed, [key][query]
    ///     dQ          Q × D           the query block's dQ += dS K, added to the chunk's partial after
    ///     lse2, dots  Q each; ones, columnMax 16 each
    package var scratchBytes: Int {
        let kb = backwardKeyBlock, qb = backwardQueryBlock, d = backwardRowStride(problem.forward.headDim)
        return (5 * kb * d + 3 * qb * d + 3 * qb * kb + 2 * qb + 32) * MemoryLayout<Float>.size
    }

    package func run(item: Int, scratch: UnsafeMutableRawPointer) {
        let f = problem.forward
        let units = f.batch * f.headsKV
        let chunk = item / units, s = f.sequence(item % units / f.headsKV), kvHead = item % f.headsKV
        let kb = backwardKeyBlock, qb = backwardQueryBlock, d = f.headDim, ld = backwardRowStride(d)
        let ldQ = Workspace.paddedDim(d)  // the dQ partials' row stride
        let base = scratch.assumingMemoryBound(to: Float.self)
        let kT = base, vT = kT + kb * ld, kRows = vT + kb * ld, dK = kRows + kb * ld, dV = dK + kb * ld
        let q = dV + kb * ld, dO = q + qb * ld, p = dO + qb * ld, dS = p + qb * kb
        let dST = dS + qb * kb, dQ = dST + kb * qb, lse2 = dQ + qb * ld, dots = lse2 + qb, ones = dots + qb, columnMax = ones + 16
        for i in 0..<8 { ones[i] = 1 }
        let offset = s.seqlenK - s.seqlenQ
        let firstBlock = chunk * problem.blocksPerChunk
        for block in firstBlock..<(firstBlock + problem.blocksPerChunk) {
            let firstKey = block * kb, keyCount = min(kb, s.seqlenK - firstKey)
            guard keyCount > 0 else { break }
            let panels = (keyCount + 15) / 16, keyTiles = (keyCount + microRows - 1) / microRows
            packTransposed(f.k, s, head: kvHead, first: firstKey, count: keyCount, depth: d, into: kT, keys: true)
            packTransposed(f.v, s, head: kvHead, first: firstKey, count: keyCount, depth: d, into: vT, keys: true)
            loadRows(f.k, s, head: kvHead, first: firstKey, count: keyCount, depth: d, into: kRows, stride: ld, padTo: keyCount, keys: true)
            dK.update(repeating: 0, count: 2 * kb * ld)
            // Queries that see any of these keys: i + offset − left ≤ key ≤ i + offset + right.
            let lastKey = firstKey + keyCount - 1
            let qLow = max(0, f.windowRight.map { firstKey - offset - $0 } ?? 0)
            let qHigh = min(s.seqlenQ, f.windowLeft.map { lastKey - offset + $0 + 1 } ?? s.seqlenQ)
            for h in (kvHead * f.groupSize)..<((kvHead + 1) * f.groupSize) {
                let scores = BackwardScores(
                    scaleLog2: f.scale * log2e,
                    slope: f.alibiSlopes.map { $0[s.batch * f.alibiBatchStride + h] * log2e } ?? 0,
                    softcap: f.softcap * log2e)
                for firstQuery in stride(from: qLow, to: qHigh, by: qb) {
                    let rows = min(qb, qHigh - firstQuery)
                    // The next block's rows come from DRAM or L3 (each key block rereads the queries):
                    // requesting them now hides the misses behind this block's products.
                    if firstQuery + qb < qHigh {
                        prefetchRows(s, head: h, first: firstQuery + qb, count: min(qb, qHigh - firstQuery - qb))
                    } else if h + 1 < (kvHead + 1) * f.groupSize {
                        prefetchRows(s, head: h + 1, first: qLow, count: min(qb, qHigh - qLow))
                    }
                    let rowTiles = (rows + microRows - 1) / microRows, padded = rowTiles * microRows
                    // This chunk's dQ partial rows of the block, added to last.
                    let partial = problem.partialRow(chunk: chunk, s, head: h, row: firstQuery)
                    prefetchRow(partial, bytes: rows * ldQ * MemoryLayout<Float>.size)
                    loadRows(f.q, s, head: h, first: firstQuery, count: rows, depth: d, into: q, stride: ld, padTo: padded)
                    loadRows(problem.dout, s, head: h, first: firstQuery, count: rows, depth: d, into: dO, stride: ld, padTo: padded)
                    for r in 0..<rows {
                        let row = s.qRow + firstQuery + r
                        lse2[r] = f.lse!.row(batch: s.qBatch, head: h, row: row).pointee * log2e
                        dots[r] = problem.rowDots![problem.rowIndex(s, head: h, row: row)]
                    }
                    // S = Q Kᵀ and dP = dO Vᵀ, [query][key]: each 16-key panel stays in L1 across the rows.
                    for panel in 0..<panels {
                        for tile in 0..<rowTiles {
                            scoreTile(
                                keys: q + tile * microRows * ld, ldK: ld, queries: kT + panel * 16 * d, depth: d,
                                s: p + tile * microRows * kb + panel * 16, ldS: kb, columnMax: columnMax, band: nil)
                            scoreTile(
                                keys: dO + tile * microRows * ld, ldK: ld, queries: vT + panel * 16 * d, depth: d,
                                s: dS + tile * microRows * kb + panel * 16, ldS: kb, columnMax: columnMax, band: nil)
                        }
                    }
                    // P, and dS = P ∘ (dP − D) (∘ the softcap derivative), 8 keys at a time; padding rows
                    // and keys get 0, so that whole tiles can be accumulated below.
                    for r in 0..<padded {
                        let i = firstQuery + r
                        let visible = r < rows ? f.keyRange(position: i, seqlenQ: s.seqlenQ, seqlenK: s.seqlenK) : 0..<0
                        scores.gradientRow(
                            s: p + r * kb, dP: dS + r * kb, count: panels * 16, firstKey: firstKey,
                            visible: visible.clamped(to: firstKey..<(firstKey + keyCount)), position: i + offset,
                            lse2: r < rows ? lse2[r] : 0, dot: r < rows ? dots[r] : 0)
                    }
                    // dSᵀ, so that the dQ tiles' broadcasts read adjacent queries.
                    for r in stride(from: 0, to: padded, by: 8) {
                        for k in stride(from: 0, to: panels * 16, by: 8) {
                            fa_transpose8x8(dS + r * kb + k, kb, dST + k * qb + r, qb)
                        }
                    }
                    // dV += Pᵀ dO and dK += dSᵀ Q (6 keys × 16 columns, over the block's queries), then
                    // dQ = dS K (6 queries × 16 columns, over the block's keys) in scratch: accumulating into
                    // the partial directly waits on its misses at every tile (measured: that product ran
                    // at 55 GFLOP/s, the others at 75–100).
                    dQ.update(repeating: 0, count: padded * ld)
                    for column in stride(from: 0, to: d, by: microCols) {
                        for keyTile in 0..<keyTiles {
                            let k6 = keyTile * microRows
                            outputTile(
                                SixRows.self, Float32Storage.self, p: p + k6, ldP: kb, v: dO + column, ldV: ld,
                                count: rows, alpha: ones, o: dV + k6 * ld + column, ldO: ld)
                            outputTile(
                                SixRows.self, Float32Storage.self, p: dS + k6, ldP: kb, v: q + column, ldV: ld,
                                count: rows, alpha: ones, o: dK + k6 * ld + column, ldO: ld)
                        }
                        for tile in 0..<rowTiles {
                            outputTile(
                                SixRows.self, Float32Storage.self, p: dST + tile * microRows, ldP: qb,
                                v: kRows + column, ldV: ld, count: keyCount, alpha: ones,
                                o: dQ + tile * microRows * ld + column, ldO: ld)
                        }
                    }
                    for r in 0..<rows { addRow(dQ + r * ld, into: partial + r * ldQ, count: d) }
                }
            }
            for key in 0..<keyCount {
                let row = s.kRow + firstKey + key
                withStorage(problem.dk.element) {
                    storeRow($0, dK + key * ld, count: d, scale: f.scale, into: problem.dk.row(batch: s.kvBatch, head: kvHead, row: row))
                }
                withStorage(problem.dv.element) {
                    storeRow($0, dV + key * ld, count: d, scale: 1, into: problem.dv.row(batch: s.kvBatch, head: kvHead, row: row))
                }
            }
        }
    }
}

extension BackwardKeyValue {
    /// Prefetches the q and dout rows of a query block.
    private func prefetchRows(_ s: Sequence, head h: Int, first: Int, count: Int) {
        let f = problem.forward
        for r in first..<(first + count) {
            let row = s.qRow + r
            prefetchRow(f.q.row(batch: s.qBatch, head: h, row: row), bytes: f.headDim * f.q.element.size)
            prefetchRow(problem.dout.row(batch: s.qBatch, head: h, row: row), bytes: f.headDim * problem.dout.element.size)
        }
    }
}

/// Phase 3: dQ = scale · Σ over chunks of the partials, in chunk order; one item per (sequence, query head).
package struct BackwardQuery: Sendable {
    package let problem: BackwardProblem
    package init(_ problem: BackwardProblem) { self.problem = problem }

    package var itemCount: Int { problem.forward.batch * problem.forward.headsQ }
    package var scratchBytes: Int { Workspace.paddedDim(problem.forward.headDim) * MemoryLayout<Float>.size }

    package func run(item: Int, scratch: UnsafeMutableRawPointer) {
        let f = problem.forward
        let s = f.sequence(item / f.headsQ), h = item % f.headsQ, d = f.headDim
        let sum = scratch.assumingMemoryBound(to: Float.self)
        for i in 0..<s.seqlenQ {
            sum.update(from: problem.partialRow(chunk: 0, s, head: h, row: i), count: d)
            for chunk in 1..<max(1, problem.chunks) {
                let partial = problem.partialRow(chunk: chunk, s, head: h, row: i)
                for c in 0..<d { sum[c] += partial[c] }
            }
            withStorage(problem.dq.element) {
                storeRow($0, sum, count: d, scale: f.scale, into: problem.dq.row(batch: s.qBatch, head: h, row: s.qRow + i))
            }
        }
    }
}

/// target[c] += source[c] for c < count.
@inline(__always)
private func addRow(_ source: UnsafePointer<Float>, into target: UnsafeMutablePointer<Float>, count: Int) {
    var c = 0
    while c + 8 <= count {
        store(load(target + c) + load(source + c), target + c)
        c += 8
    }
    while c < count {
        target[c] += source[c]
        c += 1
    }
}

/// The address of row `first + r` of query-shaped `tensor` (dq, dout, q), or of key-shaped one with `keys`.
@inline(__always)
private func rowAddress(_ tensor: TensorView, _ s: Sequence, head h: Int, row: Int, keys: Bool) -> UnsafeMutableRawPointer {
    keys ? tensor.row(batch: s.kvBatch, head: h, row: s.kRow + row) : tensor.row(batch: s.qBatch, head: h, row: s.qRow + row)
}

/// Loads `count` rows from `first` as float32 rows `stride` apart, zero-filling the columns past `depth`
/// and the rows up to `padTo`.
private func loadRows(
    _ tensor: TensorView, _ s: Sequence, head h: Int, first: Int, count: Int, depth: Int,
    into target: UnsafeMutablePointer<Float>, stride: Int, padTo: Int, keys: Bool = false
) {
    withStorage(tensor.element) { storage in
        for r in 0..<count {
            loadRow(storage, rowAddress(tensor, s, head: h, row: first + r, keys: keys), count: depth, into: target + r * stride)
            (target + r * stride + depth).update(repeating: 0, count: stride - depth)
        }
    }
    if padTo > count { (target + count * stride).update(repeating: 0, count: (padTo - count) * stride) }
}

/// Packs `count` rows from `first` transposed into 16-row panels [panel][depth][16] (rows past `count` zero),
/// the layout `scoreTile` reads its 16 columns from.
private func packTransposed(
    _ tensor: TensorView, _ s: Sequence, head h: Int, first: Int, count: Int, depth: Int,
    into target: UnsafeMutablePointer<Float>, keys: Bool
) {
    let panels = (count + 15) / 16
    target.update(repeating: 0, count: panels * 16 * depth)
    withUnsafeTemporaryAllocation(of: Float.self, capacity: depth) { row in
        withStorage(tensor.element) { storage in
            for r in 0..<count {
                loadRow(storage, rowAddress(tensor, s, head: h, row: first + r, keys: keys), count: depth, into: row.baseAddress!)
                let panel = target + (r / 16) * 16 * depth + r % 16
                for c in 0..<depth { panel[c * 16] = row[c] }
            }
        }
    }
}

import Glibc

/// The backward pass (FlashAttention-2), recomputing the probabilities from the forward LSE, in three
/// phases with one owner per output element (no atomics; bitwise identical for every thread count):
///
/// 1. `BackwardRows`: D_i = rowsum(dO_i ∘ O_i) per query row, and each (sequence, head)'s share of the
///    sink gradient, dsink_h = −Σ_i exp(sink_h − LSE_i) · D_i.
/// 2. `BackwardKeyValue`: per (sequence, kv head, 96-key block): for every query head of the group and
///    every 96-query block that sees the keys, S = Q Kᵀ, P = exp(S·scale − LSE), dV += Pᵀ dO,
///    dP = dO Vᵀ, dS = P ∘ (dP − D), dK += dSᵀ Q; then dK · scale and dV are written.
/// 3. `BackwardQuery`: per (sequence, query head, 96-query block): for every key block the queries see,
///    Sᵀ = K Qᵀ and dPᵀ = V dOᵀ, dSᵀ as above, dQ += dS K; then dQ · scale is written.
///
/// Scores are recomputed exactly as the forward computed them (softcap, ALiBi, the causal/window mask);
/// under softcap dS carries the derivative 1 − tanh². The tiles reuse the forward's micro-kernels in the
/// orientation each product needs: `scoreTile` with query rows against a transposed key panel (phase 2)
/// or key rows against transposed query panels (phase 3), and `outputTile` for the three accumulations.

/// Rows (queries or keys) per backward block: a multiple of 16 (score panels) and of 6 (score and output
/// tiles), so that no tile runs past its buffer.
let backwardBlock = 96

/// A validated backward problem: the forward problem (with its `out` and `lse`) and the gradients.
package struct BackwardProblem: @unchecked Sendable {
    package var forward: AttentionProblem
    package var dout: TensorView
    package var dq: TensorView
    package var dk: TensorView
    package var dv: TensorView
    package var dsinks: UnsafeMutablePointer<Float>?
    /// D per (query batch entry, head, row), [qBatches][headsQ][seqlenQ] with seqlenQ the q tensor's rows;
    /// set by the driver.
    package var rowDots: UnsafeMutablePointer<Float>?
    /// Each (sequence, head)'s share of the sink gradient, [batch][headsQ]; set by the driver.
    package var sinkShares: UnsafeMutablePointer<Float>?

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
    }

    /// Index of row `row` (q-tensor row) of head h in `rowDots`.
    @inline(__always) func rowIndex(_ s: Sequence, head h: Int, row: Int) -> Int {
        (s.qBatch * forward.headsQ + h) * forward.seqlenQ + row
    }

    /// Floats of `rowDots`.
    package var rowDotCount: Int {
        let qBatches = { if case .varlen = forward.layout { return 1 } else { return forward.batch } }()
        return qBatches * forward.headsQ * forward.seqlenQ
    }

    /// Blocks of `backwardBlock` rows for the longest sequence (items of shorter ones may be empty).
    func blocks(_ length: Int) -> Int { (length + backwardBlock - 1) / backwardBlock }
}

/// How one recomputed score becomes a probability and a score gradient: the forward's transforms and
/// mask for one query row (position `position` in a sequence with `offset` = seqlen_k − seqlen_q).
struct BackwardScores {
    let problem: AttentionProblem
    let scaleLog2: Float
    let slope: Float  // ALiBi slope · log2(e), 0 without ALiBi
    let softcap: Float  // softcap · log2(e), 0 without softcap

    /// p = 2^(s' − lse2) for visible keys, else 0, and the softcap derivative 1 − tanh² (1 without softcap),
    /// for raw scores `raw` (Q·K, unscaled) of keys `key` (absolute positions) seen from query `position`.
    @inline(__always)
    func probabilities(
        _ raw: Vec, keys key: Vec, position: Vec, visibleLow: Vec, visibleHigh: Vec, lse2: Vec
    ) -> (p: Vec, derivative: Vec) {
        var s = raw * Vec(repeating: scaleLog2)
        var derivative = Vec(repeating: 1)
        if softcap > 0 {
            s = softcapped(s, softcap)
            let t = s / softcap
            derivative = Vec(repeating: 1) - t * t
        }
        if slope != 0 {
            let distance = position - key
            s = s - Vec(repeating: slope) * maximum(distance, -distance)
        }
        let hidden = (key .< visibleLow) .| (key .>= visibleHigh)
        let p = exp2(s - lse2).replacing(with: 0, where: hidden)
        return (p, derivative)
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

/// Phase 2: dK and dV, one item per (sequence, kv head, key block).
package struct BackwardKeyValue: Sendable {
    package let problem: BackwardProblem
    package init(_ problem: BackwardProblem) { self.problem = problem }

    package var itemCount: Int {
        let f = problem.forward
        return f.batch * f.headsKV * problem.blocks(f.maxSeqlenK)
    }

    /// Scratch, in floats (B = 96 rows, D = head_dim rounded up to 16):
    ///     kT, vT      B × D each      the key block's keys and values as transposed 16-key panels
    ///     dK, dV      B × D each      the gradient accumulators
    ///     q, dO       B × D each      a query block's rows (row stride D, zero-padded)
    ///     s, p, dp    B × B each      raw scores, probabilities, dP then dS; [query][key]
    ///     lse2, dots  B each
    ///     ones        8               rescale factors 1 for the output tiles
    package var scratchBytes: Int {
        let b = backwardBlock, d = Workspace.paddedDim(problem.forward.headDim)
        return (6 * b * d + 3 * b * b + 2 * b + 16 + 16) * MemoryLayout<Float>.size
    }

    package func run(item: Int, scratch: UnsafeMutableRawPointer) {
        let f = problem.forward
        let blocks = problem.blocks(f.maxSeqlenK)
        let s = f.sequence(item / (f.headsKV * blocks))
        let kvHead = item / blocks % f.headsKV
        let firstKey = item % blocks * backwardBlock
        let keyCount = min(backwardBlock, s.seqlenK - firstKey)
        guard keyCount > 0 else { return }
        let b = backwardBlock, d = f.headDim, dp16 = Workspace.paddedDim(d)
        let base = scratch.assumingMemoryBound(to: Float.self)
        let kT = base, vT = kT + b * dp16, dK = vT + b * dp16, dV = dK + b * dp16, q = dV + b * dp16
        let dO = q + b * dp16, sRaw = dO + b * dp16, p = sRaw + b * b, dP = p + b * b
        let lse2 = dP + b * b, dots = lse2 + b, ones = dots + b, columnMax = ones + 16
        for i in 0..<8 { ones[i] = 1 }
        dK.update(repeating: 0, count: 2 * b * dp16)

        // The key block, transposed into 16-key panels (keys past the block zero).
        packTransposed(f.k, s, head: kvHead, first: firstKey, count: keyCount, depth: d, into: kT, keys: true)
        packTransposed(f.v, s, head: kvHead, first: firstKey, count: keyCount, depth: d, into: vT, keys: true)

        // Queries that see any of these keys: i + offset − left ≤ key ≤ i + offset + right.
        let offset = s.seqlenK - s.seqlenQ
        let lastKey = firstKey + keyCount - 1
        let qLow = max(0, f.windowRight.map { firstKey - offset - $0 } ?? 0)
        let qHigh = min(s.seqlenQ, f.windowLeft.map { lastKey - offset + $0 + 1 } ?? s.seqlenQ)
        let panels = (keyCount + 15) / 16
        let keyTiles = (keyCount + microRows - 1) / microRows
        for h in (kvHead * f.groupSize)..<((kvHead + 1) * f.groupSize) {
            let scores = BackwardScores(
                problem: f, scaleLog2: f.scale * log2e,
                slope: f.alibiSlopes.map { $0[s.batch * f.alibiBatchStride + h] * log2e } ?? 0,
                softcap: f.softcap * log2e)
            var firstQuery = qLow
            while firstQuery < qHigh {
                let rows = min(b, qHigh - firstQuery)
                let rowTiles = (rows + microRows - 1) / microRows
                loadRows(f.q, s, head: h, first: firstQuery, count: rows, depth: d, into: q, stride: dp16, padTo: rowTiles * microRows)
                loadRows(problem.dout, s, head: h, first: firstQuery, count: rows, depth: d, into: dO, stride: dp16, padTo: rowTiles * microRows)
                for r in 0..<rows {
                    let row = s.qRow + firstQuery + r
                    lse2[r] = f.lse!.row(batch: s.qBatch, head: h, row: row).pointee * log2e
                    dots[r] = problem.rowDots![problem.rowIndex(s, head: h, row: row)]
                }
                // S = Q Kᵀ and dP = dO Vᵀ, [query][key], 6 queries × 16 keys at a time.
                for tile in 0..<rowTiles {
                    for panel in 0..<panels {
                        scoreTile(
                            keys: q + tile * microRows * dp16, ldK: dp16, queries: kT + panel * 16 * d, depth: d,
                            s: sRaw + tile * microRows * b + panel * 16, ldS: b, columnMax: columnMax, band: nil)
                        scoreTile(
                            keys: dO + tile * microRows * dp16, ldK: dp16, queries: vT + panel * 16 * d, depth: d,
                            s: dP + tile * microRows * b + panel * 16, ldS: b, columnMax: columnMax, band: nil)
                    }
                }
                // P, and dS = P ∘ (dP − D) (∘ the softcap derivative), 8 keys at a time.
                for r in 0..<rows {
                    let i = firstQuery + r
                    let visible = f.keyRange(position: i, seqlenQ: s.seqlenQ, seqlenK: s.seqlenK)
                    let low = Vec(repeating: Float(visible.lowerBound)), high = Vec(repeating: Float(visible.upperBound))
                    let position = Vec(repeating: Float(i + offset))
                    for k in stride(from: 0, to: panels * 16, by: 8) {
                        let key = Vec(0, 1, 2, 3, 4, 5, 6, 7) + Vec(repeating: Float(firstKey + k))
                        let (pv, derivative) = scores.probabilities(
                            load(sRaw + r * b + k), keys: key, position: position, visibleLow: low,
                            visibleHigh: minimum(high, Vec(repeating: Float(firstKey + keyCount))),
                            lse2: Vec(repeating: lse2[r]))
                        store(pv, p + r * b + k)
                        store(pv * (load(dP + r * b + k) - Vec(repeating: dots[r])) * derivative, dP + r * b + k)
                    }
                }
                // dV += Pᵀ dO and dK += dSᵀ Q: 6 keys × 16 columns, reducing over the block's queries.
                for keyTile in 0..<keyTiles {
                    let k6 = keyTile * microRows
                    for column in stride(from: 0, to: d, by: microCols) {
                        outputTile(
                            SixRows.self, Float32Storage.self, p: p + k6, ldP: b, v: dO + column, ldV: dp16,
                            count: rows, alpha: ones, o: dV + k6 * dp16 + column, ldO: dp16)
                        outputTile(
                            SixRows.self, Float32Storage.self, p: dP + k6, ldP: b, v: q + column, ldV: dp16,
                            count: rows, alpha: ones, o: dK + k6 * dp16 + column, ldO: dp16)
                    }
                }
                firstQuery += rows
            }
        }
        for key in 0..<keyCount {
            let position = firstKey + key
            withStorage(problem.dk.element) {
                storeRow($0, dK + key * dp16, count: d, scale: f.scale, into: keyRowOf(problem.dk, s, kvHead, position))
            }
            withStorage(problem.dv.element) {
                storeRow($0, dV + key * dp16, count: d, scale: 1, into: keyRowOf(problem.dv, s, kvHead, position))
            }
        }
    }

    /// Address of a gradient's row for key position `position` (dk/dv are laid out like k/v).
    private func keyRowOf(_ tensor: TensorView, _ s: Sequence, _ kvHead: Int, _ position: Int) -> UnsafeMutableRawPointer {
        tensor.row(batch: s.kvBatch, head: kvHead, row: s.kRow + position)
    }
}

/// Phase 3: dQ, one item per (sequence, query head, query block).
package struct BackwardQuery: Sendable {
    package let problem: BackwardProblem
    package init(_ problem: BackwardProblem) { self.problem = problem }

    package var itemCount: Int {
        let f = problem.forward
        return f.batch * f.headsQ * problem.blocks(f.maxSeqlenQ)
    }

    /// Scratch, in floats (B = 96, D = head_dim rounded up to 16):
    ///     qT, dOT     B × D each      the query block's queries and output gradients, transposed panels
    ///     k, v        B × D each      a key block's rows (row stride D, zero-padded to a multiple of 6)
    ///     kPanel      B × D           the key block as 16-column panels [D/16][B][16]
    ///     dQ          B × D           the accumulator
    ///     s, dp       B × B each      Sᵀ and dPᵀ then dSᵀ; [key][query]
    ///     lse2, dots  B each; ones 8
    package var scratchBytes: Int {
        let b = backwardBlock, d = Workspace.paddedDim(problem.forward.headDim)
        return (6 * b * d + 2 * b * b + 2 * b + 16 + 16) * MemoryLayout<Float>.size
    }

    package func run(item: Int, scratch: UnsafeMutableRawPointer) {
        let f = problem.forward
        let blocks = problem.blocks(f.maxSeqlenQ)
        let s = f.sequence(item / (f.headsQ * blocks))
        let h = item / blocks % f.headsQ, kvHead = h / f.groupSize
        let firstQuery = item % blocks * backwardBlock
        let rows = min(backwardBlock, s.seqlenQ - firstQuery)
        guard rows > 0 else { return }
        let b = backwardBlock, d = f.headDim, dp16 = Workspace.paddedDim(d)
        let base = scratch.assumingMemoryBound(to: Float.self)
        let qT = base, dOT = qT + b * dp16, k = dOT + b * dp16, v = k + b * dp16, kPanel = v + b * dp16
        let dQ = kPanel + b * dp16, sT = dQ + b * dp16, dP = sT + b * b, lse2 = dP + b * b, dots = lse2 + b
        let ones = dots + b, columnMax = ones + 16
        for i in 0..<8 { ones[i] = 1 }
        dQ.update(repeating: 0, count: b * dp16)
        packTransposed(f.q, s, head: h, first: firstQuery, count: rows, depth: d, into: qT, keys: false)
        packTransposed(problem.dout, s, head: h, first: firstQuery, count: rows, depth: d, into: dOT, keys: false)
        for r in 0..<rows {
            let row = s.qRow + firstQuery + r
            lse2[r] = f.lse!.row(batch: s.qBatch, head: h, row: row).pointee * log2e
            dots[r] = problem.rowDots![problem.rowIndex(s, head: h, row: row)]
        }
        let scores = BackwardScores(
            problem: f, scaleLog2: f.scale * log2e,
            slope: f.alibiSlopes.map { $0[s.batch * f.alibiBatchStride + h] * log2e } ?? 0,
            softcap: f.softcap * log2e)
        let offset = s.seqlenK - s.seqlenQ
        let first = f.keyRange(position: firstQuery, seqlenQ: s.seqlenQ, seqlenK: s.seqlenK)
        let last = f.keyRange(position: firstQuery + rows - 1, seqlenQ: s.seqlenQ, seqlenK: s.seqlenK)
        let panels = (rows + 15) / 16
        let rowTiles = (rows + microRows - 1) / microRows
        var firstKey = first.lowerBound
        while firstKey < max(first.lowerBound, last.upperBound) {
            let keyCount = min(b, last.upperBound - firstKey)
            let keyTiles = (keyCount + microRows - 1) / microRows
            loadRows(f.k, s, head: kvHead, first: firstKey, count: keyCount, depth: d, into: k, stride: dp16, padTo: keyTiles * microRows, keys: true)
            loadRows(f.v, s, head: kvHead, first: firstKey, count: keyCount, depth: d, into: v, stride: dp16, padTo: keyTiles * microRows, keys: true)
            for key in 0..<keyCount {
                for column in stride(from: 0, to: dp16, by: microCols) {
                    (kPanel + column * b + key * microCols).update(from: k + key * dp16 + column, count: microCols)
                }
            }
            // Sᵀ = K Qᵀ and dPᵀ = V dOᵀ, [key][query], 6 keys × 16 queries at a time.
            for tile in 0..<keyTiles {
                for panel in 0..<panels {
                    scoreTile(
                        keys: k + tile * microRows * dp16, ldK: dp16, queries: qT + panel * 16 * d, depth: d,
                        s: sT + tile * microRows * b + panel * 16, ldS: b, columnMax: columnMax, band: nil)
                    scoreTile(
                        keys: v + tile * microRows * dp16, ldK: dp16, queries: dOT + panel * 16 * d, depth: d,
                        s: dP + tile * microRows * b + panel * 16, ldS: b, columnMax: columnMax, band: nil)
                }
            }
            // dSᵀ = Pᵀ ∘ (dPᵀ − D) (∘ the softcap derivative), 8 queries at a time.
            for key in 0..<keyCount {
                let keyPosition = Vec(repeating: Float(firstKey + key))
                for j in stride(from: 0, to: panels * 16, by: 8) {
                    var low = Vec(), high = Vec(), lse = Vec(), dot = Vec(), position = Vec()
                    for lane in 0..<8 {
                        let r = j + lane
                        let i = firstQuery + min(r, rows - 1)
                        let visible = f.keyRange(position: i, seqlenQ: s.seqlenQ, seqlenK: s.seqlenK)
                        low[lane] = Float(visible.lowerBound)
                        high[lane] = r < rows ? Float(visible.upperBound) : -1  // padding lanes see nothing
                        lse[lane] = lse2[min(r, rows - 1)]
                        dot[lane] = dots[min(r, rows - 1)]
                        position[lane] = Float(i + offset)
                    }
                    let (pv, derivative) = scores.probabilities(
                        load(sT + key * b + j), keys: keyPosition, position: position, visibleLow: low,
                        visibleHigh: high, lse2: lse)
                    store(pv * (load(dP + key * b + j) - dot) * derivative, dP + key * b + j)
                }
            }
            // dQ += dS K: 6 queries × 16 columns, reducing over the block's keys.
            for tile in 0..<rowTiles {
                let q6 = tile * microRows
                for column in stride(from: 0, to: d, by: microCols) {
                    outputTile(
                        SixRows.self, Float32Storage.self, p: dP + q6, ldP: b, v: kPanel + column * b, ldV: microCols,
                        count: keyCount, alpha: ones, o: dQ + q6 * dp16 + column, ldO: dp16)
                }
            }
            firstKey += keyCount
        }
        for r in 0..<rows {
            withStorage(problem.dq.element) {
                storeRow($0, dQ + r * dp16, count: d, scale: f.scale, into: problem.dq.row(batch: s.qBatch, head: h, row: s.qRow + firstQuery + r))
            }
        }
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
    target.update(repeating: 0, count: max(padTo, count) * stride)
    withStorage(tensor.element) { storage in
        for r in 0..<count {
            loadRow(storage, rowAddress(tensor, s, head: h, row: first + r, keys: keys), count: depth, into: target + r * stride)
        }
    }
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

/// The tiling loop of the forward pass: one work item is one (batch, query head, query block); it packs its
/// queries once, then meets the key/value blocks one at a time (score tile → mask → online softmax →
/// output tile) and finishes with the epilogue. Nothing of size seqlen_q × seqlen_k is ever stored.

/// Queries per block: a multiple of 16 (score tile width) and of 6 (output tile height). Every packed key
/// and value block serves this many queries, so larger is cheaper until the workspace outgrows L2; 288 × 96
/// measured best on Zen 3 of Bq ∈ {96, 192, 288, 384} × Bk ∈ {48, 96, 192} at head_dim 64 and 128.
package let queryBlockSize = 288
/// Keys per block: a multiple of 6 (score tile height).
package let keyBlockSize = 96
/// Query rows that go through score → softmax → output together: a multiple of 16, 8 and 6 that divides
/// queryBlockSize, small enough that their Bk × 48 scores (18 KiB) stay in L1.
let subBlockRows = 48

/// Per-thread scratch of one work item, in floats, every part 64-byte aligned (all sizes are multiples
/// of 16 floats). With Bq = queryBlockSize, Bk = keyBlockSize, D = head_dim rounded up to 16:
///
///     qT      Bq × D          queries × scale·log2(e), as Bq/16 panels of [head_dim][16]
///     kPack   Bk × D          the key block, row-major [row][head_dim] (rows past the block's keys zero)
///     vPack   Bk × D          the value block as D/16 panels of [Bk][16]
///     s       Bk × 48         scores of 48 query rows, transposed (row = key), overwritten by probabilities
///     o       Bq × D          unnormalised output accumulators, row-major
///     rowMax, rowSum, alpha   Bq each: running max (log2 units), running sum, last rescale factor
///     blockMax                48: each query's max over the current block's scores
///
/// Packing K and V makes the micro-kernels independent of the caller's strides: a [b, s, h, d] tensor
/// with 8 heads of 128 has a 4 KiB row stride, which maps every row of a column slice to one L1 set.
/// For head_dim 128 the workspace is ~500 KiB, the size of a Zen 3 core's L2; the panels a micro-kernel
/// streams (≤ 8 KiB) stay in its 32 KiB L1.
struct Workspace {
    let qT, kPack, vPack, s, o, rowMax, rowSum, alpha, blockMax: UnsafeMutablePointer<Float>

    static func paddedDim(_ headDim: Int) -> Int { (headDim + 15) / 16 * 16 }

    static func floatCount(headDim: Int) -> Int {
        let qb = queryBlockSize, kb = keyBlockSize, d = paddedDim(headDim)
        return qb * d + kb * d + kb * d + kb * subBlockRows + qb * d + 3 * qb + subBlockRows
    }

    init(_ base: UnsafeMutablePointer<Float>, headDim: Int) {
        let qb = queryBlockSize, kb = keyBlockSize, d = Workspace.paddedDim(headDim)
        qT = base
        kPack = qT + qb * d
        vPack = kPack + kb * d
        s = vPack + kb * d
        o = s + kb * subBlockRows
        rowMax = o + qb * d
        rowSum = rowMax + qb
        alpha = rowSum + qb
        blockMax = alpha + qb
    }
}

/// Work items and scratch size of the tiled forward for one problem.
package struct TiledForward: Sendable {
    package let problem: AttentionProblem
    package let queryBlocks: Int

    package init(_ problem: AttentionProblem) {
        self.problem = problem
        queryBlocks = (problem.seqlenQ + queryBlockSize - 1) / queryBlockSize
    }

    package var itemCount: Int { problem.batch * problem.headsQ * queryBlocks }

    /// Scratch bytes one thread needs (zero-filled once at allocation; see `Workspace`).
    package var scratchBytes: Int { Workspace.floatCount(headDim: problem.headDim) * MemoryLayout<Float>.size }

    /// Runs work item `item`. Items are numbered head by head, so that the query blocks of one head run
    /// close together in time and find its K and V still in L2/L3 (reading them from DRAM once per block
    /// cost ~10% at 2048 tokens); within a head the most expensive (last, under causal masking) blocks come
    /// first, so a dynamic scheduler ends on small items and balances the triangle.
    package func run(item: Int, scratch: UnsafeMutableRawPointer) {
        let p = problem
        let bh = item / queryBlocks
        let block = queryBlocks - 1 - item % queryBlocks
        let b = bh / p.headsQ
        let h = bh % p.headsQ
        let kvHead = h / p.groupSize
        let d = p.headDim
        let firstQuery = block * queryBlockSize
        let rows = min(queryBlockSize, p.seqlenQ - firstQuery)
        let paddedRows = (rows + 15) / 16 * 16
        let outputRowTiles = (rows + microRows - 1) / microRows
        let ldO = Workspace.paddedDim(d)
        let w = Workspace(scratch.assumingMemoryBound(to: Float.self), headDim: d)

        packQueries(into: w.qT, batch: b, head: h, firstQuery: firstQuery, rows: rows, paddedRows: paddedRows)
        w.o.update(repeating: 0, count: outputRowTiles * microRows * ldO)
        w.rowMax.update(repeating: -.infinity, count: paddedRows)
        w.rowSum.update(repeating: 0, count: paddedRows)

        // Keys past the last query's causal limit are skipped entirely: those blocks are never visited.
        let keyEnd = p.keyEnd(forQuery: firstQuery + rows - 1)
        let kRow0 = p.k.row(batch: b, head: kvHead, row: 0)
        let vRow0 = p.v.row(batch: b, head: kvHead, row: 0)
        var firstKey = 0
        while firstKey < keyEnd {
            let keyCount = min(keyBlockSize, keyEnd - firstKey)

            let kBlock = kRow0 + firstKey * p.k.rowStride
            let vBlock = vRow0 + firstKey * p.v.rowStride
            packBlock(
                keys: kBlock, keyStride: p.k.rowStride, values: vBlock, valueStride: p.v.rowStride,
                count: keyCount, depth: d, w)

            // Diagonal blocks of a causal call get a mask; in them each tile does only the keys its rows see.
            let diagonal = p.causal && firstKey + keyCount - 1 > firstQuery + p.causalOffset
            let shift = firstQuery + p.causalOffset + 1 - firstKey
            // The score tiles' max also saw the zero rows padding a partial last key tile (score 0, which can
            // exceed every real score by more than exp2's range) and, in diagonal blocks, hidden keys; such
            // blocks recompute it.
            let tilesMaxIsExact = !diagonal && keyCount % microRows == 0

            // The query block meets the key block 48 rows at a time, so that the scores of those rows
            // (Bk × 48 floats) stay in L1 from the score tiles through the softmax to the output tiles.
            for first in stride(from: 0, to: paddedRows, by: subBlockRows) {
                let subRows = min(subBlockRows, paddedRows - first)
                let mask = BlockMask(keyCount: keyCount, shift: diagonal ? shift + first : nil)

                // S = K·Qᵀ, 6 keys × 16 queries at a time.
                w.blockMax.update(repeating: -.infinity, count: subRows)
                for panel in 0..<(subRows / microCols) {
                    let queries = w.qT + (first + panel * microCols) * d
                    let needed = mask.needed(throughRow: panel * microCols + microCols - 1)
                    for tile in 0..<((needed + microRows - 1) / microRows) {
                        scoreTile(
                            keys: w.kPack + tile * microRows * d, ldK: d, queries: queries, depth: d,
                            s: w.s + tile * microRows * subBlockRows + panel * microCols, ldS: subBlockRows,
                            columnMax: w.blockMax + panel * microCols)
                    }
                }

                softmaxUpdate(
                    s: w.s, ldS: subBlockRows, queryVectors: subRows / 8, mask: mask,
                    blockMax: tilesMaxIsExact ? w.blockMax : nil, rowMax: w.rowMax + first,
                    rowSum: w.rowSum + first, alpha: w.alpha + first)

                // O = α·O + P·V, 6 queries × 16 columns at a time, each tile over the keys its last row sees.
                let tiles = (min(rows - first, subRows) + microRows - 1) / microRows
                for column in stride(from: 0, to: d, by: microCols) {
                    let values = w.vPack + column * keyBlockSize
                    for tile in 0..<tiles {
                        let q = tile * microRows
                        outputTile(
                            p: w.s + q, ldP: subBlockRows, v: values, count: mask.visible(row: q + microRows - 1),
                            alpha: w.alpha + first + q, o: w.o + (first + q) * ldO + column, ldO: ldO)
                    }
                }
            }
            firstKey += keyBlockSize
        }

        writeOutputRows(
            o: w.o, ldO: ldO, rows: rows, headDim: d, rowMax: w.rowMax, rowSum: w.rowSum,
            out: p.out.row(batch: b, head: h, row: firstQuery), outRowStride: p.out.rowStride,
            lse: p.lse?.row(batch: b, head: h, row: firstQuery), lseRowStride: p.lse?.rowStride ?? 0)
    }

    /// Packs a key/value block in one pass over its rows: key rows into a dense [rows][depth] block
    /// (zero-filled up to a multiple of 6 rows so the last score tile reads defined values), value rows into
    /// 16-column panels [keyBlockSize][16] (columns past head_dim zero).
    private func packBlock(
        keys: UnsafePointer<Float>, keyStride: Int, values: UnsafePointer<Float>, valueStride: Int,
        count: Int, depth: Int, _ w: Workspace
    ) {
        let fullColumns = depth / microCols * microCols
        for key in 0..<count {
            let kSource = keys + key * keyStride
            let kTarget = w.kPack + key * depth
            let vSource = values + key * valueStride
            var column = 0
            while column < fullColumns {
                let vTarget = w.vPack + column * keyBlockSize + key * microCols
                store(load(kSource + column), kTarget + column)
                store(load(kSource + column + 8), kTarget + column + 8)
                store(load(vSource + column), vTarget)
                store(load(vSource + column + 8), vTarget + 8)
                column += microCols
            }
            if column < depth {
                let vTarget = w.vPack + column * keyBlockSize + key * microCols
                for c in 0..<microCols {
                    let inside = column + c < depth
                    if inside { kTarget[column + c] = kSource[column + c] }
                    vTarget[c] = inside ? vSource[column + c] : 0
                }
            }
        }
        let paddedCount = (count + microRows - 1) / microRows * microRows
        (w.kPack + count * depth).update(repeating: 0, count: (paddedCount - count) * depth)
    }

    /// Packs `rows` queries starting at `firstQuery` as transposed 16-query panels, multiplied by
    /// scale·log2(e) so the softmax can use exp2; rows past `rows` up to `paddedRows` are zero.
    private func packQueries(
        into qT: UnsafeMutablePointer<Float>, batch b: Int, head h: Int, firstQuery: Int, rows: Int,
        paddedRows: Int
    ) {
        let d = problem.headDim
        let factor = problem.scale * 1.442_695_040_888_963_4  // log2(e)
        for i in 0..<paddedRows {
            let panel = qT + (i / microCols) * microCols * d + i % microCols
            if i < rows {
                let source = problem.q.row(batch: b, head: h, row: firstQuery + i)
                for c in 0..<d { panel[c * microCols] = source[c] * factor }
            } else {
                for c in 0..<d { panel[c * microCols] = 0 }
            }
        }
    }
}

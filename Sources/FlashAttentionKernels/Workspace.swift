import FlashAttentionCore

/// The per-thread scratch of a forward work item, and the item's prologue: staging its queries and row tables.

/// Per-thread scratch of one work item, in floats, every part 64-byte aligned (all sizes are multiples
/// of 16 floats). With Bq = queryBlock, Bk = keyBlock, D = head_dim and Dv = head_dim_v, each rounded up
/// to `microCols`:
///
///     qT      Bq × D          queries × scale: Bq/microCols panels of [head_dim][microCols]
///                             (query blocks), or plain rows [row][head_dim] (decoding)
///     kPack   Bk × D          the key block, row-major [row][head_dim] (rows past the block's keys zero)
///     vPack   Bk × Dv         the value block as Dv/microCols panels of [Bk][microCols]
///     s       Bk × subBlockRows   scores of a sub-block's rows, transposed (row = key), overwritten by
///                             probabilities (before the scores, a staged mask's row-major copy)
///     o       Bq × Dv         unnormalised output accumulators, row-major
///     tileSum microRows × Dv  one output tile's block sums P·V of a masked block, built in pieces
///                             before they join o (`accumulateRows`)
///     rowMax, rowSum, alpha   Bq each: running max, running sum, last rescale factor
///     rowPosition, rowSlope, rowDistance
///                             Bq each: each row's query position in its block, its ALiBi slope, and
///                             the ALiBi distance its bias is rebased on
///     blockMax                subBlockRows: each query's max over the current block's scores
///     rowKeys     2 × Bq      with dropout: each row's random state (`DropoutRow`), low words then high
///     rowMaskOffsets  Bq (Int)    with an attention mask: each row's mask offset (−1: a padding row)
///     maskTile    Bk × subBlockRows   with an attention mask: a sub-block's mask values, laid out like `s`
///     pPairs  Bk/2 × subBlockRows (UInt32)   bfloat16 pair products: a sub-block's probabilities as pairs
///                             (PairProducts.swift, which also lays its q/k/v pairs over qT, kPack and vPack),
///                             or as AMX's [row][key pair] rows (`pRows`, AMXTiles.swift)
///
/// Packing K and V makes the micro-kernels independent of the caller's strides (and of paging): a
/// [b, s, h, d] tensor with 8 heads of 128 has a 4 KiB row stride, which maps every row of a column slice
/// to one L1 set. For head_dim 128 the workspace is ~400 KiB, inside the L2 of the cores it targets.
struct Workspace {
    let qT, kPack, vPack, s, o, tileSum, rowMax, rowSum, alpha, rowPosition, rowSlope, rowDistance, blockMax: UnsafeMutablePointer<Float>
    let rowKeys: UnsafeMutablePointer<UInt32>
    let rowMaskOffsets: UnsafeMutablePointer<Int>
    let maskTile: UnsafeMutablePointer<Float>
    let pPairs: UnsafeMutablePointer<UInt32>

    static func paddedDim(_ headDim: Int) -> Int { (headDim + microCols - 1) / microCols * microCols }

    static func floatCount(headDim: Int, headDimV: Int) -> Int {
        let qb = geometry.queryBlock, kb = geometry.keyBlock, d = paddedDim(headDim), dv = paddedDim(headDimV)
        return qb * d + kb * d + kb * dv + kb * subBlockRows + qb * dv + microRows * dv + 6 * qb + subBlockRows
            + 2 * qb + 2 * qb + kb * subBlockRows + kb / 2 * subBlockRows
    }

    init(_ base: UnsafeMutableRawPointer, headDim: Int, headDimV: Int) {
        let qb = geometry.queryBlock, kb = geometry.keyBlock
        let d = Workspace.paddedDim(headDim), dv = Workspace.paddedDim(headDimV)
        qT = base.assumingMemoryBound(to: Float.self)
        kPack = qT + qb * d
        vPack = kPack + kb * d
        s = vPack + kb * dv
        o = s + kb * subBlockRows
        tileSum = o + qb * dv
        rowMax = tileSum + microRows * dv
        rowSum = rowMax + qb
        alpha = rowSum + qb
        rowPosition = alpha + qb
        rowSlope = rowPosition + qb
        rowDistance = rowSlope + qb
        blockMax = rowDistance + qb
        rowKeys = UnsafeMutableRawPointer(blockMax + subBlockRows).bindMemory(to: UInt32.self, capacity: 2 * qb)
        rowMaskOffsets = UnsafeMutableRawPointer(blockMax + subBlockRows + 2 * qb).bindMemory(to: Int.self, capacity: qb)
        maskTile = blockMax + subBlockRows + 4 * qb
        pPairs = UnsafeMutableRawPointer(maskTile + kb * subBlockRows).bindMemory(to: UInt32.self, capacity: kb / 2 * subBlockRows)
    }
}

/// Rows padded to whole score panels.
@inline(__always) func paddedRows(_ item: WorkItem) -> Int { (item.rows + microCols - 1) / microCols * microCols }

/// The item's prologue: packs its queries, multiplied by the softmax scale — as
/// transposed `microCols`-row panels for the block kernels, or as plain rows for the decoding kernel —
/// with padding rows (to whole panels) zero; clears the accumulators and running statistics; fills the row
/// tables: each row's position within the block, its ALiBi slope, and the distance from its
/// aligned key to the nearest key it attends to here. Subtracting that distance from every ALiBi distance
/// of the row shifts its scores by a constant, which the softmax ignores and the LSE takes back; it keeps
/// the scores that matter near 0, where float32 is precise (biases of a few hundred would otherwise cost
/// ~5e-6 of relative accuracy).
func stageQueries(_ plan: ForwardPlan, _ item: WorkItem, transposed: Bool, _ w: Workspace) {
    let p = plan.problem
    let d = p.headDim
    let factor = p.scale
    let rows = paddedRows(item)
    w.o.update(repeating: 0, count: (item.rows + microRows - 1) / microRows * microRows * Workspace.paddedDim(p.headDimV))
    w.rowMax.update(repeating: -.infinity, count: rows)
    w.rowSum.update(repeating: 0, count: rows)
    for r in 0..<rows {
        let panel = transposed ? w.qT + (r / microCols) * microCols * d + r % microCols : w.qT + r * d
        let step = transposed ? microCols : 1
        guard let (head, position) = item.query(row: r) else {
            w.rowMaskOffsets[r] = -1
            for c in 0..<d { panel[c * step] = 0 }
            w.rowPosition[r] = Float(item.positions - 1)
            w.rowSlope[r] = 0
            w.rowDistance[r] = 0
            continue
        }
        let source = p.q.row(batch: item.sequence.qBatch, head: head, row: item.sequence.qRow + position)
        if transposed {
            withUnsafeTemporaryAllocation(of: Float.self, capacity: d) { row in
                withStorage(p.q.element) { loadRow($0, source, count: d, scale: factor, into: row.baseAddress!) }
                for c in 0..<d { panel[c * step] = row[c] }
            }
        } else {
            withStorage(p.q.element) { loadRow($0, source, count: d, scale: factor, into: panel) }
        }
        w.rowPosition[r] = Float(position - item.firstPosition)
        w.rowSlope[r] = p.alibiSlopes.map { $0[item.sequence.batch * p.alibiBatchStride + head] } ?? 0
        let aligned = position + item.sequence.seqlenK - item.sequence.seqlenQ
        let keys = p.keyRange(position: position, seqlenQ: item.sequence.seqlenQ, seqlenK: item.sequence.seqlenK)
            .clamped(to: item.keys)
        let nearest = keys.isEmpty ? aligned : min(max(aligned, keys.lowerBound), keys.upperBound - 1)
        w.rowDistance[r] = Float(abs(aligned - nearest))
        if let mask = p.attnMask {
            w.rowMaskOffsets[r] = mask.rowOffset(batch: item.sequence.batch, head: head, position: position)
        }
        if let dropout = p.dropout {
            let state = dropout.row(batch: item.sequence.batch, head: head, position: position)
            (w.rowKeys[r], w.rowKeys[geometry.queryBlock + r]) = (state.low, state.high)
        }
    }
}

/// Walks the item's keys in blocks of at most `blockKeys` (also ending at page boundaries when
/// `pageAligned` and the cache is paged), calling `body` with each block's first key and its score
/// adjustment (mask, softcap, ALiBi).
@inline(__always)
func forEachKeyBlock(
    _ plan: ForwardPlan, _ item: WorkItem, blockKeys: Int, pageAligned: Bool, _ body: (Int, ScoreAdjustment) -> Void
) {
    let p = plan.problem
    let offset = item.sequence.seqlenK - item.sequence.seqlenQ
    var firstKey = item.keys.lowerBound
    while firstKey < item.keys.upperBound {
        var keyCount = min(blockKeys, item.keys.upperBound - firstKey)
        if pageAligned, case .paged(_, _, let page) = p.storage { keyCount = min(keyCount, page - firstKey % page) }
        // Row r (block-relative position i) sees block keys [i + lowShift, i + highShift).
        let aligned = item.firstPosition + offset - firstKey
        let mask = BlockMask(
            keyCount: keyCount, lowShift: p.windowLeft.map { aligned - $0 } ?? -BlockMask.unbounded,
            highShift: p.windowRight.map { aligned + $0 + 1 } ?? BlockMask.unbounded,
            positions: item.positions, monotonic: item.headsPerSlot == 1 && item.slots == 1)
        body(
            firstKey,
            ScoreAdjustment(
                mask: mask, softcap: p.softcap, alibi: p.alibiSlopes != nil, alibiOffset: Float(aligned)))
        firstKey += keyCount
    }
}

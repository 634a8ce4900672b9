import FlashAttentionShims

/// The tiling loop of the forward pass: one work item is one (sequence, query head — or the query heads of
/// a GQA group — query block, key split). It packs its queries once, then meets the key/value blocks one at
/// a time (score tile → online softmax → output tile) and finishes with the epilogue. Nothing of size
/// seqlen_q × seqlen_k is ever stored.

/// Queries per block: a multiple of 48 (`subBlockRows`). Every packed key and value block serves this many
/// queries, so larger is cheaper until the workspace outgrows L2; 288 × 96 measured best on Zen 3 of
/// Bq ∈ {96, 192, 288, 384} × Bk ∈ {48, 96, 192} at head_dim 64 and 128.
package let queryBlockSize = 288
/// Keys per block: a multiple of 6 (score tile height).
package let keyBlockSize = 96
/// Query rows that go through score → softmax → output together: a multiple of 16, 8 and 6, small enough
/// that their Bk × 48 scores (18 KiB) stay in L1 from the score tiles through the output tiles.
let subBlockRows = 48
/// Keys per block of a thin (decoding) item: its rows of every kv head (16 × heads × head_dim floats for
/// K and V) stay in L2 while the heads are worked through one by one. Measured on Zen 3 over a
/// [b, s, 8 heads, 128] cache: 16-key blocks read it at the full DRAM rate, 64-key blocks at two thirds.
let thinBlockKeys = 16
/// Rows of each kv head's slot in a thin item: a softmax vector, of which 6 rows (one output tile) are used.
let thinSlotRows = 8
/// Key splits are at least this long, so a split's fixed costs stay small beside its work.
let minimumSplitKeys = 512
/// Below this many work items, decoding-like shapes split their keys (a property of the shape, never of the
/// thread count, so results do not depend on num_threads).
let splitTargetItems = 32

/// Per-thread scratch of one work item, in floats, every part 64-byte aligned (all sizes are multiples
/// of 16 floats). With Bq = queryBlockSize, Bk = keyBlockSize, D = head_dim rounded up to 16:
///
///     qT      Bq × D          queries × scale·log2(e), as Bq/16 panels of [head_dim][16]
///     kPack   Bk × D          the key block, row-major [row][head_dim] (rows past the block's keys zero)
///     vPack   Bk × D          the value block as D/16 panels of [Bk][16]
///     s       Bk × 48         scores of 48 query rows, transposed (row = key), overwritten by probabilities
///     o       Bq × D          unnormalised output accumulators, row-major
///     rowMax, rowSum, alpha   Bq each: running max (log2 units), running sum, last rescale factor
///     rowPosition, rowSlope, rowDistance
///                             Bq each: each row's query position in its block, its ALiBi slope·log2(e), and
///                             the ALiBi distance its bias is rebased on
///     blockMax                48: each query's max over the current block's scores
///
/// Packing K and V makes the micro-kernels independent of the caller's strides (and of paging): a
/// [b, s, h, d] tensor with 8 heads of 128 has a 4 KiB row stride, which maps every row of a column slice
/// to one L1 set. For head_dim 128 the workspace is ~400 KiB, inside a Zen 3 core's 512 KiB L2.
struct Workspace {
    let qT, kPack, vPack, s, o, rowMax, rowSum, alpha, rowPosition, rowSlope, rowDistance, blockMax: UnsafeMutablePointer<Float>

    static func paddedDim(_ headDim: Int) -> Int { (headDim + 15) / 16 * 16 }

    static func floatCount(headDim: Int) -> Int {
        let qb = queryBlockSize, kb = keyBlockSize, d = paddedDim(headDim)
        return qb * d + kb * d + kb * d + kb * subBlockRows + qb * d + 6 * qb + subBlockRows
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
        rowPosition = alpha + qb
        rowSlope = rowPosition + qb
        rowDistance = rowSlope + qb
        blockMax = rowDistance + qb
    }
}

/// The rows of one work item and the keys it covers. Rows come in `slots`, one per kv head the item
/// covers, each `slotRows` rows long: row r of slot g stands for query head firstHead + g·headsPerSlot +
/// r / positions at position firstPosition + r % positions, for r < headsPerSlot · positions (the rest of a
/// slot is padding). A query block has one slot holding one head (or a GQA group's heads); a thin
/// (decoding) item has a slot of 8 rows per kv head.
struct WorkItem {
    var sequence: Sequence
    var firstHead: Int
    var headsPerSlot: Int
    var slots: Int
    var slotRows: Int
    var firstPosition: Int
    var positions: Int
    /// The keys this item attends to (its split's share of the union of its rows' windows).
    var keys: Range<Int>
    /// Index of the item before splitting, and its split.
    var unsplit: Int
    var split: Int

    /// Rows including slot padding.
    var rows: Int { slots * slotRows }
    /// Whether row r stands for a query, and which (head, position within the sequence) it is.
    @inline(__always) func query(row r: Int) -> (head: Int, position: Int)? {
        let slot = r / slotRows, j = r % slotRows
        guard slot < slots, j < headsPerSlot * positions else { return nil }
        return (firstHead + slot * headsPerSlot + j / positions, firstPosition + j % positions)
    }
}

/// Rescale factor 1, for output tiles that add to rows already rescaled in the same block.
nonisolated(unsafe) private let unitScale: UnsafePointer<Float> = {
    let one = UnsafeMutablePointer<Float>.allocate(capacity: 1)
    one.initialize(to: 1)
    return UnsafePointer(one)
}()

/// Work items, scratch size and the per-item computation of the tiled forward for one problem.
package struct TiledForward: @unchecked Sendable {
    package let problem: AttentionProblem
    /// Few queries per kv head (decoding): items cover every kv head of a (sequence, key split), walk the
    /// keys in 16-key blocks, read K and V rows in place, and score by dot products (`thinBlock`).
    package let thin: Bool
    /// Otherwise, whether the query heads of a GQA group share one item, so that each key and value block
    /// is packed once for the whole group.
    package let stacked: Bool
    /// Query positions per item.
    let blockPositions: Int
    /// Kv heads per thin item (a thin item's slots must fit the query-block workspace).
    let kvHeadsPerItem: Int
    /// Items per batch entry before splitting (dense and cache layouts, and thin or stacked varlen).
    let itemsPerBatch: Int?
    /// Varlen query blocks: first unsplit item of each batch entry, batch + 1 entries.
    let itemStarts: [Int]
    /// Items before splitting along the keys.
    package let unsplitItems: Int
    /// Key splits per item (1: each item writes its rows' final output directly).
    package let splits: Int
    /// Rows of the largest item: the row count of a partial-result slot.
    package let maxItemRows: Int
    /// With splits > 1: [unsplit item][split][row][head_dim + 1] partial outputs and LSEs, set by the driver.
    package var partials: UnsafeMutablePointer<Float>?

    package init(_ problem: AttentionProblem) {
        self.problem = problem
        let group = problem.groupSize
        thin = group * problem.maxSeqlenQ <= microRows && problem.headDim % microCols == 0
        stacked = !thin && group > 1 && problem.maxSeqlenQ * group <= queryBlockSize
        blockPositions = thin || stacked ? max(1, problem.maxSeqlenQ) : queryBlockSize
        kvHeadsPerItem = min(problem.headsKV, queryBlockSize / thinSlotRows)
        let blocks = { (seqlen: Int) in (seqlen + queryBlockSize - 1) / queryBlockSize }
        if thin || stacked {
            // One item per (sequence, unit) even for varlen: an empty sequence's items are empty.
            itemsPerBatch = thin ? (problem.headsKV + kvHeadsPerItem - 1) / kvHeadsPerItem : problem.headsKV
            itemStarts = []
        } else if case .varlen = problem.layout {
            var starts = [0]
            starts.reserveCapacity(problem.batch + 1)
            for b in 0..<problem.batch { starts.append(starts[b] + problem.headsQ * blocks(problem.sequence(b).seqlenQ)) }
            itemStarts = starts
            itemsPerBatch = nil
        } else {
            itemsPerBatch = problem.headsQ * blocks(problem.seqlenQ)
            itemStarts = []
        }
        unsplitItems = itemsPerBatch.map { problem.batch * $0 } ?? itemStarts[problem.batch]
        maxItemRows =
            thin ? kvHeadsPerItem * thinSlotRows
            : stacked ? group * blockPositions : min(queryBlockSize, problem.maxSeqlenQ)
        if unsplitItems > 0 && unsplitItems < splitTargetItems {
            let wanted = (splitTargetItems + unsplitItems - 1) / unsplitItems
            splits = max(1, min(wanted, problem.maxSeqlenK / minimumSplitKeys))
        } else {
            splits = 1
        }
    }

    package var itemCount: Int { unsplitItems * splits }

    /// Scratch bytes one thread needs (zero-filled once at allocation; see `Workspace`).
    package var scratchBytes: Int { Workspace.floatCount(headDim: problem.headDim) * MemoryLayout<Float>.size }

    /// Floats of the partial-result buffer the driver must provide when splits > 1.
    package var partialFloats: Int { unsplitItems * splits * maxItemRows * (problem.headDim + 1) }

    /// The geometry of item `item`. Query-block items run sequence by sequence and head by head, so that
    /// the blocks of one head run close together in time and find its K and V still in L2/L3; within a
    /// head the most expensive (last, under causal masking) blocks come first, so a dynamic scheduler ends
    /// on small items and balances the triangle. Thin items run split by split.
    func workItem(_ item: Int) -> WorkItem {
        let p = problem
        let b: Int, local: Int, split: Int
        if thin, let perBatch = itemsPerBatch {
            (b, split, local) = (item / perBatch / splits, item / perBatch % splits, item % perBatch)
        } else if let perBatch = itemsPerBatch {
            (b, local, split) = (item / splits / perBatch, item / splits % perBatch, item % splits)
        } else {
            let unsplit = item / splits
            var low = 0, high = p.batch  // the last b with itemStarts[b] <= unsplit
            while high - low > 1 {
                let mid = (low + high) / 2
                if itemStarts[mid] <= unsplit { low = mid } else { high = mid }
            }
            (b, local, split) = (low, unsplit - itemStarts[low], item % splits)
        }
        let unsplit = (itemsPerBatch.map { b * $0 } ?? itemStarts[b]) + local
        let sequence = p.sequence(b)
        let blocks = thin || stacked ? 1 : (sequence.seqlenQ + queryBlockSize - 1) / queryBlockSize
        let firstPosition = (blocks - 1 - local % blocks) * blockPositions
        let positions = min(blockPositions, sequence.seqlenQ - firstPosition)
        // Window bounds grow with the query position, so the rows' union is first row's start ..< last row's end.
        let first = p.keyRange(position: firstPosition, seqlenQ: sequence.seqlenQ, seqlenK: sequence.seqlenK)
        let last = p.keyRange(
            position: firstPosition + positions - 1, seqlenQ: sequence.seqlenQ, seqlenK: sequence.seqlenK)
        var keys = positions == 0 ? 0..<0 : first.lowerBound..<max(first.lowerBound, last.upperBound)
        if splits > 1 {
            let chunk = ((keys.count + splits - 1) / splits + keyBlockSize - 1) / keyBlockSize * keyBlockSize
            let lower = min(keys.upperBound, keys.lowerBound + split * chunk)
            keys = lower..<min(keys.upperBound, lower + chunk)
        }
        let unit = local / blocks
        if thin {
            let firstKV = unit * kvHeadsPerItem
            return WorkItem(
                sequence: sequence, firstHead: firstKV * p.groupSize, headsPerSlot: p.groupSize,
                slots: min(kvHeadsPerItem, p.headsKV - firstKV), slotRows: thinSlotRows, firstPosition: firstPosition,
                positions: positions, keys: keys, unsplit: unsplit, split: split)
        }
        let heads = stacked ? p.groupSize : 1
        return WorkItem(
            sequence: sequence, firstHead: stacked ? unit * p.groupSize : unit, headsPerSlot: heads, slots: 1,
            slotRows: heads * positions, firstPosition: firstPosition, positions: positions, keys: keys,
            unsplit: unsplit, split: split)
    }

    /// Runs work item `item`.
    package func run(item index: Int, scratch: UnsafeMutableRawPointer) {
        let p = problem
        let item = workItem(index)
        let d = p.headDim
        let rows = item.rows
        let paddedRows = (rows + 15) / 16 * 16
        let ldO = Workspace.paddedDim(d)
        let w = Workspace(scratch.assumingMemoryBound(to: Float.self), headDim: d)
        let offset = item.sequence.seqlenK - item.sequence.seqlenQ

        packQueries(item, into: w)
        w.o.update(repeating: 0, count: (rows + microRows - 1) / microRows * microRows * ldO)
        w.rowMax.update(repeating: -.infinity, count: paddedRows)
        w.rowSum.update(repeating: 0, count: paddedRows)

        var firstKey = item.keys.lowerBound
        while firstKey < item.keys.upperBound {
            var keyCount = min(thin ? thinBlockKeys : keyBlockSize, item.keys.upperBound - firstKey)
            // Thin blocks read rows in place, so they stop at page boundaries (rows evenly strided).
            if thin, case .paged(_, _, let page) = p.storage { keyCount = min(keyCount, page - firstKey % page) }

            // Row r (block-relative position i) sees block keys [i + lowShift, i + highShift).
            let aligned = item.firstPosition + offset - firstKey
            let mask = BlockMask(
                keyCount: keyCount, lowShift: p.windowLeft.map { aligned - $0 } ?? -BlockMask.unbounded,
                highShift: p.windowRight.map { aligned + $0 + 1 } ?? BlockMask.unbounded,
                positions: item.positions, monotonic: item.headsPerSlot == 1 && item.slots == 1)
            let adjust = ScoreAdjustment(
                mask: mask, softcap: p.softcap * 1.442_695_040_888_963_4, alibi: p.alibiSlopes != nil,
                alibiOffset: Float(aligned))
            if thin {
                prefetchThinBlock(item, from: firstKey + keyCount)
                for slot in 0..<item.slots {
                    thinBlock(item, slot: slot, firstKey: firstKey, adjust: adjust, w)
                }
            } else {
                packedBlock(item, firstKey: firstKey, adjust: adjust, w)
            }
            firstKey += keyCount
        }
        finish(item, w)
    }

    /// One key block of a query block: pack K and V, then score → softmax → output 48 rows at a time.
    private func packedBlock(_ item: WorkItem, firstKey: Int, adjust: ScoreAdjustment, _ w: Workspace) {
        let d = problem.headDim
        let rows = item.rows
        let paddedRows = (rows + 15) / 16 * 16
        let mask = adjust.mask
        let keyCount = mask.keyCount
        packBlock(item.sequence, kvHead: item.firstHead / problem.groupSize, firstKey: firstKey, count: keyCount, into: w)

        // Without softcap or ALiBi the score tiles mask hidden keys (and the zero rows padding a partial
        // last key tile, whose score 0 could exceed every real one by more than exp2's range) as they
        // store, so their running max is exact and the softmax has neither a max pass nor a mask to do.
        var adjust = adjust
        let tilesMask = !adjust.transformsScores && (mask.isMasked || keyCount % microRows != 0)
        adjust.scoresMasked = tilesMask
        let tilesMaxIsExact = !adjust.transformsScores

        // The query block meets the key block 48 rows at a time, so that the scores of those rows stay in
        // L1 from the score tiles through the softmax to the output tiles.
        for first in stride(from: 0, to: paddedRows, by: subBlockRows) {
            let subRows = min(subBlockRows, paddedRows - first)

            // S = K·Qᵀ, 6 keys × 16 queries at a time, over the keys the panel's rows need.
            w.blockMax.update(repeating: -.infinity, count: subRows)
            for panel in 0..<(subRows / microCols) {
                let row = first + panel * microCols
                let needed = mask.needed(fromRow: row, throughRow: row + microCols - 1)
                let queries = w.qT + row * d
                let position0 = load(w.rowPosition + row), position1 = load(w.rowPosition + row + 8)
                for tile in (needed.lowerBound / microRows)..<((needed.upperBound + microRows - 1) / microRows) {
                    // Lane i sees tile keys [position_i + lowShift − key0, min(position_i + highShift, keyCount) − key0).
                    let key0 = tile * microRows
                    var band = mask.tileBand(position0, position1, firstKey: key0)
                    withUnsafePointer(to: &band) { bandPointer in
                        scoreTile(
                            keys: w.kPack + key0 * d, ldK: d, queries: queries, depth: d,
                            s: w.s + key0 * subBlockRows + panel * microCols, ldS: subBlockRows,
                            columnMax: w.blockMax + panel * microCols, band: tilesMask ? bandPointer : nil)
                    }
                }
            }

            softmaxUpdate(
                s: w.s, ldS: subBlockRows, firstRow: first, queryVectors: subRows / 8, adjust: adjust,
                blockMax: tilesMaxIsExact ? w.blockMax : nil, rowPosition: w.rowPosition, rowSlope: w.rowSlope,
                rowDistance: w.rowDistance, rowMax: w.rowMax, rowSum: w.rowSum, alpha: w.alpha)

            // O = α·O + P·V, 6 queries × 16 columns at a time.
            let tiles = (min(rows - first, subRows) + microRows - 1) / microRows
            for tile in 0..<tiles {
                let q = tile * microRows
                accumulateRows(
                    SixRows.self, Float32Storage.self, mask: mask, firstRow: first + q, p: w.s + q, ldP: subBlockRows,
                    v: w.vPack, ldV: microCols, columnStride: keyBlockSize * microCols * 4, w)
            }
        }
    }

    /// Prefetches the rows of every kv head of the item for the thin block after the one in hand. A block's
    /// rows are read head by head, and each first touch of a row, like the start of a cache page at a
    /// random address, is a fresh DRAM miss; requesting them a block ahead keeps the memory pipeline
    /// fuller (measured: paged-16 decoding went from 1.19-1.35× to 0.97-1.12× the contiguous time).
    private func prefetchThinBlock(_ item: WorkItem, from firstKey: Int) {
        let p = problem
        let firstKV = item.firstHead / p.groupSize
        for key in firstKey..<min(item.keys.upperBound, firstKey + thinBlockKeys) {
            for kvHead in firstKV..<(firstKV + item.slots) {
                prefetchRow(p.keyRow(p.k, item.sequence, head: kvHead, position: key), bytes: p.headDim * p.k.element.size)
                prefetchRow(p.keyRow(p.v, item.sequence, head: kvHead, position: key), bytes: p.headDim * p.v.element.size)
            }
        }
    }

    /// One key block of one kv head's slot of a thin item: dot-product scores against K rows in place, the
    /// softmax of the slot's one 8-row vector, and output tiles that read V rows in place.
    private func thinBlock(_ item: WorkItem, slot: Int, firstKey: Int, adjust: ScoreAdjustment, _ w: Workspace) {
        let p = problem
        let d = p.headDim
        let kvHead = item.firstHead / p.groupSize + slot
        let row = slot * thinSlotRows
        let needed = adjust.mask.needed(fromRow: row, throughRow: row + thinSlotRows - 1)
        // Rows are read in place in their storage type and converted as they are loaded.
        let kRows = p.keyRow(p.k, item.sequence, head: kvHead, position: firstKey)
        let vRows = p.keyRow(p.v, item.sequence, head: kvHead, position: firstKey)
        let rowCount = item.headsPerSlot * item.positions
        withTileRows(rowCount) { rows in
            withStorage(p.k.element) { storage in
                scoreRows(
                    rows, storage, keys: kRows + needed.lowerBound * p.k.rowBytes, ldK: p.k.rowStride,
                    count: needed.count, queries: w.qT + row * d, depth: d, s: w.s + needed.lowerBound * subBlockRows,
                    ldS: subBlockRows)
            }
        }
        softmaxUpdate(
            s: w.s, ldS: subBlockRows, firstRow: row, queryVectors: 1, adjust: adjust, blockMax: nil,
            rowPosition: w.rowPosition, rowSlope: w.rowSlope, rowDistance: w.rowDistance, rowMax: w.rowMax,
            rowSum: w.rowSum, alpha: w.alpha)
        withTileRows(rowCount) { rows in
            withStorage(p.v.element) { storage in
                accumulateRows(
                    rows, storage, mask: adjust.mask, firstRow: row, p: w.s, ldP: subBlockRows, v: vRows,
                    ldV: p.v.rowStride, columnStride: microCols * storage.size, w)
            }
        }
    }

    /// O = α·O + P·V for the R rows of an output tile from `firstRow`, every row over exactly the keys it
    /// sees. In an unmasked block that is one R-row tile per 16 columns. In a masked one, the keys every
    /// row sees go through the R-row tile and each row's own extra keys through a one-row tile: the
    /// probability of a hidden key is tiny but not 0, and 0 · NaN is NaN anyway, so multiplying a hidden
    /// value row would let a NaN in it poison rows that must not see it.
    /// - Parameters:
    ///   - p: probabilities of the tile's first row for key 0 (key k at `p + k * ldP`, row r at `p + r`).
    ///   - v: value row 0 of column 0 stored as S; row k `ldV` elements further, column panel c at
    ///     `v + c / 16 * columnStride` bytes.
    private func accumulateRows<R: TileRows, S: StorageElement>(
        _ rows: R.Type, _ storage: S.Type, mask: BlockMask, firstRow: Int, p: UnsafePointer<Float>, ldP: Int,
        v: UnsafeRawPointer, ldV: Int, columnStride: Int, _ w: Workspace
    ) {
        let d = problem.headDim
        let ldO = Workspace.paddedDim(d)
        let o = w.o + firstRow * ldO, alpha = w.alpha + firstRow
        let n = R.count
        @inline(__always) func tile<T: TileRows>(_ r: T.Type, row: Int, keys: Range<Int>, alpha: UnsafePointer<Float>) {
            for column in stride(from: 0, to: d, by: microCols) {
                outputTile(
                    r, S.self, p: p + keys.lowerBound * ldP + row, ldP: ldP,
                    v: v + (keys.lowerBound * ldV) * S.size + column / microCols * columnStride, ldV: ldV,
                    count: keys.count, alpha: alpha, o: o + row * ldO + column, ldO: ldO)
            }
        }
        guard mask.isMasked else { return tile(R.self, row: 0, keys: 0..<mask.keyCount, alpha: alpha) }
        let position = { (r: Int) in Int(w.rowPosition[firstRow + r]) }
        var common = mask.keys(position: position(0))
        for r in 1..<n { common = common.clamped(to: mask.keys(position: position(r))) }
        if !common.isEmpty { tile(R.self, row: 0, keys: common, alpha: alpha) }
        for r in 0..<n {
            let own = mask.keys(position: position(r))
            if common.isEmpty {
                tile(OneRow.self, row: r, keys: own, alpha: alpha + r)
            } else {
                if own.lowerBound < common.lowerBound {
                    tile(OneRow.self, row: r, keys: own.lowerBound..<common.lowerBound, alpha: unitScale)
                }
                if own.upperBound > common.upperBound {
                    tile(OneRow.self, row: r, keys: common.upperBound..<own.upperBound, alpha: unitScale)
                }
            }
        }
    }

    /// Writes the item's rows: final outputs and LSEs (with the sink folded in), or, for a split item, its
    /// normalised partial state for `mergeSplits`.
    private func finish(_ item: WorkItem, _ w: Workspace) {
        let p = problem
        let d = p.headDim
        let ldO = Workspace.paddedDim(d)
        for r in 0..<item.rows {
            guard let (head, position) = item.query(row: r) else { continue }
            let row = item.sequence.qRow + position
            // ALiBi was rebased on the row's nearest visible key; its bias returns to the LSE here.
            let bias = w.rowSlope[r] * ln2 * w.rowDistance[r]
            let o = w.o + r * ldO
            if let partials {
                let slot = partials + ((item.unsplit * splits + item.split) * maxItemRows + r) * (d + 1)
                let (factor, lse) = finishRow(rowMax: w.rowMax[r], rowSum: w.rowSum[r], lseShift: -bias, sink: -.infinity)
                scaleRow(o, by: factor, into: slot, count: d)
                slot[d] = lse
            } else {
                let (factor, lse) = finishRow(
                    rowMax: w.rowMax[r], rowSum: w.rowSum[r], lseShift: -bias, sink: p.sinks.map { $0[head] } ?? -.infinity)
                withStorage(p.out.element) { storage in
                    storeRow(storage, o, count: d, scale: factor, into: p.out.row(batch: item.sequence.qBatch, head: head, row: row))
                }
                p.lse?.row(batch: item.sequence.qBatch, head: head, row: row).pointee = lse
            }
        }
    }

    /// Combines the split partial results of unsplit item `item` in split order (and the sink), writing
    /// the final rows. The order is fixed, so the result does not depend on which thread ran which split.
    package func mergeSplits(item: Int) {
        let p = problem
        let d = p.headDim
        guard let partials else { return }
        // The unsplit item's first split has the same rows as every split.
        let perBatch = itemsPerBatch ?? 1
        let first = thin ? (item / perBatch * splits) * perBatch + item % perBatch : item * splits
        let geometry = workItem(first)
        for r in 0..<geometry.rows {
            guard let (head, position) = geometry.query(row: r) else { continue }
            let row = geometry.sequence.qRow + position
            let slot = { (split: Int) in partials + ((item * self.splits + split) * self.maxItemRows + r) * (d + 1) }
            // Merged in place in split 0's slot (float32), then stored once in the output's type.
            let out = slot(0)
            var lse = out[d]
            for split in 1..<splits {
                lse = mergeStates(out: out, lse: lse, other: slot(split), otherLSE: slot(split)[d], headDim: d)
            }
            if let sinks = p.sinks { lse = mergeSink(out: out, lse: lse, sink: sinks[head], headDim: d) }
            withStorage(p.out.element) { storage in
                storeRow(storage, out, count: d, scale: 1, into: p.out.row(batch: geometry.sequence.qBatch, head: head, row: row))
            }
            p.lse?.row(batch: geometry.sequence.qBatch, head: head, row: row).pointee = lse
        }
    }

    /// Packs the item's queries, multiplied by scale·log2(e) so the softmax can use exp2: as transposed
    /// 16-row panels for the block kernels, or as plain rows for the thin kernel; padding rows (to the
    /// next multiple of 16) are zero. Fills the row tables: each row's position within the block, its
    /// ALiBi slope·log2(e), and the distance from its aligned key to the nearest key it attends to here.
    /// Subtracting that distance from every ALiBi distance of the row shifts its scores by a constant,
    /// which the softmax ignores and the LSE takes back; it keeps the scores that matter near 0, where
    /// float32 is precise (biases of a few hundred would otherwise cost ~5e-6 of relative accuracy).
    private func packQueries(_ item: WorkItem, into w: Workspace) {
        let p = problem
        let d = p.headDim
        let log2e: Float = 1.442_695_040_888_963_4
        let factor = p.scale * log2e
        let paddedRows = (item.rows + 15) / 16 * 16
        for r in 0..<paddedRows {
            let panel = thin ? w.qT + r * d : w.qT + (r / microCols) * microCols * d + r % microCols
            let step = thin ? 1 : microCols
            guard let (head, position) = item.query(row: r) else {
                for c in 0..<d { panel[c * step] = 0 }
                w.rowPosition[r] = Float(item.positions - 1)
                w.rowSlope[r] = 0
                w.rowDistance[r] = 0
                continue
            }
            let source = p.q.row(batch: item.sequence.qBatch, head: head, row: item.sequence.qRow + position)
            if thin {
                withStorage(p.q.element) { loadRow($0, source, count: d, scale: factor, into: panel) }
            } else {
                withUnsafeTemporaryAllocation(of: Float.self, capacity: d) { row in
                    withStorage(p.q.element) { loadRow($0, source, count: d, scale: factor, into: row.baseAddress!) }
                    for c in 0..<d { panel[c * step] = row[c] }
                }
            }
            w.rowPosition[r] = Float(position - item.firstPosition)
            w.rowSlope[r] = p.alibiSlopes.map { $0[item.sequence.batch * p.alibiBatchStride + head] * log2e } ?? 0
            let aligned = position + item.sequence.seqlenK - item.sequence.seqlenQ
            let keys = p.keyRange(position: position, seqlenQ: item.sequence.seqlenQ, seqlenK: item.sequence.seqlenK)
                .clamped(to: item.keys)
            let nearest = keys.isEmpty ? aligned : min(max(aligned, keys.lowerBound), keys.upperBound - 1)
            w.rowDistance[r] = Float(abs(aligned - nearest))
        }
    }

    /// Packs keys [firstKey, firstKey + count) of the sequence in one pass over their rows: key rows into a
    /// dense [rows][depth] block (zero-filled up to a multiple of 6 rows, so the last score tile reads
    /// defined values), value rows into 16-column panels [keyBlockSize][16] (columns past head_dim zero).
    /// Rows are located one by one, so a paged cache costs one table read per row.
    private func packBlock(_ sequence: Sequence, kvHead: Int, firstKey: Int, count: Int, into w: Workspace) {
        withStorage(problem.k.element) { storage in
            packBlock(storage, sequence, kvHead: kvHead, firstKey: firstKey, count: count, into: w)
        }
    }

    private func packBlock<S: StorageElement>(
        _ storage: S.Type, _ sequence: Sequence, kvHead: Int, firstKey: Int, count: Int, into w: Workspace
    ) {
        let depth = problem.headDim
        let fullColumns = depth / microCols * microCols
        for key in 0..<count {
            let kSource = problem.keyRow(problem.k, sequence, head: kvHead, position: firstKey + key)
            let vSource = problem.keyRow(problem.v, sequence, head: kvHead, position: firstKey + key)
            loadRow(S.self, kSource, count: depth, into: w.kPack + key * depth)
            var column = 0
            while column < fullColumns {
                let vTarget = w.vPack + column * keyBlockSize + key * microCols
                store(S.load8(vSource + column * S.size), vTarget)
                store(S.load8(vSource + (column + 8) * S.size), vTarget + 8)
                column += microCols
            }
            if column < depth {
                let vTarget = w.vPack + column * keyBlockSize + key * microCols
                for c in 0..<microCols { vTarget[c] = column + c < depth ? S.load(vSource + (column + c) * S.size) : 0 }
            }
        }
        let paddedCount = (count + microRows - 1) / microRows * microRows
        (w.kPack + count * depth).update(repeating: 0, count: (paddedCount - count) * depth)
    }
}

/// Prefetches the cache lines of `bytes` bytes from `row`.
@inline(__always)
func prefetchRow(_ row: UnsafeRawPointer, bytes: Int) {
    var offset = 0
    while offset < bytes {
        fa_prefetch(row + offset)
        offset += 64
    }
}

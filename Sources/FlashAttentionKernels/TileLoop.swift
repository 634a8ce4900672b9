import FlashAttentionCore

/// The tiling loop of the forward pass over query blocks (one head's, or a GQA group's heads stacked): an
/// item packs its queries once, then meets the key/value blocks one at a time — pack K and V, score tiles,
/// online softmax, output tiles — and finishes with the epilogue. Nothing of size seqlen_q × seqlen_k is
/// ever stored.

/// Runs forward work item `index` of `plan` on this kernel copy: the entry point of its table.
func runForwardItem(_ plan: ForwardPlan, _ index: Int, _ scratch: UnsafeMutableRawPointer) {
    let item = plan.workItem(index)
    let w = Workspace(scratch, headDim: plan.problem.headDim)
    switch plan.path {
    case .decoding: DecodeKernel(plan: plan).run(item, w)
    case .queryBlocks, .groupBlocks: QueryBlockKernel(plan: plan).run(item, w)
    }
}

/// The query-block path: K and V are packed once per key block for all of the item's rows.
struct QueryBlockKernel {
    let plan: ForwardPlan

    /// bfloat16 q/k/v on a copy with pair products: both products from bfloat16 pairs (PairProducts.swift).
    private var pairs: Bool { usesPairProducts(plan.problem) }

    func run(_ item: WorkItem, _ w: Workspace) {
        stageQueries(plan, item, transposed: true, w)
        if pairs { stageQueryPairs(plan, item, w) }
        forEachKeyBlock(plan, item, blockKeys: geometry.keyBlock, pageAligned: false) { firstKey, adjust in
            keyBlock(item, firstKey: firstKey, adjust: adjust, w)
        }
        finishItem(plan, item, w)
    }

    /// One key block: pack K and V, then score → softmax → output `subBlockRows` rows at a time.
    private func keyBlock(_ item: WorkItem, firstKey: Int, adjust: ScoreAdjustment, _ w: Workspace) {
        let padded = paddedRows(item)
        let mask = adjust.mask
        let keyCount = mask.keyCount
        let attnMask = plan.problem.attnMask
        let kvHead = item.firstHead / plan.problem.groupSize
        if pairs {
            packPairBlock(plan, item.sequence, kvHead: kvHead, firstKey: firstKey, count: keyCount, w)
        } else {
            packBlock(item.sequence, kvHead: kvHead, firstKey: firstKey, count: keyCount, into: w)
        }

        // Without softcap or ALiBi the score tiles mask hidden keys (and the zero rows padding a partial
        // last key tile, whose score 0 could exceed every real one by more than exp2's range) as they
        // store, so their running max is exact and the softmax has neither a max pass nor a mask to do.
        var adjust = adjust
        if attnMask != nil { adjust.maskTile = w.maskTile }
        let tilesMask = !adjust.transformsScores && (mask.isMasked || keyCount % microRows != 0)
        adjust.scoresMasked = tilesMask
        let tilesMaxIsExact = !adjust.transformsScores

        // The query block meets the key block a sub-block of rows at a time, so that the scores of those
        // rows stay in L1 from the score tiles through the softmax to the output tiles.
        for first in stride(from: 0, to: padded, by: subBlockRows) {
            let subRows = min(subBlockRows, padded - first)
            var subAdjust = adjust
            if let attnMask {
                // Staged first: a sub-block the mask hides is skipped, one it hides in part narrowed.
                guard let seen = stageMaskTile(
                    attnMask, rowOffsets: w.rowMaskOffsets, firstRow: first, rows: subRows,
                    keys: mask.needed(fromRow: first, throughRow: first + subRows - 1), firstKey: firstKey,
                    into: w.maskTile, ldS: subBlockRows)
                else { continue }
                (subAdjust.mask.firstSeen, subAdjust.mask.endSeen) = (seen.lowerBound, seen.upperBound)
            }
            subBlock(
                item, firstKey: firstKey, first: first, subRows: subRows, adjust: subAdjust, tilesMask: tilesMask,
                tilesMaxIsExact: tilesMaxIsExact, w)
        }
    }

    /// Score → softmax → output for item rows `first ..< first + subRows` against the packed key block.
    private func subBlock(
        _ item: WorkItem, firstKey: Int, first: Int, subRows: Int, adjust: ScoreAdjustment, tilesMask: Bool,
        tilesMaxIsExact: Bool, _ w: Workspace
    ) {
        let d = plan.problem.headDim, mask = adjust.mask
        // S = K·Qᵀ, one micro-tile at a time, over the keys the panel's rows need.
        w.blockMax.update(repeating: -.infinity, count: subRows)
        for panel in 0..<(subRows / microCols) {
            let row = first + panel * microCols
            let needed = mask.needed(fromRow: row, throughRow: row + microCols - 1)
            let queries = w.qT + row * d
            let position0 = load(w.rowPosition + row), position1 = load(w.rowPosition + row + lanes)
            for tile in (needed.lowerBound / microRows)..<((needed.upperBound + microRows - 1) / microRows) {
                // Lane i sees tile keys [position_i + lowShift − key0, min(position_i + highShift, keyCount) − key0).
                let key0 = tile * microRows
                var band = mask.tileBand(position0, position1, firstKey: key0)
                withUnsafePointer(to: &band) { bandPointer in
                    let s = w.s + key0 * subBlockRows + panel * microCols, columnMax = w.blockMax + panel * microCols
                    if pairs {
                        let words = pairCount(d)
                        scoreTilePairs(
                            keys: w.kPairs + key0 * words, ldK: words, queries: w.qPairs + row * words, pairs: words,
                            scale: plan.problem.scale, s: s, ldS: subBlockRows, columnMax: columnMax,
                            band: tilesMask ? bandPointer : nil)
                    } else {
                        scoreTile(
                            keys: w.kPack + key0 * d, ldK: d, queries: queries, depth: d, s: s, ldS: subBlockRows,
                            columnMax: columnMax, band: tilesMask ? bandPointer : nil)
                    }
                }
            }
        }

        softmaxUpdate(
            s: w.s, ldS: subBlockRows, firstRow: first, queryVectors: subRows / lanes, adjust: adjust,
            blockMax: tilesMaxIsExact ? w.blockMax : nil, rowPosition: w.rowPosition, rowSlope: w.rowSlope,
            rowDistance: w.rowDistance, rowMax: w.rowMax, rowSum: w.rowSum, alpha: w.alpha)
        if let dropout = plan.problem.dropout {
            applyDropout(
                dropout, s: w.s, ldS: subBlockRows, firstRow: first, queryVectors: subRows / lanes, mask: mask,
                firstKey: firstKey, rowKeys: w.rowKeys)
        }

        // O = α·O + P·V, one output tile at a time.
        let tiles = (min(item.rows - first, subRows) + microRows - 1) / microRows
        if pairs {
            packProbabilityPairs(
                w.s, ldS: subBlockRows, keys: mask.needed(fromRow: first, throughRow: first + subRows - 1), rows: subRows,
                into: w.pPairs)
        }
        for tile in 0..<tiles {
            let q = tile * microRows
            if pairs {
                accumulatePairRows(
                    MicroRows.self, headDim: d, mask: mask, firstRow: first + q, p: w.s + q, pairs: w.pPairs + q,
                    ldP: subBlockRows, w)
            } else {
                accumulateRows(
                    MicroRows.self, Float32Storage.self, headDim: d, mask: mask, firstRow: first + q, p: w.s + q,
                    ldP: subBlockRows, v: w.vPack, ldV: microCols,
                    columnStride: geometry.keyBlock * microCols * MemoryLayout<Float>.size, w)
            }
        }
    }

    /// Packs keys [firstKey, firstKey + count) of the sequence in one pass over their rows: key rows into a
    /// dense [rows][depth] block (zero-filled up to a whole micro-tile of rows, so the last score tile reads
    /// defined values), value rows into `microCols`-column panels [keyBlock][microCols] (columns past
    /// head_dim zero). Rows are located one by one, so a paged cache costs one table read per row.
    private func packBlock(_ sequence: Sequence, kvHead: Int, firstKey: Int, count: Int, into w: Workspace) {
        withStorage(plan.problem.k.element) { storage in
            packBlock(storage, sequence, kvHead: kvHead, firstKey: firstKey, count: count, into: w)
        }
    }

    private func packBlock<S: StorageElement>(
        _ storage: S.Type, _ sequence: Sequence, kvHead: Int, firstKey: Int, count: Int, into w: Workspace
    ) {
        let p = plan.problem
        let depth = p.headDim
        let fullColumns = depth / microCols * microCols
        let keyBlock = geometry.keyBlock
        for key in 0..<count {
            let kSource = p.keyRow(p.k, sequence, head: kvHead, position: firstKey + key)
            let vSource = p.keyRow(p.v, sequence, head: kvHead, position: firstKey + key)
            // An 8-bit cache is dequantized here, row by row (its rows and scales read once per block).
            let kScale: Float = p.k.scale == nil ? 1 : p.keyScale(p.k, sequence, head: kvHead, position: firstKey + key).pointee
            let vScale: Float = p.v.scale == nil ? 1 : p.keyScale(p.v, sequence, head: kvHead, position: firstKey + key).pointee
            loadRow(S.self, kSource, count: depth, scale: kScale, into: w.kPack + key * depth)
            let factor = Vec(repeating: vScale)
            var column = 0
            while column < fullColumns {
                let vTarget = w.vPack + column * keyBlock + key * microCols
                store(S.loadVector(vSource + column * S.size) * factor, vTarget)
                store(S.loadVector(vSource + (column + lanes) * S.size) * factor, vTarget + lanes)
                column += microCols
            }
            if column < depth {
                let vTarget = w.vPack + column * keyBlock + key * microCols
                for c in 0..<microCols {
                    vTarget[c] = column + c < depth ? S.load(vSource + (column + c) * S.size) * vScale : 0
                }
            }
        }
        let paddedCount = (count + microRows - 1) / microRows * microRows
        (w.kPack + count * depth).update(repeating: 0, count: (paddedCount - count) * depth)
    }
}

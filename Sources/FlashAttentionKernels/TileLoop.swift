import FlashAttentionCore

/// The tiling loop of the forward pass over query blocks (one head's, or a GQA group's heads stacked): an
/// item packs its queries once, then meets the key/value blocks one at a time — pack K and V, score tiles,
/// online softmax, output tiles — and finishes with the epilogue. Nothing of size seqlen_q × seqlen_k is
/// ever stored.

/// Runs forward work item `index` of `plan` on this kernel copy: the entry point of its table.
func runForwardItem(_ plan: ForwardPlan, _ index: Int, _ scratch: UnsafeMutableRawPointer) {
    let item = plan.workItem(index)
    let w = Workspace(scratch, headDim: plan.problem.headDim, headDimV: plan.problem.headDimV)
    switch plan.path {
    case .decoding: DecodeKernel(plan: plan).run(item, w)
    case .queryBlocks, .groupBlocks: QueryBlockKernel(plan: plan).run(item, w)
    }
}

/// The query-block path: K and V are packed once per key block for all of the item's rows.
struct QueryBlockKernel {
    let plan: ForwardPlan

    /// float32, or bfloat16 products for bfloat16 q/k/v on a copy that has them (PairProducts.swift).
    private var products: BlockProducts { blockProducts(plan.problem) }
    /// Keys per score tile: an AMX step takes 32.
    private var tileKeys: Int { products == .amx ? amxStepRows : microRows }

    func run(_ item: WorkItem, _ w: Workspace) {
        stageQueries(plan, item, transposed: true, w)
        if products != .float32 { stageQueryPairs(plan, item, w) }
        if products == .amx { beginAMXItem() }
        forEachKeyBlock(plan, item, blockKeys: geometry.keyBlock, pageAligned: false) { firstKey, adjust in
            keyBlock(item, firstKey: firstKey, adjust: adjust, w)
        }
        if products == .amx { endAMXItem() }
        finishItem(plan, item, w)
    }

    /// One key block: pack K and V, then score → softmax → output `subBlockRows` rows at a time.
    private func keyBlock(_ item: WorkItem, firstKey: Int, adjust: ScoreAdjustment, _ w: Workspace) {
        let padded = paddedRows(item)
        let mask = adjust.mask
        let attnMask = plan.problem.attnMask
        let keyCount = mask.keyCount
        let kvHead = item.firstHead / plan.problem.groupSize
        // How this block forms P·V: as the scores, except that AMX tiles take only finite values (AMXTiles.swift).
        var valueProducts = products
        switch products {
        case .float32: packBlock(item.sequence, kvHead: kvHead, firstKey: firstKey, count: keyCount, into: w)
        case .pairs:
            packPairBlock(plan, item.sequence, kvHead: kvHead, firstKey: firstKey, count: keyCount, tileKeys: tileKeys, valueChunk: 1, w)
        case .amx:
            let pairs = packPairBlock(
                plan, item.sequence, kvHead: kvHead, firstKey: firstKey, count: keyCount, tileKeys: tileKeys,
                valueChunk: amxChunkPairs, w)
            if !valuePairsAreFinite(pairs: pairs, headDimV: plan.problem.headDimV, w) { valueProducts = .pairs }
        }
        if let attnMask {
            let next = firstKey + keyCount
            prefetchMask(attnMask, rowOffsets: w.rowMaskOffsets, rows: padded, keys: next..<(next + geometry.keyBlock))
        }

        // The query block meets the key block a sub-block of rows at a time, so that the scores of those
        // rows stay in L1 from the score tiles through the softmax to the output tiles.
        for first in stride(from: 0, to: padded, by: subBlockRows) {
            let subRows = min(subBlockRows, padded - first)
            var subAdjust = adjust
            if let attnMask {
                // Surveyed first: a sub-block the mask hides is skipped, one it hides in part narrowed, and
                // its values staged only where they change some score.
                guard let content = stageMaskTile(
                    attnMask, rowOffsets: w.rowMaskOffsets, firstRow: first, rows: subRows,
                    keys: mask.needed(fromRow: first, throughRow: first + subRows - 1), firstKey: firstKey,
                    keyLimit: item.sequence.seqlenK, into: w.maskTile, ldS: subBlockRows, scratch: w.s)
                else { continue }
                (subAdjust.mask.firstSeen, subAdjust.mask.endSeen) = (content.seen.lowerBound, content.seen.upperBound)
                if content.staged { subAdjust.maskTile = w.maskTile }
            }
            subBlock(item, firstKey: firstKey, first: first, subRows: subRows, adjust: subAdjust, values: valueProducts, w)
        }
    }

    /// Score → softmax → output for item rows `first ..< first + subRows` against the packed key block, P·V formed
    /// as `values` says.
    private func subBlock(
        _ item: WorkItem, firstKey: Int, first: Int, subRows: Int, adjust: ScoreAdjustment, values: BlockProducts,
        _ w: Workspace
    ) {
        // Without softcap, ALiBi or staged mask values the score tiles mask hidden keys (and the zero rows
        // padding a partial last key tile, whose score 0 could exceed every real one by more than exp2's
        // range) as they store, so their running max is exact and the softmax has neither a max pass nor a
        // mask to do.
        var adjust = adjust
        let tilesMask = !adjust.transformsScores && (adjust.mask.isMasked || adjust.mask.keyCount % tileKeys != 0)
        adjust.scoresMasked = tilesMask
        let tilesMaxIsExact = !adjust.transformsScores
        let mask = adjust.mask, dv = plan.problem.headDimV
        scoreTiles(first: first, subRows: subRows, mask: mask, tilesMask: tilesMask, w)

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
        let rows = min(item.rows - first, subRows)
        if values == .amx {
            return accumulateAMXRows(headDimV: dv, mask: mask, first: first, rows: (rows + amxStepRows - 1) / amxStepRows * amxStepRows, w)
        }
        let tiles = (rows + microRows - 1) / microRows
        let pairs = values == .pairs
        if pairs {
            packProbabilityPairs(
                w.s, ldS: subBlockRows, keys: mask.needed(fromRow: first, throughRow: first + subRows - 1), rows: subRows,
                into: w.pPairs)
        }
        for tile in 0..<tiles {
            let q = tile * microRows
            if pairs {
                let products = PairOutputs(p: w.s + q, pairs: w.pPairs + q, ldP: subBlockRows, v: w.vPairs)
                accumulateRows(MicroRows.self, products, headDim: dv, mask: mask, firstRow: first + q, w)
            } else {
                let products = FloatOutputs<Float32Storage>(
                    p: w.s + q, ldP: subBlockRows, v: w.vPack, ldV: microCols,
                    columnStride: geometry.keyBlock * microCols * MemoryLayout<Float>.size)
                accumulateRows(MicroRows.self, products, headDim: dv, mask: mask, firstRow: first + q, w)
            }
        }
    }

    /// S = K·Qᵀ for item rows `first ..< first + subRows`, one score tile at a time, over the keys each panel's rows
    /// need; the tiles mask with their bands when `tilesMask`.
    private func scoreTiles(first: Int, subRows: Int, mask: BlockMask, tilesMask: Bool, _ w: Workspace) {
        let d = plan.problem.headDim, stride = pairStride(d), products = products, tileKeys = tileKeys
        w.blockMax.update(repeating: -.infinity, count: subRows)
        for panel in 0..<(subRows / microCols) {
            let row = first + panel * microCols
            let needed = mask.needed(fromRow: row, throughRow: row + microCols - 1)
            let position0 = load(w.rowPosition + row), position1 = load(w.rowPosition + row + lanes)
            for tile in (needed.lowerBound / tileKeys)..<((needed.upperBound + tileKeys - 1) / tileKeys) {
                // Lane i sees tile keys [position_i + lowShift − key0, min(position_i + highShift, keyCount) − key0);
                // an AMX step's band j is that of its keys 8j to 8j + 7.
                let key0 = tile * tileKeys
                let band = mask.tileBand(position0, position1, firstKey: key0)
                var bands = (band, band, band, band)
                if products == .amx && tilesMask {
                    bands.1 = mask.tileBand(position0, position1, firstKey: key0 + microRows)
                    bands.2 = mask.tileBand(position0, position1, firstKey: key0 + 2 * microRows)
                    bands.3 = mask.tileBand(position0, position1, firstKey: key0 + 3 * microRows)
                }
                withUnsafePointer(to: &bands) { pointer in
                    let band = tilesMask ? UnsafeRawPointer(pointer).assumingMemoryBound(to: TileBand.self) : nil
                    let s = w.s + key0 * subBlockRows + panel * microCols, columnMax = w.blockMax + panel * microCols
                    switch products {
                    case .float32:
                        scoreTile(
                            keys: w.kPack + key0 * d, ldK: d, queries: w.qT + row * d, depth: d, s: s, ldS: subBlockRows,
                            columnMax: columnMax, band: band)
                    case .pairs:
                        scoreTilePairs(
                            keys: w.kPairs + key0 * stride, ldK: stride, queries: w.qPairs + row * stride,
                            pairs: pairCount(d), scale: plan.problem.scale, s: s, ldS: subBlockRows, columnMax: columnMax,
                            band: band)
                    case .amx:
                        scoreTileAMX(
                            keys: w.kPairs + key0 * stride, ldK: stride, queries: w.qPairs + row * stride,
                            chunks: stride / 16, scale: plan.problem.scale, s: s, ldS: subBlockRows, columnMax: columnMax,
                            bands: band)
                    }
                }
            }
        }
    }

    /// Packs keys [firstKey, firstKey + count) of the sequence in one pass over their rows: key rows into a
    /// dense [rows][depth] block (zero-filled up to a whole micro-tile of rows, so the last score tile reads
    /// defined values), value rows into `microCols`-column panels [keyBlock][microCols] (columns past
    /// head_dim_v zero). Rows are located one by one, so a paged cache costs one table read per row.
    private func packBlock(_ sequence: Sequence, kvHead: Int, firstKey: Int, count: Int, into w: Workspace) {
        withStorage(plan.problem.k.element) { storage in
            packBlock(storage, sequence, kvHead: kvHead, firstKey: firstKey, count: count, into: w)
        }
    }

    private func packBlock<S: StorageElement>(
        _ storage: S.Type, _ sequence: Sequence, kvHead: Int, firstKey: Int, count: Int, into w: Workspace
    ) {
        let p = plan.problem
        let depth = p.headDim, width = p.headDimV
        let fullColumns = width / microCols * microCols
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
            if column < width {
                let vTarget = w.vPack + column * keyBlock + key * microCols
                for c in 0..<microCols {
                    vTarget[c] = column + c < width ? S.load(vSource + (column + c) * S.size) * vScale : 0
                }
            }
        }
        let paddedCount = (count + microRows - 1) / microRows * microRows
        (w.kPack + count * depth).update(repeating: 0, count: (paddedCount - count) * depth)
    }
}

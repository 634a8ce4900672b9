import FlashAttentionCore
struct DecodeKernel {
    let plan: ForwardPlan

    /// Keys per block: `thinBlockKeys` float32 rows' worth of bytes, so that narrower elements (half, 8-bit)
    /// spread the per-block costs (mask, softmax set-up, calls) over more keys for the same cache footprint.
    var blockKeys: Int {
        min(geometry.keyBlock, geometry.thinBlockKeys * MemoryLayout<Float>.size / plan.problem.k.element.size)
    }

    func run(_ item: WorkItem, _ w: Workspace) {
        stageQueries(plan, item, transposed: false, w)
        // Blocks read rows in place, so they stop at page boundaries (rows evenly strided).
        forEachKeyBlock(plan, item, blockKeys: blockKeys, pageAligned: true) { firstKey, adjust in
            prefetchBlock(item, from: firstKey + adjust.mask.keyCount)
            for slot in 0..<item.slots {
                headBlock(item, slot: slot, firstKey: firstKey, adjust: adjust, w)
            }
        }
        finishItem(plan, item, w)
    }

    /// Prefetches the rows of every kv head of the item for the block after the one in hand, into L2 (a
    /// block of 8 heads is 128 KiB of rows, more than L1). A block's rows are read head by head, and each
    /// first touch of a row, like the start of a cache page at a random address, is a fresh DRAM miss;
    /// requesting them a block ahead keeps the memory pipeline fuller (measured on Zen 3: paged-16 decoding
    /// went from 1.19-1.35× to 0.97-1.12× the contiguous time; on Zen 5, prefetching into L2 instead of L1
    /// raised contiguous decoding from ~12.5 to ~14 GB/s at 1 thread, and none at all gave ~10.5).
    private func prefetchBlock(_ item: WorkItem, from firstKey: Int) {
        let p = plan.problem
        let firstKV = item.firstHead / p.groupSize
        for key in firstKey..<min(item.keys.upperBound, firstKey + blockKeys) {
            for kvHead in firstKV..<(firstKV + item.slots) {
                prefetchRowToL2(p.keyRow(p.k, item.sequence, head: kvHead, position: key), bytes: p.headDim * p.k.element.size)
                prefetchRowToL2(p.keyRow(p.v, item.sequence, head: kvHead, position: key), bytes: p.headDimV * p.v.element.size)
            }
        }
    }

    /// One key block of one kv head's slot: dot-product scores against K rows in place, the softmax of the
    /// slot's one vector of rows, and output tiles that read V rows in place.
    private func headBlock(_ item: WorkItem, slot: Int, firstKey: Int, adjust: ScoreAdjustment, _ w: Workspace) {
        let p = plan.problem
        let d = p.headDim
        let kvHead = item.firstHead / p.groupSize + slot
        let row = slot * geometry.thinSlotRows
        let needed = adjust.mask.needed(fromRow: row, throughRow: row + geometry.thinSlotRows - 1)
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
        // An 8-bit cache: each key's score and each value's probability take the row's scale (the softmax's
        // sum is over the unscaled probabilities, which it has taken before they are scaled).
        if p.k.scale != nil { scaleKeyRows(p.k, item, kvHead: kvHead, firstKey: firstKey, keys: needed, w) }
        softmaxUpdate(
            s: w.s, ldS: subBlockRows, firstRow: row, queryVectors: geometry.thinSlotRows / lanes, adjust: adjust,
            blockMax: nil, rowPosition: w.rowPosition, rowSlope: w.rowSlope, rowDistance: w.rowDistance,
            rowMax: w.rowMax, rowSum: w.rowSum, alpha: w.alpha)
        if p.v.scale != nil { scaleKeyRows(p.v, item, kvHead: kvHead, firstKey: firstKey, keys: needed, w) }
        withTileRows(rowCount) { rows in
            withStorage(p.v.element) { storage in
                accumulateValueRows(rows, storage, v: vRows, mask: adjust.mask, firstRow: row, w)
            }
        }
    }

    /// O = α·O + P·V for the slot's rows from `firstRow`, the values read in place from `v` (stored as S).
    private func accumulateValueRows<R: TileRows, S: StorageElement>(
        _ rows: R.Type, _ storage: S.Type, v: UnsafeRawPointer, mask: BlockMask, firstRow: Int, _ w: Workspace
    ) {
        let p = plan.problem
        let products = FloatOutputs<S>(p: w.s, ldP: subBlockRows, v: v, ldV: p.v.rowStride, columnStride: microCols * S.size)
        accumulateRows(R.self, products, headDim: p.headDimV, mask: mask, firstRow: firstRow, w)
    }

    /// Multiplies the slot's scores (or probabilities) of keys `keys` by the row scales of `tensor` (K or V).
    private func scaleKeyRows(_ tensor: TensorView, _ item: WorkItem, kvHead: Int, firstKey: Int, keys: Range<Int>, _ w: Workspace) {
        let p = plan.problem
        for k in keys {
            let scale = Vec(repeating: p.keyScale(tensor, item.sequence, head: kvHead, position: firstKey + k).pointee)
            for vector in 0..<(geometry.thinSlotRows / lanes) {
                let column = w.s + k * subBlockRows + vector * lanes
                store(load(column) * scale, column)
            }
        }
    }
}

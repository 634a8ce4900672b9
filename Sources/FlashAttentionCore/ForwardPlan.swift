/// The work decomposition of the tiled forward pass: which kernel path a problem takes, how it is cut into
/// work items (one per (sequence, query head or GQA group or kv heads, query block, key split)), and the
/// merge of split items. It depends on the kernel copy only through its `TileGeometry`, so every copy cuts
/// the same problem the same way for its own block sizes, and the result never depends on the thread count.

/// Key splits are at least this long, so a split's fixed costs stay small beside its work.
let minimumSplitKeys = 512
/// Below this many work items, decoding-like shapes split their keys (a property of the shape, never of the
/// thread count, so results do not depend on num_threads).
let splitTargetItems = 32
/// Query-block problems with fewer items than this get shorter query blocks, so that many cores have work to
/// share and the dynamic scheduler can balance causal triangles (16 threads had 16 items of 576 rows for
/// (1, 8, 8, 1024, 64)). Again a property of the shape only.
let minimumQueryItems = 64

/// The kernel path of a problem (each has its own file in the kernel source).
public enum ForwardPath: Sendable {
    /// Query blocks of one head (TileLoop.swift): K and V packed once per key block for the block's queries.
    case queryBlocks
    /// Query blocks holding every query head of a GQA group (short sequences): each key and value block is
    /// packed once for the whole group.
    case groupBlocks
    /// Few queries per kv head (Decode.swift): items cover every kv head of a (sequence, key split), walk
    /// the keys in short blocks, read K and V rows in place, and score by dot products.
    case decoding
}

/// The rows of one work item and the keys it covers. Rows come in `slots`, one per kv head the item
/// covers, each `slotRows` rows long: row r of slot g stands for query head firstHead + g·headsPerSlot +
/// r / positions at position firstPosition + r % positions, for r < headsPerSlot · positions (the rest of a
/// slot is padding). A query block has one slot holding one head (or a GQA group's heads); a decoding
/// item has a slot of `thinSlotRows` rows per kv head.
public struct WorkItem {
    public var sequence: Sequence
    public var firstHead: Int
    public var headsPerSlot: Int
    public var slots: Int
    public var slotRows: Int
    public var firstPosition: Int
    public var positions: Int
    /// The keys this item attends to (its split's share of the union of its rows' windows).
    public var keys: Range<Int>
    /// Index of the item before splitting, and its split.
    public var unsplit: Int
    public var split: Int

    /// Rows including slot padding.
    @inlinable public var rows: Int { slots * slotRows }

    /// Whether row r stands for a query, and which (head, position within the sequence) it is.
    @inlinable @inline(__always)
    public func query(row r: Int) -> (head: Int, position: Int)? {
        let slot = r / slotRows, j = r % slotRows
        guard slot < slots, j < headsPerSlot * positions else { return nil }
        return (firstHead + slot * headsPerSlot + j / positions, firstPosition + j % positions)
    }
}

/// A problem cut into work items for one kernel copy's geometry.
public struct ForwardPlan: @unchecked Sendable {
    public let problem: AttentionProblem
    public let geometry: TileGeometry
    public let path: ForwardPath
    /// Query positions per item (the query block size of query-block problems).
    public let blockPositions: Int
    /// Kv heads per decoding item (its slots must fit the query-block workspace).
    public let kvHeadsPerItem: Int
    /// Items per batch entry before splitting (dense and cache layouts, and decoding or group varlen).
    let itemsPerBatch: Int?
    /// Varlen query blocks: first unsplit item of each batch entry, batch + 1 entries.
    let itemStarts: [Int]
    /// Items before splitting along the keys.
    public let unsplitItems: Int
    /// Key splits per item (1: each item writes its rows' final output directly).
    public let splits: Int
    /// Rows of the largest item: the row count of a partial-result slot.
    public let maxItemRows: Int
    /// With splits > 1: [unsplit item][split][row][head_dim_v + 1] partial outputs and LSEs, set by the driver.
    public var partials: UnsafeMutablePointer<Float>?

    public init(_ problem: AttentionProblem, geometry g: TileGeometry) {
        self.problem = problem
        self.geometry = g
        let group = problem.groupSize
        // The decoding kernel serves KV-cache shapes without dropout (a training option) or a caller's mask
        // (whose tiles the query-block kernel stages).
        if group * problem.maxSeqlenQ <= g.microRows && problem.headDim % g.microCols == 0
            && problem.headDimV % g.microCols == 0 && problem.dropout == nil
            && problem.attnMask == nil
        {
            path = .decoding
        } else if group > 1 && problem.maxSeqlenQ * group <= g.queryBlock {
            path = .groupBlocks
        } else {
            path = .queryBlocks
        }
        let queryBlock = Self.queryBlock(problem, g)
        blockPositions = path == .queryBlocks ? queryBlock : max(1, problem.maxSeqlenQ)
        kvHeadsPerItem = min(problem.headsKV, g.queryBlock / g.thinSlotRows)
        let blocks = { (seqlen: Int) in (seqlen + queryBlock - 1) / queryBlock }
        switch (path, problem.layout) {
        case (.decoding, _), (.groupBlocks, _):
            // One item per (sequence, unit) even for varlen: an empty sequence's items are empty.
            itemsPerBatch = path == .decoding ? (problem.headsKV + kvHeadsPerItem - 1) / kvHeadsPerItem : problem.headsKV
            itemStarts = []
        case (.queryBlocks, .varlen):
            var starts = [0]
            starts.reserveCapacity(problem.batch + 1)
            for b in 0..<problem.batch { starts.append(starts[b] + problem.headsQ * blocks(problem.sequence(b).seqlenQ)) }
            itemStarts = starts
            itemsPerBatch = nil
        case (.queryBlocks, _):
            itemsPerBatch = problem.headsQ * blocks(problem.seqlenQ)
            itemStarts = []
        }
        unsplitItems = itemsPerBatch.map { problem.batch * $0 } ?? itemStarts[problem.batch]
        switch path {
        case .decoding: maxItemRows = kvHeadsPerItem * g.thinSlotRows
        case .groupBlocks: maxItemRows = group * blockPositions
        case .queryBlocks: maxItemRows = min(queryBlock, problem.maxSeqlenQ)
        }
        if unsplitItems > 0 && unsplitItems < splitTargetItems {
            let wanted = (splitTargetItems + unsplitItems - 1) / unsplitItems
            splits = max(1, min(wanted, problem.maxSeqlenK / minimumSplitKeys))
        } else {
            splits = 1
        }
    }

    public var itemCount: Int { unsplitItems * splits }

    /// The copy's query block, or, where that leaves fewer than `minimumQueryItems` items, the largest
    /// multiple of its sub-block (at least two) that reaches them: costs per item (packing K and V) then
    /// spread over fewer rows, but the cores share the work evenly.
    private static func queryBlock(_ p: AttentionProblem, _ g: TileGeometry) -> Int {
        let units = max(1, p.batch * p.headsQ), longest = max(1, p.maxSeqlenQ)
        let wanted = (minimumQueryItems + units - 1) / units  // blocks per sequence
        let rows = (longest + wanted - 1) / wanted
        let block = (rows + g.subBlockRows - 1) / g.subBlockRows * g.subBlockRows
        return min(g.queryBlock, max(2 * g.subBlockRows, block))
    }

    /// Floats of the partial-result buffer the driver must provide when splits > 1.
    public var partialFloats: Int { unsplitItems * splits * maxItemRows * (problem.headDimV + 1) }

    /// The geometry of item `item`. Query-block items run sequence by sequence and head by head, so that
    /// the blocks of one head run close together in time and find its K and V still in L2/L3; within a
    /// head the most expensive (last, under causal masking) blocks come first, so a dynamic scheduler ends
    /// on small items and balances the triangle. Decoding items run split by split.
    public func workItem(_ item: Int) -> WorkItem {
        let p = problem
        let b: Int, local: Int, split: Int
        if path == .decoding, let perBatch = itemsPerBatch {
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
        let blocks = path == .queryBlocks ? (sequence.seqlenQ + blockPositions - 1) / blockPositions : 1
        let firstPosition = (blocks - 1 - local % blocks) * blockPositions
        let positions = min(blockPositions, sequence.seqlenQ - firstPosition)
        // Window bounds grow with the query position, so the rows' union is first row's start ..< last row's end.
        let first = p.keyRange(position: firstPosition, seqlenQ: sequence.seqlenQ, seqlenK: sequence.seqlenK)
        let last = p.keyRange(
            position: firstPosition + positions - 1, seqlenQ: sequence.seqlenQ, seqlenK: sequence.seqlenK)
        var keys = positions == 0 ? 0..<0 : first.lowerBound..<max(first.lowerBound, last.upperBound)
        if splits > 1 {
            let block = geometry.keyBlock
            let chunk = ((keys.count + splits - 1) / splits + block - 1) / block * block
            let lower = min(keys.upperBound, keys.lowerBound + split * chunk)
            keys = lower..<min(keys.upperBound, lower + chunk)
        }
        let unit = local / blocks
        switch path {
        case .decoding:
            let firstKV = unit * kvHeadsPerItem
            return WorkItem(
                sequence: sequence, firstHead: firstKV * p.groupSize, headsPerSlot: p.groupSize,
                slots: min(kvHeadsPerItem, p.headsKV - firstKV), slotRows: geometry.thinSlotRows,
                firstPosition: firstPosition, positions: positions, keys: keys, unsplit: unsplit, split: split)
        case .groupBlocks:
            return WorkItem(
                sequence: sequence, firstHead: unit * p.groupSize, headsPerSlot: p.groupSize, slots: 1,
                slotRows: p.groupSize * positions, firstPosition: firstPosition, positions: positions, keys: keys,
                unsplit: unsplit, split: split)
        case .queryBlocks:
            return WorkItem(
                sequence: sequence, firstHead: unit, headsPerSlot: 1, slots: 1, slotRows: positions,
                firstPosition: firstPosition, positions: positions, keys: keys, unsplit: unsplit, split: split)
        }
    }

    /// Where split `item.split` of an item keeps row r's partial state: head_dim_v floats, then the LSE.
    @inlinable
    public func partialRow(_ item: WorkItem, row r: Int) -> UnsafeMutablePointer<Float> {
        partials! + ((item.unsplit * splits + item.split) * maxItemRows + r) * (problem.headDimV + 1)
    }

    /// Combines the split partial results of unsplit item `item` in split order (and the sink), writing
    /// the final rows. The order is fixed, so the result does not depend on which thread ran which split.
    public func mergeSplits(item: Int) {
        let p = problem
        let d = p.headDimV
        guard partials != nil else { return }
        // The unsplit item's first split has the same rows as every split.
        let perBatch = itemsPerBatch ?? 1
        let first = path == .decoding ? (item / perBatch * splits) * perBatch + item % perBatch : item * splits
        var geometry = workItem(first)
        for r in 0..<geometry.rows {
            guard let (head, position) = geometry.query(row: r) else { continue }
            let row = geometry.sequence.qRow + position
            // Merged in place in split 0's slot (float32), then stored once in the output's type.
            geometry.split = 0
            let out = partialRow(geometry, row: r)
            var lse = out[d]
            for split in 1..<splits {
                geometry.split = split
                let other = partialRow(geometry, row: r)
                lse = mergeStates(out: out, lse: lse, other: other, otherLSE: other[d], headDim: d)
            }
            if let sinks = p.sinks { lse = mergeSink(out: out, lse: lse, sink: sinks[head], headDim: d) }
            p.out.element.storeRow(out, count: d, scale: 1, into: p.out.row(batch: geometry.sequence.qBatch, head: head, row: row))
            p.lse?.row(batch: geometry.sequence.qBatch, head: head, row: row).pointee = lse
        }
    }
}

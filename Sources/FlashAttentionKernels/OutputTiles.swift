import FlashAttentionCore

/// O = α·O + P·V over one key block, for the rows of one output tile, each row accumulating exactly the keys
/// it sees.

/// O = α·O + P·V for the R rows of an output tile from `firstRow`, every row over exactly the keys it
/// sees: one R-row tile per `microCols` columns, whose rows add the keys they see beyond those the whole
/// tile shares one row at a time (masked blocks; see `outputTile`).
/// - Parameters:
///   - p: probabilities of the tile's first row for key 0 (key k at `p + k * ldP`, row r at `p + r`).
///   - v: value row 0 of column 0 stored as S; row k `ldV` elements further, column panel c at
///     `v + c / microCols * columnStride` bytes.
func accumulateRows<R: TileRows, S: StorageElement>(
    _ rows: R.Type, _ storage: S.Type, headDim d: Int, mask: BlockMask, firstRow: Int, p: UnsafePointer<Float>,
    ldP: Int, v: UnsafeRawPointer, ldV: Int, columnStride: Int, _ w: Workspace
) {
    let ldO = Workspace.paddedDim(d)
    @inline(__always) func tiles<K: RowKeys>(keys: Range<Int>, rowKeys: K) {
        for column in stride(from: 0, to: d, by: microCols) {
            outputTile(
                R.self, S.self, p: p, ldP: ldP, v: v + column / microCols * columnStride, ldV: ldV, keys: keys,
                rowKeys: rowKeys, alpha: w.alpha + firstRow, o: w.o + firstRow * ldO + column, ldO: ldO)
        }
    }
    withTileKeys(R.self, mask: mask, firstRow: firstRow, w) { keys, perRow in
        if let perRow { tiles(keys: keys, rowKeys: perRow) } else { tiles(keys: keys, rowKeys: SharedKeys()) }
    }
}

/// Calls `body` with the keys every row of the R-row tile from `firstRow` sees, and — in a masked block — each
/// row's own keys (nil: every row sees exactly the shared keys).
@inline(__always)
func withTileKeys<R: TileRows>(
    _ rows: R.Type, mask: BlockMask, firstRow: Int, _ w: Workspace, _ body: (Range<Int>, KeysPerRow?) -> Void
) {
    guard mask.isMasked else { return body(0..<mask.keyCount, nil) }
    withUnsafeTemporaryAllocation(of: Range<Int>.self, capacity: R.count) { own in
        for r in 0..<R.count { own[r] = mask.keys(position: Int(w.rowPosition[firstRow + r])) }
        var common = own[0]
        for r in 1..<R.count { common = common.clamped(to: own[r]) }
        // With no key shared, each row takes all of its keys alone (an empty `keys` past every row's).
        body(common.isEmpty ? mask.keyCount..<mask.keyCount : common, KeysPerRow(ranges: own.baseAddress!))
    }
}

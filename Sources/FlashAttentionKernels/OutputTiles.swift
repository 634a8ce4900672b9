import FlashAttentionCore

/// O = α·O + P·V over one key block, for the rows of one output tile, with masked blocks split so that each
/// row accumulates exactly the keys it sees.

/// O = α·O + P·V for the R rows of an output tile from `firstRow`, every row over exactly the keys it
/// sees, with the same arithmetic whichever rows share its tile (so results do not depend on how a call is
/// cut into items): each row's block sum runs from zero over its visible keys in key order, then
/// o = α·o + sum with one FMA. In an unmasked block that is one R-row tile per `microCols` columns
/// (`TileUpdate.rescale`). A masked one builds the sums in `Workspace.tileSum`: each row's own keys before
/// those every row sees through a one-row tile, the shared keys through the R-row tile, then each row's own
/// keys after them, and folds them into O at the end (`foldTileSums`). Hidden keys are never multiplied: the
/// probability of a hidden key is tiny but not 0, and 0 · NaN is NaN anyway, so multiplying a hidden value
/// row would let a NaN in it poison rows that must not see it.
/// - Parameters:
///   - p: probabilities of the tile's first row for key 0 (key k at `p + k * ldP`, row r at `p + r`).
///   - v: value row 0 of column 0 stored as S; row k `ldV` elements further, column panel c at
///     `v + c / microCols * columnStride` bytes.
func accumulateRows<R: TileRows, S: StorageElement>(
    _ rows: R.Type, _ storage: S.Type, headDim d: Int, mask: BlockMask, firstRow: Int, p: UnsafePointer<Float>,
    ldP: Int, v: UnsafeRawPointer, ldV: Int, columnStride: Int, _ w: Workspace
) {
    let ldO = Workspace.paddedDim(d)
    let o = w.o + firstRow * ldO
    @inline(__always) func tile<T: TileRows>(
        _ r: T.Type, row: Int, keys: Range<Int>, into target: UnsafeMutablePointer<Float>, _ update: TileUpdate
    ) {
        guard !keys.isEmpty else { return }
        for column in stride(from: 0, to: d, by: microCols) {
            outputTile(
                r, S.self, p: p + keys.lowerBound * ldP + row, ldP: ldP,
                v: v + (keys.lowerBound * ldV) * S.size + column / microCols * columnStride, ldV: ldV,
                count: keys.count, update, o: target + row * ldO + column, ldO: ldO)
        }
    }
    guard mask.isMasked else {
        return tile(R.self, row: 0, keys: 0..<mask.keyCount, into: o, .rescale(alpha: w.alpha + firstRow))
    }
    let sums = w.tileSum
    sums.update(repeating: 0, count: R.count * ldO)
    let own = { (r: Int) in mask.keys(position: Int(w.rowPosition[firstRow + r])) }
    var common = own(0)
    for r in 1..<R.count { common = common.clamped(to: own(r)) }
    for r in 0..<R.count {
        tile(OneRow.self, row: r, keys: common.isEmpty ? own(r) : own(r).lowerBound..<common.lowerBound, into: sums, .accumulate)
    }
    tile(R.self, row: 0, keys: common, into: sums, .accumulate)
    for r in 0..<R.count where !common.isEmpty {
        tile(OneRow.self, row: r, keys: common.upperBound..<own(r).upperBound, into: sums, .accumulate)
    }
    foldTileSums(sums, into: o, alpha: w.alpha + firstRow, count: R.count * ldO, rowLength: ldO)
}

/// o = α·o + sum over `count` floats of rows `rowLength` floats long (whole vectors), row r scaled by
/// alpha[r]: the store of `TileUpdate.rescale`, so that a row gets the same bits from either.
private func foldTileSums(
    _ sums: UnsafePointer<Float>, into o: UnsafeMutablePointer<Float>, alpha: UnsafePointer<Float>, count: Int,
    rowLength: Int
) {
    for c in stride(from: 0, to: count, by: lanes) {
        store(muladd(load(o + c), Vec(repeating: alpha[c / rowLength]), load(sums + c)), o + c)
    }
}

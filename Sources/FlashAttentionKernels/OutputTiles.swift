import FlashAttentionCore

/// O = α·O + P·V over one key block, for the rows of one output tile, each row accumulating exactly the keys
/// it sees.

/// O = α·O + P·V for the R rows of an output tile from `firstRow`, every row over exactly the keys it
/// sees, with the same arithmetic whichever rows share its tile, so that results do not depend on how a
/// call is cut into work items: each row's block sum runs from zero over its keys in key order, then
/// o = α·o + sum with one FMA (`Rescale`). An unmasked block is one R-row tile per `microCols` columns. A
/// masked one builds the rows' sums in `Workspace.tileSum`: each row's keys before those all rows see
/// through a one-row tile, the shared keys through the R-row tile, each row's keys after them, then folds
/// them into O (`foldTileSums`). Hidden keys are never multiplied: the probability of a hidden key is tiny
/// but not 0, and 0 · NaN is NaN anyway, so multiplying a hidden value row would let a NaN in it poison
/// rows that must not see it.
/// - Parameters:
///   - p: probabilities of the tile's first row for key 0 (key k at `p + k * ldP`, row r at `p + r`).
///   - v: value row 0 of column 0 stored as S; row k `ldV` elements further, column panel c at
///     `v + c / microCols * columnStride` bytes.
func accumulateRows<R: TileRows, S: StorageElement>(
    _ rows: R.Type, _ storage: S.Type, headDim d: Int, mask: BlockMask, firstRow: Int, p: UnsafePointer<Float>,
    ldP: Int, v: UnsafeRawPointer, ldV: Int, columnStride: Int, _ w: Workspace
) {
    let ldO = Workspace.paddedDim(d)
    let o = w.o + firstRow * ldO, alpha = w.alpha + firstRow
    @inline(__always) func tile<T: TileRows, U: TileUpdate>(
        _ r: T.Type, _ update: U.Type, row: Int, keys: Range<Int>, into target: UnsafeMutablePointer<Float>
    ) {
        guard U.rescales || !keys.isEmpty else { return }
        for column in stride(from: 0, to: d, by: microCols) {
            outputTile(
                r, S.self, U.self, p: p + keys.lowerBound * ldP + row, ldP: ldP,
                v: v + (keys.lowerBound * ldV) * S.size + column / microCols * columnStride, ldV: ldV,
                count: keys.count, alpha: alpha + row, o: target + row * ldO + column, ldO: ldO)
        }
    }
    guard mask.isMasked else { return tile(R.self, Rescale.self, row: 0, keys: 0..<mask.keyCount, into: o) }
    let own = { (r: Int) in mask.keys(position: Int(w.rowPosition[firstRow + r])) }
    var common = own(0), union = own(0)
    for r in 1..<R.count {
        common = common.clamped(to: own(r))
        union = min(union.lowerBound, own(r).lowerBound)..<max(union.upperBound, own(r).upperBound)
    }
    // Most tiles of a masked block have rows that all see the same keys (only the block's edge differs).
    if common == union { return tile(R.self, Rescale.self, row: 0, keys: common, into: o) }
    guard !common.isEmpty else {
        for r in 0..<R.count { tile(OneRow.self, Rescale.self, row: r, keys: own(r), into: o) }
        return
    }
    let sums = w.tileSum
    sums.update(repeating: 0, count: R.count * ldO)
    for r in 0..<R.count { tile(OneRow.self, Accumulate.self, row: r, keys: own(r).lowerBound..<common.lowerBound, into: sums) }
    tile(R.self, Accumulate.self, row: 0, keys: common, into: sums)
    for r in 0..<R.count { tile(OneRow.self, Accumulate.self, row: r, keys: common.upperBound..<own(r).upperBound, into: sums) }
    foldTileSums(sums, into: o, alpha: alpha, count: R.count * ldO, rowLength: ldO)
}

/// o = α·o + sum over `count` floats of rows `rowLength` floats long (whole vectors), row r scaled by
/// alpha[r]: `Rescale`'s store, so that a row gets the same bits from either.
private func foldTileSums(
    _ sums: UnsafePointer<Float>, into o: UnsafeMutablePointer<Float>, alpha: UnsafePointer<Float>, count: Int,
    rowLength: Int
) {
    for c in stride(from: 0, to: count, by: lanes) {
        store(muladd(load(o + c), Vec(repeating: alpha[c / rowLength]), load(sums + c)), o + c)
    }
}

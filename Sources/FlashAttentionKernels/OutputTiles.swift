import FlashAttentionCore

/// O = α·O + P·V over one key block, for the rows of one output tile, each row accumulating exactly the keys
/// it sees.

/// O = α·O + P·V for the R rows of an output tile from `firstRow`, every row over exactly the keys it
/// sees, with the same arithmetic whichever rows share its tile, so that results do not depend on how a
/// call is cut into work items: each row's block sum runs from zero over its keys in key order, then
/// o = α·o + sum with one FMA (`Rescale`). That is one R-row tile per `microCols` columns when the rows see
/// the same keys (every tile of an unmasked block, most of a masked one), and one-row tiles when they share
/// none. Otherwise the rows' sums are built in `Workspace.tileSum`: each row's keys before those all rows
/// see through a one-row tile, the shared keys through the R-row tile, then each row's keys after them,
/// whose tile folds the row into O (`Finish`). Hidden keys are never multiplied: the probability of a
/// hidden key is tiny but not 0, and 0 · NaN is NaN anyway, so multiplying a hidden value row would let a
/// NaN in it poison rows that must not see it.
/// - Parameters:
///   - p: probabilities of the tile's first row for key 0 (key k at `p + k * ldP`, row r at `p + r`).
///   - v: value row 0 of column 0 stored as S; row k `ldV` elements further, column panel c at
///     `v + c / microCols * columnStride` bytes.
func accumulateRows<R: TileRows, S: StorageElement>(
    _ rows: R.Type, _ storage: S.Type, headDim d: Int, mask: BlockMask, firstRow: Int, p: UnsafePointer<Float>,
    ldP: Int, v: UnsafeRawPointer, ldV: Int, columnStride: Int, _ w: Workspace
) {
    let ldO = Workspace.paddedDim(d)
    let o = w.o + firstRow * ldO, sums = w.tileSum
    /// The T-row tile from row `row` over `keys`, written to `target` as U says (from `sums` if not from zero).
    @inline(__always) func tile<T: TileRows, U: TileUpdate>(
        _ r: T.Type, _ update: U.Type, row: Int, keys: Range<Int>, into target: UnsafeMutablePointer<Float>
    ) {
        for column in stride(from: 0, to: d, by: microCols) {
            outputTile(
                r, S.self, U.self, p: p + keys.lowerBound * ldP + row, ldP: ldP,
                v: v + (keys.lowerBound * ldV) * S.size + column / microCols * columnStride, ldV: ldV,
                count: keys.count, from: sums + row * ldO + column, alpha: w.alpha + firstRow + row,
                o: target + row * ldO + column, ldO: ldO)
        }
    }
    guard mask.isMasked else { return tile(R.self, Rescale.self, row: 0, keys: 0..<mask.keyCount, into: o) }
    let own = { (r: Int) in mask.keys(position: Int(w.rowPosition[firstRow + r])) }
    var common = own(0), first = own(0).lowerBound, last = own(0).upperBound
    for r in 1..<R.count {
        common = common.clamped(to: own(r))
        (first, last) = (min(first, own(r).lowerBound), max(last, own(r).upperBound))
    }
    if common == first..<last { return tile(R.self, Rescale.self, row: 0, keys: common, into: o) }
    guard !common.isEmpty else {
        for r in 0..<R.count { tile(OneRow.self, Rescale.self, row: r, keys: own(r), into: o) }
        return
    }
    if first < common.lowerBound {
        sums.update(repeating: 0, count: R.count * ldO)
        for r in 0..<R.count {
            tile(OneRow.self, Accumulate.self, row: r, keys: own(r).lowerBound..<common.lowerBound, into: sums)
        }
        tile(R.self, Accumulate.self, row: 0, keys: common, into: sums)
    } else {
        tile(R.self, Assign.self, row: 0, keys: common, into: sums)
    }
    for r in 0..<R.count { tile(OneRow.self, Finish.self, row: r, keys: common.upperBound..<own(r).upperBound, into: o) }
}

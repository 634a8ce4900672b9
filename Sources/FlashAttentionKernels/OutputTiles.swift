import FlashAttentionCore

/// O = α·O + P·V over one key block, for the rows of one output tile, each row accumulating exactly the keys
/// it sees.

/// How an output tile multiplies probabilities by values over a range of keys: float32 FMAs (`FloatOutputs`) or
/// bfloat16 pairs (`PairOutputs`, PairProducts.swift). A generic parameter of `accumulateRows`, so that each gets
/// its own copy of the splitting below.
protocol OutputProducts {
    /// Keys one product takes together (a bfloat16 pair: 2): the tile splits a row's keys only between such units,
    /// so that each row's keys group the same way whichever rows share its tile.
    static var keyUnit: Int { get }
    /// The T-row tile from tile row `row` over `keys`, the `microCols` columns from `column`: sums started (from
    /// `from` unless U starts from zero) and stored to `o` as U says; `from` and `o` are laid out `ldO` floats a row.
    func tile<T: TileRows, U: TileUpdate>(
        _ rows: T.Type, _ update: U.Type, row: Int, keys: Range<Int>, column: Int, from: UnsafePointer<Float>,
        alpha: UnsafePointer<Float>, o: UnsafeMutablePointer<Float>, ldO: Int)
}

/// float32 FMAs (`outputTile`): the probabilities of tile row r for key k at `p + k * ldP + r`; values stored as S,
/// value row 0 of column 0 at `v`, row k `ldV` elements further, column panel c at `v + c / microCols *
/// columnStride` bytes.
struct FloatOutputs<S: StorageElement>: OutputProducts {
    let p: UnsafePointer<Float>
    let ldP: Int
    let v: UnsafeRawPointer
    let ldV: Int
    let columnStride: Int
    static var keyUnit: Int { 1 }

    @inline(__always)
    func tile<T: TileRows, U: TileUpdate>(
        _ rows: T.Type, _ update: U.Type, row: Int, keys: Range<Int>, column: Int, from: UnsafePointer<Float>,
        alpha: UnsafePointer<Float>, o: UnsafeMutablePointer<Float>, ldO: Int
    ) {
        outputTile(
            T.self, S.self, U.self, p: p + keys.lowerBound * ldP + row, ldP: ldP,
            v: v + keys.lowerBound * ldV * S.size + column / microCols * columnStride, ldV: ldV, count: keys.count,
            from: from, alpha: alpha, o: o, ldO: ldO)
    }
}

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
func accumulateRows<R: TileRows, K: OutputProducts>(
    _ rows: R.Type, _ products: K, headDim d: Int, mask: BlockMask, firstRow: Int, _ w: Workspace
) {
    let ldO = Workspace.paddedDim(d)
    let o = w.o + firstRow * ldO, sums = w.tileSum
    /// The T-row tile from row `row` over `keys`, written to `target` as U says (from `sums` if not from zero).
    @inline(__always) func tile<T: TileRows, U: TileUpdate>(
        _ r: T.Type, _ update: U.Type, row: Int, keys: Range<Int>, into target: UnsafeMutablePointer<Float>
    ) {
        for column in stride(from: 0, to: d, by: microCols) {
            products.tile(
                r, U.self, row: row, keys: keys, column: column, from: sums + row * ldO + column,
                alpha: w.alpha + firstRow + row, o: target + row * ldO + column, ldO: ldO)
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
    let lower = (common.lowerBound + K.keyUnit - 1) / K.keyUnit * K.keyUnit
    common = lower..<max(lower, common.upperBound / K.keyUnit * K.keyUnit)
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

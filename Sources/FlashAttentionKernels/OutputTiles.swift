import FlashAttentionCore

/// O = α·O + P·V over one key block, for the rows of one output tile, with masked blocks split so that each
/// row accumulates exactly the keys it sees.

/// Rescale factor 1, for output tiles that add to rows already rescaled in the same block.
nonisolated(unsafe) private let unitScale: UnsafePointer<Float> = {
    let one = UnsafeMutablePointer<Float>.allocate(capacity: 1)
    one.initialize(to: 1)
    return UnsafePointer(one)
}()

/// O = α·O + P·V for the R rows of an output tile from `firstRow`, every row over exactly the keys it
/// sees. In an unmasked block that is one R-row tile per `microCols` columns. In a masked one, the keys
/// every row sees go through the R-row tile and each row's own extra keys through a one-row tile: the
/// probability of a hidden key is tiny but not 0, and 0 · NaN is NaN anyway, so multiplying a hidden
/// value row would let a NaN in it poison rows that must not see it.
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
    for r in 1..<R.count { common = common.clamped(to: mask.keys(position: position(r))) }
    if !common.isEmpty { tile(R.self, row: 0, keys: common, alpha: alpha) }
    for r in 0..<R.count {
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

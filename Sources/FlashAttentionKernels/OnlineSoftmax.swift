/// Online softmax: the causal and window masks of key blocks, and the running max/sum update.
///
/// Scores arrive scaled (the queries were pre-multiplied by the softmax scale) and stay in natural units:
/// each exponential is e^(score − max), converted to exp2 only after the subtraction (`exponential`).
/// Scores are stored transposed (row k = key k, consecutive queries along the row), so the
/// per-query max and sum over keys are vertical vector operations with no horizontal reductions.

/// Which keys of a key block each row of a work item may see.
///
/// Row r stands for block-relative query position i (r itself when the item holds one head, r % positions
/// when it stacks a GQA group's heads) and sees the block's keys [i + lowShift, i + highShift) — the
/// sliding window and causal limits, aligned bottom-right. Both ends grow with i, so for one head the
/// visible keys of a run of rows are a band, and the kernels skip the micro-tiles outside it: a causal or
/// windowed call does only the work its masks leave.
struct BlockMask {
    /// A shift beyond any key index: "no limit on this side".
    static let unbounded = 1 << 40

    let keyCount: Int
    let lowShift: Int
    let highShift: Int
    /// Query positions per head in the item; rows past the last real row stand for the last position.
    let positions: Int
    /// One head per item: positions grow with the row, so look-ahead/behind bounds hold.
    let monotonic: Bool
    /// Keys outside [firstSeen, endSeen) are hidden from every row (a caller's mask says so): no row visits them.
    var firstSeen = 0
    var endSeen = Int.max

    /// The position of row r when the item holds one head (rows past the block stand for its ends).
    @inline(__always) private func position(_ r: Int) -> Int { min(max(r, 0), positions - 1) }

    @inline(__always) private func start(_ i: Int) -> Int { min(min(keyCount, endSeen), max(firstSeen, i + lowShift)) }
    @inline(__always) private func end(_ i: Int) -> Int { min(min(keyCount, endSeen), max(firstSeen, i + highShift)) }

    /// The keys a row at block-relative position i sees.
    @inline(__always) func keys(position i: Int) -> Range<Int> {
        let lower = start(i)
        return lower..<max(lower, end(i))
    }

    /// Whether some row sees only part of the block (the block needs masking).
    var isMasked: Bool { start(positions - 1) > 0 || end(0) < keyCount }

    /// Keys that rows `first...last` see (their union).
    @inline(__always) func visible(fromRow first: Int, throughRow last: Int) -> Range<Int> {
        guard monotonic else { return start(0)..<max(start(0), end(positions - 1)) }
        let lower = start(position(first))
        return lower..<max(lower, end(position(last)))
    }

    /// The band of a score tile whose first key is `firstKey`, for the query lanes of its two vectors at
    /// block-relative positions `position0`, `position1`; keys past the block (padding rows) and outside
    /// [firstSeen, endSeen) are hidden too, so that the tiles' max is over keys some row sees.
    @inline(__always) func tileBand(_ position0: Vec, _ position1: Vec, firstKey: Int) -> TileBand {
        // Unbounded shifts (±2^40) stay far outside the tile after adding any position; bounded ones are exact.
        let low = Vec(repeating: Float(lowShift - firstKey))
        let high = Vec(repeating: Float(highShift - firstKey))
        let first = Vec(repeating: Float(firstSeen - firstKey))
        let end = Vec(repeating: Float(min(keyCount, endSeen) - firstKey))
        return TileBand(
            low0: maximum(position0 + low, first), low1: maximum(position1 + low, first),
            high0: minimum(position0 + high, end), high1: minimum(position1 + high, end))
    }

    /// Keys to score and exponentiate for the tiles that hold rows `first...last`: the union of their bands.
    /// Every layer reads only keys the layer before computed: a score panel's rows include each softmax
    /// vector's, whose union of bands includes each of its rows' bands, and an output tile reads, row by row,
    /// only the keys that row sees (`accumulateRows`). Scoring beyond the band (a margin used until 0.5) only
    /// added work on diagonal blocks.
    @inline(__always) func needed(fromRow first: Int, throughRow last: Int) -> Range<Int> {
        guard monotonic else { return visible(fromRow: first, throughRow: last) }
        let lower = start(position(first))
        return lower..<max(lower, end(position(last)))
    }
}

/// What the softmax does to raw scores before the exponential: softcap, ALiBi, then the mask.
struct ScoreAdjustment {
    var mask: BlockMask
    /// The softcap C, or 0 for none: s ← C · tanh(s / C).
    let softcap: Float
    /// Whether each row's rowSlope times |i + alibiOffset − k| is subtracted.
    let alibi: Bool
    /// Block-relative query position minus key index where the distance is 0.
    let alibiOffset: Float
    /// The score tiles already set hidden scores to −inf (plain masked blocks), so the softmax need not.
    var scoresMasked = false
    /// A caller's attention mask staged for the sub-block, laid out like the scores (`stageMaskTile`), or nil.
    var maskTile: UnsafeMutablePointer<Float>? = nil

    /// Softcap, ALiBi and a caller's mask transform scores, and must precede the causal/window mask: they are
    /// applied here.
    var transformsScores: Bool { softcap > 0 || alibi || maskTile != nil }
}

/// How the softmax reads a key's scores for one column of a vector of queries: plain loads, or with softcap, ALiBi and
/// the mask applied. A generic parameter, so each reader gets its own specialised copy of the loops and
/// the plain path carries no per-element option checks.
protocol ScoreReader {
    /// The scores' storage: key k of the column at `column + k * ldS` (probabilities are written there).
    var column: UnsafeMutablePointer<Float> { get }
    var ldS: Int { get }
    func callAsFunction(_ k: Int) -> Vec
    /// Whether probabilities below e^−87 must be exactly 0: a hidden key inside a row's band (a caller's mask)
    /// reaches P·V, where exp2's 1e-38 for −inf would make subnormal products (several times slower on x86).
    static var flushesTiny: Bool { get }
}

/// Scores as stored (no transform, or already masked by the score tiles).
struct PlainScores: ScoreReader {
    let column: UnsafeMutablePointer<Float>
    let ldS: Int
    /// Hidden scores here lie outside their rows' bands, which P·V never reads.
    static var flushesTiny: Bool { false }
    @inline(__always) func callAsFunction(_ k: Int) -> Vec { load(column + k * ldS) }
}

/// Scores with softcap, ALiBi, a caller's mask and the causal/window mask applied, in that order.
struct AdjustedScores: ScoreReader {
    let column: UnsafeMutablePointer<Float>
    let ldS: Int
    static var flushesTiny: Bool { true }
    let adjust: ScoreAdjustment
    /// The caller's mask values of this column (same layout as the scores), or nil.
    let maskColumn: UnsafeMutablePointer<Float>?
    let masked: Bool
    /// Lane i sees key k iff low_i <= k < high_i.
    let low, high: Vec
    let slope, distanceBase, rebase: Vec

    @inline(__always) func callAsFunction(_ k: Int) -> Vec {
        var x = load(column + k * ldS)
        if adjust.softcap > 0 { x = softcapped(x, adjust.softcap) }
        if adjust.alibi {
            let distance = distanceBase - Vec(repeating: Float(k))
            x = x - slope * (maximum(distance, -distance) - rebase)
        }
        if let maskColumn { x = x + load(maskColumn + k * ldS) }
        if masked {
            let key = Vec(repeating: Float(k))
            x = x.replacing(with: Vec(repeating: -.infinity), where: (key .< low) .| (key .>= high))
        }
        return x
    }
}

/// One online-softmax step for a block of keys, for the rows `firstRow ..< firstRow + lanes·queryVectors`.
///
/// For each query: m' = max(m, blockMax); α = 2^(m − m'); p_k = 2^(s_k − m') written over s;
/// l' = α·l + Σ_k p_k. α is left in `alpha` for the output tile to rescale O with. A query that has seen
/// only masked keys keeps m = −inf; its exponent base is taken as 0 so that −inf − (−inf) never makes NaN
/// (its tiny sums are discarded by the epilogue, which writes 0 for rows whose max is −inf).
/// - Parameters:
///   - s: transposed scores of the sub-block, key k at `s + k * ldS`; overwritten with probabilities.
///   - adjust: softcap, ALiBi and mask; the vector of rows j reads only the keys its rows' band needs.
///   - blockMax: each query's max over the block's scores, from the score tiles, or nil to compute it here
///     (blocks whose scores are transformed here).
///   - rowPosition, rowSlope, rowDistance: the item's row tables (block-relative position, ALiBi
///     slope, the distance the row's ALiBi bias is rebased on).
///   - rowMax, rowSum, alpha: indexed by item row.
func softmaxUpdate(
    s: UnsafeMutablePointer<Float>, ldS: Int, firstRow: Int, queryVectors: Int, adjust: ScoreAdjustment,
    blockMax: UnsafePointer<Float>?, rowPosition: UnsafePointer<Float>, rowSlope: UnsafePointer<Float>,
    rowDistance: UnsafePointer<Float>, rowMax: UnsafeMutablePointer<Float>, rowSum: UnsafeMutablePointer<Float>,
    alpha: UnsafeMutablePointer<Float>
) {
    let masked = adjust.mask.isMasked && !adjust.scoresMasked
    for j in 0..<queryVectors {
        let column = s + j * lanes
        let row = firstRow + lanes * j
        let keys = adjust.mask.needed(fromRow: row, throughRow: row + lanes - 1)
        let known = blockMax.map { load($0 + row - firstRow) }
        if masked || adjust.transformsScores {
            let position = load(rowPosition + row)
            let reader = AdjustedScores(
                column: column, ldS: ldS, adjust: adjust, maskColumn: adjust.maskTile.map { $0 + j * lanes }, masked: masked,
                low: position + Vec(repeating: Float(adjust.mask.lowShift)),
                high: position + Vec(repeating: Float(adjust.mask.highShift)), slope: load(rowSlope + row),
                distanceBase: position + Vec(repeating: adjust.alibiOffset), rebase: load(rowDistance + row))
            softmaxColumn(reader, keys: keys, blockMax: known, rowMax: rowMax + row, rowSum: rowSum + row, alpha: alpha + row)
        } else {
            softmaxColumn(
                PlainScores(column: column, ldS: ldS), keys: keys, blockMax: known, rowMax: rowMax + row,
                rowSum: rowSum + row, alpha: alpha + row)
        }
    }
}

/// The online-softmax step of one vector of queries over `keys`, writing probabilities over the scores.
@inline(__always)
func softmaxColumn<Reader: ScoreReader>(
    _ score: Reader, keys: Range<Int>, blockMax: Vec?, rowMax: UnsafeMutablePointer<Float>,
    rowSum: UnsafeMutablePointer<Float>, alpha: UnsafeMutablePointer<Float>
) where Reader: ScoreReader {
    let negInf = Vec(repeating: -.infinity)
    var columnMax: Vec
    if let blockMax {
        columnMax = blockMax
    } else {
        var max0 = negInf, max1 = negInf
        var k = keys.lowerBound
        while k + 1 < keys.upperBound {
            max0 = maximum(max0, score(k))
            max1 = maximum(max1, score(k + 1))
            k += 2
        }
        if k < keys.upperBound { max0 = maximum(max0, score(k)) }
        columnMax = maximum(max0, max1)
    }
    let oldMax = load(rowMax)
    let newMax = maximum(oldMax, columnMax)
    let base = newMax.replacing(with: 0, where: newMax .== negInf)
    let scale = exponential(oldMax - base)
    var sum0 = Vec(), sum1 = Vec()
    var k = keys.lowerBound
    while k + 1 < keys.upperBound {
        let p0 = probability(score(k) - base, Reader.self)
        let p1 = probability(score(k + 1) - base, Reader.self)
        store(p0, score.column + k * score.ldS)
        store(p1, score.column + (k + 1) * score.ldS)
        sum0 += p0
        sum1 += p1
        k += 2
    }
    if k < keys.upperBound {
        let p0 = probability(score(k) - base, Reader.self)
        store(p0, score.column + k * score.ldS)
        sum0 += p0
    }
    store(newMax, rowMax)
    store(scale * load(rowSum) + (sum0 + sum1), rowSum)
    store(scale, alpha)
}

/// e^x of a score minus its row's max, exactly 0 below e^−87 for readers that need it (`flushesTiny`).
@inline(__always)
func probability<Reader: ScoreReader>(_ x: Vec, _ reader: Reader.Type) -> Vec {
    let p = exponential(x)
    return Reader.flushesTiny ? p.replacing(with: 0, where: x .< Vec(repeating: -87)) : p
}

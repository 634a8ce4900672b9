/// Online softmax: the vectorised exp2, the causal mask of diagonal blocks, and the running max/sum update.
///
/// Scores arrive in log2 units (the queries were pre-multiplied by scale·log2(e)), so every exponential is
/// an exp2. Scores are stored transposed (row k = key k, consecutive queries along the row), so the
/// per-query max and sum over keys are vertical vector operations with no horizontal reductions.

/// Lane-wise max that compiles to one `vmaxps` (the stdlib's generic `pointwiseMax` is an out-of-line
/// call here). If `b` is NaN the result is `a`; NaN scores still poison their row through exp2.
@inline(__always)
func maximum(_ a: Vec, _ b: Vec) -> Vec {
    a.replacing(with: b, where: b .> a)
}

/// Lane-wise min (one `vminps`).
@inline(__always)
func minimum(_ a: Vec, _ b: Vec) -> Vec {
    a.replacing(with: b, where: b .< a)
}

/// 2^x for x ≤ 0 (and NaN), eight lanes at a time.
///
/// Accuracy: at most 2.3 ulp relative error for x ≥ −126 (degree-5 polynomial for 2^f on [−0.5, 0.5],
/// fitted by weighted least squares; measured max relative error 1.9e-7). Arguments below −126, −inf
/// included, give 2^−126·p(f) ≈ 1e-38 instead of 0: negligible beside a row's maximum term (which is 1),
/// and rows whose every key is masked are recognised by their −inf running max instead (the epilogue
/// writes 0 for them). NaN propagates. Arguments above 0 never occur here and are not handled.
/// Cost: 10 vector operations, of which 5 FMAs.
@inline(__always)
func exp2(_ x: Vec) -> Vec {
    // Clamping keeps n ≥ −126, so adding n to the polynomial's exponent bits never leaves the normal range.
    // `maximum` keeps its first argument when the other is NaN, so NaN passes through.
    let xc = maximum(x, Vec(repeating: -126))
    // Adding 1.5·2^23 rounds to the nearest integer n and leaves n in the low mantissa bits of t.
    let t = xc + 12_582_912.0
    let f = xc - (t - 12_582_912.0)
    var poly = Vec(repeating: 1.326_472_731_307_149e-3)
    poly = Vec(repeating: 9.671_512_991_189_957e-3).addingProduct(poly, f)
    poly = Vec(repeating: 5.550_733_581_185_341e-2).addingProduct(poly, f)
    poly = Vec(repeating: 2.402_224_242_687_225_3e-1).addingProduct(poly, f)
    poly = Vec(repeating: 6.931_470_036_506_653e-1).addingProduct(poly, f)
    poly = Vec(repeating: 1.0).addingProduct(poly, f)
    // Multiply by 2^n by adding n to the exponent field: shifting t's bits left by 23 leaves exactly n << 23
    // (the bits of 1.5·2^23 above the low nine are shifted out).
    let bits = unsafeBitCast(poly, to: SIMD8<UInt32>.self) &+ (unsafeBitCast(t, to: SIMD8<UInt32>.self) &<< 23)
    return unsafeBitCast(bits, to: Vec.self)
}

/// The kernel's exp2 for tests of its accuracy.
package func exp2Lanes(_ x: SIMD8<Float>) -> SIMD8<Float> { exp2(x) }

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

    /// The position of row r when the item holds one head (rows past the block stand for its ends).
    @inline(__always) private func position(_ r: Int) -> Int { min(max(r, 0), positions - 1) }

    @inline(__always) private func start(_ i: Int) -> Int { min(keyCount, max(0, i + lowShift)) }
    @inline(__always) private func end(_ i: Int) -> Int { min(keyCount, max(0, i + highShift)) }

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

    /// The band of a score tile whose first key is `firstKey`, for the 16 query lanes at block-relative
    /// positions `position0`, `position1`; keys past the block (padding rows) are hidden too.
    @inline(__always) func tileBand(_ position0: Vec, _ position1: Vec, firstKey: Int) -> TileBand {
        // Unbounded shifts (±2^40) stay far outside 0..<6 after adding any position; bounded ones are exact.
        let low = Vec(repeating: Float(lowShift - firstKey))
        let high = Vec(repeating: Float(highShift - firstKey))
        let end = Vec(repeating: Float(keyCount - firstKey))
        return TileBand(
            low0: position0 + low, low1: position1 + low,
            high0: minimum(position0 + high, end), high1: minimum(position1 + high, end))
    }

    /// Keys to score and exponentiate for the tiles that hold rows `first...last`: the band 16 rows wider on
    /// each side. Output tiles (6 rows), softmax vectors (8) and score panels (16) do not line up, and each
    /// must find computed every key its rows see; 16 rows of margin covers every overlap.
    @inline(__always) func needed(fromRow first: Int, throughRow last: Int) -> Range<Int> {
        guard monotonic else { return visible(fromRow: first, throughRow: last) }
        let lower = start(position(first - 16))
        return lower..<max(lower, end(position(last + 16)))
    }
}

/// What the softmax does to raw scores before the exponential: softcap, ALiBi, then the mask. All in log2
/// units (the scores were pre-multiplied by log2(e)).
struct ScoreAdjustment {
    let mask: BlockMask
    /// softcap · log2(e), or 0 for none: s ← C · tanh(s / C).
    let softcap: Float
    /// Whether each row's rowSlope (slope · log2(e)) times |i + alibiOffset − k| is subtracted.
    let alibi: Bool
    /// Block-relative query position minus key index where the distance is 0.
    let alibiOffset: Float
    /// The score tiles already set hidden scores to −inf (plain masked blocks), so the softmax need not.
    var scoresMasked = false

    /// Softcap and ALiBi transform scores, and must precede the mask: they are applied here.
    var transformsScores: Bool { softcap > 0 || alibi }
}

/// C · tanh(s / C) for C > 0, from exp2 of a non-positive argument: tanh|y| = (1 − e^(−2|y|)) / (1 + e^(−2|y|)).
/// Absolute error ≲ 2e-7 · C.
@inline(__always)
func softcapped(_ s: Vec, _ cap: Float) -> Vec {
    let y = s / cap
    let magnitude = maximum(y, -y)
    let e = exp2(magnitude * Vec(repeating: -2 * 1.442_695_040_888_963_4))
    let t = (Vec(repeating: 1) - e) / (Vec(repeating: 1) + e)
    return t.replacing(with: -t, where: y .< Vec(repeating: 0)) * cap
}

/// How the softmax reads a key's scores for one 8-query column: plain loads, or with softcap, ALiBi and
/// the mask applied. A generic parameter, so each reader gets its own specialised copy of the loops and
/// the plain path carries no per-element option checks.
protocol ScoreReader {
    /// The scores' storage: key k of the column at `column + k * ldS` (probabilities are written there).
    var column: UnsafeMutablePointer<Float> { get }
    var ldS: Int { get }
    func callAsFunction(_ k: Int) -> Vec
}

/// Scores as stored (no transform, or already masked by the score tiles).
struct PlainScores: ScoreReader {
    let column: UnsafeMutablePointer<Float>
    let ldS: Int
    @inline(__always) func callAsFunction(_ k: Int) -> Vec { load(column + k * ldS) }
}

/// Scores with softcap, ALiBi and mask applied, in that order.
struct AdjustedScores: ScoreReader {
    let column: UnsafeMutablePointer<Float>
    let ldS: Int
    let adjust: ScoreAdjustment
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
        if masked {
            let key = Vec(repeating: Float(k))
            x = x.replacing(with: Vec(repeating: -.infinity), where: (key .< low) .| (key .>= high))
        }
        return x
    }
}

/// One online-softmax step for a block of keys, for the rows `firstRow ..< firstRow + 8·queryVectors`.
///
/// For each query: m' = max(m, blockMax); α = 2^(m − m'); p_k = 2^(s_k − m') written over s;
/// l' = α·l + Σ_k p_k. α is left in `alpha` for the output tile to rescale O with. A query that has seen
/// only masked keys keeps m = −inf; its exponent base is taken as 0 so that −inf − (−inf) never makes NaN
/// (its tiny sums are discarded by the epilogue, which writes 0 for rows whose max is −inf).
/// - Parameters:
///   - s: transposed scores of the sub-block, key k at `s + k * ldS`; overwritten with probabilities.
///   - adjust: softcap, ALiBi and mask; 8-row group j reads only the keys its rows' band needs.
///   - blockMax: each query's max over the block's scores, from the score tiles, or nil to compute it here
///     (blocks whose scores are transformed here).
///   - rowPosition, rowSlope, rowDistance: the item's row tables (block-relative position, ALiBi
///     slope·log2(e), the distance the row's ALiBi bias is rebased on).
///   - rowMax, rowSum, alpha: indexed by item row.
func softmaxUpdate(
    s: UnsafeMutablePointer<Float>, ldS: Int, firstRow: Int, queryVectors: Int, adjust: ScoreAdjustment,
    blockMax: UnsafePointer<Float>?, rowPosition: UnsafePointer<Float>, rowSlope: UnsafePointer<Float>,
    rowDistance: UnsafePointer<Float>, rowMax: UnsafeMutablePointer<Float>, rowSum: UnsafeMutablePointer<Float>,
    alpha: UnsafeMutablePointer<Float>
) {
    let masked = adjust.mask.isMasked && !adjust.scoresMasked
    for j in 0..<queryVectors {
        let column = s + j * 8
        let row = firstRow + 8 * j
        let keys = adjust.mask.needed(fromRow: row, throughRow: row + 7)
        let known = blockMax.map { load($0 + row - firstRow) }
        if masked || adjust.transformsScores {
            let position = load(rowPosition + row)
            let reader = AdjustedScores(
                column: column, ldS: ldS, adjust: adjust, masked: masked,
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

/// The online-softmax step of one 8-query column over `keys`, writing probabilities over the scores.
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
    let scale = exp2(oldMax - base)
    var sum0 = Vec(), sum1 = Vec()
    var k = keys.lowerBound
    while k + 1 < keys.upperBound {
        let p0 = exp2(score(k) - base)
        let p1 = exp2(score(k + 1) - base)
        store(p0, score.column + k * score.ldS)
        store(p1, score.column + (k + 1) * score.ldS)
        sum0 += p0
        sum1 += p1
        k += 2
    }
    if k < keys.upperBound {
        let p0 = exp2(score(k) - base)
        store(p0, score.column + k * score.ldS)
        sum0 += p0
    }
    store(newMax, rowMax)
    store(scale * load(rowSum) + (sum0 + sum1), rowSum)
    store(scale, alpha)
}

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

/// Which keys of a key block each query row of a query block may see.
///
/// Outside causal diagonal blocks every row sees all `keyCount` keys. In a diagonal block row r sees the
/// block's keys k < r + shift (shift = firstQuery + seqlen_k − seqlen_q + 1 − firstKey), a count that grows
/// down the block; the kernels use it to skip the micro-tiles above the diagonal, so a causal call does
/// about half the work of a full one even when the blocks are large.
struct BlockMask {
    let keyCount: Int
    /// nil when the block needs no mask.
    let shift: Int?

    /// Number of the block's keys (a prefix) that row r sees.
    @inline(__always) func visible(row r: Int) -> Int {
        guard let shift else { return keyCount }
        return min(keyCount, max(0, r + shift))
    }

    /// Keys to score and exponentiate for the tiles that hold rows ≤ r: row r + 16's count. Output tiles
    /// (6 rows), softmax vectors (8) and score panels (16) do not line up, and every one of them must have
    /// all the keys its last row sees; looking 16 rows ahead covers each overlap.
    @inline(__always) func needed(throughRow r: Int) -> Int { visible(row: r + 16) }
}

/// One online-softmax step for a block of keys.
///
/// For each query: m' = max(m, blockMax); α = 2^(m − m'); p_k = 2^(s_k − m') written over s;
/// l' = α·l + Σ_k p_k. α is left in `alpha` for the output tile to rescale O with. A query that has seen
/// only masked keys keeps m = −inf; its exponent base is taken as 0 so that −inf − (−inf) never makes NaN
/// (its tiny sums are discarded by the epilogue, which writes 0 for rows whose max is −inf). In a diagonal block, keys a row may not see count as −inf (a compare and
/// blend per vector, only there).
/// - Parameters:
///   - s: transposed scores, key k at `s + k * ldS`; overwritten with probabilities.
///   - queryVectors: number of 8-query groups to update.
///   - mask: the block's key limits; 8-query group v reads keys `0..<mask.needed(throughRow: 8v + 7)`.
///   - blockMax: each query's max over the block's scores, from the score tiles, or nil to compute it here
///     (diagonal blocks and blocks whose score tiles were padded).
func softmaxUpdate(
    s: UnsafeMutablePointer<Float>, ldS: Int, queryVectors: Int, mask: BlockMask,
    blockMax: UnsafePointer<Float>?,
    rowMax: UnsafeMutablePointer<Float>, rowSum: UnsafeMutablePointer<Float>,
    alpha: UnsafeMutablePointer<Float>
) {
    let negInf = Vec(repeating: -.infinity)
    let lanes = Vec(0, 1, 2, 3, 4, 5, 6, 7)
    for j in 0..<queryVectors {
        let column = s + j * 8
        let keyCount = mask.needed(throughRow: 8 * j + 7)
        // Lane i (row 8j + i) sees key k iff k < 8j + i + shift.
        let limit = lanes + Vec(repeating: Float(8 * j + (mask.shift ?? 0)))
        @inline(__always) func score(_ k: Int) -> Vec {
            let x = load(column + k * ldS)
            return mask.shift == nil ? x : x.replacing(with: negInf, where: limit .<= Float(k))
        }
        var columnMax: Vec
        if let blockMax {
            columnMax = load(blockMax + j * 8)
        } else {
            var max0 = negInf, max1 = negInf
            var k = 0
            while k + 1 < keyCount {
                max0 = maximum(max0, score(k))
                max1 = maximum(max1, score(k + 1))
                k += 2
            }
            if k < keyCount { max0 = maximum(max0, score(k)) }
            columnMax = maximum(max0, max1)
        }
        let oldMax = load(rowMax + j * 8)
        let newMax = maximum(oldMax, columnMax)
        let base = newMax.replacing(with: 0, where: newMax .== negInf)
        let scale = exp2(oldMax - base)
        var sum0 = Vec(), sum1 = Vec()
        var k = 0
        while k + 1 < keyCount {
            let p0 = exp2(score(k) - base)
            let p1 = exp2(score(k + 1) - base)
            store(p0, column + k * ldS)
            store(p1, column + (k + 1) * ldS)
            sum0 += p0
            sum1 += p1
            k += 2
        }
        if k < keyCount {
            let p0 = exp2(score(k) - base)
            store(p0, column + k * ldS)
            sum0 += p0
        }
        store(newMax, rowMax + j * 8)
        store(scale * load(rowSum + j * 8) + (sum0 + sum1), rowSum + j * 8)
        store(scale, alpha + j * 8)
    }
}

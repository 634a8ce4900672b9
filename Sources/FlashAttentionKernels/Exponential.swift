/// The kernels' exponential: a vectorised exp2, e^x as exp2 of x·log2(e), and softcap's tanh built on it.

/// 2^x for x ≤ 0 (and NaN), a vector at a time.
///
/// Accuracy for x ≥ −126 (degree-5 polynomial for 2^f on [−0.5, 0.5], fitted by weighted least squares):
/// at most 2.02 ulp (relative error 1.67e-7) where `muladd` is fused, 2.23 ulp (1.89e-7) in the portable
/// copy on x86-64, which rounds each product; `ABITests` checks ≤ 2.05 and ≤ 2.25 ulp. A degree-6 fit
/// (0.93 ulp, one more FMA) changed the forward's relative error by under 1%: the float32 roundings of the
/// scores and of P·V dominate it, so the cheaper polynomial stays (bench/RESULTS.md). Arguments below
/// −126, −inf included, give 2^−126·p(f) ≈ 1e-38 instead of 0: negligible beside a row's maximum term
/// (which is 1), and rows whose every key is masked are recognised by their −inf running max instead (the
/// epilogue writes 0 for them); where such a value would reach P·V (keys a caller's mask hides inside a
/// row's band), the softmax flushes it to 0 (`AdjustedScores`), since its products would be subnormal.
/// NaN propagates. Arguments above 0 never occur here and are not handled. Cost: 10 vector operations, of
/// which 5 FMAs.
@inline(__always)
func exp2(_ x: Vec) -> Vec {
    // Clamping keeps n ≥ −126, so adding n to the polynomial's exponent bits never leaves the normal range.
    // `maximum` keeps its first argument when the other is NaN, so NaN passes through.
    let xc = maximum(x, Vec(repeating: -126))
    // Adding 1.5·2^23 rounds to the nearest integer n and leaves n in the low mantissa bits of t.
    let t = xc + 12_582_912.0
    let f = xc - (t - 12_582_912.0)
    var poly = Vec(repeating: 1.326_472_731_307_149e-3)
    poly = muladd(poly, f, Vec(repeating: 9.671_512_991_189_957e-3))
    poly = muladd(poly, f, Vec(repeating: 5.550_733_581_185_341e-2))
    poly = muladd(poly, f, Vec(repeating: 2.402_224_242_687_225_3e-1))
    poly = muladd(poly, f, Vec(repeating: 6.931_470_036_506_653e-1))
    poly = muladd(poly, f, Vec(repeating: 1.0))
    // Multiply by 2^n by adding n to the exponent field: shifting t's bits left by 23 leaves exactly n << 23
    // (the bits of 1.5·2^23 above the low nine are shifted out).
    let bits = unsafeBitCast(poly, to: VecBits.self) &+ (unsafeBitCast(t, to: VecBits.self) &<< 23)
    return unsafeBitCast(bits, to: Vec.self)
}

/// e^x for x ≤ 0 (and NaN): exp2 of x·log2(e). The softmax and the backward form x as the difference of
/// a score and the row's max or LSE — two close numbers, so the difference is exact or nearly — and only
/// then convert units: one rounding of a small number, where scores kept in log2 units carry the rounding
/// of numbers 1.44 times larger (twice as coarse past a power of two). Accuracy: exp2's, plus ≤ 0.5 ulp
/// of x·log2(e) (relative error |x|·2^-24 · ln 2).
@inline(__always)
func exponential(_ x: Vec) -> Vec {
    exp2(x * Vec(repeating: 1.442_695_040_888_963_4))
}

/// This copy's exp2 over `count` floats in place (whole vectors, then a padded last one), for the tests of
/// its accuracy.
func exp2InPlace(_ values: UnsafeMutablePointer<Float>, count: Int) {
    var i = 0
    while i < count {
        var x = Vec(repeating: 0)
        for lane in 0..<min(lanes, count - i) { x[lane] = values[i + lane] }
        let y = exp2(x)
        for lane in 0..<min(lanes, count - i) { values[i + lane] = y[lane] }
        i += lanes
    }
}

/// C · tanh(s / C) for C > 0. For |s / C| ≥ 0.625 from exp2 of a non-positive argument, tanh|y| =
/// 1 − 2e / (1 + e) with e = e^(−2|y|) (≲ 1 ulp: the quotient's error is relative to e); below, where 1 − e^(−2|y|) would cancel, an odd polynomial
/// y + y³·P(y²) of degree 11 fitted to tanh on [0, 0.625] (≤ 0.9 ulp, measured over 200,000 points).
@inline(__always)
func softcapped(_ s: Vec, _ cap: Float) -> Vec {
    let y = s / cap
    let magnitude = maximum(y, -y)
    let e = exp2(magnitude * Vec(repeating: -2 * 1.442_695_040_888_963_4))
    // 1 − 2e/(1 + e): the rounding error of the quotient is relative to e, not to 1.
    let large = Vec(repeating: 1) - (e + e) / (Vec(repeating: 1) + e)
    let z = y * y
    var p = Vec(repeating: -0.005_718_962_564_187_072)
    p = muladd(p, z, Vec(repeating: 0.020_653_124_518_893_83))
    p = muladd(p, z, Vec(repeating: -0.053_744_657_901_888_97))
    p = muladd(p, z, Vec(repeating: 0.133_315_126_650_163_32))
    p = muladd(p, z, Vec(repeating: -0.333_332_852_195_644_8))
    let small = muladd(y * z, p, y)
    let t = large.replacing(with: -large, where: y .< Vec(repeating: 0))
    return t.replacing(with: small, where: magnitude .< Vec(repeating: 0.625)) * cap
}

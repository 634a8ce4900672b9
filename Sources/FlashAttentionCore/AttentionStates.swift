#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#elseif canImport(Musl)
import Musl
#endif

/// Attention states and how they merge: the arithmetic shared by the kernels' epilogues, the merge of
/// split-KV partial results and `flash_attention_merge`. Scalar code: it runs once per output row, and the
/// compiler vectorises its loops for whatever the module is built for.
///
/// A row's state is (out, lse): its output normalised over the keys it saw and the natural log of the
/// softmax denominator. Two states over disjoint key sets merge exactly:
///     lse = log(e^lse_a + e^lse_b),  out = out_a · e^(lse_a − lse) + out_b · e^(lse_b − lse).
/// Split-KV decoding merges its splits this way, an attention sink is a state with out = 0 and lse = the
/// sink logit, and `flash_attention_merge` exposes the same operation.

/// ln(2) and log2(e), for converting to and from exp2's units. Inlinable
/// computed constants, so that the kernel copies fold them (a global is read through an accessor).
@inlinable public var ln2: Float { 0.693_147_180_559_945_3 }
@inlinable public var log2e: Float { 1.442_695_040_888_963_4 }

/// The normalisation of one finished row: the factor its accumulator is multiplied by (1 / l, or 0 for a
/// row that saw no key) and its LSE plus `lseShift` (a constant taken out of the row's scores), with the
/// sink (natural log, or −inf for none) merged in.
/// - Parameters:
///   - rowMax: the running max of the scores; rowSum: the running sum of e^(s − max).
public func finishRow(rowMax: Float, rowSum: Float, lseShift: Float, sink: Float) -> (factor: Float, lse: Float) {
    // A NaN score (a NaN in the query or a key it sees) never raises the running max but makes the sum NaN:
    // the row's output and LSE are NaN, so that a merge or ring step cannot mistake it for a row that saw
    // nothing.
    if rowSum.isNaN { return (.nan, .nan) }
    // A row that saw no key has max −inf (its sum holds only exp2's ~1e-38 floor for −inf scores): its
    // output is 0 and its LSE −inf.
    let sawNoKey = rowMax == -.infinity
    var rowLSE = sawNoKey ? -Float.infinity : rowMax + log(rowSum) + lseShift
    var factor: Float = sawNoKey ? 0 : 1 / rowSum
    if sink > -.infinity {
        let merged = logAddExp(rowLSE, sink)
        factor *= exp(rowLSE - merged)
        rowLSE = merged
    }
    return (factor, rowLSE)
}

/// Merges state (other, otherLSE) into (out, lse) in place; returns the merged LSE.
public func mergeStates(
    out: UnsafeMutablePointer<Float>, lse: Float, other: UnsafePointer<Float>, otherLSE: Float, headDim: Int
) -> Float {
    let merged = logAddExp(lse, otherLSE)
    if merged == -.infinity {  // neither side saw a key
        out.update(repeating: 0, count: headDim)
        return merged
    }
    let a = lse == -.infinity ? 0 : exp(lse - merged)
    let b = otherLSE == -.infinity ? 0 : exp(otherLSE - merged)
    for c in 0..<headDim { out[c] = out[c] * a + other[c] * b }
    return merged
}

/// Merges an attention sink (a state with output 0) into (out, lse) in place; returns the merged LSE.
public func mergeSink(out: UnsafeMutablePointer<Float>, lse: Float, sink: Float, headDim: Int) -> Float {
    let merged = logAddExp(lse, sink)
    let factor = lse == -.infinity ? 0 : exp(lse - merged)
    for c in 0..<headDim { out[c] *= factor }
    return merged
}

/// log(e^a + e^b) without overflow; −inf when both are −inf; NaN if either is NaN.
public func logAddExp(_ a: Float, _ b: Float) -> Float {
    let high = max(a, b), low = min(a, b)
    if a.isNaN || b.isNaN { return .nan }
    if high == -.infinity { return -.infinity }
    return high + log1p(exp(low - high))
}

/// The public merge of two states over disjoint key sets, rows at a time (`flash_attention_merge`).
public func mergeAttentionStates(
    rows: Int, headDim: Int, outA: UnsafePointer<Float>, outAStride: Int, lseA: UnsafePointer<Float>, lseAStride: Int,
    outB: UnsafePointer<Float>, outBStride: Int, lseB: UnsafePointer<Float>, lseBStride: Int,
    out: UnsafeMutablePointer<Float>, outStride: Int, lse: UnsafeMutablePointer<Float>, lseStride: Int
) {
    for r in 0..<rows {
        let target = out + r * outStride
        if UnsafePointer(target) != outA + r * outAStride {
            target.update(from: outA + r * outAStride, count: headDim)
        }
        lse[r * lseStride] = mergeStates(
            out: target, lse: lseA[r * lseAStride], other: outB + r * outBStride, otherLSE: lseB[r * lseBStride],
            headDim: headDim)
    }
}

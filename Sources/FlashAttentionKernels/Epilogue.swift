import Glibc

/// The epilogue of a query block: divide each output row by its softmax sum once, write it to the caller's
/// `out` (only the real rows and the real head_dim columns), and write the log-sum-exp.

/// ln(2): converts the log2-domain running max back to natural-log units for the LSE.
let ln2: Float = 0.693_147_180_559_945_3

/// Writes `rows` normalised output rows and their LSE.
/// - Parameters:
///   - o: unnormalised accumulators, row r at `o + r * ldO`, at least `headDim` columns.
///   - rowMax: running max in log2 units; rowSum: running sum of 2^(s − max).
///   - out: pointer to the first row's element 0; row r at `out + r * outRowStride`.
///   - lse: pointer to the first row's LSE or nil; row r at `lse + r * lseRowStride`.
func writeOutputRows(
    o: UnsafePointer<Float>, ldO: Int, rows: Int, headDim: Int,
    rowMax: UnsafePointer<Float>, rowSum: UnsafePointer<Float>,
    out: UnsafeMutablePointer<Float>, outRowStride: Int,
    lse: UnsafeMutablePointer<Float>?, lseRowStride: Int
) {
    let fullVectors = headDim / 8
    for r in 0..<rows {
        let sum = rowSum[r]
        // A row that saw no key has max −inf (its sum holds only exp2's ~1e-38 floor for −inf scores): its
        // output is 0 and its LSE −inf. NaN sums stay NaN.
        let sawNoKey = rowMax[r] == -.infinity
        let inverse: Float = sawNoKey ? 0 : 1 / sum
        let source = o + r * ldO
        let target = out + r * outRowStride
        let scale = Vec(repeating: inverse)
        for j in 0..<fullVectors {
            store(load(source + j * 8) * scale, target + j * 8)
        }
        for c in (fullVectors * 8)..<headDim {
            target[c] = source[c] * inverse
        }
        if let lse {
            lse[r * lseRowStride] = sawNoKey ? -.infinity : (rowMax[r] + log2(sum)) * ln2
        }
    }
}

import FlashAttentionCore

/// Attention dropout inside the kernels: the forward drops probabilities of a sub-block after its softmax
/// update (the row sums already hold them, as FlashAttention-2's do), the backward regenerates the same mask
/// per (query, key) from `Dropout` (FlashAttentionCore), which defines it.

/// Multiplies the probabilities of rows `firstRow ..< firstRow + lanes·queryVectors` by the dropout factor
/// (1/(1 − p) where kept, 0 where dropped), over the keys each vector of rows needs. Probabilities are
/// stored transposed (key k of the vector of rows j at `s + k * ldS + j * lanes`), so one key's words are
/// computed for a vector of queries at once from the rows' states in `rowKeys`.
func applyDropout(
    _ dropout: Dropout, s: UnsafeMutablePointer<Float>, ldS: Int, firstRow: Int, queryVectors: Int, mask: BlockMask,
    firstKey: Int, rowKeys: UnsafeMutablePointer<UInt32>
) {
    let scale = Vec(repeating: dropout.scale)
    for j in 0..<queryVectors {
        let row = firstRow + lanes * j
        let low = loadBits(rowKeys + row), high = loadBits(rowKeys + geometry.queryBlock + row)
        for k in mask.needed(fromRow: row, throughRow: row + lanes - 1) {
            let keep = kept(dropout, low: low, high: high, key: VecBits(repeating: UInt32(truncatingIfNeeded: firstKey + k)))
            let p = s + k * ldS + j * lanes
            store((load(p) * scale).replacing(with: 0, where: .!keep), p)
        }
    }
}

/// The lanes `Dropout.bits` keeps, compared as signed words (24-bit values, so the bits are the same) on this
/// copy's concrete mask type: one vector compare.
@inline(__always)
func kept(_ dropout: Dropout, low: VecBits, high: VecBits, key: VecBits) -> SIMDMask<Vec.MaskStorage> {
    unsafeBitCast(dropout.bits(low: low, high: high, key: key), to: Vec.MaskStorage.self)
        .< Vec.MaskStorage(repeating: Int32(dropout.threshold))
}

/// `lanes` consecutive words.
@inline(__always) private func loadBits(_ p: UnsafePointer<UInt32>) -> VecBits {
    UnsafeRawPointer(p).loadUnaligned(as: VecBits.self)
}

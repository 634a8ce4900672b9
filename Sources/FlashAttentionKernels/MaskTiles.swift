import FlashAttentionCore

/// A caller's attention mask inside the query-block kernel: whole key blocks it hides are skipped, and the
/// blocks it does not are staged sub-block by sub-block in the scores' transposed layout, so the softmax adds
/// a vector of mask values per key like any other score adjustment (after softcap and ALiBi).

/// Whether the mask hides every key of [firstKey, firstKey + count) from every row of the item. Skipping such a
/// block is exact: its scores would all be −inf, which changes neither the running max nor the sum.
/// `rowOffsets[r]` is row r's mask offset, −1 for padding rows. Stops at the first visible element, so a dense
/// mask costs one read per block.
func hidesBlock(_ mask: AttentionMask, rowOffsets: UnsafePointer<Int>, rows: Int, firstKey: Int, count: Int) -> Bool {
    for r in 0..<rows where rowOffsets[r] >= 0 {
        var offset = rowOffsets[r] &+ firstKey &* mask.colStride
        for _ in 0..<count {
            if !mask.hides(at: offset) { return false }
            offset &+= mask.colStride
        }
    }
    return true
}

/// Writes the mask values of rows `firstRow ..< firstRow + rows` for block keys `keys` (block-relative, the
/// block starting at `firstKey`) into `tile`, transposed like the scores: key k of sub-block row r at
/// `tile + k * ldS + r`. Padding rows get 0.
func stageMaskTile(
    _ mask: AttentionMask, rowOffsets: UnsafePointer<Int>, firstRow: Int, rows: Int, keys: Range<Int>, firstKey: Int,
    into tile: UnsafeMutablePointer<Float>, ldS: Int
) {
    for r in 0..<rows {
        let rowOffset = rowOffsets[firstRow + r]
        guard rowOffset >= 0 else {
            for k in keys { tile[k * ldS + r] = 0 }
            continue
        }
        var offset = rowOffset &+ (firstKey &+ keys.lowerBound) &* mask.colStride
        for k in keys {
            tile[k * ldS + r] = mask.bias(at: offset)
            offset &+= mask.colStride
        }
    }
}

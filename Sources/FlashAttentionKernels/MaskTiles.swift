import FlashAttentionCore

/// A caller's attention mask inside the query-block kernel: each sub-block's mask values are staged in the
/// scores' transposed layout before its scores are computed, so the softmax adds a vector of mask values per
/// key like any other score adjustment (after softcap and ALiBi); a sub-block the mask hides entirely is
/// skipped, and one it hides in part is narrowed to the keys some row sees — exactly: hidden scores would be
/// −inf, which changes neither the running max nor the sum. So a block-sparse mask costs about what its
/// visible blocks cost, plus one read of the mask.

/// Writes the mask values of rows `firstRow ..< firstRow + rows` for block keys `keys` (block-relative, the
/// block starting at `firstKey`) into `tile`, transposed like the scores: key k of sub-block row r at
/// `tile + k * ldS + r`. `rowOffsets[r]` is row r's mask offset, −1 for padding rows (staged as 0). Returns
/// the keys from the first to the last that some real row sees, nil if none.
func stageMaskTile(
    _ mask: AttentionMask, rowOffsets: UnsafePointer<Int>, firstRow: Int, rows: Int, keys: Range<Int>, firstKey: Int,
    into tile: UnsafeMutablePointer<Float>, ldS: Int
) -> Range<Int>? {
    // One loop per element type, so the inner loop carries no type test.
    if mask.isBool {
        return stageRows(mask, rowOffsets, firstRow, rows, keys, firstKey, tile, ldS) { base, offset in
            base.load(fromByteOffset: offset, as: UInt8.self) != 0 ? 0 : -.infinity
        }
    }
    return stageRows(mask, rowOffsets, firstRow, rows, keys, firstKey, tile, ldS) { base, offset in
        base.load(fromByteOffset: offset &* 4, as: Float.self)
    }
}

@inline(__always)
private func stageRows(
    _ mask: AttentionMask, _ rowOffsets: UnsafePointer<Int>, _ firstRow: Int, _ rows: Int, _ keys: Range<Int>,
    _ firstKey: Int, _ tile: UnsafeMutablePointer<Float>, _ ldS: Int, _ value: (UnsafeRawPointer, Int) -> Float
) -> Range<Int>? {
    var first = Int.max, last = -1
    for r in 0..<rows {
        let rowOffset = rowOffsets[firstRow + r]
        guard rowOffset >= 0 else {
            for k in keys { tile[k * ldS + r] = 0 }
            continue
        }
        var offset = rowOffset &+ (firstKey &+ keys.lowerBound) &* mask.colStride
        for k in keys {
            let x = value(mask.base, offset)
            tile[k * ldS + r] = x
            if x != -.infinity {
                first = min(first, k)
                last = max(last, k)
            }
            offset &+= mask.colStride
        }
    }
    return last < 0 ? nil : first..<(last + 1)
}

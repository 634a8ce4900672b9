import FlashAttentionCore

/// A caller's attention mask inside the query-block kernel. Before a sub-block's scores are computed, its
/// mask is surveyed a vector of keys at a time: a sub-block the mask hides entirely is skipped, one it hides
/// in part is narrowed to the keys some row sees — exactly: hidden scores would be −inf, which changes
/// neither the running max nor the sum. Where every row's value over the remaining keys is "attend" (true,
/// or 0.0), the mask adds nothing and the sub-block runs as an unmasked one; only the others are staged, in
/// the scores' transposed layout, for the softmax to add a vector of mask values per key like any other score
/// adjustment (after softcap and ALiBi). So a block-sparse mask costs about what its visible blocks cost, plus
/// one vector read of the mask, and an all-attend mask about what no mask costs.

/// What a caller's mask leaves of a sub-block (`stageMaskTile`).
struct MaskTileContent {
    /// The keys from the first to the last that some real row sees (block-relative).
    let seen: Range<Int>
    /// Whether the values were staged: some real row has a value other than "attend" among `seen` (a hidden
    /// key, or an additive bias). When not, the tile holds nothing and the sub-block needs no mask values.
    let staged: Bool
}

/// Surveys the mask values of rows `firstRow ..< firstRow + rows` for block keys `keys` (block-relative, the
/// block starting at `firstKey`) and, when the sub-block needs them, writes those of the keys it sees into
/// `tile`, transposed like the scores: key k of sub-block row r at `tile + k * ldS + r`. `rowOffsets[r]` is
/// row r's mask offset, −1 for padding rows (which see nothing, and are staged as 0). Returns nil when no
/// real row sees any key.
func stageMaskTile(
    _ mask: AttentionMask, rowOffsets: UnsafePointer<Int>, firstRow: Int, rows: Int, keys: Range<Int>, firstKey: Int,
    into tile: UnsafeMutablePointer<Float>, ldS: Int, scratch: UnsafeMutablePointer<Float>
) -> MaskTileContent? {
    let rows = MaskRows(mask: mask, offsets: rowOffsets + firstRow, count: rows, firstKey: firstKey)
    // One copy per element type, so the loops carry no type test.
    return mask.isBool
        ? rows.stage(BoolMask.self, keys, tile, ldS, scratch) : rows.stage(FloatMask.self, keys, tile, ldS, scratch)
}

/// How a mask's elements become score biases: a generic parameter, so each loop is specialised to one type.
protocol MaskElement {
    /// The bias of the element at element offset `offset`: 0 or −inf for a boolean mask, the value for a float one.
    static func bias(_ base: UnsafeRawPointer, _ offset: Int) -> Float
    /// The biases of `lanes` consecutive elements from element offset `offset`, in one load.
    static func biases(_ base: UnsafeRawPointer, _ offset: Int) -> Vec
}

enum BoolMask: MaskElement {
    @inline(__always) static func bias(_ base: UnsafeRawPointer, _ offset: Int) -> Float {
        base.load(fromByteOffset: offset, as: UInt8.self) != 0 ? 0 : -.infinity
    }
    @inline(__always) static func biases(_ base: UnsafeRawPointer, _ offset: Int) -> Vec {
        // The bytes widened as int8 are nonzero exactly where the bytes are (Swift's generic integer
        // widening and compares are out-of-line or lane-by-lane here; float compares are one instruction).
        Vec().replacing(with: -.infinity, where: loadInt8(base + offset) .== Vec())
    }
}

enum FloatMask: MaskElement {
    @inline(__always) static func bias(_ base: UnsafeRawPointer, _ offset: Int) -> Float {
        base.load(fromByteOffset: offset &* 4, as: Float.self)
    }
    @inline(__always) static func biases(_ base: UnsafeRawPointer, _ offset: Int) -> Vec {
        base.loadUnaligned(fromByteOffset: offset &* 4, as: Vec.self)
    }
}

extension AttentionMask {
    /// The biases of lanes `part` of the `lanes` consecutive keys whose first is at element offset `offset`;
    /// the other lanes are −inf and read nothing (their keys may lie beyond the mask). One wide load when all
    /// lanes are wanted and the keys are contiguous (column stride 1, the usual case).
    @inline(__always)
    func biases<E: MaskElement>(_ element: E.Type, at offset: Int, lanes part: Range<Int>) -> Vec {
        if colStride == 1 && part == 0..<lanes { return E.biases(base, offset) }
        var b = Vec(repeating: -.infinity)
        for lane in part { b[lane] = E.bias(base, offset &+ lane &* colStride) }
        return b
    }

    /// `biases(_:at:lanes:)` for this mask's element type.
    @inline(__always)
    func biases(at offset: Int, lanes part: Range<Int>) -> Vec {
        isBool ? biases(BoolMask.self, at: offset, lanes: part) : biases(FloatMask.self, at: offset, lanes: part)
    }
}

/// The mask rows of a sub-block.
private struct MaskRows {
    let mask: AttentionMask
    /// Each row's mask offset, −1 for padding rows.
    let offsets: UnsafePointer<Int>
    let count: Int
    let firstKey: Int

    /// The element offset of row r's block key k.
    @inline(__always) func offset(_ r: Int, _ k: Int) -> Int { offsets[r] &+ (firstKey &+ k) &* mask.colStride }

    /// Surveys the rows' values over `keys` and stages them when the sub-block needs them: row by row in
    /// whole vectors into `rowMajor` (room for `count` rows of `keys.count` rounded up to whole vectors),
    /// then into `tile` a `transposeSize`-square block at a time.
    func stage<E: MaskElement>(
        _ element: E.Type, _ keys: Range<Int>, _ tile: UnsafeMutablePointer<Float>, _ ldS: Int,
        _ rowMajor: UnsafeMutablePointer<Float>
    ) -> MaskTileContent? {
        guard let (seen, attendsAll) = survey(E.self, keys) else { return nil }
        if attendsAll { return MaskTileContent(seen: seen, staged: false) }
        // Whole transpose blocks of keys; those outside `seen` are never read, and hold anything.
        let low = seen.lowerBound / transposeSize * transposeSize
        let high = (seen.upperBound + transposeSize - 1) / transposeSize * transposeSize
        let ld = (high - low + lanes - 1) / lanes * lanes
        for r in 0..<count {
            for k in stride(from: low, to: high, by: lanes) {
                let first = max(seen.lowerBound - k, 0), end = min(seen.upperBound - k, lanes)
                let b = offsets[r] < 0 || first >= end ? Vec() : mask.biases(E.self, at: offset(r, k), lanes: first..<end)
                store(b, rowMajor + r * ld + (k - low))
            }
        }
        for r in stride(from: 0, to: count, by: transposeSize) {
            for k in stride(from: low, to: high, by: transposeSize) {
                transposeBlock(rowMajor + r * ld + (k - low), ld, tile + k * ldS + r, ldS)
            }
        }
        return MaskTileContent(seen: seen, staged: true)
    }

    /// The keys from the first to the last that some real row sees, and whether every real row's value there
    /// is "attend" (bias +0.0); nil if no real row sees any key. A vector of keys at a time over all rows,
    /// keeping the AND and the OR of the biases' bits: a key is hidden from all rows when both are −inf's
    /// bits, and attended by all without a bias when the OR is 0. The answer is conservative: values are
    /// staged when a key with a bias lies anywhere between the first and the last such key.
    private func survey<E: MaskElement>(_ element: E.Type, _ keys: Range<Int>) -> (Range<Int>, Bool)? {
        guard (0..<count).contains(where: { offsets[$0] >= 0 }) else { return nil }
        typealias Bits = Vec.MaskStorage  // signed words: their compares are single instructions
        let hidden = Bits(repeating: Int32(bitPattern: (-Float.infinity).bitPattern)), none = Vec(repeating: .infinity)
        var seenLow = none, seenHigh = -none, biasedLow = none, biasedHigh = -none
        for k in stride(from: keys.lowerBound, to: keys.upperBound, by: lanes) {
            let n = min(lanes, keys.upperBound - k)
            var all = Bits(repeating: -1), any = Bits()
            for r in 0..<count where offsets[r] >= 0 {
                let bits = unsafeBitCast(mask.biases(E.self, at: offset(r, k), lanes: 0..<n), to: Bits.self)
                all &= bits
                any |= bits
            }
            let key = laneIndices + Vec(repeating: Float(k)), wanted = laneIndices .< Vec(repeating: Float(n))
            let seen = wanted .& ((all .!= hidden) .| (any .!= hidden)), biased = wanted .& (any .!= Bits())
            seenLow = minimum(seenLow, none.replacing(with: key, where: seen))
            seenHigh = maximum(seenHigh, (-none).replacing(with: key, where: seen))
            biasedLow = minimum(biasedLow, none.replacing(with: key, where: biased))
            biasedHigh = maximum(biasedHigh, (-none).replacing(with: key, where: biased))
        }
        guard seenHigh.max() >= 0 else { return nil }
        let seen = Int(seenLow.min())..<(Int(seenHigh.max()) + 1)
        return (seen, biasedLow.min() >= Float(seen.upperBound) || biasedHigh.max() < Float(seen.lowerBound))
    }
}

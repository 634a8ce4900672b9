import FlashAttentionCore

/// A caller's attention mask inside the query-block kernel. Before a sub-block's scores are computed, its
/// mask is surveyed a vector of keys at a time: a sub-block the mask hides entirely is skipped, one it hides
/// in part is narrowed to the keys some row sees — exactly: hidden scores would be −inf, which changes
/// neither the running max nor the sum. Where every row's value over the remaining keys is "attend" (true,
/// or +0.0), the mask adds nothing and the sub-block runs as an unmasked one; only the others are staged, in
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
/// block starting at `firstKey` of a sequence of `keyLimit` keys) and, when the sub-block needs them, writes
/// those of the keys it sees into `tile`, transposed like the scores: key k of sub-block row r at
/// `tile + k * ldS + r`. `rowOffsets[r]` is row r's mask offset, −1 for padding rows (which see nothing, and
/// are staged as 0); `scratch` has room for `rows` × `keys.count` floats rounded up to whole vectors (the
/// scores' buffer, free until the scores are computed). Returns nil when no real row sees any key.
func stageMaskTile(
    _ mask: AttentionMask, rowOffsets: UnsafePointer<Int>, firstRow: Int, rows: Int, keys: Range<Int>, firstKey: Int,
    keyLimit: Int, into tile: UnsafeMutablePointer<Float>, ldS: Int, scratch: UnsafeMutablePointer<Float>
) -> MaskTileContent? {
    let rows = MaskRows(mask: mask, offsets: rowOffsets + firstRow, count: rows, firstKey: firstKey, keyLimit: keyLimit)
    // One copy per element type, so the loops carry no type test.
    return mask.isBool
        ? rows.stage(BoolMask.self, keys, tile, ldS, scratch) : rows.stage(FloatMask.self, keys, tile, ldS, scratch)
}

/// Prefetches into L2 the mask values of rows `0 ..< rows` for `keys` (sequence positions; contiguous masks
/// only): the next key block's, while this one is computed. Each row's values of a key block are a few
/// cache lines on a page of their own, hundreds of rows at once: too many streams for the hardware
/// prefetcher, so without this the survey waits on memory row after row.
func prefetchMask(_ mask: AttentionMask, rowOffsets: UnsafePointer<Int>, rows: Int, keys: Range<Int>) {
    guard mask.colStride == 1 else { return }
    let size = mask.isBool ? 1 : 4
    for r in 0..<rows where rowOffsets[r] >= 0 {
        prefetchRowToL2(mask.base + (rowOffsets[r] + keys.lowerBound) * size, bytes: keys.count * size)
    }
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

/// Signed words, one a lane: their compares are single instructions (unsigned ones go lane by lane).
private typealias Bits = Vec.MaskStorage

/// The mask rows of a sub-block.
private struct MaskRows {
    let mask: AttentionMask
    /// Each row's mask offset, −1 for padding rows.
    let offsets: UnsafePointer<Int>
    let count: Int
    let firstKey: Int
    /// Keys of the sequence: every row holds this many values (reads may go up to it).
    let keyLimit: Int

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
    /// is "attend" (true, or +0.0); nil if no real row sees any key. Conservative: the span from the first to
    /// the last key that some row does not simply attend must miss the seen keys (two surveys' worth of
    /// min/max, not a set), which holds for blocks of a block-sparse mask and for an all-attend one.
    private func survey<E: MaskElement>(_ element: E.Type, _ keys: Range<Int>) -> (Range<Int>, Bool)? {
        guard (0..<count).contains(where: { offsets[$0] >= 0 }) else { return nil }
        var seen = KeyHull(), biased = KeyHull()
        if E.self == BoolMask.self && mask.colStride == 1 {
            surveyBytes(keys, &seen, &biased)
        } else {
            surveyBiases(E.self, keys, &seen, &biased)
        }
        guard let visible = seen.range else { return nil }
        return (visible, !(biased.range?.overlaps(visible) ?? false))
    }

    /// `survey` of the biases, a vector of keys at a time over all rows, keeping the AND and the OR of their
    /// bits: a key is hidden from all rows when both are −inf's bits, attended by all without a bias when
    /// the OR is 0.
    private func surveyBiases<E: MaskElement>(_ element: E.Type, _ keys: Range<Int>, _ seen: inout KeyHull, _ biased: inout KeyHull) {
        let hidden = Bits(repeating: Int32(bitPattern: (-Float.infinity).bitPattern))
        for k in stride(from: keys.lowerBound, to: keys.upperBound, by: lanes) {
            let n = min(lanes, keys.upperBound - k), column = (firstKey &+ k) &* mask.colStride
            let (all, any): (Bits, Bits)
            if n == lanes && mask.colStride == 1 {
                (all, any) = combine(column) { unsafeBitCast(E.biases(mask.base, $0), to: Bits.self) }
            } else {
                (all, any) = combine(column) { unsafeBitCast(mask.biases(E.self, at: $0, lanes: 0..<n), to: Bits.self) }
            }
            let key = laneIndices + Vec(repeating: Float(k)), wanted = laneIndices .< Vec(repeating: Float(n))
            seen.add(key, where: wanted .& ((all .!= hidden) .| (any .!= hidden)))
            biased.add(key, where: wanted .& (any .!= Bits()))
        }
    }

    /// `survey` of a contiguous boolean mask on its bytes, 4 · `lanes` keys a row at a time: the top bit of
    /// each byte of ((w & 0x7f…) + 0x7f…) | w is set exactly where the byte is nonzero (no carry crosses a
    /// byte), so the AND and the OR of those bits over the rows say which keys every row and some row sees.
    private func surveyBytes(_ keys: Range<Int>, _ seen: inout KeyHull, _ biased: inout KeyHull) {
        let width = MemoryLayout<VecBits>.size, low = VecBits(repeating: 0x7f7f_7f7f), top = VecBits(repeating: 0x8080_8080)
        @inline(__always) func nonzero(_ w: VecBits) -> VecBits { (((w & low) &+ low) | w) & top }
        for k in stride(from: keys.lowerBound, to: keys.upperBound, by: width) {
            let n = min(width, keys.upperBound - k), column = firstKey &+ k, base = mask.base
            let (all, any): (VecBits, VecBits)
            if column + width <= keyLimit {  // a whole vector inside the rows (bytes past n are not looked at)
                (all, any) = combine(column) { nonzero(base.loadUnaligned(fromByteOffset: $0, as: VecBits.self)) }
            } else {
                (all, any) = combine(column) { offset in
                    var w = VecBits()
                    withUnsafeMutableBytes(of: &w) { $0.copyMemory(from: UnsafeRawBufferPointer(start: base + offset, count: n)) }
                    return nonzero(w)
                }
            }
            seen.add(bytes: any, key: k, count: n)
            biased.add(bytes: ~all & top, key: k, count: n)
        }
    }

    /// The AND and the OR over the real rows of what `read` returns for each row's element offset `column`
    /// further (one load a row, the mask's fields in registers).
    @inline(__always)
    private func combine<W: SIMD>(_ column: Int, _ read: (Int) -> W) -> (W, W) where W.Scalar: FixedWidthInteger {
        let offsets = offsets
        var all = W(repeating: ~0), any = W()
        for r in 0..<count where offsets[r] >= 0 {
            let w = read(offsets[r] &+ column)
            all &= w
            any |= w
        }
        return (all, any)
    }
}

/// The first and the last of a set of block keys.
private struct KeyHull {
    var first = Int.max, last = -1
    var low = Vec(repeating: .infinity), high = Vec(repeating: -.infinity)

    /// Adds the keys k + i, i < n, whose byte i of `flags` is nonzero, eight bytes at a time.
    @inline(__always) mutating func add(bytes flags: VecBits, key k: Int, count n: Int) {
        withUnsafeBytes(of: flags) { bytes in
            for j in stride(from: 0, to: n, by: 8) {
                var word = bytes.load(fromByteOffset: j, as: UInt64.self)
                if n - j < 8 { word &= (1 &<< (8 * (n - j))) &- 1 }
                guard word != 0 else { continue }
                first = min(first, k + j + word.trailingZeroBitCount / 8)
                last = max(last, k + j + (63 - word.leadingZeroBitCount) / 8)
            }
        }
    }

    /// Adds the lanes of `keys` (block keys as floats) that `lanes` selects.
    @inline(__always) mutating func add(_ keys: Vec, where lanes: SIMDMask<Bits>) {
        low = minimum(low, Vec(repeating: .infinity).replacing(with: keys, where: lanes))
        high = maximum(high, Vec(repeating: -.infinity).replacing(with: keys, where: lanes))
    }

    var range: Range<Int>? {
        let first = min(first, low.min() < .infinity ? Int(low.min()) : .max)
        let last = max(last, high.max() >= 0 ? Int(high.max()) : -1)
        return last < 0 ? nil : first..<(last + 1)
    }
}

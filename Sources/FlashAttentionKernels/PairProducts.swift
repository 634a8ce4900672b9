import FlashAttentionCore

/// bfloat16 products for bfloat16 q, k and v (the avx512bf16 copy, `hasPairProducts`): S = Q·Kᵀ from bfloat16
/// pairs accumulated in float32, the online softmax in float32 as on every path, and O += P·V with P rounded to
/// bfloat16 and accumulated in float32 — what FlashAttention does on GPUs and PyTorch's SDPA on CPUs. The LSE and
/// the final division stay float32. `vdpbf16ps` does two products per float32 lane, so both products run at twice
/// the float32 FMA rate; the tiling loop, softmax, dropout and epilogue are the float32 path's (TileLoop.swift),
/// only the packing and the two micro-kernels differ.
///
/// A word is two bfloat16 values, the even element in its low half (two adjacent bfloat16s in memory); `dotPairs`
/// multiplies two vectors of words lane by lane and adds both products. The pairs run along the dimension each
/// product sums over (VNNI order):
///
///     qPairs   (qT's memory) panels of `microCols` queries, [pair p of head_dim][query i] = (q_i[2p], q_i[2p+1]),
///              `pairStride` pair rows a panel, not scaled: the inputs are exact in bfloat16, and the score tiles
///              apply the scale in float32
///     kPairs   (kPack's memory) [key][pair p] = (k[2p], k[2p+1]), `pairStride` words a row: the key rows as stored,
///              padded with zeros; rows past the block's keys zero up to a whole score tile
///
/// Padded to `pairStride` (whole 16-word chunks, 64 bytes), the pair rows of K are AMX's A operand of S = K·Qᵀ and
/// the query panels its B operand in VNNI order (AMXTiles.swift), as they are `dotPairs`' operands here.
///     vPairs   (vPack's memory) head_dim_v/microCols panels of [key pair j][column c] = (v_2j[c], v_2j+1[c]);
///              an odd last key paired with zeros, columns past head_dim_v zero
///     pPairs   [key pair j][sub-block row r] = (p_2j[r], p_2j+1[r]), the probabilities rounded to nearest even
///
/// Each row of an output tile sums the key pairs (2j, 2j + 1) that lie wholly inside the keys it sees, and the one
/// key at either end of its range that has no partner in it alone (its P rounded the same way, times its own V
/// row): the grouping depends only on the row's own keys, so a row's result is the same whichever rows share its
/// tile, and a hidden key's value never meets a row that must not see it (0 × NaN).

/// How the query-block kernel forms its two products.
enum BlockProducts {
    /// float32 FMAs (every input widened while packing).
    case float32
    /// Both from bfloat16 pairs with `dotPairs` (avx512bf16).
    case pairs
    /// Both in AMX tiles from the pair layouts (amxbf16, AMXTiles.swift).
    case amx
}

/// The products of `problem` on this copy: bfloat16 q, k and v take the copy's bfloat16 products, if it has any.
@inline(__always)
func blockProducts(_ problem: AttentionProblem) -> BlockProducts {
    guard problem.q.element == .bfloat16, problem.k.element == .bfloat16, problem.v.element == .bfloat16 else {
        return .float32
    }
    return hasAMXTiles ? .amx : hasPairProducts ? .pairs : .float32
}

extension Workspace {
    @inline(__always) var qPairs: UnsafeMutablePointer<UInt32> { words(qT) }
    @inline(__always) var kPairs: UnsafeMutablePointer<UInt32> { words(kPack) }
    @inline(__always) var vPairs: UnsafeMutablePointer<UInt32> { words(vPack) }

    @inline(__always) private func words(_ p: UnsafeMutablePointer<Float>) -> UnsafeMutablePointer<UInt32> {
        UnsafeMutableRawPointer(p).assumingMemoryBound(to: UInt32.self)
    }
}

/// Words of a head_dim row: ⌈head_dim / 2⌉.
@inline(__always) func pairCount(_ headDim: Int) -> Int { (headDim + 1) / 2 }

/// Words between packed pair rows: `pairCount` rounded up to whole 16-word (64-byte) chunks, zero-padded.
@inline(__always) func pairStride(_ headDim: Int) -> Int { (pairCount(headDim) + 15) / 16 * 16 }

/// The word of bfloat16 elements i and i + 1 of a row of `count` (a zero past the end).
@inline(__always)
func pairWord(_ row: UnsafeRawPointer, _ i: Int, count: Int) -> UInt32 {
    let low = UInt32(row.loadUnaligned(fromByteOffset: 2 * i, as: UInt16.self))
    return i + 1 < count ? low | UInt32(row.loadUnaligned(fromByteOffset: 2 * i + 2, as: UInt16.self)) << 16 : low
}

@inline(__always) private func loadWords(_ p: UnsafePointer<UInt32>) -> VecBits {
    UnsafeRawPointer(p).loadUnaligned(as: VecBits.self)
}

/// Packs the item's queries as `qPairs` (after `stageQueries`, which fills the row tables; its float32 panels are
/// overwritten), padding rows zero.
func stageQueryPairs(_ plan: ForwardPlan, _ item: WorkItem, _ w: Workspace) {
    let p = plan.problem
    let d = p.headDim, pairs = pairCount(d), stride = pairStride(d)
    for r in 0..<paddedRows(item) {
        let panel = w.qPairs + (r / microCols) * microCols * stride + r % microCols
        let source = item.query(row: r).map { head, position in
            p.q.row(batch: item.sequence.qBatch, head: head, row: item.sequence.qRow + position)
        }
        for j in 0..<stride { panel[j * microCols] = j < pairs ? source.map { pairWord($0, 2 * j, count: d) } ?? 0 : 0 }
    }
}

/// Packs keys [firstKey, firstKey + count) as `kPairs` (zero rows up to a multiple of `tileKeys`) and their values
/// as `vPairs` (zero pairs up to a multiple of `valueChunk` pairs), layouts above, reading each row where the cache
/// keeps it (a paged cache costs one table read per row). Returns the pairs packed, padding included.
@discardableResult
func packPairBlock(
    _ plan: ForwardPlan, _ sequence: Sequence, kvHead: Int, firstKey: Int, count: Int, tileKeys: Int, valueChunk: Int,
    _ w: Workspace
) -> Int {
    let p = plan.problem
    packKeyPairs(plan, sequence, kvHead: kvHead, firstKey: firstKey, count: count, tileKeys: tileKeys, w)
    let pairs = (count + 1) / 2, paddedPairs = (pairs + valueChunk - 1) / valueChunk * valueChunk
    for pair in 0..<pairs {
        let even = p.keyRow(p.v, sequence, head: kvHead, position: firstKey + 2 * pair)
        let odd = 2 * pair + 1 < count ? p.keyRow(p.v, sequence, head: kvHead, position: firstKey + 2 * pair + 1) : nil
        packValuePair(even, odd, headDim: p.headDimV, into: w.vPairs + pair * microCols)
    }
    let panelWords = geometry.keyBlock / 2 * microCols
    for panel in 0..<(Workspace.paddedDim(p.headDimV) / microCols) {
        (w.vPairs + panel * panelWords + pairs * microCols).update(repeating: 0, count: (paddedPairs - pairs) * microCols)
    }
    return paddedPairs
}

/// Packs keys [firstKey, firstKey + count) as `kPairs`, zero rows after them up to a multiple of `tileKeys`.
func packKeyPairs(
    _ plan: ForwardPlan, _ sequence: Sequence, kvHead: Int, firstKey: Int, count: Int, tileKeys: Int, _ w: Workspace
) {
    let p = plan.problem
    let d = p.headDim, stride = pairStride(d)
    for key in 0..<count {
        storePairRow(p.keyRow(p.k, sequence, head: kvHead, position: firstKey + key), depth: d, into: w.kPairs + key * stride)
    }
    let paddedCount = (count + tileKeys - 1) / tileKeys * tileKeys
    (w.kPairs + count * stride).update(repeating: 0, count: (paddedCount - count) * stride)
}

/// Stores a bfloat16 row of `depth` values as `pairStride(depth)` words: the words of a row are its values as stored
/// (the even element in the low half), so this is a copy, after zeroing the word an odd depth leaves half empty and
/// the padding.
@inline(__always)
func storePairRow(_ source: UnsafeRawPointer, depth: Int, into row: UnsafeMutablePointer<UInt32>) {
    let pairs = pairCount(depth)
    (row + pairs - 1).update(repeating: 0, count: pairStride(depth) - pairs + 1)
    UnsafeMutableRawPointer(row).copyMemory(from: source, byteCount: 2 * depth)
}

/// Interleaves two bfloat16 rows (`odd` nil: zeros) into one row pair's words of every column panel, from `target`
/// (panels `panelWords` words apart, `microCols` words wide; `microCols` apart: one row of words); columns past
/// `headDim`, up to `paddedDim`, are zero.
@inline(__always)
func packValuePair(
    _ even: UnsafeRawPointer, _ odd: UnsafeRawPointer?, headDim d: Int, into target: UnsafeMutablePointer<UInt32>,
    panelWords: Int = geometry.keyBlock / 2 * microCols
) {
    @inline(__always) func element(_ row: UnsafeRawPointer?, _ c: Int) -> UInt32 {
        guard let row, c < d else { return 0 }
        return UInt32(row.loadUnaligned(fromByteOffset: 2 * c, as: UInt16.self))
    }
    for column in stride(from: 0, to: Workspace.paddedDim(d), by: lanes) {
        let words = target + column / microCols * panelWords + column % microCols
        if column + lanes <= d {
            // A bfloat16 widened to float32 is the value in the high half: even's moves down, odd's stays.
            let low = bits(loadBFloat16(even + 2 * column)) &>> 16
            let high = odd.map { bits(loadBFloat16($0 + 2 * column)) } ?? VecBits()
            UnsafeMutableRawPointer(words).storeBytes(of: low | high, as: VecBits.self)
        } else {
            for c in 0..<lanes { words[c] = element(even, column + c) | element(odd, column + c) << 16 }
        }
    }
}

@inline(__always) private func bits(_ x: Vec) -> VecBits { unsafeBitCast(x, to: VecBits.self) }
@inline(__always) private func float(_ x: VecBits) -> Vec { unsafeBitCast(x, to: Vec.self) }

/// `scoreTile` from pairs: scores of `microRows` keys against `microCols` queries, transposed,
/// `s[r * ldS + i] = scale · Σ_j dot(keys[r * ldK + j], queries[j * microCols + i])` over `pairs` words, then
/// masked, stored and folded into the queries' running max as `scoreTile` does.
@inline(never)
func scoreTilePairs(
    keys: UnsafePointer<UInt32>, ldK: Int, queries: UnsafePointer<UInt32>, pairs: Int, scale: Float,
    s: UnsafeMutablePointer<Float>, ldS: Int, columnMax: UnsafeMutablePointer<Float>, band: UnsafePointer<TileBand>?
) {
    var c = zeroAccumulators()
    accumulatePairs(MicroRows.self, a: keys, ldA: ldK, b: queries, ldB: microCols, words: pairs, &c)
    let factor = Vec(repeating: scale)
    for i in 0..<2 * microRows { c[i] *= factor }
    storeScoreTile(c, s: s, ldS: ldS, columnMax: columnMax, band: band)
}

/// c_r += Σ_j dot(a[r * ldA + j], b[j * ldB ..< j * ldB + microCols]) over `words` words j, for the R rows.
@inline(__always)
private func accumulatePairs<R: TileRows>(
    _ rows: R.Type, a: UnsafePointer<UInt32>, ldA: Int, b: UnsafePointer<UInt32>, ldB: Int, words: Int,
    _ c: inout TileAccumulators
) {
    for j in 0..<words {
        let b0 = loadWords(b + j * ldB), b1 = loadWords(b + j * ldB + lanes)
        for r in 0..<R.count {
            let x = VecBits(repeating: a[r * ldA + j])
            c[2 * r] = dotPairs(c[2 * r], x, b0)
            c[2 * r + 1] = dotPairs(c[2 * r + 1], x, b1)
        }
    }
}

/// c = A·B (`Assign`) or c += A·B (`Accumulate`) for `microRows` rows × `microCols` columns with `dotPairs`: A's
/// rows of words `ldA` apart, B's word rows `ldB` apart, over `words` words; c's rows `ldC` floats apart. The
/// backward's products on the avx512bf16 copy (BackwardPairs.swift).
@inline(never)
func pairTileProduct<U: TileUpdate>(
    _ update: U.Type, a: UnsafePointer<UInt32>, ldA: Int, b: UnsafePointer<UInt32>, ldB: Int, words: Int,
    c: UnsafeMutablePointer<Float>, ldC: Int
) {
    var sums = startOutputTile(MicroRows.self, U.self, from: c, ldO: ldC)
    accumulatePairs(MicroRows.self, a: a, ldA: ldA, b: b, ldB: ldB, words: words, &sums)
    finishOutputTile(MicroRows.self, U.self, sums, alpha: c, o: c, ldO: ldC)
}

/// Rounds the probabilities of keys `keys` (rounded out to whole pairs) of a sub-block's `rows` rows to
/// bfloat16 pairs: `pPairs[j * ldS + r]` = (p[2j][r], p[2j + 1][r]), from `p[k * ldS + r]`.
func packProbabilityPairs(_ p: UnsafePointer<Float>, ldS: Int, keys: Range<Int>, rows: Int, into pPairs: UnsafeMutablePointer<UInt32>) {
    for j in (keys.lowerBound / 2)..<((keys.upperBound + 1) / 2) {
        let even = p + 2 * j * ldS, odd = even + ldS
        for column in stride(from: 0, to: rows, by: lanes) {
            let x = roundPairs(load(even + column), load(odd + column))
            UnsafeMutableRawPointer(pPairs + j * ldS + column).storeBytes(of: x, as: VecBits.self)
        }
    }
}

/// bfloat16 pairs (`outputTilePairs`): the probabilities of tile row r for key pair j at `pairs + j * ldP + r`, and
/// as float32 for key k at `p + k * ldP + r` (a range's unpaired end keys); values as `vPairs` panels from `v`.
struct PairOutputs: OutputProducts {
    let p: UnsafePointer<Float>
    let pairs: UnsafePointer<UInt32>
    let ldP: Int
    let v: UnsafePointer<UInt32>
    static var keyUnit: Int { 2 }

    @inline(__always)
    func tile<T: TileRows, U: TileUpdate>(
        _ rows: T.Type, _ update: U.Type, row: Int, keys: Range<Int>, column: Int, from: UnsafePointer<Float>,
        alpha: UnsafePointer<Float>, o: UnsafeMutablePointer<Float>, ldO: Int
    ) {
        outputTilePairs(
            T.self, U.self, p: p + row, pairs: pairs + row, ldP: ldP, v: v + column / microCols * (geometry.keyBlock / 2 * microCols),
            keys: keys, from: from, alpha: alpha, o: o, ldO: ldO)
    }
}

/// A row's keys as pairs: the key pairs (2j, 2j + 1) inside `keys` span `pairs` (even bounds), with at most one
/// unpaired key before them and one after.
private struct PairedKeys {
    let keys: Range<Int>
    let pairs: Range<Int>

    @inline(__always) init(_ keys: Range<Int>) {
        self.keys = keys
        let first = min((keys.lowerBound + 1) & ~1, keys.upperBound)
        pairs = first..<max(first, keys.upperBound & ~1)
    }

    @inline(__always) var leading: Int? { keys.lowerBound < pairs.lowerBound ? keys.lowerBound : nil }
    @inline(__always) var trailing: Int? { pairs.upperBound < keys.upperBound ? pairs.upperBound : nil }
}

/// `outputTile` from pairs: `o_r ← Σ_k p[k][r] · v_k` over `keys` for the R rows, started and stored as U says: the
/// key pairs (2j, 2j + 1) inside `keys` with `dotPairs`, an unpaired key at either end alone.
/// - Parameters:
///   - v: one `microCols`-column panel of `vPairs`.
@inline(never)
func outputTilePairs<R: TileRows, U: TileUpdate>(
    _ rows: R.Type, _ update: U.Type, p: UnsafePointer<Float>, pairs: UnsafePointer<UInt32>, ldP: Int,
    v: UnsafePointer<UInt32>, keys: Range<Int>, from: UnsafePointer<Float>, alpha: UnsafePointer<Float>,
    o: UnsafeMutablePointer<Float>, ldO: Int
) {
    var c = startOutputTile(R.self, U.self, from: from, ldO: ldO)
    let paired = PairedKeys(keys)
    if let k = paired.leading { for r in 0..<R.count { addSingleKey(row: r, k, p, ldP, v, &c) } }
    for k in stride(from: paired.pairs.lowerBound, to: paired.pairs.upperBound, by: 2) {
        let j = k / 2
        let b0 = loadWords(v + j * microCols), b1 = loadWords(v + j * microCols + lanes)
        for r in 0..<R.count {
            let a = VecBits(repeating: pairs[j * ldP + r])
            c[2 * r] = dotPairs(c[2 * r], a, b0)
            c[2 * r + 1] = dotPairs(c[2 * r + 1], a, b1)
        }
    }
    if let k = paired.trailing { for r in 0..<R.count { addSingleKey(row: r, k, p, ldP, v, &c) } }
    finishOutputTile(R.self, U.self, c, alpha: alpha, o: o, ldO: ldO)
}

/// Adds key k alone to row r: its probability rounded to bfloat16 as in a pair, times its own half of the
/// value words (float32 FMAs, so the other key of the word, which the row may not see, is never multiplied).
@inline(__always)
private func addSingleKey(
    row r: Int, _ k: Int, _ p: UnsafePointer<Float>, _ ldP: Int, _ v: UnsafePointer<UInt32>, _ c: inout TileAccumulators
) {
    let a = Vec(repeating: Float(bitPattern: bfloat16Bits(p[k * ldP + r]) << 16))
    let words = v + k / 2 * microCols
    // An even key's half moves up into place; an odd key's is already there.
    let shift = VecBits(repeating: k % 2 == 0 ? 16 : 0), keep = VecBits(repeating: 0xFFFF_0000)
    c[2 * r] = muladd(a, float((loadWords(words) &<< shift) & keep), c[2 * r])
    c[2 * r + 1] = muladd(a, float((loadWords(words + lanes) &<< shift) & keep), c[2 * r + 1])
}

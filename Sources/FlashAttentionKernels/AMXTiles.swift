import FlashAttentionCore
import FlashAttentionShims

/// The amxbf16 copy's two products in AMX tiles (`tdpbf16ps`, float32 accumulation) for bfloat16 q, k and v, from
/// the pair layouts of PairProducts.swift. Every step multiplies two A tiles (16 rows × 16 words each: 32 rows of 32
/// bfloat16 values) by two B tiles (16 pair rows × 16 columns each) into four C tiles of 16 × 16 floats (shims.h),
/// over `chunks` chunks of 16 words (32 head_dim values, or 32 keys): four independent sums, so that the tile
/// unit never waits on one sum's latency.
///
/// S = K·Qᵀ, 32 keys × 32 queries a step (`scoreTileAMX`):
///
///     A  32 key rows of `kPairs`, `pairStride` words apart (rows past the block's keys zero)
///     B  16 pair rows of a `qPairs` panel, queries 0–15 and 16–31
///     C  stored straight into the transposed score block, then scaled, masked and folded into the running max by
///        `storeScoreTile` 8 keys at a time, as the other copies' tiles end
///
/// O = α·O + P·V, 32 rows × 32 columns a step, over the 32-key chunks the rows need (`accumulateAMXRows`):
///
///     A  `pRows` (over pPairs' memory): [row][key pair] words, each row's probabilities rounded to bfloat16 in key
///        order, `keyBlock / 2` words a row — the softmax leaves P as [key][row], so each 32 keys × 16 rows are
///        transposed while rounding (`fa_pack_probability_rows`)
///     B  16 key pairs of a `vPairs` panel, columns 0–15 and 16–31 (padded with zero pairs to whole chunks)
///     C  summed from zero over the block's chunks, then o = α·o + C, as `Rescale` does
///
/// A tile multiplies every key of a chunk into every row, so a row must not meet a key it does not see with
/// anything but an exact 0 × a finite value: P is set to exactly 0 outside each row's band before the transpose,
/// and a key block whose values hold an infinity or NaN takes the pair path's P·V instead (`outputTilePairs`, which
/// never multiplies a key a row does not see). Each thread loads the tile configuration when it starts an item
/// (`beginAMXItem`) and releases the tiles after it.

/// Rows of a step's two A tiles: keys per step of the score loop, query rows per step of P·V.
@inline(__always) var amxStepRows: Int { 32 }

/// Key pairs of a chunk of P·V (one B tile's pair rows): `vPairs` is padded to whole chunks.
@inline(__always) var amxChunkPairs: Int { 16 }

/// Loads this thread's tile configuration (tiles 0–7, 16 rows × 64 bytes).
@inline(__always)
func beginAMXItem() {
    #if FA_AMX
    fa_amx_configure()
    #endif
}

/// Releases this thread's tiles.
@inline(__always)
func endAMXItem() {
    #if FA_AMX
    fa_amx_release()
    #endif
}

/// C = A·B over `chunks` 16-word chunks into the four C tiles: A rows 0–15 at `a` and 16–31 at `a + 16 * ldA`
/// (chunk c at `+ 16 * c` words), B's pair rows `ldB` words apart (chunk c at `+ 16 * c * ldB`), columns 0–15 and
/// 16–31; `chunks` may be empty (C zero). With `sums`, C starts from the 32 × 32 floats there (rows `ldSums` apart).
@inline(__always)
private func amxProduct(
    a: UnsafePointer<UInt32>, ldA: Int, b: UnsafePointer<UInt32>, ldB: Int, chunks: Range<Int>,
    sums: UnsafePointer<Float>? = nil, ldSums: Int = 0
) {
    #if FA_AMX
    let bytes = MemoryLayout<UInt32>.size
    if let sums { fa_amx_load_c(sums, ldSums) } else { fa_amx_zero_c() }
    for chunk in chunks {
        fa_amx_load_a0(a + 16 * chunk, ldA * bytes)
        fa_amx_load_a1(a + 16 * ldA + 16 * chunk, ldA * bytes)
        fa_amx_load_b0(b + 16 * chunk * ldB, ldB * bytes)
        fa_amx_load_b1(b + 16 * chunk * ldB + 16, ldB * bytes)
        fa_amx_dot_c()
    }
    #endif
}

/// Stores the four C tiles as 32 rows × 32 floats at `c`, rows `ldC` floats apart.
@inline(__always)
private func storeAMXProduct(_ c: UnsafeMutablePointer<Float>, ldC: Int) {
    #if FA_AMX
    let bytes = ldC * MemoryLayout<Float>.size
    fa_amx_store_c0(c, bytes)
    fa_amx_store_c1(c + 16, bytes)
    fa_amx_store_c2(c + 16 * ldC, bytes)
    fa_amx_store_c3(c + 16 * ldC + 16, bytes)
    #endif
}

/// c = A·B, or c += A·B when `accumulate`, for 32 rows × 32 columns in the four C tiles (the backward's products,
/// BackwardPairs.swift): A and B as `amxProduct` takes them, over `words` words (whole chunks), c's rows `ldC` apart.
func amxBlockProduct(
    a: UnsafePointer<UInt32>, ldA: Int, b: UnsafePointer<UInt32>, ldB: Int, words: Int, c: UnsafeMutablePointer<Float>,
    ldC: Int, accumulate: Bool
) {
    amxProduct(a: a, ldA: ldA, b: b, ldB: ldB, chunks: 0..<(words / 16), sums: accumulate ? c : nil, ldSums: ldC)
    storeAMXProduct(c, ldC: ldC)
}

/// Scores of 32 keys against 32 queries, transposed: `s[r * ldS + i] = scale · Σ_p k_r[p] · q_i[p]` over
/// `chunks` 16-word chunks of the pair rows, then masked with `bands[j]` (keys 8j to 8j + 7) when `bands` is set,
/// stored, and folded into `columnMax`.
@inline(never)
func scoreTileAMX(
    keys: UnsafePointer<UInt32>, ldK: Int, queries: UnsafePointer<UInt32>, chunks: Int, scale: Float,
    s: UnsafeMutablePointer<Float>, ldS: Int, columnMax: UnsafeMutablePointer<Float>, bands: UnsafePointer<TileBand>?
) {
    amxProduct(a: keys, ldA: ldK, b: queries, ldB: microCols, chunks: 0..<chunks)
    storeAMXProduct(s, ldC: ldS)
    let factor = Vec(repeating: scale)
    for part in 0..<(amxStepRows / microRows) {
        let rows = s + part * microRows * ldS
        var c = zeroAccumulators()
        for r in 0..<microRows {
            c[2 * r] = load(rows + r * ldS) * factor
            c[2 * r + 1] = load(rows + r * ldS + lanes) * factor
        }
        storeScoreTile(c, s: rows, ldS: ldS, columnMax: columnMax, band: bands.map { $0 + part })
    }
}

/// Whether every value of the packed `vPairs` (key pairs [0, pairs), columns [0, headDimV)) is finite: whether the
/// block's P·V may run in AMX tiles. An exponent of all ones in either half of a word (0x7F80) carries into the
/// half's top bit when 0x80 is added.
func valuePairsAreFinite(pairs: Int, headDimV: Int, _ w: Workspace) -> Bool {
    let panelWords = geometry.keyBlock / 2 * microCols
    let exponents = VecBits(repeating: 0x7F80_7F80), carry = VecBits(repeating: 0x0080_0080)
    var flags = VecBits()
    for panel in 0..<(Workspace.paddedDim(headDimV) / microCols) {
        let words = UnsafeRawPointer(w.vPairs + panel * panelWords)
        for i in stride(from: 0, to: pairs * microCols, by: lanes) {
            flags |= (words.load(fromByteOffset: 4 * i, as: VecBits.self) & exponents) &+ carry
        }
    }
    return (flags & VecBits(repeating: 0x8000_8000)) == VecBits()
}

/// O = α·O + P·V in AMX tiles for the sub-block's rows `first ..< first + rows` (a multiple of 32), from the
/// probabilities in `w.s` ([key][row], `subBlockRows` apart) and the block's `vPairs`: each 16 rows pack their
/// `pRows` over the 32-key chunks they need, then every `microCols`-column panel of 32 rows takes one step.
func accumulateAMXRows(headDimV dv: Int, mask: BlockMask, first: Int, rows: Int, _ w: Workspace) {
    #if FA_AMX
    let ldT = geometry.keyBlock / 2, ldO = Workspace.paddedDim(dv), panelWords = geometry.keyBlock / 2 * microCols
    for group in stride(from: 0, to: rows, by: 16) {
        packAMXProbabilities(mask: mask, firstRow: first + group, p: w.s + group, pRows: w.pPairs + group * ldT, w)
    }
    // The probabilities are all in pRows now: the scores' memory holds each step's sums.
    let sums = w.s
    for group in stride(from: 0, to: rows, by: amxStepRows) {
        let row = first + group
        let chunks = amxChunks(mask.needed(fromRow: row, throughRow: row + amxStepRows - 1))
        for panel in 0..<(ldO / microCols) {
            amxProduct(
                a: w.pPairs + group * ldT, ldA: ldT, b: w.vPairs + panel * panelWords, ldB: microCols, chunks: chunks)
            storeAMXProduct(sums, ldC: microCols)
            for r in 0..<amxStepRows {
                let a = Vec(repeating: w.alpha[row + r]), o = w.o + (row + r) * ldO + panel * microCols
                store(muladd(load(o), a, load(sums + r * microCols)), o)
                store(muladd(load(o + lanes), a, load(sums + r * microCols + lanes)), o + lanes)
            }
        }
    }
    #else
    preconditionFailure("AMX tiles exist in the amxbf16 copy only")
    #endif
}

/// The 32-key chunks holding `keys`.
@inline(__always) private func amxChunks(_ keys: Range<Int>) -> Range<Int> {
    keys.isEmpty ? 0..<0 : (keys.lowerBound / 32)..<((keys.upperBound + 31) / 32)
}

/// Packs the `pRows` of the 16 rows from item row `firstRow` (their probabilities from `p`, key k at
/// `p + k * subBlockRows`) over the chunks of the 32 rows from their step's first row (the chunks that step
/// reads); in a chunk some row does not wholly see, P outside each row's band (and past the block's keys) is first
/// set to exactly 0.
private func packAMXProbabilities(
    mask: BlockMask, firstRow: Int, p: UnsafeMutablePointer<Float>, pRows: UnsafeMutablePointer<UInt32>, _ w: Workspace
) {
    #if FA_AMX
    let position = load(w.rowPosition + firstRow)
    let band = mask.tileBand(position, position, firstKey: 0)
    let shared = Int(band.low0.max())..<max(Int(band.low0.max()), Int(band.high0.min()))
    let stepRow = firstRow - firstRow % amxStepRows
    for chunk in amxChunks(mask.needed(fromRow: stepRow, throughRow: stepRow + amxStepRows - 1)) {
        let keys = (32 * chunk)..<(32 * chunk + 32)
        if !(shared.lowerBound <= keys.lowerBound && keys.upperBound <= shared.upperBound) {
            for k in keys {
                let key = Vec(repeating: Float(k)), x = load(p + k * subBlockRows)
                store(x.replacing(with: 0, where: (key .< band.low0) .| (key .>= band.high0)), p + k * subBlockRows)
            }
        }
        packTransposedPairs(p + keys.lowerBound * subBlockRows, ldP: subBlockRows, into: pRows + chunk * 16, ldDst: geometry.keyBlock / 2)
    }
    #endif
}

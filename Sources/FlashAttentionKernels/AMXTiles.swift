import FlashAttentionCore
import FlashAttentionShims

/// The amxbf16 copy's two products in AMX tiles (`tdpbf16ps`, float32 accumulation) for bfloat16 q, k and v, from
/// the pair layouts of PairProducts.swift. Tiles 0 and 1 accumulate (C), tile 2 is the A operand, 3 and 4 the B
/// operands; every tile is 16 rows × 64 bytes (16 words: 32 bfloat16 values, or 16 floats in C).
///
/// S = K·Qᵀ, 16 keys × 32 queries a step (`scoreTileAMX`):
///
///     A  16 key rows of `kPairs`, one 16-word chunk (32 head_dim values) each, `pairStride` words apart
///     B  16 pair rows of a `qPairs` panel (the same 32 head_dim values), queries 0–15 and 16–31
///     C  16 keys × 16 queries each, stored straight into the transposed score block, then scaled, masked and
///        folded into the running max by `storeScoreTile`, as the other copies' tiles end
///
/// O = α·O + P·V, 16 rows × 32 columns a step, over chunks of 32 keys (`accumulateAMXRows`):
///
///     A  `pRows` (over pPairs' memory): [row][key pair] words, each row's probabilities rounded to bfloat16 in key
///        order, `keyBlock / 2` words a row — the softmax leaves P as [key][row], so each 32 keys × 16 rows are
///        transposed while rounding (`fa_pack_probability_rows`)
///     B  16 key pairs of a `vPairs` panel, columns 0–15 and 16–31 (padded with zero pairs to whole chunks)
///     C  16 rows × 16 columns each, summed from zero over the block's chunks; o = α·o + C, as `Rescale` does
///
/// A tile multiplies every key of a chunk into every row, so a row must not meet a key it does not see with
/// anything but an exact 0 × a finite value: P is set to exactly 0 outside each row's band before the transpose,
/// and a key block whose values hold an infinity or NaN takes the pair path's P·V instead (`outputTilePairs`, which
/// never multiplies a key a row does not see). Each thread loads the tile configuration when it starts an item
/// (`beginAMXItem`) and releases the tiles after it.

/// Rows of an AMX tile: keys per step of the score loop, rows per step of P·V.
@inline(__always) var amxTileKeys: Int { 16 }

/// Loads this thread's tile configuration (tiles 0–4, 16 rows × 64 bytes).
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

/// Scores of 16 keys against 32 queries, transposed: `s[r * ldS + i] = scale · Σ_p k_r[p] · q_i[p]` over
/// `chunks` 16-word chunks of the pair rows, then masked with `bands[0]` (keys 0–7) and `bands[1]` (keys 8–15) when
/// `bands` is set, stored, and folded into `columnMax`.
@inline(never)
func scoreTileAMX(
    keys: UnsafePointer<UInt32>, ldK: Int, queries: UnsafePointer<UInt32>, chunks: Int, scale: Float,
    s: UnsafeMutablePointer<Float>, ldS: Int, columnMax: UnsafeMutablePointer<Float>, bands: UnsafePointer<TileBand>?
) {
    #if FA_AMX
    let bytes = MemoryLayout<UInt32>.size
    fa_amx_zero_c0()
    fa_amx_zero_c1()
    for chunk in 0..<chunks {
        let b = queries + chunk * 16 * microCols
        fa_amx_load_a(keys + chunk * 16, ldK * bytes)
        fa_amx_load_b0(b, microCols * bytes)
        fa_amx_load_b1(b + lanes, microCols * bytes)
        fa_amx_dot_c0()
        fa_amx_dot_c1()
    }
    fa_amx_store_c0(s, ldS * MemoryLayout<Float>.size)
    fa_amx_store_c1(s + lanes, ldS * MemoryLayout<Float>.size)
    let factor = Vec(repeating: scale)
    for half in 0..<2 {
        let rows = s + half * microRows * ldS
        var c = zeroAccumulators()
        for r in 0..<microRows {
            c[2 * r] = load(rows + r * ldS) * factor
            c[2 * r + 1] = load(rows + r * ldS + lanes) * factor
        }
        storeScoreTile(c, s: rows, ldS: ldS, columnMax: columnMax, band: bands.map { $0 + half })
    }
    #else
    preconditionFailure("AMX score tiles exist in the amxbf16 copy only")
    #endif
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

/// O = α·O + P·V in AMX tiles for the sub-block's rows `first ..< first + rows` (a multiple of 16), from the
/// probabilities in `w.s` ([key][row], `subBlockRows` apart) and the block's `vPairs`: each 16-row group packs its
/// `pRows` over the 32-key chunks its rows need, then every `microCols`-column panel of O takes one pair of C tiles.
func accumulateAMXRows(headDimV dv: Int, mask: BlockMask, first: Int, rows: Int, _ w: Workspace) {
    #if FA_AMX
    let ldT = geometry.keyBlock / 2, ldO = Workspace.paddedDim(dv), panelWords = geometry.keyBlock / 2 * microCols
    let bytes = MemoryLayout<UInt32>.size
    for group in stride(from: 0, to: rows, by: amxTileKeys) {
        packAMXProbabilities(mask: mask, firstRow: first + group, p: w.s + group, pRows: w.pPairs + group * ldT, w)
    }
    // The probabilities are all in pRows now: the scores' memory holds each step's C tiles.
    let sums = w.s
    for group in stride(from: 0, to: rows, by: amxTileKeys) {
        let row = first + group, pRows = w.pPairs + group * ldT
        for panel in 0..<(ldO / microCols) {
            fa_amx_zero_c0()
            fa_amx_zero_c1()
            for chunk in amxChunks(mask.needed(fromRow: row, throughRow: row + amxTileKeys - 1)) {
                let b = w.vPairs + panel * panelWords + chunk * 16 * microCols
                fa_amx_load_a(pRows + chunk * 16, ldT * bytes)
                fa_amx_load_b0(b, microCols * bytes)
                fa_amx_load_b1(b + lanes, microCols * bytes)
                fa_amx_dot_c0()
                fa_amx_dot_c1()
            }
            fa_amx_store_c0(sums, microCols * MemoryLayout<Float>.size)
            fa_amx_store_c1(sums + lanes, microCols * MemoryLayout<Float>.size)
            for r in 0..<amxTileKeys {
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
/// `p + k * subBlockRows`) over the chunks they need; in a chunk some row does not wholly see, P outside each row's
/// band (and past the block's keys) is first set to exactly 0.
private func packAMXProbabilities(
    mask: BlockMask, firstRow: Int, p: UnsafeMutablePointer<Float>, pRows: UnsafeMutablePointer<UInt32>, _ w: Workspace
) {
    #if FA_AMX
    let position = load(w.rowPosition + firstRow)
    let band = mask.tileBand(position, position, firstKey: 0)
    let shared = Int(band.low0.max())..<max(Int(band.low0.max()), Int(band.high0.min()))
    for chunk in amxChunks(mask.needed(fromRow: firstRow, throughRow: firstRow + amxTileKeys - 1)) {
        let keys = (32 * chunk)..<(32 * chunk + 32)
        if !(shared.lowerBound <= keys.lowerBound && keys.upperBound <= shared.upperBound) {
            for k in keys {
                let key = Vec(repeating: Float(k)), x = load(p + k * subBlockRows)
                store(x.replacing(with: 0, where: (key .< band.low0) .| (key .>= band.high0)), p + k * subBlockRows)
            }
        }
        fa_pack_probability_rows(p + keys.lowerBound * subBlockRows, subBlockRows, pRows + chunk * 16, geometry.keyBlock / 2)
    }
    #endif
}

import FlashAttentionCore
import FlashAttentionShims

/// The amxbf16 copy's score tiles: S = K·Qᵀ for bfloat16 q and k in AMX tiles (`tdpbf16ps`, float32 accumulation),
/// 16 keys × 32 queries at a time, from the pair layouts of PairProducts.swift:
///
///     A (tile 2)      16 key rows of `kPairs`, one 16-word chunk (32 head_dim values) each, `pairStride` words apart
///     B (tiles 3, 4)  16 pair rows of a `qPairs` panel (the same 32 head_dim values), queries 0–15 and 16–31: VNNI
///                     order as packed, `microCols` words apart
///     C (tiles 0, 1)  16 keys × 16 queries of float32 scores each, stored straight into the transposed score block
///
/// Then each half of 8 keys is scaled, masked, stored and folded into the running max by `storeScoreTile`, as the
/// other copies' tiles end. The softmax and P·V are the float32 path's. Each thread loads the tile configuration
/// when it starts an item (`beginAMXItem`) and releases the tiles after it.

/// Rows of an AMX score tile: keys per step of the score loop.
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

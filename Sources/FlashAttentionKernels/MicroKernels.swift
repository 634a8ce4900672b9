/// The two register-blocked micro-kernels of the tiled forward: S = K·Qᵀ and O = α·O + Pᵀᵀ·V.
///
/// Both hold a 6 × 16 float tile in twelve `SIMD8<Float>` accumulators (twelve ymm registers under AVX2),
/// leaving four registers for the two vector loads and the broadcast. Each step of the inner loop is two
/// vector loads, six broadcasts and twelve FMAs, so it is bound by the two FMA pipes, not by loads.

typealias Vec = SIMD8<Float>

@inline(__always) func load(_ p: UnsafePointer<Float>) -> Vec {
    UnsafeRawPointer(p).loadUnaligned(as: Vec.self)
}

@inline(__always) func load(_ p: UnsafeMutablePointer<Float>) -> Vec {
    UnsafeRawPointer(p).loadUnaligned(as: Vec.self)
}

@inline(__always) func store(_ x: Vec, _ p: UnsafeMutablePointer<Float>) {
    UnsafeMutableRawPointer(p).storeBytes(of: x, as: Vec.self)
}

/// Rows of the score tile (keys) and rows of the output tile (queries).
let microRows = 6
/// Columns of both tiles: two vectors.
let microCols = 16

/// Scores of 6 keys against 16 queries, transposed: `s[r * ldS + i] = Σ_p keys[r * ldK + p] · queries[p * 16 + i]`.
///
/// - Parameters:
///   - keys: 6 packed key rows, row r at `keys + r * ldK` (packed once per key block).
///   - queries: 16 queries, transposed and pre-scaled, `depth` × 16 floats (packed once per query block).
///   - depth: head_dim.
///   - s: the top-left score of the tile; row r (key r) starts at `s + r * ldS`.
///   - columnMax: the 16 queries' running max over the block's keys, raised to include this tile. Doing
///     this here, while the scores are still in registers, saves the softmax a full pass over the block.
@inline(never)
func scoreTile(
    keys: UnsafePointer<Float>, ldK: Int, queries: UnsafePointer<Float>, depth: Int,
    s: UnsafeMutablePointer<Float>, ldS: Int, columnMax: UnsafeMutablePointer<Float>
) {
    var c00 = Vec(), c01 = Vec(), c10 = Vec(), c11 = Vec(), c20 = Vec(), c21 = Vec()
    var c30 = Vec(), c31 = Vec(), c40 = Vec(), c41 = Vec(), c50 = Vec(), c51 = Vec()
    let k0 = keys, k1 = keys + ldK, k2 = keys + 2 * ldK, k3 = keys + 3 * ldK, k4 = keys + 4 * ldK
    let k5 = keys + 5 * ldK
    var b = queries
    for p in 0..<depth {
        let b0 = load(b), b1 = load(b + 8)
        var x = Vec(repeating: k0[p])
        c00.addProduct(x, b0); c01.addProduct(x, b1)
        x = Vec(repeating: k1[p])
        c10.addProduct(x, b0); c11.addProduct(x, b1)
        x = Vec(repeating: k2[p])
        c20.addProduct(x, b0); c21.addProduct(x, b1)
        x = Vec(repeating: k3[p])
        c30.addProduct(x, b0); c31.addProduct(x, b1)
        x = Vec(repeating: k4[p])
        c40.addProduct(x, b0); c41.addProduct(x, b1)
        x = Vec(repeating: k5[p])
        c50.addProduct(x, b0); c51.addProduct(x, b1)
        b += microCols
    }
    store(c00, s); store(c01, s + 8)
    store(c10, s + ldS); store(c11, s + ldS + 8)
    store(c20, s + 2 * ldS); store(c21, s + 2 * ldS + 8)
    store(c30, s + 3 * ldS); store(c31, s + 3 * ldS + 8)
    store(c40, s + 4 * ldS); store(c41, s + 4 * ldS + 8)
    store(c50, s + 5 * ldS); store(c51, s + 5 * ldS + 8)
    let max0 = maximum(maximum(maximum(c00, c10), maximum(c20, c30)), maximum(maximum(c40, c50), load(columnMax)))
    let max1 = maximum(maximum(maximum(c01, c11), maximum(c21, c31)), maximum(maximum(c41, c51), load(columnMax + 8)))
    store(max0, columnMax)
    store(max1, columnMax + 8)
}

/// Rescales and accumulates a 6-query × 16-column output tile: `o_r = alpha[r] · o_r + Σ_k p[k][r] · v_k`.
///
/// `p` is the transposed probability block (row k holds the probabilities of key k for consecutive
/// queries), so the six broadcasts of a step read six adjacent floats; `v` is a packed 16-column panel
/// of the key block's values. Folding the online-softmax rescale α into the tile's load costs six
/// multiplies per tile instead of a separate pass over O.
/// - Parameters:
///   - p: probabilities of the tile's first query for key 0; key k at `p + k * ldP`.
///   - v: 16 columns of V, `count` × 16 floats.
///   - count: keys to accumulate.
///   - alpha: six per-query rescale factors.
///   - o: the tile's top-left accumulator; query r at `o + r * ldO`.
@inline(never)
func outputTile(
    p: UnsafePointer<Float>, ldP: Int, v: UnsafePointer<Float>, count: Int,
    alpha: UnsafePointer<Float>, o: UnsafeMutablePointer<Float>, ldO: Int
) {
    var a = Vec(repeating: alpha[0])
    var c00 = load(o) * a, c01 = load(o + 8) * a
    a = Vec(repeating: alpha[1])
    var c10 = load(o + ldO) * a, c11 = load(o + ldO + 8) * a
    a = Vec(repeating: alpha[2])
    var c20 = load(o + 2 * ldO) * a, c21 = load(o + 2 * ldO + 8) * a
    a = Vec(repeating: alpha[3])
    var c30 = load(o + 3 * ldO) * a, c31 = load(o + 3 * ldO + 8) * a
    a = Vec(repeating: alpha[4])
    var c40 = load(o + 4 * ldO) * a, c41 = load(o + 4 * ldO + 8) * a
    a = Vec(repeating: alpha[5])
    var c50 = load(o + 5 * ldO) * a, c51 = load(o + 5 * ldO + 8) * a
    var pk = p
    var vk = v
    for _ in 0..<count {
        let b0 = load(vk), b1 = load(vk + 8)
        a = Vec(repeating: pk[0])
        c00.addProduct(a, b0); c01.addProduct(a, b1)
        a = Vec(repeating: pk[1])
        c10.addProduct(a, b0); c11.addProduct(a, b1)
        a = Vec(repeating: pk[2])
        c20.addProduct(a, b0); c21.addProduct(a, b1)
        a = Vec(repeating: pk[3])
        c30.addProduct(a, b0); c31.addProduct(a, b1)
        a = Vec(repeating: pk[4])
        c40.addProduct(a, b0); c41.addProduct(a, b1)
        a = Vec(repeating: pk[5])
        c50.addProduct(a, b0); c51.addProduct(a, b1)
        pk += ldP
        vk += microCols
    }
    store(c00, o); store(c01, o + 8)
    store(c10, o + ldO); store(c11, o + ldO + 8)
    store(c20, o + 2 * ldO); store(c21, o + 2 * ldO + 8)
    store(c30, o + 3 * ldO); store(c31, o + 3 * ldO + 8)
    store(c40, o + 4 * ldO); store(c41, o + 4 * ldO + 8)
    store(c50, o + 5 * ldO); store(c51, o + 5 * ldO + 8)
}

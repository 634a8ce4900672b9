/// The register-blocked micro-kernels of the tiled forward: S = K·Qᵀ and O = α·O + P·V for query blocks,
/// and a dot-product form of S for the few query rows of a decoding step.
///
/// The block kernels hold a 6 × 16 float tile in twelve `SIMD8<Float>` accumulators (twelve ymm registers
/// under AVX2), leaving four registers for the two vector loads and the broadcast. Each step of the inner
/// loop is two vector loads, six broadcasts and twelve FMAs, so it is bound by the two FMA pipes.

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

/// A compile-time row count for the output tile and the dot-product scores: the generic kernels are
/// specialised per count, and the work of rows beyond it is removed at compile time, so decoding with 4
/// (GQA) or 1 (MHA) query rows per kv head does not pay for 6 (measured: +5% K/V bandwidth at GQA 4).
protocol TileRows { static var count: Int { get } }
enum OneRow: TileRows { static var count: Int { 1 } }
enum TwoRows: TileRows { static var count: Int { 2 } }
enum FourRows: TileRows { static var count: Int { 4 } }
enum SixRows: TileRows { static var count: Int { 6 } }

/// Calls `body` with the smallest supported row count ≥ `rows` (at most 6).
@inline(__always)
func withTileRows<Result>(_ rows: Int, _ body: (any TileRows.Type) -> Result) -> Result {
    switch rows {
    case ...1: return body(OneRow.self)
    case 2: return body(TwoRows.self)
    case 3...4: return body(FourRows.self)
    default: return body(SixRows.self)
    }
}
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
///   - band: if set, scores of keys outside each query's visible band become −inf before the store and
///     the max (the mask of diagonal and window-edge blocks, and the padding rows of a partial key tile).
///     A pointer, so that unmasked tiles pass 8 bytes rather than copy the band through the stack.
@inline(never)
func scoreTile(
    keys: UnsafePointer<Float>, ldK: Int, queries: UnsafePointer<Float>, depth: Int,
    s: UnsafeMutablePointer<Float>, ldS: Int, columnMax: UnsafeMutablePointer<Float>, band: UnsafePointer<TileBand>?
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
    if let band = band?.pointee {
        (c00, c01) = band.apply(c00, c01, key: 0)
        (c10, c11) = band.apply(c10, c11, key: 1)
        (c20, c21) = band.apply(c20, c21, key: 2)
        (c30, c31) = band.apply(c30, c31, key: 3)
        (c40, c41) = band.apply(c40, c41, key: 4)
        (c50, c51) = band.apply(c50, c51, key: 5)
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

/// The visible keys of a score tile's 16 queries: query lane i sees the tile's keys k (0..<6, relative to
/// the tile) with low_i ≤ k < high_i.
struct TileBand {
    let low0, low1, high0, high1: Vec

    @inline(__always) func apply(_ x0: Vec, _ x1: Vec, key: Float) -> (Vec, Vec) {
        let k = Vec(repeating: key), hidden = Vec(repeating: -.infinity)
        return (x0.replacing(with: hidden, where: (k .< low0) .| (k .>= high0)),
                x1.replacing(with: hidden, where: (k .< low1) .| (k .>= high1)))
    }
}

/// Rescales and accumulates an R-query × 16-column output tile (R = 6 in query blocks):
/// `o_r = alpha[r] · o_r + Σ_k p[k][r] · v_k`.
///
/// `p` is the transposed probability block (row k holds the probabilities of key k for consecutive
/// queries), so the broadcasts of a step read adjacent floats; `v` is a packed 16-column panel of the key
/// block's values, or V itself. Folding the online-softmax rescale α into the tile's load costs one
/// multiply per row and vector instead of a separate pass over O.
/// - Parameters:
///   - p: probabilities of the tile's first query for key 0; key k at `p + k * ldP`.
///   - v: 16 columns of V row 0 stored as S; row k `ldV` elements further (a packed float32 panel, ldV 16,
///     or V itself in any storage type, converted as it is loaded).
///   - count: keys to accumulate.
///   - alpha: R per-query rescale factors.
///   - o: the tile's top-left accumulator; query r at `o + r * ldO`.
@inline(never)
func outputTile<R: TileRows, S: StorageElement>(
    _ rows: R.Type, _ storage: S.Type, p: UnsafePointer<Float>, ldP: Int, v: UnsafeRawPointer, ldV: Int, count: Int,
    alpha: UnsafePointer<Float>, o: UnsafeMutablePointer<Float>, ldO: Int
) {
    let n = R.count
    var a = Vec(repeating: alpha[0])
    var c00 = load(o) * a, c01 = load(o + 8) * a
    var c10 = Vec(), c11 = Vec(), c20 = Vec(), c21 = Vec(), c30 = Vec(), c31 = Vec()
    var c40 = Vec(), c41 = Vec(), c50 = Vec(), c51 = Vec()
    if n > 1 {
        a = Vec(repeating: alpha[1])
        (c10, c11) = (load(o + ldO) * a, load(o + ldO + 8) * a)
    }
    if n > 2 {
        a = Vec(repeating: alpha[2])
        (c20, c21) = (load(o + 2 * ldO) * a, load(o + 2 * ldO + 8) * a)
        a = Vec(repeating: alpha[3])
        (c30, c31) = (load(o + 3 * ldO) * a, load(o + 3 * ldO + 8) * a)
    }
    if n > 4 {
        a = Vec(repeating: alpha[4])
        (c40, c41) = (load(o + 4 * ldO) * a, load(o + 4 * ldO + 8) * a)
        a = Vec(repeating: alpha[5])
        (c50, c51) = (load(o + 5 * ldO) * a, load(o + 5 * ldO + 8) * a)
    }
    var pk = p
    var vk = v
    let rowBytes = ldV * S.size, half = 8 * S.size
    for _ in 0..<count {
        let b0 = S.load8(vk), b1 = S.load8(vk + half)
        a = Vec(repeating: pk[0])
        c00.addProduct(a, b0); c01.addProduct(a, b1)
        if n > 1 {
            a = Vec(repeating: pk[1])
            c10.addProduct(a, b0); c11.addProduct(a, b1)
        }
        if n > 2 {
            a = Vec(repeating: pk[2])
            c20.addProduct(a, b0); c21.addProduct(a, b1)
            a = Vec(repeating: pk[3])
            c30.addProduct(a, b0); c31.addProduct(a, b1)
        }
        if n > 4 {
            a = Vec(repeating: pk[4])
            c40.addProduct(a, b0); c41.addProduct(a, b1)
            a = Vec(repeating: pk[5])
            c50.addProduct(a, b0); c51.addProduct(a, b1)
        }
        pk += ldP
        vk += rowBytes
    }
    store(c00, o); store(c01, o + 8)
    if n > 1 { store(c10, o + ldO); store(c11, o + ldO + 8) }
    if n > 2 {
        store(c20, o + 2 * ldO); store(c21, o + 2 * ldO + 8)
        store(c30, o + 3 * ldO); store(c31, o + 3 * ldO + 8)
    }
    if n > 4 {
        store(c40, o + 4 * ldO); store(c41, o + 4 * ldO + 8)
        store(c50, o + 5 * ldO); store(c51, o + 5 * ldO + 8)
    }
}

/// Scores of R ≤ 6 query rows against `count` keys read in place, for decoding-sized work:
/// `s[k * ldS + r] = Σ_p keys[k * ldK + p] · queries[r * depth + p]`.
///
/// With so few queries the block kernel's 16-query panel would be mostly padding, and packing K would
/// copy every key for one use. Here each key row is read once from the cache, two keys at a time against
/// all R query rows (2R accumulators over head_dim, 8 lanes wide), then each accumulator is summed across
/// its lanes. An odd last key is paired with itself.
/// - Parameters:
///   - keys: key 0's row stored as S (converted as it is loaded); key k `ldK` elements further; head_dim
///     contiguous elements, a multiple of 8.
///   - queries: R rows × `depth` floats, pre-scaled.
@inline(never)
func scoreRows<R: TileRows, S: StorageElement>(
    _ rows: R.Type, _ storage: S.Type, keys: UnsafeRawPointer, ldK: Int, count: Int, queries: UnsafePointer<Float>,
    depth: Int, s: UnsafeMutablePointer<Float>, ldS: Int
) {
    let n = R.count
    let q0 = queries, q1 = queries + depth, q2 = queries + 2 * depth, q3 = queries + 3 * depth
    let q4 = queries + 4 * depth, q5 = queries + 5 * depth
    var k = 0
    while k < count {
        let a = keys + k * ldK * S.size, b = keys + min(k + 1, count - 1) * ldK * S.size
        var a0 = Vec(), a1 = Vec(), a2 = Vec(), a3 = Vec(), a4 = Vec(), a5 = Vec()
        var b0 = Vec(), b1 = Vec(), b2 = Vec(), b3 = Vec(), b4 = Vec(), b5 = Vec()
        var c = 0
        while c < depth {
            let x = S.load8(a + c * S.size), y = S.load8(b + c * S.size)
            var q = load(q0 + c)
            a0.addProduct(x, q); b0.addProduct(y, q)
            if n > 1 {
                q = load(q1 + c)
                a1.addProduct(x, q); b1.addProduct(y, q)
            }
            if n > 2 {
                q = load(q2 + c)
                a2.addProduct(x, q); b2.addProduct(y, q)
                q = load(q3 + c)
                a3.addProduct(x, q); b3.addProduct(y, q)
            }
            if n > 4 {
                q = load(q4 + c)
                a4.addProduct(x, q); b4.addProduct(y, q)
                q = load(q5 + c)
                a5.addProduct(x, q); b5.addProduct(y, q)
            }
            c += 8
        }
        let row = s + k * ldS, next = row + ldS
        row[0] = a0.sum()
        if k + 1 < count { next[0] = b0.sum() }
        if n > 1 {
            row[1] = a1.sum()
            if k + 1 < count { next[1] = b1.sum() }
        }
        if n > 2 {
            (row[2], row[3]) = (a2.sum(), a3.sum())
            if k + 1 < count { (next[2], next[3]) = (b2.sum(), b3.sum()) }
        }
        if n > 4 {
            (row[4], row[5]) = (a4.sum(), a5.sum())
            if k + 1 < count { (next[4], next[5]) = (b4.sum(), b5.sum()) }
        }
        k += 2
    }
}

/// The register-blocked micro-kernels of the tiled forward (and the backward's products): S = K·Qᵀ and
/// O = α·O + P·V for query blocks, and a dot-product form of S for the few query rows of a decoding step.
///
/// A micro-tile is `microRows` rows × `microCols` columns (two vectors): 6 × 32 floats in twelve zmm
/// registers with AVX-512, 6 × 16 in twelve ymm with AVX2, 6 × 8 in twelve xmm in the portable copy. Each
/// step of the inner loop is two vector loads, six broadcasts and twelve FMAs, so it is bound by the FMA
/// pipes. The accumulators are an `InlineArray` indexed by compile-time row numbers: once the row loops are
/// unrolled the array lives in registers (checked in the object code: no spills).

/// A compile-time row count for the micro-tiles: the generic kernels are specialised per count, and the
/// work of rows beyond it is removed at compile time, so decoding with 4 (GQA) or 1 (MHA) query rows per kv
/// head does not pay for 6 (measured: +5% K/V bandwidth at GQA 4).
protocol TileRows { static var count: Int { get } }
enum OneRow: TileRows { static var count: Int { 1 } }
enum TwoRows: TileRows { static var count: Int { 2 } }
enum FourRows: TileRows { static var count: Int { 4 } }
enum SixRows: TileRows { static var count: Int { 6 } }
enum EightRows: TileRows { static var count: Int { 8 } }

#if !FA_EMBEDDED  // Embedded Swift has no existential metatypes: Tests/arm64/EmbeddedDispatch.swift
/// Calls `body` with the smallest supported row count ≥ `rows` (at most `microRows`).
@inline(__always)
func withTileRows<Result>(_ rows: Int, _ body: (any TileRows.Type) -> Result) -> Result {
    switch rows {
    case ...1: return body(OneRow.self)
    case 2: return body(TwoRows.self)
    case 3...4: return body(FourRows.self)
    case 5...6 where microRows >= 6: return body(SixRows.self)
    default: return body(MicroRows.self)
    }
}
#endif

/// The accumulators of a micro-tile: two vectors per row, row r at 2r and 2r + 1 (room for 8 rows; the
/// entries a row count does not use are removed at compile time).
typealias TileAccumulators = InlineArray<16, Vec>

/// Zeroed accumulators. A literal, because `InlineArray(repeating:)` was compiled as a shared out-of-line
/// call that fills the array in memory before every tile (seen in the object code).
@inline(__always) func zeroAccumulators() -> TileAccumulators {
    [.zero, .zero, .zero, .zero, .zero, .zero, .zero, .zero, .zero, .zero, .zero, .zero, .zero, .zero, .zero, .zero]
}

/// Scores of `microRows` keys against `microCols` queries, transposed:
/// `s[r * ldS + i] = Σ_p keys[r * ldK + p] · queries[p * microCols + i]`.
///
/// - Parameters:
///   - keys: packed key rows, row r at `keys + r * ldK` (packed once per key block).
///   - queries: `microCols` queries, transposed and pre-scaled, `depth` × `microCols` floats (packed once
///     per query block).
///   - depth: head_dim.
///   - s: the top-left score of the tile; row r (key r) starts at `s + r * ldS`.
///   - columnMax: the queries' running max over the block's keys, raised to include this tile. Doing this
///     here, while the scores are still in registers, saves the softmax a full pass over the block.
///   - band: if set, scores of keys outside each query's visible band become −inf before the store and
///     the max (the mask of diagonal and window-edge blocks, and the padding rows of a partial key tile).
///     A pointer, so that unmasked tiles pass 8 bytes rather than copy the band through the stack.
@inline(never)
func scoreTile(
    keys: UnsafePointer<Float>, ldK: Int, queries: UnsafePointer<Float>, depth: Int,
    s: UnsafeMutablePointer<Float>, ldS: Int, columnMax: UnsafeMutablePointer<Float>, band: UnsafePointer<TileBand>?
) {
    var c = zeroAccumulators()
    var b = queries
    for p in 0..<depth {
        let b0 = load(b), b1 = load(b + lanes)
        for r in 0..<microRows {
            let x = Vec(repeating: keys[r * ldK + p])
            c[2 * r] = muladd(x, b0, c[2 * r])
            c[2 * r + 1] = muladd(x, b1, c[2 * r + 1])
        }
        b += microCols
    }
    storeScoreTile(c, s: s, ldS: ldS, columnMax: columnMax, band: band)
}

/// The end of a score tile: masks the scores of `c` with `band` (if any), stores them (row r at `s + r * ldS`)
/// and raises `columnMax` to include them.
@inline(__always)
func storeScoreTile(
    _ c: TileAccumulators, s: UnsafeMutablePointer<Float>, ldS: Int, columnMax: UnsafeMutablePointer<Float>,
    band: UnsafePointer<TileBand>?
) {
    var c = c
    if let band = band?.pointee {
        for r in 0..<microRows { (c[2 * r], c[2 * r + 1]) = band.apply(c[2 * r], c[2 * r + 1], key: Float(r)) }
    }
    var max0 = load(columnMax), max1 = load(columnMax + lanes)
    for r in 0..<microRows {
        store(c[2 * r], s + r * ldS)
        store(c[2 * r + 1], s + r * ldS + lanes)
        max0 = maximum(max0, c[2 * r])
        max1 = maximum(max1, c[2 * r + 1])
    }
    store(max0, columnMax)
    store(max1, columnMax + lanes)
}

/// The visible keys of a score tile's queries: query lane i of vector v sees the tile's keys k (relative to
/// the tile) with low_v[i] ≤ k < high_v[i].
struct TileBand {
    let low0, low1, high0, high1: Vec

    @inline(__always) func apply(_ x0: Vec, _ x1: Vec, key: Float) -> (Vec, Vec) {
        let k = Vec(repeating: key), hidden = Vec(repeating: -.infinity)
        return (x0.replacing(with: hidden, where: (k .< low0) .| (k .>= high0)),
                x1.replacing(with: hidden, where: (k .< low1) .| (k .>= high1)))
    }
}

/// Where an output tile's sums start and how they are stored: a generic parameter of `outputTile`, so
/// that each kind gets a copy of its own with no run-time test in it.
protocol TileUpdate {
    /// The sums start from zero, or else from `from`.
    static var startsFromZero: Bool { get }
    /// The store is o = α·o + sum (else o = sum).
    static var rescales: Bool { get }
}

/// o = α·o + Σ: the products are summed from zero and α·o joins them once, at the store (one FMA per row
/// and vector, no separate pass over O). This is blocked summation: its rounding error grows with the
/// square root of the block's keys rather than of every key the row has seen. Summing onto α·o from the
/// start made P·V the forward's largest float32 error, growing with seqlen_k: 1.6–1.8× PyTorch SDPA's
/// relative error at 1024–2048 keys, 0.86–0.96× this way (bench/accuracy.py, bench/RESULTS.md).
enum Rescale: TileUpdate {
    static var startsFromZero: Bool { true }
    static var rescales: Bool { true }
}

/// The pieces of block sums built in a scratch (`accumulateRows` on masked blocks): the first piece
/// (`Assign`: o = Σ), middle ones (`Accumulate`: o = from + Σ, key after key, `from` being o), and the last
/// (`Finish`: o = α·o + (from + Σ)), whose store is `Rescale`'s.
enum Assign: TileUpdate {
    static var startsFromZero: Bool { true }
    static var rescales: Bool { false }
}

/// See `Assign`.
enum Accumulate: TileUpdate {
    static var startsFromZero: Bool { false }
    static var rescales: Bool { false }
}

/// See `Assign`.
enum Finish: TileUpdate {
    static var startsFromZero: Bool { false }
    static var rescales: Bool { true }
}

/// Accumulates an R-query × `microCols`-column output tile, `o_r ← Σ_k p[k][r] · v_k` started and stored as
/// U says.
///
/// `p` is the transposed probability block (row k holds the probabilities of key k for consecutive
/// queries), so the broadcasts of a step read adjacent floats; `v` is a packed `microCols`-column panel of
/// the key block's values, or V itself.
/// - Parameters:
///   - p: probabilities of the tile's first query for key 0; key k at `p + k * ldP`.
///   - v: `microCols` columns of V row 0 stored as S; row k `ldV` elements further (a packed float32
///     panel, or V itself in any storage type, converted as it is loaded).
///   - count: keys to accumulate.
///   - from: where sums that do not start from zero start, laid out as o (read before o is written); nil
///     only for kinds that start from zero.
///   - alpha: R per-query rescale factors (read by kinds that rescale).
///   - o: the tile's top-left element; query r at `o + r * ldO`.
@inline(never)
func outputTile<R: TileRows, S: StorageElement, U: TileUpdate>(
    _ rows: R.Type, _ storage: S.Type, _ update: U.Type, p: UnsafePointer<Float>, ldP: Int, v: UnsafeRawPointer,
    ldV: Int, count: Int, from: UnsafePointer<Float>? = nil, alpha: UnsafePointer<Float>, o: UnsafeMutablePointer<Float>,
    ldO: Int
) {
    var c = startOutputTile(R.self, U.self, from: from, ldO: ldO)
    var pk = p
    var vk = v
    let rowBytes = ldV * S.size, half = lanes * S.size
    for _ in 0..<count {
        let b0 = S.loadVector(vk), b1 = S.loadVector(vk + half)
        for r in 0..<R.count {
            let a = Vec(repeating: pk[r])
            c[2 * r] = muladd(a, b0, c[2 * r])
            c[2 * r + 1] = muladd(a, b1, c[2 * r + 1])
        }
        pk += ldP
        vk += rowBytes
    }
    finishOutputTile(R.self, U.self, c, alpha: alpha, o: o, ldO: ldO)
}

/// An output tile's accumulators as U starts them: zero, or the R rows at `from` (`ldO` floats apart).
@inline(__always)
func startOutputTile<R: TileRows, U: TileUpdate>(
    _ rows: R.Type, _ update: U.Type, from: UnsafePointer<Float>?, ldO: Int
) -> TileAccumulators {
    var c = zeroAccumulators()
    if !U.startsFromZero {
        let from = from!
        for r in 0..<R.count {
            c[2 * r] = load(from + r * ldO)
            c[2 * r + 1] = load(from + r * ldO + lanes)
        }
    }
    return c
}

/// Stores an output tile's sums to the R rows at `o` as U says (o = α·o + sum, or o = sum).
@inline(__always)
func finishOutputTile<R: TileRows, U: TileUpdate>(
    _ rows: R.Type, _ update: U.Type, _ c: TileAccumulators, alpha: UnsafePointer<Float>, o: UnsafeMutablePointer<Float>,
    ldO: Int
) {
    var c = c
    for r in 0..<R.count {
        if U.rescales {
            let a = Vec(repeating: alpha[r])
            c[2 * r] = muladd(load(o + r * ldO), a, c[2 * r])
            c[2 * r + 1] = muladd(load(o + r * ldO + lanes), a, c[2 * r + 1])
        }
        store(c[2 * r], o + r * ldO)
        store(c[2 * r + 1], o + r * ldO + lanes)
    }
}

/// Scores of R ≤ `microRows` query rows against `count` keys read in place, for decoding-sized work:
/// `s[k * ldS + r] = Σ_p keys[k * ldK + p] · queries[r * depth + p]`.
///
/// With so few queries the block kernel's query panel would be mostly padding, and packing K would copy
/// every key for one use. Here each key row is read once from the cache, two keys at a time against all R
/// query rows (2R accumulators over head_dim, a vector wide), then each accumulator is summed across its
/// lanes. An odd last key is paired with itself.
/// - Parameters:
///   - keys: key 0's row stored as S (converted as it is loaded); key k `ldK` elements further; head_dim
///     contiguous elements, a multiple of the vector width.
///   - queries: R rows × `depth` floats, pre-scaled.
@inline(never)
func scoreRows<R: TileRows, S: StorageElement>(
    _ rows: R.Type, _ storage: S.Type, keys: UnsafeRawPointer, ldK: Int, count: Int, queries: UnsafePointer<Float>,
    depth: Int, s: UnsafeMutablePointer<Float>, ldS: Int
) {
    var k = 0
    while k < count {
        let a = keys + k * ldK * S.size, b = keys + min(k + 1, count - 1) * ldK * S.size
        // Row r's sums against key k at 2r, against key k + 1 at 2r + 1.
        var c = zeroAccumulators()
        var column = 0
        while column < depth {
            let x = S.loadVector(a + column * S.size), y = S.loadVector(b + column * S.size)
            for r in 0..<R.count {
                let q = load(queries + r * depth + column)
                c[2 * r] = muladd(x, q, c[2 * r])
                c[2 * r + 1] = muladd(y, q, c[2 * r + 1])
            }
            column += lanes
        }
        let sums = laneSums(c, count: 2 * R.count)
        let row = s + k * ldS
        for r in 0..<R.count { row[r] = sums[2 * r / lanes][2 * r % lanes] }
        if k + 1 < count {
            for r in 0..<R.count { row[ldS + r] = sums[(2 * r + 1) / lanes][(2 * r + 1) % lanes] }
        }
        k += 2
    }
}

/// Folds the lane sums of accumulators 0..<n (the rest must be zero) into whole vectors: sum i ends in lane
/// i % `lanes` of vector i / `lanes`.
///
/// A transpose-and-add tree: each level folds pairs of vectors (`foldPairs`), so n vectors of L lanes take
/// about 3n operations in all, where reducing each alone takes 2·log2(L) with a longer dependency chain
/// (and the stdlib's `sum()` adds lanes one at a time). Every count here is a compile-time constant, so the
/// levels unroll and the vectors stay in registers.
@inline(__always)
func laneSums(_ c: TileAccumulators, count n: Int) -> TileAccumulators {
    var v = c
    var vectors = n <= 1 ? 1 : n <= 2 ? 2 : n <= 4 ? 4 : n <= 8 ? 8 : 16  // pairs need a power of two
    for _ in 0..<Vec.scalarCount.trailingZeroBitCount {
        if vectors > 1 {
            for i in 0..<8 where i < vectors / 2 { v[i] = foldPairs(v[2 * i], v[2 * i + 1]) }
            vectors /= 2
        } else {
            v[0] = foldPairs(v[0], v[0])
        }
    }
    return v
}

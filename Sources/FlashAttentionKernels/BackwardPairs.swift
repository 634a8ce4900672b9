import FlashAttentionCore

/// The backward pass's five products from bfloat16 pairs, for bfloat16 q, k, v and dout on a copy with bfloat16
/// products (`hasPairProducts`: `dotPairs` micro-tiles on avx512bf16, AMX tiles on amxbf16), as FlashAttention-2
/// does on GPUs: S = Q·Kᵀ and dP = dO·Vᵀ from the inputs as given, accumulated in float32; P and dS in float32
/// (`BackwardScores`, as on every path); then P and dS rounded to bfloat16 for dV += Pᵀ·dO, dK += dSᵀ·Q and
/// dQ = dS·K, accumulated in float32. Every product is a sum of 32 × 32 blocks, c (+)= A·B (`pairBlockProduct`),
/// A as rows of words (two bfloat16 values each: elements 2j and 2j + 1 of a row in word j) and B as rows of
/// words pairing two rows of the other matrix (VNNI order), so that a word of A meets a word of B in one
/// `vdpbf16ps` lane or one `tdpbf16ps` step. The layouts, over the float32 path's scratch (Backward.swift):
///
///     kT     K's pair rows transposed: [pair p][key] = (k_key[2p], k_key[2p+1]), `keyBlock` words a row  (B of S)
///     vT     V's the same                                                                                 (B of dP)
///     kRows  K's row pairs: [key pair j][c] = (k_2j[c], k_2j+1[c]), `paddedDim(head_dim)` words a row     (B of dQ)
///     q      Q's pair rows ([query][pair], `pairStride` words; A of S), then Q's row pairs                (B of dK)
///     dO     dout's, the same                                                                    (A of dP, B of dV)
///     dST    Pᵀ's then dSᵀ's pair rows: [key][query pair], `backwardQueryBlock / 2` words a row   (A of dV and dK)
///     p      after Pᵀ is packed: dS's pair rows, [query][key pair], `keyBlock / 2` words a row         (A of dQ)
///
/// Rows and keys are padded with zeros to whole 32-row blocks (every operand's padding is zero, and so are P and
/// dS there). S is the forward's: the same pair sums in the same order, times the scale in float32, so P is
/// recomputed from the forward's own scores; the queries enter unscaled, so dK is scaled when it is stored.

/// Whether the backward of `problem` takes the pair products: bfloat16 q, k, v and dout on a copy that has them.
@inline(__always)
func backwardPairProducts(_ problem: BackwardProblem) -> Bool {
    blockProducts(problem.forward) != .float32 && problem.dout.element == .bfloat16
}

/// c = A·B (`Assign`) or c += A·B (`Accumulate`) for 32 rows × 32 columns: A's rows of words `ldA` apart, B's word
/// rows `ldB` apart, over `words` words (a multiple of 16); c's rows `ldC` floats apart. In AMX tiles on the
/// amxbf16 copy, else `microRows` rows at a time with `dotPairs` (32 rows are four of the avx512 copies' tiles).
@inline(__always)
func pairBlockProduct<U: TileUpdate>(
    _ update: U.Type, a: UnsafePointer<UInt32>, ldA: Int, b: UnsafePointer<UInt32>, ldB: Int, words: Int,
    c: UnsafeMutablePointer<Float>, ldC: Int
) {
    if hasAMXTiles {
        return amxBlockProduct(a: a, ldA: ldA, b: b, ldB: ldB, words: words, c: c, ldC: ldC, accumulate: !U.startsFromZero)
    }
    for r in stride(from: 0, to: amxStepRows, by: microRows) {
        pairTileProduct(U.self, a: a + r * ldA, ldA: ldA, b: b, ldB: ldB, words: words, c: c + r * ldC, ldC: ldC)
    }
}

@inline(__always) private func words(_ p: UnsafeMutablePointer<Float>) -> UnsafeMutablePointer<UInt32> {
    UnsafeMutableRawPointer(p).assumingMemoryBound(to: UInt32.self)
}

/// Packs keys [first, first + count) of a key block for the pair products: K and V as transposed pair rows (`kT`,
/// `vT`) and K as row pairs (`kRows`), layouts above, zero past the keys.
func packKeyBlockPairs(
    _ f: AttentionProblem, _ s: Sequence, head: Int, first: Int, count: Int, keyBlock kb: Int,
    into target: (kT: UnsafeMutablePointer<Float>, vT: UnsafeMutablePointer<Float>, kRows: UnsafeMutablePointer<Float>)
) {
    func transposedPairRows(_ tensor: TensorView, depth: Int, into panel: UnsafeMutablePointer<UInt32>) {
        panel.update(repeating: 0, count: pairStride(depth) * kb)
        for key in 0..<count {
            let row = rowAddress(tensor, s, head: head, row: first + key, keys: true)
            for j in 0..<pairCount(depth) { panel[j * kb + key] = pairWord(row, 2 * j, count: depth) }
        }
    }
    transposedPairRows(f.k, depth: f.headDim, into: words(target.kT))
    transposedPairRows(f.v, depth: f.headDimV, into: words(target.vT))
    let d = f.headDim, columns = Workspace.paddedDim(d), rowPairs = words(target.kRows)
    for j in 0..<(kb / 2) {
        let even = 2 * j < count ? rowAddress(f.k, s, head: head, row: first + 2 * j, keys: true) : nil
        let odd = 2 * j + 1 < count ? rowAddress(f.k, s, head: head, row: first + 2 * j + 1, keys: true) : nil
        storeRowPair(even, odd, depth: d, into: rowPairs + j * columns)
    }
}

/// Interleaves two bfloat16 rows into a row of `paddedDim(depth)` words (`even` nil: zeros).
@inline(__always)
private func storeRowPair(_ even: UnsafeRawPointer?, _ odd: UnsafeRawPointer?, depth: Int, into target: UnsafeMutablePointer<UInt32>) {
    guard let even else { return target.update(repeating: 0, count: Workspace.paddedDim(depth)) }
    packValuePair(even, odd, headDim: depth, into: target, panelWords: microCols)
}

extension BackwardTiles {
    /// S = Q·Kᵀ (then × scale) and dP = dO·Vᵀ from pairs, [query][key], after packing the block's q and dout rows.
    func pairScores(padded: Int) {
        let f = problem.forward
        let (kT, vT, _, _, _, q, dO, p, dS, _, _, _, _, _, _) = scratch
        let kb = problem.keyBlock, keys = panels * microCols
        packQueryPairs(f.q, depth: f.headDim, into: words(q), padded: padded)
        packQueryPairs(problem.dout, depth: f.headDimV, into: words(dO), padded: padded)
        func product(_ a: UnsafeMutablePointer<Float>, _ b: UnsafeMutablePointer<Float>, depth: Int, into c: UnsafeMutablePointer<Float>) {
            let ldA = pairStride(depth)
            for row in stride(from: 0, to: padded, by: amxStepRows) {
                for key in stride(from: 0, to: keys, by: microCols) {
                    pairBlockProduct(
                        Assign.self, a: words(a) + row * ldA, ldA: ldA, b: words(b) + key, ldB: kb, words: ldA,
                        c: c + row * kb + key, ldC: kb)
                }
            }
        }
        product(q, kT, depth: f.headDim, into: p)
        product(dO, vT, depth: f.headDimV, into: dS)
        let scale = Vec(repeating: f.scale)
        for r in 0..<padded {
            for k in stride(from: 0, to: keys, by: lanes) { store(load(p + r * kb + k) * scale, p + r * kb + k) }
        }
    }

    /// Packs rows [firstQuery, firstQuery + rows) of query-shaped `tensor` twice, zero rows up to `padded`: as pair
    /// rows (`pairStride(depth)` words each) and after `backwardQueryBlock` of them as row pairs
    /// (`paddedDim(depth)` words each).
    private func packQueryPairs(_ tensor: TensorView, depth: Int, into target: UnsafeMutablePointer<UInt32>, padded: Int) {
        let stride = pairStride(depth), columns = Workspace.paddedDim(depth)
        let address = { (r: Int) in r < rows ? rowAddress(tensor, sequence, head: head, row: firstQuery + r, keys: false) : nil }
        for r in 0..<padded {
            if let row = address(r) { storePairRow(row, depth: depth, into: target + r * stride) } else {
                (target + r * stride).update(repeating: 0, count: stride)
            }
        }
        let rowPairs = target + backwardQueryBlock * stride
        for j in 0..<(padded / 2) { storeRowPair(address(2 * j), address(2 * j + 1), depth: depth, into: rowPairs + j * columns) }
    }

    /// dV += Pᵀ·dO and dK += dSᵀ·Q over the block's queries, dQ = dS·K over its keys, from P and dS rounded to
    /// bfloat16 pairs.
    func pairGradientProducts(padded: Int) {
        let f = problem.forward
        let (_, _, kRows, dK, dV, q, dO, p, dS, dST, dQ, _, _, _, _) = scratch
        let kb = problem.keyBlock, qb = backwardQueryBlock, ld = backwardRowStride(f), keys = panels * microCols
        let pT = words(dST), dSPairsT = pT + kb * qb / 2, dSPairs = words(p)
        for row in stride(from: 0, to: padded, by: amxStepRows) {
            for key in stride(from: 0, to: keys, by: 16) {
                packTransposedPairs(p + row * kb + key, ldP: kb, into: pT + key * qb / 2 + row / 2, ldDst: qb / 2)
                packTransposedPairs(dS + row * kb + key, ldP: kb, into: dSPairsT + key * qb / 2 + row / 2, ldDst: qb / 2)
            }
        }
        // P is in its transposed pairs now: its memory takes dS's pairs.
        for r in 0..<padded {
            for k in stride(from: 0, to: keys, by: 2 * lanes) {
                let x = roundAdjacentPairs(load(dS + r * kb + k), load(dS + r * kb + k + lanes))
                UnsafeMutableRawPointer(dSPairs + r * kb / 2 + k / 2).storeBytes(of: x, as: VecBits.self)
            }
        }
        func keyProduct(_ a: UnsafeMutablePointer<UInt32>, _ b: UnsafeMutablePointer<Float>, depth: Int, into c: UnsafeMutablePointer<Float>) {
            let rowPairs = words(b) + qb * pairStride(depth), columns = Workspace.paddedDim(depth)
            for key in stride(from: 0, to: keys, by: amxStepRows) {
                for column in stride(from: 0, to: columns, by: microCols) {
                    pairBlockProduct(
                        Accumulate.self, a: a + key * qb / 2, ldA: qb / 2, b: rowPairs + column, ldB: columns,
                        words: padded / 2, c: c + key * ld + column, ldC: ld)
                }
            }
        }
        keyProduct(pT, dO, depth: f.headDimV, into: dV)
        keyProduct(dSPairsT, q, depth: f.headDim, into: dK)
        let columns = Workspace.paddedDim(f.headDim)
        for row in stride(from: 0, to: padded, by: amxStepRows) {
            for column in stride(from: 0, to: columns, by: microCols) {
                pairBlockProduct(
                    Assign.self, a: dSPairs + row * kb / 2, ldA: kb / 2, b: words(kRows) + column, ldB: columns,
                    words: keys / 2, c: dQ + row * ld + column, ldC: ld)
            }
        }
    }
}

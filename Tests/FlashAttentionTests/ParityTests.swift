import CFlashAttention
import FlashAttention
import FlashAttentionCore
import Testing

/// Parity of the library against the naive float64 reference, over shapes that hit every tail: lengths that
/// are not multiples of any block size, seqlen 1, head_dim 1 and odd sizes, seqlen_q ≠ seqlen_k, GQA, strided
/// views, and causal masks that leave rows with no visible key.

let seqlens = [1, 7, 64, 113, 203]
let headDims = [1, 3, 40, 59, 64, 111, 128, 256]

/// Every seqlen × head_dim pair (GQA 2:1, causal on every other pair, seqlen_q ≠ seqlen_k on a third).
let shapeGrid: [Problem] = seqlens.enumerated().flatMap { i, s in
    headDims.enumerated().map { j, d in
        Problem(
            batch: 1, seqlenQ: s, seqlenK: (i + j) % 3 == 0 ? s + 37 : s, headsQ: 2, headsKV: 1, headDim: d,
            causal: (i + j) % 2 == 1, seed: UInt64(100 * i + j))
    }
}

let specialProblems: [Problem] = [
    // Long sequences: several key and query blocks, with and without causal masking.
    Problem(batch: 1, seqlenQ: 1000, seqlenK: 1000, headsQ: 1, headsKV: 1, headDim: 64, causal: true, seed: 2),
    Problem(batch: 1, seqlenQ: 1000, seqlenK: 1000, headsQ: 1, headsKV: 1, headDim: 128, seed: 3),
    Problem(batch: 1, seqlenQ: 1000, seqlenK: 1000, headsQ: 1, headsKV: 1, headDim: 256, causal: true, seed: 3),
    Problem(batch: 1, seqlenQ: 333, seqlenK: 1000, headsQ: 2, headsKV: 2, headDim: 59, causal: true, seed: 4),
    // GQA / MQA ratios 1, 2, 4, 8.
    Problem(batch: 2, seqlenQ: 113, seqlenK: 203, headsQ: 8, headsKV: 8, headDim: 64, causal: true, seed: 5),
    Problem(batch: 2, seqlenQ: 113, seqlenK: 203, headsQ: 8, headsKV: 4, headDim: 64, seed: 6),
    Problem(batch: 2, seqlenQ: 113, seqlenK: 203, headsQ: 8, headsKV: 2, headDim: 40, causal: true, seed: 7),
    Problem(batch: 2, seqlenQ: 113, seqlenK: 203, headsQ: 8, headsKV: 1, headDim: 111, seed: 8),
    // Causal with seqlen_q above seqlen_k: the first rows see no key at all (out 0, LSE −inf).
    Problem(batch: 1, seqlenQ: 203, seqlenK: 113, headsQ: 2, headsKV: 1, headDim: 64, causal: true, seed: 9),
    Problem(batch: 1, seqlenQ: 300, seqlenK: 1, headsQ: 1, headsKV: 1, headDim: 16, causal: true, seed: 10),
    Problem(batch: 1, seqlenQ: 1, seqlenK: 300, headsQ: 1, headsKV: 1, headDim: 16, causal: true, seed: 11),
    // Decode: one query against a long key sequence.
    Problem(batch: 3, seqlenQ: 1, seqlenK: 1000, headsQ: 8, headsKV: 2, headDim: 128, causal: true, seed: 12),
    // Strided views: [b, h, s, d] memory, and rows/batches with spare room between them.
    Problem(batch: 2, seqlenQ: 113, seqlenK: 203, headsQ: 4, headsKV: 2, headDim: 59, causal: true, layout: .bhsd, seed: 13),
    Problem(batch: 2, seqlenQ: 203, seqlenK: 113, headsQ: 4, headsKV: 4, headDim: 64, layout: .padded, seed: 14),
    // Explicit scales, including a negative one.
    Problem(batch: 1, seqlenQ: 64, seqlenK: 97, headsQ: 2, headsKV: 2, headDim: 32, scale: 0.5, seed: 15),
    Problem(batch: 1, seqlenQ: 64, seqlenK: 97, headsQ: 2, headsKV: 2, headDim: 32, causal: true, scale: -0.3, seed: 16),
]

@Test("tiled kernel matches the float64 reference", arguments: tiledPaths, shapeGrid + specialProblems)
func tiledParity(_ isa: KernelISA, _ problem: Problem) {
    onPath(isa) {
        let (q, k, v) = problem.inputs()
        let output = runLibrary(problem, q: q, k: k, v: v)
        #expect(output.status == FA_OK, "\(output.message)")
        let errors = Errors(problem, output: output, reference: referenceAttention(problem, q: q, k: k, v: v))
        #expect(errors.withinBounds, "\(errors)")
    }
}

/// The reference loop, chosen by the algorithm field (on the default path) and by the reference path itself.
@Test("reference path matches the float64 reference", arguments: [specialProblems[0], specialProblems[6], specialProblems[8], specialProblems[12]])
func referencePathParity(_ problem: Problem) {
    let (q, k, v) = problem.inputs()
    let reference = referenceAttention(problem, q: q, k: k, v: v)
    let byAlgorithm = runLibrary(problem, q: q, k: k, v: v, algorithm: FA_ALGORITHM_REFERENCE)
    let byPath = onPath(.reference) { runLibrary(problem, q: q, k: k, v: v) }
    for output in [byAlgorithm, byPath] {
        #expect(output.status == FA_OK, "\(output.message)")
        let errors = Errors(problem, output: output, reference: reference)
        #expect(errors.withinBounds, "\(errors)")
    }
    #expect(byPath.out.storage.map(\.bitPattern) == byAlgorithm.out.storage.map(\.bitPattern))
}

@Test("results are bitwise identical for every thread count", arguments: tiledPaths, [
    Problem(batch: 2, seqlenQ: 700, seqlenK: 650, headsQ: 4, headsKV: 2, headDim: 64, causal: true, seed: 21),
    Problem(batch: 1, seqlenQ: 1000, seqlenK: 1000, headsQ: 3, headsKV: 1, headDim: 40, seed: 22),
])
func threadInvariance(_ isa: KernelISA, _ problem: Problem) {
    onPath(isa) {
        let (q, k, v) = problem.inputs()
        let single = runLibrary(problem, q: q, k: k, v: v, threads: 1)
        #expect(single.status == FA_OK)
        for threads: Int32 in [2, 3, 8, 0] {
            let other = runLibrary(problem, q: q, k: k, v: v, threads: threads)
            #expect(other.status == FA_OK)
            #expect(other.out.storage.map(\.bitPattern) == single.out.storage.map(\.bitPattern), "threads \(threads)")
            #expect(other.lse.map(\.bitPattern) == single.lse.map(\.bitPattern), "threads \(threads)")
        }
    }
}

@Test("rowsThatSeeNoKeyGiveZeroAndNegativeInfinity", arguments: tiledPaths)
func rowsThatSeeNoKeyGiveZeroAndNegativeInfinity(_ isa: KernelISA) {
    onPath(isa) {
        // The header's example: seqlen_q 5, seqlen_k 2, causal: rows 0-2 see nothing, row 3 sees k0, row 4 both.
        let problem = Problem(batch: 1, seqlenQ: 5, seqlenK: 2, headsQ: 1, headsKV: 1, headDim: 4, causal: true)
        let (q, k, v) = problem.inputs()
        let output = runLibrary(problem, q: q, k: k, v: v)
        #expect(output.status == FA_OK)
        for i in 0..<3 {
            #expect(output.lse[i] == -.infinity)
            for c in 0..<4 { #expect(output.out[0, i, 0, c] == 0) }
        }
        // Row 3 sees only key 0, so its output is exactly v0 and its LSE is that one scaled score.
        for c in 0..<4 { #expect(abs(output.out[0, 3, 0, c] - v[0, 0, 0, c]) <= 1e-6) }
        var dot: Float = 0
        for c in 0..<4 { dot += q[0, 3, 0, c] * k[0, 0, 0, c] }
        #expect(abs(output.lse[3] - dot / 2) <= 1e-5)
    }
}

@Test("emptyKeySequenceGivesZeroAndNegativeInfinity", arguments: tiledPaths)
func emptyKeySequenceGivesZeroAndNegativeInfinity(_ isa: KernelISA) {
    onPath(isa) {
        let problem = Problem(batch: 2, seqlenQ: 9, seqlenK: 0, headsQ: 2, headsKV: 1, headDim: 5)
        let (q, k, v) = problem.inputs()
        let output = runLibrary(problem, q: q, k: k, v: v)
        #expect(output.status == FA_OK, "\(output.message)")
        for b in 0..<2 { for i in 0..<9 { for h in 0..<2 { for c in 0..<5 { #expect(output.out[b, i, h, c] == 0) } } } }
        #expect(output.lse.allSatisfy { $0 == -.infinity })
    }
}

@Test("inPlaceOutputOverQueries", arguments: tiledPaths)
func inPlaceOutputOverQueries(_ isa: KernelISA) {
    onPath(isa) {
        let problem = Problem(batch: 1, seqlenQ: 300, seqlenK: 300, headsQ: 2, headsKV: 2, headDim: 64, causal: true, seed: 31)
        let (q, k, v) = problem.inputs()
        let expected = runLibrary(problem, q: q, k: k, v: v)
        var inPlace = q
        let status = inPlace.storage.withUnsafeMutableBufferPointer { qp in
            k.storage.withUnsafeBufferPointer { kp in
                v.storage.withUnsafeBufferPointer { vp in
                    var params = flash_attention_params()
                    _ = flash_attention_params_init(&params, MemoryLayout<flash_attention_params>.size)
                    (params.batch, params.seqlen_q, params.seqlen_k) = (1, 300, 300)
                    (params.heads_q, params.heads_kv, params.head_dim, params.causal) = (2, 2, 64, 1)
                    let (bs, rs, hs) = (Int64(q.batchStride), Int64(q.rowStride), Int64(q.headStride))
                    params.q = UnsafeRawPointer(qp.baseAddress)
                    (params.q_batch_stride, params.q_row_stride, params.q_head_stride) = (bs, rs, hs)
                    params.out = UnsafeMutableRawPointer(qp.baseAddress)
                    (params.out_batch_stride, params.out_row_stride, params.out_head_stride) = (bs, rs, hs)
                    params.k = UnsafeRawPointer(kp.baseAddress)
                    (params.k_batch_stride, params.k_row_stride, params.k_head_stride) = (bs, rs, hs)
                    params.v = UnsafeRawPointer(vp.baseAddress)
                    (params.v_batch_stride, params.v_row_stride, params.v_head_stride) = (bs, rs, hs)
                    return flash_attention_forward(&params)
                }
            }
        }
        #expect(status == FA_OK)
        #expect(inPlace.storage.map(\.bitPattern) == expected.out.storage.map(\.bitPattern))
    }
}

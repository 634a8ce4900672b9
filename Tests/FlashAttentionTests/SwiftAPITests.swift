import CFlashAttention
import FlashAttention
import FlashAttentionCore
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#elseif canImport(Musl)
import Musl
#endif
import Testing

/// The Swift API (SwiftAPI.swift) against a naive float64 loop written here with every option, and its
/// errors: each rejection is a thrown `AttentionError` of the right case carrying the library's message, and
/// leaves inout arguments unchanged. The kernels themselves are covered by the C-level suites; these tests
/// check that the Swift layer maps shapes, options, LSE layout and errors onto the C API correctly.

/// One Swift API problem; `options` are applied as given.
struct SwiftCase: CustomTestStringConvertible, Sendable {
    var name: String
    var batch = 1, seqlenQ = 1, seqlenK = 1, headsQ = 1, headsKV = 1, headDim = 1
    var options = AttentionOptions()
    var seed: UInt64 = 1
    /// v's head size when it differs from q's and k's (multi-head latent attention).
    var headDimV: Int? = nil
    var testDescription: String {
        "b\(batch)-h\(headsQ)/\(headsKV)-s\(seqlenQ)x\(seqlenK)-d\(headDim)\(headDimV.map { "/\($0)" } ?? "")-\(name)"
    }

    func inputs() -> (q: AttentionTensor, k: AttentionTensor, v: AttentionTensor) {
        var rng = SeededRandom(seed: seed)
        return (randomTensor(batch, seqlenQ, headsQ, headDim, &rng), randomTensor(batch, seqlenK, headsKV, headDim, &rng),
                randomTensor(batch, seqlenK, headsKV, headDimV ?? headDim, &rng))
    }
}

func randomTensor(_ b: Int, _ s: Int, _ h: Int, _ d: Int, _ rng: inout SeededRandom) -> AttentionTensor {
    var t = AttentionTensor(batch: b, seqlen: s, heads: h, headDim: d)
    for i in 0..<b { for j in 0..<s { for k in 0..<h { for c in 0..<d { t[i, j, k, c] = rng.normal() } } } }
    return t
}

/// Naive float64 attention with every option as the header defines it: scores scaled, softcapped, ALiBi
/// added, masked by causal and window around the bottom-right diagonal, sinks joining the denominator.
/// Returns out [b][s][h][dv] and lse [b][h][s].
func naiveAttention(
    q: AttentionTensor, k: AttentionTensor, v: AttentionTensor, options o: AttentionOptions
) -> (out: [Double], lse: [Double]) {
    let (b, sq, sk, hq, d, dv) = (q.batch, q.seqlen, k.seqlen, q.heads, q.headDim, v.headDim)
    let group = hq / k.heads
    let scale = o.scale.map(Double.init) ?? 1 / Double(d).squareRoot()
    var out = [Double](repeating: 0, count: b * sq * hq * dv)
    var lse = [Double](repeating: -.infinity, count: b * hq * sq)
    for bi in 0..<b { for h in 0..<hq { for i in 0..<sq {
        let diagonal = i + sk - sq
        var scores: [(j: Int, s: Double)] = []
        for j in 0..<sk {
            if o.causal && j > diagonal { continue }
            if let left = o.windowLeft, j < diagonal - left { continue }
            if let right = o.windowRight, j > diagonal + right { continue }
            var s = 0.0
            for c in 0..<d { s += Double(q[bi, i, h, c]) * Double(k[bi, j, h / group, c]) }
            s *= scale
            if let cap = o.softcap, cap > 0 { s = Double(cap) * tanh(s / Double(cap)) }
            if let slopes = o.alibiSlopes {
                let slope = Double(slopes.count == hq ? slopes[h] : slopes[bi * hq + h])
                s -= slope * Double(abs(diagonal - j))
            }
            if let mask = o.mask {
                let entry = (mask.batch == 1 ? 0 : bi) * mask.heads + (mask.heads == 1 ? 0 : h)
                s += Double(mask.values[(entry * mask.rows + i) * mask.cols + j])
            }
            scores.append((j, s))
        }
        let sink = o.sinks.map { Double($0[h]) }
        let m = max(scores.map(\.s).max() ?? -.infinity, sink ?? -.infinity)
        if m == -.infinity { continue }
        let weights = scores.map { exp($0.s - m) }
        let total = weights.reduce(sink.map { exp($0 - m) } ?? 0, +)
        for c in 0..<dv {
            var acc = 0.0
            for (w, key) in zip(weights, scores) { acc += w * Double(v[bi, key.j, h / group, c]) }
            out[((bi * sq + i) * hq + h) * dv + c] = acc / total
        }
        lse[(bi * hq + h) * sq + i] = m + log(total)
    } } }
    return (out, lse)
}

/// Max |x − ref| over out, and over the LSE where finite; LSE infinities must agree exactly.
func maxErrors(_ result: AttentionResult, _ reference: (out: [Double], lse: [Double])) -> (out: Double, lse: Double) {
    var outError = 0.0, lseError = 0.0
    for (x, r) in zip(result.out.values, reference.out) { outError = max(outError, x.isFinite ? abs(Double(x) - r) : .infinity) }
    for (x, r) in zip(result.lse, reference.lse) {
        lseError = max(lseError, r == -.infinity ? (x == -.infinity ? 0 : .infinity) : abs(Double(x) - r))
    }
    return (outError, lseError)
}

let swiftCases: [SwiftCase] = [
    SwiftCase(name: "plain", batch: 2, seqlenQ: 37, seqlenK: 53, headsQ: 2, headsKV: 2, headDim: 40, seed: 501),
    SwiftCase(name: "causal", batch: 1, seqlenQ: 29, seqlenK: 71, headsQ: 4, headsKV: 2, headDim: 59,
              options: .init(causal: true), seed: 502),
    // The first 40 rows see no key: out 0 and LSE −inf.
    SwiftCase(name: "causal-empty-rows", batch: 1, seqlenQ: 70, seqlenK: 30, headsQ: 2, headsKV: 1, headDim: 16,
              options: .init(causal: true), seed: 503),
    SwiftCase(name: "gqa-scale", batch: 2, seqlenQ: 17, seqlenK: 33, headsQ: 8, headsKV: 2, headDim: 8,
              options: .init(scale: -0.3), seed: 504),
    SwiftCase(name: "window", batch: 1, seqlenQ: 45, seqlenK: 45, headsQ: 2, headsKV: 2, headDim: 24,
              options: .init(windowLeft: 5, windowRight: 2), seed: 505),
    SwiftCase(name: "softcap", batch: 1, seqlenQ: 20, seqlenK: 40, headsQ: 2, headsKV: 2, headDim: 32,
              options: .init(scale: 2, softcap: 3), seed: 506),
    SwiftCase(name: "alibi-shared", batch: 2, seqlenQ: 19, seqlenK: 23, headsQ: 3, headsKV: 1, headDim: 16,
              options: .init(causal: true, alibiSlopes: [0.5, 0.25, 0.125]), seed: 507),
    SwiftCase(name: "alibi-per-batch", batch: 2, seqlenQ: 19, seqlenK: 23, headsQ: 2, headsKV: 2, headDim: 16,
              options: .init(alibiSlopes: [0.5, 0.25, 0.1, 0.05]), seed: 508),
    SwiftCase(name: "sinks", batch: 1, seqlenQ: 40, seqlenK: 20, headsQ: 2, headsKV: 2, headDim: 16,
              options: .init(causal: true, sinks: [0.7, -1.5]), seed: 509),
    SwiftCase(name: "reference-1-thread", batch: 1, seqlenQ: 13, seqlenK: 9, headsQ: 2, headsKV: 2, headDim: 3,
              options: .init(numThreads: 1, algorithm: .reference), seed: 510),
    SwiftCase(name: "mask-bool-shared", batch: 2, seqlenQ: 21, seqlenK: 34, headsQ: 4, headsKV: 2, headDim: 16,
              options: .init(causal: true, mask: randomMask(batch: 1, heads: 1, rows: 21, cols: 34, seed: 511)), seed: 511),
    SwiftCase(name: "mask-additive-per-head", batch: 2, seqlenQ: 9, seqlenK: 40, headsQ: 2, headsKV: 1, headDim: 24,
              options: .init(softcap: 4, mask: randomMask(batch: 2, heads: 2, rows: 9, cols: 40, seed: 512, additive: true)),
              seed: 512),
    SwiftCase(name: "value-heads-wider", batch: 2, seqlenQ: 23, seqlenK: 41, headsQ: 4, headsKV: 2, headDim: 24,
              options: .init(causal: true), seed: 513, headDimV: 40),
    SwiftCase(name: "value-heads-narrower", batch: 1, seqlenQ: 5, seqlenK: 70, headsQ: 8, headsKV: 1, headDim: 48,
              options: .init(sinks: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]), seed: 514, headDimV: 13),
]

/// A mask with about 30% of its entries hidden (−∞); `additive` gives the others random biases.
func randomMask(batch: Int, heads: Int, rows: Int, cols: Int, seed: UInt64, additive: Bool = false) -> ScoreMask {
    var rng = SeededRandom(seed: seed)
    let values = (0..<(batch * heads * rows * cols)).map { _ in
        rng.uniform() < 0.3 ? -Float.infinity : additive ? rng.normal() : 0
    }
    return try! ScoreMask(batch: batch, heads: heads, rows: rows, cols: cols, values: values)
}

@Test("Swift forward matches a naive float64 loop", arguments: tiledPaths, swiftCases)
func swiftForward(_ isa: KernelISA, _ c: SwiftCase) throws {
    try onPath(isa) {
        let (q, k, v) = c.inputs()
        let result = try Attention.forward(q: q, k: k, v: v, options: c.options)
        #expect(result.out.shape == [q.batch, q.seqlen, q.heads, v.headDim])
        #expect(result.lse.count == q.batch * q.heads * q.seqlen)
        let errors = maxErrors(result, naiveAttention(q: q, k: k, v: v, options: c.options))
        #expect(errors.out <= Errors.absoluteBound && errors.lse <= Errors.lseBound, "\(errors)")
    }
}

@Test func swiftForwardIsBitwiseIdenticalForEveryThreadCount() throws {
    let c = swiftCases[1]
    let (q, k, v) = c.inputs()
    var options = c.options
    options.numThreads = 1
    let one = try Attention.forward(q: q, k: k, v: v, options: options)
    options.numThreads = 0
    #expect(try Attention.forward(q: q, k: k, v: v, options: options) == one)
}

@Test func causalRowsWithoutKeysAreZeroWithInfiniteLSE() throws {
    let c = swiftCases[2]
    let (q, k, v) = c.inputs()
    let result = try Attention.forward(q: q, k: k, v: v, options: c.options)
    #expect(result.lse(batch: 0, head: 1, row: 39) == -.infinity)
    #expect(result.lse(batch: 0, head: 1, row: 40).isFinite)
    #expect((0..<c.headDim).allSatisfy { result.out[0, 39, 1, $0] == 0 })
}

/// Backward cases: the options the reference gradients know (causal, softcap, sinks) on GQA shapes.
let swiftGradientCases: [SwiftCase] = [
    SwiftCase(name: "plain", batch: 2, seqlenQ: 21, seqlenK: 34, headsQ: 2, headsKV: 2, headDim: 16, seed: 601),
    SwiftCase(name: "causal-gqa", batch: 1, seqlenQ: 50, seqlenK: 30, headsQ: 4, headsKV: 2, headDim: 24,
              options: .init(causal: true), seed: 602),
    SwiftCase(name: "softcap-sinks", batch: 1, seqlenQ: 19, seqlenK: 27, headsQ: 2, headsKV: 1, headDim: 8,
              options: .init(scale: 0.7, softcap: 2, sinks: [0.3, -0.8]), seed: 603),
]

@Test("Swift backward matches float64 analytic gradients", arguments: tiledPaths, swiftGradientCases)
func swiftBackward(_ isa: KernelISA, _ c: SwiftCase) throws {
    try onPath(isa) {
        let (q, k, v) = c.inputs()
        var rng = SeededRandom(seed: c.seed &+ 7)
        let dout = randomTensor(c.batch, c.seqlenQ, c.headsQ, c.headDim, &rng)
        let result = try Attention.forward(q: q, k: k, v: v, options: c.options)
        let grads = try Attention.backward(dout: dout, q: q, k: k, v: v, result: result, options: c.options)
        #expect(grads.dq.shape == q.shape && grads.dk.shape == k.shape && grads.dv.shape == v.shape)
        // The float64 analytic gradients of BackwardTests.swift, fed through its strided test tensor.
        func tensor(_ t: AttentionTensor) -> Tensor {
            var x = Tensor(batch: t.batch, seq: t.seqlen, heads: t.heads, dim: t.headDim)
            x.storage = t.values
            return x
        }
        let problem = Problem(
            batch: c.batch, seqlenQ: c.seqlenQ, seqlenK: c.seqlenK, headsQ: c.headsQ, headsKV: c.headsKV,
            headDim: c.headDim, causal: c.options.causal, scale: c.options.scale ?? 0)
        let gradientCase = GradientCase(problem: problem, softcap: c.options.softcap ?? 0, sinks: c.options.sinks)
        let reference = referenceGradients(gradientCase, q: tensor(q), k: tensor(k), v: tensor(v), dout: tensor(dout))
        for (name, x, r) in [("dq", grads.dq, reference.dq), ("dk", grads.dk, reference.dk), ("dv", grads.dv, reference.dv)] {
            let error = relativeError(x.values.map(Double.init), r)
            #expect(error <= gradientRelativeBound, "\(name): \(error)")
        }
        if c.options.sinks != nil {
            let dsinks = try #require(grads.dsinks)
            #expect(relativeError(dsinks.map(Double.init), reference.dsinks) <= gradientRelativeBound)
        } else {
            #expect(grads.dsinks == nil)
        }
    }
}

/// Slices rows `range` of every batch entry of a tensor.
func rows(_ t: AttentionTensor, _ range: Range<Int>, batch: Int = 0) throws -> AttentionTensor {
    let width = t.heads * t.headDim
    let start = (batch * t.seqlen + range.lowerBound) * width
    return try AttentionTensor(
        batch: 1, seqlen: range.count, heads: t.heads, headDim: t.headDim,
        values: Array(t.values[start..<(start + range.count * width)]))
}

@Test func varlenEqualsEachSequenceAlone() throws {
    let (cuQ, cuK) = ([0, 7, 7, 30], [0, 12, 20, 20])  // an empty query sequence and an empty key sequence
    var rng = SeededRandom(seed: 701)
    let q = randomTensor(1, 30, 4, 16, &rng), k = randomTensor(1, 20, 2, 16, &rng), v = randomTensor(1, 20, 2, 16, &rng)
    let dout = randomTensor(1, 30, 4, 16, &rng)
    let options = AttentionOptions(causal: true, alibiSlopes: [0.1, 0.2, 0.3, 0.4, 0, 0, 0, 0, 0.5, 0.4, 0.3, 0.2])
    let packed = try Attention.forwardVarlen(q: q, k: k, v: v, cuSeqlensQ: cuQ, cuSeqlensK: cuK, options: options)
    let grads = try Attention.backwardVarlen(
        dout: dout, q: q, k: k, v: v, result: packed, cuSeqlensQ: cuQ, cuSeqlensK: cuK, options: options)
    for b in 0..<3 {
        let (rq, rk) = (cuQ[b]..<cuQ[b + 1], cuK[b]..<cuK[b + 1])
        var alone = options
        alone.alibiSlopes = Array(options.alibiSlopes![(4 * b)..<(4 * b + 4)])
        let (sq, sk, sv) = (try rows(q, rq), try rows(k, rk), try rows(v, rk))
        let reference = naiveAttention(q: sq, k: sk, v: sv, options: alone)
        let part = try AttentionResult(
            out: rows(packed.out, rq),
            lse: (0..<4).flatMap { h in packed.lse[(h * 30 + rq.lowerBound)..<(h * 30 + rq.upperBound)] })
        let errors = maxErrors(part, reference)
        #expect(errors.out <= Errors.absoluteBound && errors.lse <= Errors.lseBound, "sequence \(b): \(errors)")
        // Gradients of one sequence alone, through the dense API, agree with the packed ones.
        guard !rq.isEmpty else { continue }
        let dense = try Attention.forward(q: sq, k: sk, v: sv, options: alone)
        let denseGrads = try Attention.backward(dout: rows(dout, rq), q: sq, k: sk, v: sv, result: dense, options: alone)
        #expect(relativeError(try rows(grads.dq, rq).values.map(Double.init), denseGrads.dq.values.map(Double.init)) <= 1e-6)
        #expect(relativeError(try rows(grads.dk, rk).values.map(Double.init), denseGrads.dk.values.map(Double.init)) <= 1e-6)
    }
}

@Test("kvCacheAppendsThenAttends", arguments: tiledPaths)
func kvCacheAppendsThenAttends(_ isa: KernelISA) throws {
    try onPath(isa) {
        var rng = SeededRandom(seed: 801)
        let (batch, heads, dim, capacity) = (2, 2, 16, 24)
        var kCache = randomTensor(batch, capacity, heads, dim, &rng), vCache = randomTensor(batch, capacity, heads, dim, &rng)
        let q = randomTensor(batch, 3, 4, dim, &rng)
        let newK = randomTensor(batch, 3, heads, dim, &rng), newV = randomTensor(batch, 3, heads, dim, &rng)
        let cached = [10, 17]
        let before = kCache
        let options = AttentionOptions(causal: true)
        let result = try Attention.forwardKVCache(
            q: q, kCache: &kCache, vCache: &vCache, cacheSeqlens: cached, newK: newK, newV: newV, options: options)
        for b in 0..<batch {
            // The new rows landed at cacheSeqlens[b]...; the rows before and after are untouched.
            #expect(try rows(kCache, cached[b]..<(cached[b] + 3), batch: b) == rows(newK, 0..<3, batch: b))
            #expect(try rows(kCache, 0..<cached[b], batch: b) == rows(before, 0..<cached[b], batch: b))
            let keys = cached[b] + 3
            let reference = naiveAttention(
                q: try rows(q, 0..<3, batch: b), k: try rows(kCache, 0..<keys, batch: b),
                v: try rows(vCache, 0..<keys, batch: b), options: options)
            let part = try AttentionResult(
                out: rows(result.out, 0..<3, batch: b), lse: Array(result.lse[(b * 4 * 3)..<((b + 1) * 4 * 3)]))
            let errors = maxErrors(part, reference)
            #expect(errors.out <= Errors.absoluteBound && errors.lse <= Errors.lseBound, "batch \(b): \(errors)")
        }
        // The same cache seen through a block table of 4-row pages, with the pages of batch 1 listed first.
        var pagedK = AttentionTensor(batch: 12, seqlen: 4, heads: heads, headDim: dim)
        var pagedV = pagedK
        let table = [[6, 7, 8, 9, 10, 11], [0, 1, 2, 3, 4, 5]]
        for b in 0..<batch { for s in 0..<capacity { for h in 0..<heads { for c in 0..<dim {
            pagedK[table[b][s / 4], s % 4, h, c] = kCache[b, s, h, c]
            pagedV[table[b][s / 4], s % 4, h, c] = vCache[b, s, h, c]
        } } } }
        let paged = try Attention.forwardKVCache(
            q: q, kCache: &pagedK, vCache: &pagedV, cacheSeqlens: cached.map { $0 + 3 }, blockTable: table, options: options)
        #expect(maxErrors(paged, (result.out.values.map(Double.init), result.lse.map(Double.init))).out <= 1e-6)
    }
}

/// `t` with its head size widened to `width` by zero columns.
func zeroPadded(_ t: AttentionTensor, to width: Int) -> AttentionTensor {
    var wide = AttentionTensor(batch: t.batch, seqlen: t.seqlen, heads: t.heads, headDim: width)
    for b in 0..<t.batch { for s in 0..<t.seqlen { for h in 0..<t.heads { for c in 0..<t.headDim {
        wide[b, s, h, c] = t[b, s, h, c]
    } } } }
    return wide
}

/// Values of a narrower head size than the keys' (MLA) give the gradients of the same values padded with zero
/// columns to the keys' size: dq and dk agree, and dv is the padded dv's first columns.
@Test("value heads of their own size: backward equals the zero-padded problem's", arguments: tiledPaths)
func swiftBackwardWithValueHeadSize(_ isa: KernelISA) throws {
    try onPath(isa) {
        let c = SwiftCase(name: "mla", batch: 2, seqlenQ: 29, seqlenK: 37, headsQ: 4, headsKV: 2, headDim: 40,
                          options: .init(causal: true, softcap: 5), seed: 515, headDimV: 19)
        let (q, k, v) = c.inputs()
        var rng = SeededRandom(seed: 516)
        let dout = randomTensor(c.batch, c.seqlenQ, c.headsQ, 19, &rng)
        let result = try Attention.forward(q: q, k: k, v: v, options: c.options)
        let grads = try Attention.backward(dout: dout, q: q, k: k, v: v, result: result, options: c.options)
        #expect(grads.dq.shape == q.shape && grads.dk.shape == k.shape && grads.dv.shape == v.shape)
        let (wideV, wideDout) = (zeroPadded(v, to: 40), zeroPadded(dout, to: 40))
        let wide = try Attention.forward(q: q, k: k, v: wideV, options: c.options)
        let wideGrads = try Attention.backward(dout: wideDout, q: q, k: k, v: wideV, result: wide, options: c.options)
        #expect(relativeError(zeroPadded(result.out, to: 40).values.map(Double.init), wide.out.values.map(Double.init)) <= 1e-5)
        #expect(relativeError(grads.dq.values.map(Double.init), wideGrads.dq.values.map(Double.init)) <= 1e-5)
        #expect(relativeError(grads.dk.values.map(Double.init), wideGrads.dk.values.map(Double.init)) <= 1e-5)
        #expect(relativeError(zeroPadded(grads.dv, to: 40).values.map(Double.init), wideGrads.dv.values.map(Double.init)) <= 1e-5)
    }
}

/// A KV cache whose values are narrower than its keys, with an append of both.
@Test("kvCacheWithValueHeadSize", arguments: tiledPaths)
func kvCacheWithValueHeadSize(_ isa: KernelISA) throws {
    try onPath(isa) { try kvCacheWithValueHeadSizeOnPath() }
}

private func kvCacheWithValueHeadSizeOnPath() throws {
    var rng = SeededRandom(seed: 817)
    var kCache = randomTensor(2, 20, 1, 36, &rng), vCache = randomTensor(2, 20, 1, 20, &rng)
    let q = randomTensor(2, 1, 6, 36, &rng), newK = randomTensor(2, 1, 1, 36, &rng), newV = randomTensor(2, 1, 1, 20, &rng)
    let result = try Attention.forwardKVCache(q: q, kCache: &kCache, vCache: &vCache, cacheSeqlens: [7, 19], newK: newK, newV: newV)
    #expect(result.out.shape == [2, 1, 6, 20])
    for (b, keys) in [(0, 8), (1, 20)] {
        let reference = naiveAttention(
            q: try rows(q, 0..<1, batch: b), k: try rows(kCache, 0..<keys, batch: b), v: try rows(vCache, 0..<keys, batch: b),
            options: .init())
        let part = try AttentionResult(out: rows(result.out, 0..<1, batch: b), lse: Array(result.lse[(b * 6)..<(b * 6 + 6)]))
        let errors = maxErrors(part, reference)
        #expect(errors.out <= Errors.absoluteBound && errors.lse <= Errors.lseBound, "batch \(b): \(errors)")
    }
    #expect(throws: AttentionError.self) {
        try Attention.forwardKVCache(q: q, kCache: &kCache, vCache: &vCache, cacheSeqlens: [7, 19], newK: newK, newV: newK)
    }
}

@Test func mergeOfTwoKeyHalvesEqualsTheWhole() throws {
    let c = swiftCases[0]
    let (q, k, v) = c.inputs()
    func half(_ t: AttentionTensor, _ r: Range<Int>) throws -> AttentionTensor {
        var parts: [Float] = []
        for b in 0..<t.batch { parts += try rows(t, r, batch: b).values }
        return try AttentionTensor(batch: t.batch, seqlen: r.count, heads: t.heads, headDim: t.headDim, values: parts)
    }
    let first = try Attention.forward(q: q, k: half(k, 0..<20), v: half(v, 0..<20))
    let second = try Attention.forward(q: q, k: half(k, 20..<53), v: half(v, 20..<53))
    let merged = try Attention.merge(first, second)
    let errors = maxErrors(merged, naiveAttention(q: q, k: k, v: v, options: .init()))
    #expect(errors.out <= Errors.absoluteBound && errors.lse <= Errors.lseBound, "\(errors)")
}

// MARK: Errors

/// Expects `body` to throw an `AttentionError` of `status` whose message contains `part`.
func expectAttentionError(
    _ status: flash_attention_status, _ part: String, sourceLocation: SourceLocation = #_sourceLocation,
    _ body: () throws -> Void
) {
    do {
        try body()
        Issue.record("no error thrown; expected \(part)", sourceLocation: sourceLocation)
    } catch let error as AttentionError {
        #expect(error.status == status, "\(error)", sourceLocation: sourceLocation)
        #expect(error.message.contains(part), "\(error)", sourceLocation: sourceLocation)
    } catch {
        Issue.record("unexpected error \(error)", sourceLocation: sourceLocation)
    }
}

@Test func libraryErrorsAreThrownWithTheirMessage() throws {
    var rng = SeededRandom(seed: 901)
    let q = randomTensor(1, 5, 4, 8, &rng), k = randomTensor(1, 6, 3, 8, &rng)
    expectAttentionError(FA_ERROR_INVALID_SHAPE, "heads_q (4) is not a multiple of heads_kv (3)") {
        _ = try Attention.forward(q: q, k: k, v: k)
    }
    do {
        _ = try Attention.forward(q: q, k: k, v: k)
    } catch {
        // Typed throws: `error` is an AttentionError without a cast.
        #expect(error == .invalidShape("heads_q (4) is not a multiple of heads_kv (3)"))
        #expect(error.description == "invalid or inconsistent size: heads_q (4) is not a multiple of heads_kv (3)")
    }
    let kv = randomTensor(1, 6, 2, 8, &rng)
    expectAttentionError(FA_ERROR_INVALID_ARGUMENT, "softmax_scale (nan)") {
        _ = try Attention.forward(q: q, k: kv, v: kv, options: .init(scale: .nan))
    }
    expectAttentionError(FA_ERROR_INVALID_ARGUMENT, "num_threads (-1)") {
        _ = try Attention.forward(q: q, k: kv, v: kv, options: .init(numThreads: -1))
    }
    expectAttentionError(FA_ERROR_INVALID_ARGUMENT, "window_left (-2)") {
        _ = try Attention.forward(q: q, k: kv, v: kv, options: .init(windowLeft: -2))
    }
    expectAttentionError(FA_ERROR_INVALID_ARGUMENT, "softcap (-1.0)") {
        _ = try Attention.forward(q: q, k: kv, v: kv, options: .init(softcap: -1))
    }
    expectAttentionError(FA_ERROR_INVALID_ARGUMENT, "sinks has a non-finite value") {
        _ = try Attention.forward(q: q, k: kv, v: kv, options: .init(sinks: [0, 0, .infinity, 0]))
    }
    expectAttentionError(FA_ERROR_INVALID_INDEX, "cu_seqlens_k[2] (7) exceeds seqlen_k (6)") {
        _ = try Attention.forwardVarlen(q: q, k: kv, v: kv, cuSeqlensQ: [0, 2, 5], cuSeqlensK: [0, 3, 7])
    }
    // A varlen forward's LSE with a dense backward of the wrong shape never reaches the library.
    let result = try Attention.forward(q: q, k: kv, v: kv)
    expectAttentionError(FA_ERROR_INVALID_SHAPE, "result.lse has 3 elements") {
        _ = try Attention.backward(dout: q, q: q, k: kv, v: kv, result: AttentionResult(out: result.out, lse: [0, 0, 0]))
    }
}

@Test func swiftLayerChecksCountsTheLibraryCannotSee() {
    var rng = SeededRandom(seed: 902)
    let q = randomTensor(2, 5, 4, 8, &rng), kv = randomTensor(2, 6, 2, 8, &rng)
    expectAttentionError(FA_ERROR_INVALID_SHAPE, "needs 120") {
        _ = try AttentionTensor(batch: 2, seqlen: 3, heads: 4, headDim: 5, values: [1, 2, 3])
    }
    expectAttentionError(FA_ERROR_INVALID_SHAPE, "must be >= 0") {
        _ = try AttentionTensor(batch: -1, seqlen: 3, heads: 4, headDim: 5, values: [])
    }
    expectAttentionError(FA_ERROR_INVALID_SHAPE, "must match q") {
        _ = try Attention.forward(q: q, k: randomTensor(1, 6, 2, 8, &rng), v: randomTensor(1, 6, 2, 8, &rng))
    }
    expectAttentionError(FA_ERROR_INVALID_SHAPE, "must have the shape of k") {
        _ = try Attention.forward(q: q, k: kv, v: randomTensor(2, 7, 2, 8, &rng))
    }
    expectAttentionError(FA_ERROR_INVALID_ARGUMENT, "scale (0.0) must be nonzero") {
        _ = try Attention.forward(q: q, k: kv, v: kv, options: .init(scale: 0))
    }
    expectAttentionError(FA_ERROR_INVALID_SHAPE, "alibiSlopes has 3 elements") {
        _ = try Attention.forward(q: q, k: kv, v: kv, options: .init(alibiSlopes: [1, 2, 3]))
    }
    expectAttentionError(FA_ERROR_INVALID_SHAPE, "sinks has 2 elements") {
        _ = try Attention.forward(q: q, k: kv, v: kv, options: .init(sinks: [1, 2]))
    }
    expectAttentionError(FA_ERROR_INVALID_SHAPE, "packed q must have batch 1") {
        _ = try Attention.forwardVarlen(q: q, k: kv, v: kv, cuSeqlensQ: [0, 5], cuSeqlensK: [0, 6])
    }
    expectAttentionError(FA_ERROR_INVALID_INDEX, "cuSeqlensK[1] (4294967296) does not fit in int32") {
        let (q1, kv1) = (randomTensor(1, 5, 4, 8, &rng), randomTensor(1, 6, 2, 8, &rng))
        _ = try Attention.forwardVarlen(q: q1, k: kv1, v: kv1, cuSeqlensQ: [0, 5], cuSeqlensK: [0, 1 << 32])
    }
    expectAttentionError(FA_ERROR_INVALID_SHAPE, "dout [2, 4, 4, 8]") {
        let result = try Attention.forward(q: q, k: kv, v: kv)
        _ = try Attention.backward(dout: randomTensor(2, 4, 4, 8, &rng), q: q, k: kv, v: kv, result: result)
    }
    expectAttentionError(FA_ERROR_INVALID_SHAPE, "results of shapes") {
        let result = try Attention.forward(q: q, k: kv, v: kv)
        _ = try Attention.merge(result, AttentionResult(out: result.out, lse: []))
    }
}

@Test func kvCacheErrorsLeaveTheCacheUnchanged() {
    var rng = SeededRandom(seed: 903)
    let q = randomTensor(2, 1, 2, 8, &rng), newK = randomTensor(2, 2, 2, 8, &rng)
    var kCache = randomTensor(2, 10, 2, 8, &rng), vCache = randomTensor(2, 10, 2, 8, &rng)
    let (k0, v0) = (kCache, vCache)
    expectAttentionError(FA_ERROR_INVALID_INDEX, "cache_seqlens[1] (9) + seqlen_new (2) exceeds the cache capacity") {
        _ = try Attention.forwardKVCache(
            q: q, kCache: &kCache, vCache: &vCache, cacheSeqlens: [3, 9], newK: newK, newV: newK)
    }
    expectAttentionError(FA_ERROR_INVALID_SHAPE, "cacheSeqlens must have 2 elements") {
        _ = try Attention.forwardKVCache(q: q, kCache: &kCache, vCache: &vCache, cacheSeqlens: [3])
    }
    expectAttentionError(FA_ERROR_INVALID_ARGUMENT, "newK and newV must be given together") {
        _ = try Attention.forwardKVCache(q: q, kCache: &kCache, vCache: &vCache, cacheSeqlens: [3, 3], newK: newK)
    }
    expectAttentionError(FA_ERROR_INVALID_INDEX, "block_table[0][1] (5)") {
        _ = try Attention.forwardKVCache(
            q: q, kCache: &kCache, vCache: &vCache, cacheSeqlens: [12, 3], blockTable: [[0, 5], [1, 0]])
    }
    #expect(kCache == k0 && vCache == v0)
}

@Test func swiftInfoAgreesWithTheHeader() {
    #expect(Attention.version == "\(FA_VERSION_MAJOR).\(FA_VERSION_MINOR).\(FA_VERSION_PATCH)")
    #expect(Attention.abiVersion == Int(FA_ABI_VERSION))
    #expect(Attention.defaultThreadCount >= 1)
    #expect(Attention.kernelISA == String(cString: flash_attention_kernel_isa()))
    #expect(Attention.availableKernelISAs == kernelPaths.map(\.name))
}

/// A boolean mask drawing the causal band gives causal attention, forward and backward (through the mask
/// path: staged tiles, the backward's per-key mask reads), on every kernel path.
@Test("a causal-shaped mask equals causal, forward and backward", arguments: tiledPaths)
func swiftCausalShapedMask(_ isa: KernelISA) throws {
    try onPath(isa) {
        let c = SwiftCase(name: "mask", batch: 2, seqlenQ: 37, seqlenK: 52, headsQ: 4, headsKV: 2, headDim: 24, seed: 801)
        let (q, k, v) = c.inputs()
        var rng = SeededRandom(seed: 802)
        let dout = randomTensor(2, 37, 4, 24, &rng)
        let band = (0..<37).flatMap { i in (0..<52).map { j in j <= i + 52 - 37 } }
        let masked = AttentionOptions(mask: try ScoreMask(rows: 37, cols: 52, attends: band))
        let causal = AttentionOptions(causal: true)
        let a = try Attention.forward(q: q, k: k, v: v, options: masked)
        let b = try Attention.forward(q: q, k: k, v: v, options: causal)
        #expect(relativeError(a.out.values.map(Double.init), b.out.values.map(Double.init)) <= 1e-6)
        let ga = try Attention.backward(dout: dout, q: q, k: k, v: v, result: a, options: masked)
        let gb = try Attention.backward(dout: dout, q: q, k: k, v: v, result: b, options: causal)
        for (x, y) in [(ga.dq, gb.dq), (ga.dk, gb.dk), (ga.dv, gb.dv)] {
            #expect(relativeError(x.values.map(Double.init), y.values.map(Double.init)) <= gradientRelativeBound)
        }
        let wrong = AttentionOptions(mask: try ScoreMask(rows: 37, cols: 51, attends: Array(band.prefix(37 * 51))))
        #expect(throws: AttentionError.self) { try Attention.forward(q: q, k: k, v: v, options: wrong) }
    }
}

/// Dropout through the Swift API: 0 is no dropout (bitwise), a seed gives the same output for any thread
/// count, another seed another output, and the backward runs with the forward's options.
@Test func swiftDropoutIsDeterministicPerSeed() throws {
    let c = SwiftCase(name: "dropout", batch: 1, seqlenQ: 40, seqlenK: 40, headsQ: 2, headsKV: 2, headDim: 16, seed: 803)
    let (q, k, v) = c.inputs()
    let plain = try Attention.forward(q: q, k: k, v: v)
    let zero = try Attention.forward(q: q, k: k, v: v, options: .init(dropout: 0, dropoutSeed: 9))
    #expect(zero == plain)
    let one = try Attention.forward(q: q, k: k, v: v, options: .init(numThreads: 1, dropout: 0.3, dropoutSeed: 9))
    let two = try Attention.forward(q: q, k: k, v: v, options: .init(numThreads: 2, dropout: 0.3, dropoutSeed: 9))
    let other = try Attention.forward(q: q, k: k, v: v, options: .init(dropout: 0.3, dropoutSeed: 10))
    #expect(one.out == two.out && one.out != other.out && one.out != plain.out)
    #expect(one.lse == plain.lse)  // the LSE is the undropped one
    let grads = try Attention.backward(dout: q, q: q, k: k, v: v, result: one, options: .init(dropout: 0.3, dropoutSeed: 9))
    #expect(grads.dq.values.allSatisfy { $0.isFinite })
    #expect(throws: AttentionError.self) { try Attention.forward(q: q, k: k, v: v, options: .init(dropout: 1)) }
}

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

/// The backward pass through the C ABI: flash_attention_forward (with lse), then flash_attention_backward,
/// against analytic float64 gradients computed naively below. Covers plain, causal with seqlen_q ≠ seqlen_k
/// (both ways, so some rows see no key), GQA, odd head dims, softcap, sinks with dsinks, strided views,
/// empty sequences, thread-count invariance and rejected arguments.

/// One backward problem: the forward problem plus the options that change the gradients' formulas.
struct GradientCase: CustomTestStringConvertible, Sendable {
    var problem: Problem
    var softcap: Float = 0
    /// Sink logits [heads_q]; nil = off.
    var sinks: [Float]? = nil

    var testDescription: String {
        problem.testDescription + (softcap > 0 ? "-softcap\(softcap)" : "") + (sinks == nil ? "" : "-sinks")
    }

    /// q, k, v from the problem's seed, and dout (laid out like out) from the next seed.
    func inputs() -> (q: Tensor, k: Tensor, v: Tensor, dout: Tensor) {
        let (q, k, v) = problem.inputs()
        var rng = SeededRandom(seed: problem.seed &+ 0x5EED)
        let dout = Tensor.random(
            batch: problem.batch, seq: problem.seqlenQ, heads: problem.headsQ, dim: problem.headDim,
            layout: problem.layout, rng: &rng)
        return (q, k, v, dout)
    }
}

/// Floats at a stable address for the length of a forward + backward pair (the params hold raw pointers).
final class PinnedFloats {
    let buffer: UnsafeMutableBufferPointer<Float>
    init(_ values: [Float]) {
        buffer = .allocate(capacity: max(1, values.count))
        buffer.initialize(repeating: .nan)
        _ = buffer.update(fromContentsOf: values)
    }
    deinit { buffer.deallocate() }
    var pointer: UnsafeMutablePointer<Float> { buffer.baseAddress! }
    var raw: UnsafeMutableRawPointer { UnsafeMutableRawPointer(buffer.baseAddress!) }
    var values: [Float] { Array(buffer) }
}

/// What one forward + backward pair returned. Every output starts as NaN.
struct GradientOutput {
    var out: Tensor
    var lse: [Float]
    var dq: Tensor, dk: Tensor, dv: Tensor
    /// [heads_q]; NaN where not written.
    var dsinks: [Float]
    var forwardStatus: flash_attention_status
    var status: flash_attention_status
    var message: String
}

private func strides(_ t: Tensor) -> (Int64, Int64, Int64) {
    (Int64(t.batchStride), Int64(t.rowStride), Int64(t.headStride))
}

/// Calls flash_attention_forward with lse, then flash_attention_backward on its params. `configureForward`
/// adjusts the forward params the backward sees (after the forward ran); `configureBackward` adjusts the
/// backward params last.
func runForwardBackward(
    _ c: GradientCase, q: Tensor, k: Tensor, v: Tensor, dout: Tensor, threads: Int32 = 0,
    configureForward: (inout flash_attention_params) -> Void = { _ in },
    configureBackward: (inout flash_attention_backward_params) -> Void = { _ in }
) -> GradientOutput {
    let p = c.problem
    var out = Tensor(batch: p.batch, seq: p.seqlenQ, heads: p.headsQ, dim: p.headDim, layout: p.layout)
    var dq = Tensor(batch: p.batch, seq: p.seqlenQ, heads: p.headsQ, dim: p.headDim, layout: p.layout)
    var dk = Tensor(batch: p.batch, seq: p.seqlenK, heads: p.headsKV, dim: p.headDim, layout: p.layout)
    var dv = Tensor(batch: p.batch, seq: p.seqlenK, heads: p.headsKV, dim: p.headDim, layout: p.layout)
    let qBuffer = PinnedFloats(q.storage), kBuffer = PinnedFloats(k.storage), vBuffer = PinnedFloats(v.storage)
    let outBuffer = PinnedFloats(out.storage), doutBuffer = PinnedFloats(dout.storage)
    let lseBuffer = PinnedFloats([Float](repeating: .nan, count: p.batch * p.headsQ * p.seqlenQ))
    let dqBuffer = PinnedFloats(dq.storage), dkBuffer = PinnedFloats(dk.storage), dvBuffer = PinnedFloats(dv.storage)
    let sinksBuffer = c.sinks.map(PinnedFloats.init)
    let dsinksBuffer = PinnedFloats([Float](repeating: .nan, count: p.headsQ))

    var forward = flash_attention_params()
    #expect(flash_attention_params_init(&forward, MemoryLayout<flash_attention_params>.size) == FA_OK)
    forward.batch = Int64(p.batch)
    forward.seqlen_q = Int64(p.seqlenQ)
    forward.seqlen_k = Int64(p.seqlenK)
    forward.heads_q = Int64(p.headsQ)
    forward.heads_kv = Int64(p.headsKV)
    forward.head_dim = Int64(p.headDim)
    forward.softmax_scale = p.scale
    forward.causal = p.causal ? 1 : 0
    forward.num_threads = threads
    forward.softcap = c.softcap
    forward.sinks = sinksBuffer.map { UnsafePointer($0.pointer) }
    forward.q = UnsafeRawPointer(qBuffer.raw)
    (forward.q_batch_stride, forward.q_row_stride, forward.q_head_stride) = strides(q)
    forward.k = UnsafeRawPointer(kBuffer.raw)
    (forward.k_batch_stride, forward.k_row_stride, forward.k_head_stride) = strides(k)
    forward.v = UnsafeRawPointer(vBuffer.raw)
    (forward.v_batch_stride, forward.v_row_stride, forward.v_head_stride) = strides(v)
    forward.out = outBuffer.raw
    (forward.out_batch_stride, forward.out_row_stride, forward.out_head_stride) = strides(out)
    forward.lse = lseBuffer.pointer
    forward.lse_batch_stride = Int64(p.headsQ * p.seqlenQ)
    forward.lse_head_stride = Int64(p.seqlenQ)
    forward.lse_row_stride = 1
    let forwardStatus = flash_attention_forward(&forward)

    var backward = flash_attention_backward_params()
    #expect(
        flash_attention_backward_params_init(&backward, MemoryLayout<flash_attention_backward_params>.size) == FA_OK)
    backward.dout = UnsafeRawPointer(doutBuffer.raw)
    (backward.dout_batch_stride, backward.dout_row_stride, backward.dout_head_stride) = strides(dout)
    backward.dq = dqBuffer.raw
    (backward.dq_batch_stride, backward.dq_row_stride, backward.dq_head_stride) = strides(dq)
    backward.dk = dkBuffer.raw
    (backward.dk_batch_stride, backward.dk_row_stride, backward.dk_head_stride) = strides(dk)
    backward.dv = dvBuffer.raw
    (backward.dv_batch_stride, backward.dv_row_stride, backward.dv_head_stride) = strides(dv)
    backward.dsinks = c.sinks == nil ? nil : dsinksBuffer.pointer
    configureForward(&forward)
    let status = withUnsafePointer(to: &forward) { forwardPointer in
        backward.forward = forwardPointer
        configureBackward(&backward)
        return flash_attention_backward(&backward)
    }
    let message = String(cString: flash_attention_last_error())
    // Every buffer (inputs included) stays alive until both calls are done.
    withExtendedLifetime((qBuffer, kBuffer, vBuffer, doutBuffer, sinksBuffer)) {}
    out.storage = outBuffer.values
    dq.storage = dqBuffer.values
    dk.storage = dkBuffer.values
    dv.storage = dvBuffer.values
    return GradientOutput(
        out: out, lse: Array(lseBuffer.values.prefix(p.batch * p.headsQ * p.seqlenQ)), dq: dq, dk: dk, dv: dv,
        dsinks: dsinksBuffer.values, forwardStatus: forwardStatus, status: status, message: message)
}

/// Analytic float64 gradients, written naively and independently of the library: per query row, the
/// scores (softcapped when set), the masked softmax over the visible keys and the sink, O = P V, then
/// D = rowsum(dO ∘ O), dV += Pᵀ dO, dP = dO Vᵀ, dS = P ∘ (dP − D) (∘ (1 − tanh²) under softcap),
/// dQ = scale · dS K, dK = scale · dSᵀ Q, dsink = −Σ p_sink · D. GQA kv heads sum over their query heads.
/// Causal masking is bottom-right aligned: query i sees key j iff j <= i + seqlen_k − seqlen_q.
/// Tensors are flattened [b][s][h][d], dsinks [heads_q].
struct ReferenceGradients {
    var out: [Double], dq: [Double], dk: [Double], dv: [Double], dsinks: [Double]
}

func referenceGradients(_ c: GradientCase, q: Tensor, k: Tensor, v: Tensor, dout: Tensor) -> ReferenceGradients {
    let p = c.problem
    let (b, sq, sk, hq, hk, d) = (p.batch, p.seqlenQ, p.seqlenK, p.headsQ, p.headsKV, p.headDim)
    let group = hq / hk
    let scale = p.scale == 0 ? 1 / Double(d).squareRoot() : Double(p.scale)
    let softcap = Double(c.softcap)
    // Contiguous float64 copies: [b][s][h][d].
    func dense(_ t: Tensor) -> [Double] {
        var values = [Double](repeating: 0, count: t.batch * t.seq * t.heads * t.dim)
        var n = 0
        for bi in 0..<t.batch { for s in 0..<t.seq { for h in 0..<t.heads { for x in 0..<t.dim {
            values[n] = Double(t[bi, s, h, x])
            n += 1
        } } } }
        return values
    }
    let (qd, kd, vd, dod) = (dense(q), dense(k), dense(v), dense(dout))
    func qi(_ bi: Int, _ s: Int, _ h: Int) -> Int { ((bi * sq + s) * hq + h) * d }
    func ki(_ bi: Int, _ s: Int, _ h: Int) -> Int { ((bi * sk + s) * hk + h) * d }
    var result = ReferenceGradients(
        out: [Double](repeating: 0, count: b * sq * hq * d), dq: [Double](repeating: 0, count: b * sq * hq * d),
        dk: [Double](repeating: 0, count: b * sk * hk * d), dv: [Double](repeating: 0, count: b * sk * hk * d),
        dsinks: [Double](repeating: 0, count: hq))
    var raw = [Double](repeating: 0, count: sk), probs = [Double](repeating: 0, count: sk)
    var row = [Double](repeating: 0, count: d)
    for bi in 0..<b { for h in 0..<hq { for i in 0..<sq {
        let kh = h / group
        let visibleKeys = p.causal ? max(0, min(sk, i + sk - sq + 1)) : sk
        let sink = c.sinks.map { Double($0[h]) }
        let qo = qi(bi, i, h)
        var m = sink ?? -.infinity
        for j in 0..<visibleKeys {
            let ko = ki(bi, j, kh)
            var dot = 0.0
            for x in 0..<d { dot += qd[qo + x] * kd[ko + x] }
            raw[j] = dot * scale
            probs[j] = softcap > 0 ? softcap * tanh(raw[j] / softcap) : raw[j]
            m = max(m, probs[j])
        }
        if m == -.infinity { continue }  // no key and no sink: out and every gradient of the row are 0
        var total = sink.map { exp($0 - m) } ?? 0
        for j in 0..<visibleKeys {
            probs[j] = exp(probs[j] - m)
            total += probs[j]
        }
        for j in 0..<visibleKeys { probs[j] /= total }
        let sinkProbability = sink.map { exp($0 - m) / total } ?? 0
        for x in 0..<d { row[x] = 0 }
        for j in 0..<visibleKeys {
            let ko = ki(bi, j, kh)
            for x in 0..<d { row[x] += probs[j] * vd[ko + x] }
        }
        var rowDot = 0.0
        for x in 0..<d {
            result.out[qo + x] = row[x]
            rowDot += dod[qo + x] * row[x]
        }
        for j in 0..<visibleKeys {
            let ko = ki(bi, j, kh)
            var dp = 0.0
            for x in 0..<d { dp += dod[qo + x] * vd[ko + x] }
            var ds = probs[j] * (dp - rowDot)
            if softcap > 0 {
                let t = tanh(raw[j] / softcap)
                ds *= 1 - t * t
            }
            for x in 0..<d {
                result.dv[ko + x] += probs[j] * dod[qo + x]
                result.dq[qo + x] += scale * ds * kd[ko + x]
                result.dk[ko + x] += scale * ds * qd[qo + x]
            }
        }
        result.dsinks[h] -= sinkProbability * rowDot
    } } }
    return result
}

/// Bound on the relative (norm) error ‖x − ref‖ / ‖ref‖ of each float32 gradient.
let gradientRelativeBound = 1e-5

/// ‖x − ref‖ / ‖ref‖ over a tensor read in [b][s][h][d] order; the absolute norm where ‖ref‖ ≤ 1e-6 (e.g.
/// rows that see no key, whose gradients must be 0). Infinite when any element is not finite.
func relativeError(_ x: Tensor, _ reference: [Double]) -> Double {
    var values = [Double]()
    values.reserveCapacity(reference.count)
    for b in 0..<x.batch { for s in 0..<x.seq { for h in 0..<x.heads { for c in 0..<x.dim {
        values.append(Double(x[b, s, h, c]))
    } } } }
    return relativeError(values, reference)
}

func relativeError(_ values: [Double], _ reference: [Double]) -> Double {
    precondition(values.count == reference.count)
    var diff2 = 0.0, ref2 = 0.0
    for (x, r) in zip(values, reference) {
        if !x.isFinite { return .infinity }
        diff2 += (x - r) * (x - r)
        ref2 += r * r
    }
    return ref2.squareRoot() <= 1e-6 ? diff2.squareRoot() : (diff2 / ref2).squareRoot()
}

let gradientCases: [GradientCase] = [
    // Plain: one block with tails, then several 96-row query and key blocks.
    GradientCase(problem: Problem(batch: 2, seqlenQ: 37, seqlenK: 53, headsQ: 2, headsKV: 2, headDim: 16, seed: 201)),
    GradientCase(problem: Problem(batch: 1, seqlenQ: 130, seqlenK: 211, headsQ: 2, headsKV: 2, headDim: 64, seed: 202)),
    // Causal, seqlen_q < seqlen_k and seqlen_q > seqlen_k (the first 89 rows see no key).
    GradientCase(problem: Problem(
        batch: 1, seqlenQ: 70, seqlenK: 190, headsQ: 2, headsKV: 2, headDim: 32, causal: true, seed: 203)),
    GradientCase(problem: Problem(
        batch: 2, seqlenQ: 150, seqlenK: 61, headsQ: 2, headsKV: 2, headDim: 24, causal: true, seed: 204)),
    // GQA: heads_q 4, heads_kv 2 (and 4:1).
    GradientCase(problem: Problem(batch: 2, seqlenQ: 45, seqlenK: 101, headsQ: 4, headsKV: 2, headDim: 40, seed: 205)),
    GradientCase(problem: Problem(
        batch: 1, seqlenQ: 200, seqlenK: 200, headsQ: 4, headsKV: 2, headDim: 64, causal: true, seed: 206)),
    GradientCase(problem: Problem(
        batch: 1, seqlenQ: 1, seqlenK: 150, headsQ: 4, headsKV: 1, headDim: 16, causal: true, seed: 207)),
    // Odd head dims: 1, 3, 59.
    GradientCase(problem: Problem(batch: 1, seqlenQ: 20, seqlenK: 30, headsQ: 2, headsKV: 1, headDim: 1, seed: 208)),
    GradientCase(problem: Problem(batch: 1, seqlenQ: 33, seqlenK: 7, headsQ: 4, headsKV: 4, headDim: 3, seed: 209)),
    GradientCase(problem: Problem(
        batch: 1, seqlenQ: 97, seqlenK: 120, headsQ: 4, headsKV: 2, headDim: 59, causal: true, seed: 210)),
    // Sinks, with dsinks: plain GQA, and causal with rows that see only their sink.
    GradientCase(
        problem: Problem(batch: 2, seqlenQ: 50, seqlenK: 80, headsQ: 4, headsKV: 2, headDim: 16, seed: 211),
        sinks: [0.5, 1, -1, 2]),
    GradientCase(
        problem: Problem(batch: 1, seqlenQ: 120, seqlenK: 40, headsQ: 4, headsKV: 2, headDim: 59, causal: true, seed: 212),
        sinks: [1.5, -0.5, 0, 3]),
    // Softcap (derivative 1 − tanh²), alone and with sinks, GQA and an explicit scale.
    GradientCase(
        problem: Problem(batch: 1, seqlenQ: 77, seqlenK: 99, headsQ: 2, headsKV: 2, headDim: 32, causal: true, seed: 213),
        softcap: 3),
    GradientCase(
        problem: Problem(
            batch: 2, seqlenQ: 40, seqlenK: 110, headsQ: 4, headsKV: 2, headDim: 24, causal: true, scale: 0.4, seed: 214),
        softcap: 2, sinks: [0.25, -1, 1, 0.5]),
    // Strided views: [b, h, s, d] memory, and rows/batches with spare room between them.
    GradientCase(problem: Problem(
        batch: 2, seqlenQ: 64, seqlenK: 99, headsQ: 4, headsKV: 2, headDim: 24, causal: true, layout: .bhsd, seed: 215)),
    GradientCase(problem: Problem(
        batch: 2, seqlenQ: 99, seqlenK: 64, headsQ: 2, headsKV: 1, headDim: 40, layout: .padded, seed: 216)),
    // Empty sequences: no keys (dq 0; with sinks dsinks 0), and no queries (dk and dv 0).
    GradientCase(
        problem: Problem(batch: 2, seqlenQ: 9, seqlenK: 0, headsQ: 2, headsKV: 1, headDim: 5, seed: 217),
        sinks: [0.5, -0.5]),
    GradientCase(problem: Problem(batch: 2, seqlenQ: 0, seqlenK: 20, headsQ: 2, headsKV: 1, headDim: 5, seed: 218)),
]

@Suite struct BackwardTests {
    @Test("gradients match the float64 analytic reference", arguments: tiledPaths, gradientCases)
func backwardMatchesReference(_ isa: KernelISA, _ c: GradientCase) {
    onPath(isa) {
            let (q, k, v, dout) = c.inputs()
            let output = runForwardBackward(c, q: q, k: k, v: v, dout: dout)
            #expect(output.forwardStatus == FA_OK)
            #expect(output.status == FA_OK, "\(output.message)")
            #expect(output.message == "")
            let reference = referenceGradients(c, q: q, k: k, v: v, dout: dout)
            let errors = [
                ("out", relativeError(output.out, reference.out)),
                ("dq", relativeError(output.dq, reference.dq)),
                ("dk", relativeError(output.dk, reference.dk)),
                ("dv", relativeError(output.dv, reference.dv)),
            ]
            for (name, error) in errors {
                #expect(error <= gradientRelativeBound, "\(name): relative error \(error)")
            }
            if c.sinks != nil {
                let error = relativeError(output.dsinks.map(Double.init), reference.dsinks)
                #expect(error <= gradientRelativeBound, "dsinks: relative error \(error), got \(output.dsinks), want \(reference.dsinks)")
            } else {
                #expect(output.dsinks.allSatisfy { $0.isNaN }, "dsinks written without sinks")
            }
    }
}

    @Test("results are bitwise identical for num_threads 1 and 2 (and 0)", arguments: tiledPaths)
func backwardThreadInvariance(_ isa: KernelISA) {
    onPath(isa) {
            let c = GradientCase(
                problem: Problem(
                    batch: 2, seqlenQ: 250, seqlenK: 420, headsQ: 4, headsKV: 2, headDim: 48, causal: true, seed: 231),
                softcap: 4, sinks: [0.5, -0.25, 1, 0])
            let (q, k, v, dout) = c.inputs()
            let single = runForwardBackward(c, q: q, k: k, v: v, dout: dout, threads: 1)
            #expect(single.status == FA_OK, "\(single.message)")
            for threads: Int32 in [2, 0] {
                let other = runForwardBackward(c, q: q, k: k, v: v, dout: dout, threads: threads)
                #expect(other.status == FA_OK, "\(other.message)")
                #expect(other.out.storage.map(\.bitPattern) == single.out.storage.map(\.bitPattern), "out, threads \(threads)")
                #expect(other.dq.storage.map(\.bitPattern) == single.dq.storage.map(\.bitPattern), "dq, threads \(threads)")
                #expect(other.dk.storage.map(\.bitPattern) == single.dk.storage.map(\.bitPattern), "dk, threads \(threads)")
                #expect(other.dv.storage.map(\.bitPattern) == single.dv.storage.map(\.bitPattern), "dv, threads \(threads)")
                #expect(other.dsinks.map(\.bitPattern) == single.dsinks.map(\.bitPattern), "dsinks, threads \(threads)")
            }
    }
}

    @Test("a rejected backward call returns its status and message and writes nothing", arguments: badBackwardInputs)
    func backwardRejectsBadInput(_ bad: BadBackwardInput) {
        let c = GradientCase(
            problem: Problem(batch: 2, seqlenQ: 9, seqlenK: 11, headsQ: 4, headsKV: 2, headDim: 8, seed: 241),
            sinks: [0, 1, 2, 3])
        let (q, k, v, dout) = c.inputs()
        let output = runForwardBackward(
            c, q: q, k: k, v: v, dout: dout, configureForward: bad.configureForward,
            configureBackward: bad.configureBackward)
        #expect(output.forwardStatus == FA_OK)
        #expect(output.status == bad.status)
        #expect(!output.message.isEmpty)
        #expect(output.message.contains(bad.messagePart), "message: \(output.message)")
        // Gradients start as NaN; a rejected call must leave every element as it was.
        #expect(output.dq.storage.allSatisfy { $0.isNaN })
        #expect(output.dk.storage.allSatisfy { $0.isNaN })
        #expect(output.dv.storage.allSatisfy { $0.isNaN })
        #expect(output.dsinks.allSatisfy { $0.isNaN })
    }

    @Test func backwardRejectsNullParamsAndUnknownInitSize() {
        #expect(flash_attention_backward(nil) == FA_ERROR_NULL_POINTER)
        #expect(String(cString: flash_attention_last_error()) == "params is NULL")
        #expect(flash_attention_backward_params_init(nil, MemoryLayout<flash_attention_backward_params>.size)
            == FA_ERROR_NULL_POINTER)
        var params = flash_attention_backward_params()
        #expect(flash_attention_backward_params_init(&params, 7) == FA_ERROR_UNSUPPORTED)
        #expect(String(cString: flash_attention_last_error()).contains("struct_size (7)"))
        #expect(params.struct_size == 0)
        #expect(flash_attention_backward_params_init(&params, MemoryLayout<flash_attention_backward_params>.size) == FA_OK)
        #expect(params.struct_size == UInt64(MemoryLayout<flash_attention_backward_params>.size))
        #expect((params.dout_dim_stride, params.dq_dim_stride, params.dk_dim_stride, params.dv_dim_stride) == (1, 1, 1, 1))
        #expect(params.forward == nil && params.dq == nil && params.dsinks == nil)
        #expect(String(cString: flash_attention_last_error()) == "")
    }
}

struct BadBackwardInput: CustomTestStringConvertible, Sendable {
    let name: String
    let status: flash_attention_status
    let messagePart: String
    var configureForward: @Sendable (inout flash_attention_params) -> Void = { _ in }
    var configureBackward: @Sendable (inout flash_attention_backward_params) -> Void = { _ in }
    var testDescription: String { name }
}

let badBackwardInputs: [BadBackwardInput] = [
    BadBackwardInput(name: "NULL dq", status: FA_ERROR_NULL_POINTER, messagePart: "dq is NULL",
                     configureBackward: { $0.dq = nil }),
    BadBackwardInput(name: "NULL dk", status: FA_ERROR_NULL_POINTER, messagePart: "dk is NULL",
                     configureBackward: { $0.dk = nil }),
    BadBackwardInput(name: "NULL dout", status: FA_ERROR_NULL_POINTER, messagePart: "dout is NULL",
                     configureBackward: { $0.dout = nil }),
    BadBackwardInput(name: "NULL forward", status: FA_ERROR_NULL_POINTER, messagePart: "forward is NULL",
                     configureBackward: { $0.forward = nil }),
    BadBackwardInput(name: "unknown struct size", status: FA_ERROR_UNSUPPORTED, messagePart: "struct_size (12345)",
                     configureBackward: { $0.struct_size = 12345 }),
    BadBackwardInput(name: "NULL forward lse", status: FA_ERROR_NULL_POINTER, messagePart: "forward->lse is NULL",
                     configureForward: { $0.lse = nil }),
    BadBackwardInput(name: "dq dim stride 2", status: FA_ERROR_INVALID_STRIDE, messagePart: "dq_dim_stride (2)",
                     configureBackward: { $0.dq_dim_stride = 2 }),
    BadBackwardInput(name: "dv aliases dout", status: FA_ERROR_INVALID_ARGUMENT, messagePart: "dv overlaps dout",
                     configureBackward: { $0.dv = UnsafeMutableRawPointer(mutating: $0.dout) }),
    BadBackwardInput(name: "dk aliases dv", status: FA_ERROR_INVALID_ARGUMENT, messagePart: "dk overlaps dv",
                     configureBackward: { $0.dk = $0.dv }),
    BadBackwardInput(name: "heads not divisible", status: FA_ERROR_INVALID_SHAPE,
                     messagePart: "heads_q (4) is not a multiple of heads_kv (3)",
                     configureForward: { $0.heads_kv = 3 }),
]

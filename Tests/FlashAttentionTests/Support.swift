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

/// Test support: the kernel paths under test, a seeded RNG, strided float tensors, a naive float64
/// reference, and the tolerance policy.

/// Every path this CPU can run, widest first (the reference loop last): tests that exercise the kernels are
/// parametrised over these and run each call on one path through `onPath`. The paths this CPU lacks are
/// listed as skipped by `introspection` (ABITests.swift).
let kernelPaths = KernelSelection.available
/// The tiled kernel copies among them.
let tiledPaths = kernelPaths.filter { $0 != .reference }
let skippedPaths = KernelISA.allCases.filter { !kernelPaths.contains($0) }

/// Runs `body` with every library call it makes on the calling task forced onto `isa`.
func onPath<R>(_ isa: KernelISA, _ body: () throws -> R) rethrows -> R {
    try KernelSelection.$override.withValue(isa) { try body() }
}

/// SplitMix64: tiny, seedable, and the same on every platform.
struct SeededRandom {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
    /// Uniform in (0, 1).
    mutating func uniform() -> Double { (Double(next() >> 11) + 0.5) / Double(1 << 53) }
    /// Standard normal (Box–Muller).
    mutating func normal() -> Float {
        Float((-2 * log(uniform())).squareRoot() * cos(2 * Double.pi * uniform()))
    }
}

/// Memory order of a [batch, seq, heads, dim] tensor.
enum Layout: String, Sendable {
    /// [batch, seq, heads, dim], the FlashAttention layout.
    case bshd
    /// [batch, heads, seq, dim] memory seen as a [b, s, h, d] view through strides.
    case bhsd
    /// bshd with 3 spare floats after every row and 5 spare rows after every batch (odd, non-packed strides).
    case padded
}

/// A float32 tensor indexed as [batch, seq, heads, dim] over its own buffer with element strides.
struct Tensor {
    let batch: Int, seq: Int, heads: Int, dim: Int
    let batchStride: Int, rowStride: Int, headStride: Int
    var storage: [Float]

    init(batch: Int, seq: Int, heads: Int, dim: Int, layout: Layout = .bshd, fill: Float = .nan) {
        self.batch = batch
        self.seq = seq
        self.heads = heads
        self.dim = dim
        switch layout {
        case .bshd:
            (rowStride, headStride, batchStride) = (heads * dim, dim, seq * heads * dim)
        case .bhsd:
            (rowStride, headStride, batchStride) = (dim, seq * dim, seq * heads * dim)
        case .padded:
            let row = heads * dim + 3
            (rowStride, headStride, batchStride) = (row, dim, (seq + 5) * row)
        }
        storage = Array(repeating: fill, count: max(1, batch * batchStride))
    }

    static func random(
        batch: Int, seq: Int, heads: Int, dim: Int, layout: Layout = .bshd, rng: inout SeededRandom
    ) -> Tensor {
        var t = Tensor(batch: batch, seq: seq, heads: heads, dim: dim, layout: layout)
        for b in 0..<batch { for s in 0..<seq { for h in 0..<heads { for d in 0..<dim {
            t[b, s, h, d] = rng.normal()
        } } } }
        return t
    }

    subscript(b: Int, s: Int, h: Int, d: Int) -> Float {
        get { storage[b * batchStride + s * rowStride + h * headStride + d] }
        set { storage[b * batchStride + s * rowStride + h * headStride + d] = newValue }
    }
}

/// One attention problem for the tests: shapes, options and the inputs.
struct Problem: CustomTestStringConvertible, Sendable {
    var batch = 1, seqlenQ = 1, seqlenK = 1, headsQ = 1, headsKV = 1, headDim = 1
    var causal = false
    var scale: Float = 0
    var layout: Layout = .bshd
    var seed: UInt64 = 1

    var testDescription: String {
        "b\(batch)-h\(headsQ)/\(headsKV)-s\(seqlenQ)x\(seqlenK)-d\(headDim)\(causal ? "-causal" : "")"
            + (layout == .bshd ? "" : "-\(layout.rawValue)") + (scale == 0 ? "" : "-scale\(scale)")
    }

    func inputs() -> (q: Tensor, k: Tensor, v: Tensor) {
        var rng = SeededRandom(seed: seed)
        let q = Tensor.random(batch: batch, seq: seqlenQ, heads: headsQ, dim: headDim, layout: layout, rng: &rng)
        let k = Tensor.random(batch: batch, seq: seqlenK, heads: headsKV, dim: headDim, layout: layout, rng: &rng)
        let v = Tensor.random(batch: batch, seq: seqlenK, heads: headsKV, dim: headDim, layout: layout, rng: &rng)
        return (q, k, v)
    }
}

/// Result of one library call.
struct Output {
    var out: Tensor
    var lse: [Float]  // [batch, heads_q, seqlen_q], contiguous
    var status: flash_attention_status
    var message: String
}

/// Calls flash_attention_forward on `problem`'s inputs; `configure` may adjust the params last.
func runLibrary(
    _ problem: Problem, q: Tensor, k: Tensor, v: Tensor, threads: Int32 = 0,
    algorithm: Int32 = FA_ALGORITHM_AUTO, configure: (inout flash_attention_params) -> Void = { _ in }
) -> Output {
    var out = Tensor(
        batch: problem.batch, seq: problem.seqlenQ, heads: problem.headsQ, dim: problem.headDim,
        layout: problem.layout)
    var lse = [Float](repeating: .nan, count: max(1, problem.batch * problem.headsQ * problem.seqlenQ))
    var params = flash_attention_params()
    #expect(flash_attention_params_init(&params, MemoryLayout<flash_attention_params>.size) == FA_OK)
    params.batch = Int64(problem.batch)
    params.seqlen_q = Int64(problem.seqlenQ)
    params.seqlen_k = Int64(problem.seqlenK)
    params.heads_q = Int64(problem.headsQ)
    params.heads_kv = Int64(problem.headsKV)
    params.head_dim = Int64(problem.headDim)
    params.softmax_scale = problem.scale
    params.causal = problem.causal ? 1 : 0
    params.num_threads = threads
    params.algorithm = algorithm
    let status = q.storage.withUnsafeBufferPointer { qp in
        k.storage.withUnsafeBufferPointer { kp in
            v.storage.withUnsafeBufferPointer { vp in
                out.storage.withUnsafeMutableBufferPointer { op in
                    lse.withUnsafeMutableBufferPointer { lp in
                        params.q = UnsafeRawPointer(qp.baseAddress)
                        (params.q_batch_stride, params.q_row_stride, params.q_head_stride) =
                            (Int64(q.batchStride), Int64(q.rowStride), Int64(q.headStride))
                        params.k = UnsafeRawPointer(kp.baseAddress)
                        (params.k_batch_stride, params.k_row_stride, params.k_head_stride) =
                            (Int64(k.batchStride), Int64(k.rowStride), Int64(k.headStride))
                        params.v = UnsafeRawPointer(vp.baseAddress)
                        (params.v_batch_stride, params.v_row_stride, params.v_head_stride) =
                            (Int64(v.batchStride), Int64(v.rowStride), Int64(v.headStride))
                        params.out = UnsafeMutableRawPointer(op.baseAddress)
                        (params.out_batch_stride, params.out_row_stride, params.out_head_stride) =
                            (Int64(out.batchStride), Int64(out.rowStride), Int64(out.headStride))
                        params.lse = lp.baseAddress
                        params.lse_batch_stride = Int64(problem.headsQ * problem.seqlenQ)
                        params.lse_head_stride = Int64(problem.seqlenQ)
                        params.lse_row_stride = 1
                        configure(&params)
                        return flash_attention_forward(&params)
                    }
                }
            }
        }
    }
    return Output(out: out, lse: lse, status: status, message: String(cString: flash_attention_last_error()))
}

/// The naive float64 reference: every score, the full softmax, the weighted sum. Independent of the
/// library's own code. Returns out as [b][s][h][d] flattened and lse [b][h][s].
func referenceAttention(_ problem: Problem, q: Tensor, k: Tensor, v: Tensor) -> (out: [Double], lse: [Double]) {
    let (b, sq, sk, hq, d) = (problem.batch, problem.seqlenQ, problem.seqlenK, problem.headsQ, problem.headDim)
    let group = hq / problem.headsKV
    let scale = problem.scale == 0 ? 1 / Double(d).squareRoot() : Double(problem.scale)
    var out = [Double](repeating: 0, count: b * sq * hq * d)
    var lse = [Double](repeating: -.infinity, count: b * hq * sq)
    var scores = [Double](repeating: 0, count: sk)
    for bi in 0..<b { for h in 0..<hq { for i in 0..<sq {
        let kh = h / group
        var visible = [Bool](repeating: true, count: sk)
        if problem.causal { for j in 0..<sk { visible[j] = j <= i + sk - sq } }
        var m = -Double.infinity
        for j in 0..<sk where visible[j] {
            var dot = 0.0
            for c in 0..<d { dot += Double(q[bi, i, h, c]) * Double(k[bi, j, kh, c]) }
            scores[j] = dot * scale
            m = max(m, scores[j])
        }
        if m == -.infinity { continue }
        var total = 0.0
        for j in 0..<sk where visible[j] {
            scores[j] = exp(scores[j] - m)
            total += scores[j]
        }
        for c in 0..<d {
            var acc = 0.0
            for j in 0..<sk where visible[j] { acc += scores[j] * Double(v[bi, j, kh, c]) }
            out[((bi * sq + i) * hq + h) * d + c] = acc / total
        }
        lse[(bi * hq + h) * sq + i] = m + log(total)
    } } }
    return (out, lse)
}

/// Accuracy policy for float32 on N(0, 1) inputs, written once: ‖out − ref‖ / ‖ref‖ ≤ 2e-6, max |out − ref|
/// ≤ 1e-5, max |lse − ref| ≤ 1e-5, and −inf LSE exactly where the reference has it.
struct Errors {
    var relative = 0.0, maxAbsolute = 0.0, lseMaxAbsolute = 0.0
    var lseInfinitiesAgree = true

    static let relativeBound = 2e-6, absoluteBound = 1e-5, lseBound = 1e-5

    var withinBounds: Bool {
        relative <= Self.relativeBound && maxAbsolute <= Self.absoluteBound && lseMaxAbsolute <= Self.lseBound
            && lseInfinitiesAgree
    }

    init(_ problem: Problem, output: Output, reference: (out: [Double], lse: [Double])) {
        var diff2 = 0.0, ref2 = 0.0
        let (sq, hq, d) = (problem.seqlenQ, problem.headsQ, problem.headDim)
        for b in 0..<problem.batch { for i in 0..<sq { for h in 0..<hq { for c in 0..<d {
            let r = reference.out[((b * sq + i) * hq + h) * d + c]
            let x = Double(output.out[b, i, h, c])
            diff2 += (x - r) * (x - r)
            ref2 += r * r
            maxAbsolute = max(maxAbsolute, x.isNaN ? .infinity : abs(x - r))
        } } } }
        relative = ref2 == 0 ? diff2.squareRoot() : (diff2 / ref2).squareRoot()
        for (x, r) in zip(output.lse, reference.lse) {
            if r == -.infinity {
                lseInfinitiesAgree = lseInfinitiesAgree && x == -.infinity
            } else {
                lseMaxAbsolute = max(lseMaxAbsolute, Double(x).isNaN ? .infinity : abs(Double(x) - r))
            }
        }
    }
}

/// libm's double-precision functions by a name nothing in the tests shadows (Glibc's or Darwin's).
enum LibM {
    #if canImport(Glibc)
    static func exp2(_ x: Double) -> Double { Glibc.exp2(x) }
    static func exp(_ x: Double) -> Double { Glibc.exp(x) }
    static func log(_ x: Double) -> Double { Glibc.log(x) }
    #elseif canImport(Darwin)
    static func exp2(_ x: Double) -> Double { Darwin.exp2(x) }
    static func exp(_ x: Double) -> Double { Darwin.exp(x) }
    static func log(_ x: Double) -> Double { Darwin.log(x) }
    #elseif canImport(Musl)
    static func exp2(_ x: Double) -> Double { Musl.exp2(x) }
    static func exp(_ x: Double) -> Double { Musl.exp(x) }
    static func log(_ x: Double) -> Double { Musl.log(x) }
    #endif
}

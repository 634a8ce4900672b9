// A SwiftPM package using FlashAttention through its Swift API (Package.swift: the `FlashAttentionSwift`
// product). Causal grouped-query attention on random data, checked against a naive loop; then its gradients.
//
//     cd examples/swift && swift build -c release && .build/release/attention-example
import FlashAttention
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#elseif canImport(Musl)
import Musl
#endif

/// Deterministic inputs in [-1, 1) (a 64-bit LCG), so the example prints the same numbers on every run.
func tensor(_ batch: Int, _ seqlen: Int, _ heads: Int, _ headDim: Int, seed: UInt64) -> AttentionTensor {
    var state = seed
    var t = AttentionTensor(batch: batch, seqlen: seqlen, heads: heads, headDim: headDim)
    for b in 0..<batch { for s in 0..<seqlen { for h in 0..<heads { for d in 0..<headDim {
        state = state &* 6364136223846793005 &+ 1442695040888963407
        t[b, s, h, d] = Float(state >> 40) / Float(1 << 23) - 1
    } } } }
    return t
}

// 8 query heads share 2 kv heads; 40 new queries attend to 56 keys (bottom-right causal).
let q = tensor(1, 40, 8, 64, seed: 1), k = tensor(1, 56, 2, 64, seed: 2), v = tensor(1, 56, 2, 64, seed: 3)
let options = AttentionOptions(causal: true)
let result = try Attention.forward(q: q, k: k, v: v, options: options)

// The same attention, one row at a time in Double.
var worst = 0.0
let scale = 1 / Double(64).squareRoot()
for h in 0..<8 { for i in 0..<40 {
    let visible = 0...(i + 56 - 40), kv = h / 4
    var scores: [Double] = []
    for j in visible {
        var dot = 0.0
        for d in 0..<64 { dot += Double(q[0, i, h, d]) * Double(k[0, j, kv, d]) }
        scores.append(dot * scale)
    }
    let top = scores.max()!
    let weights = scores.map { exp($0 - top) }
    let total = weights.reduce(0, +)
    for d in 0..<64 {
        var expected = 0.0
        for (j, w) in zip(visible, weights) { expected += w * Double(v[0, j, kv, d]) }
        worst = max(worst, abs(expected / total - Double(result.out[0, i, h, d])))
    }
} }
print("libFlashAttention \(Attention.version) (\(Attention.kernelISA)): max |out - naive| = \(worst)")

// Gradients of sum(out): dout is all ones.
let dout = AttentionTensor(batch: 1, seqlen: 40, heads: 8, headDim: 64, repeating: 1)
let grads = try Attention.backward(dout: dout, q: q, k: k, v: v, result: result, options: options)
print("dq[0, 39, 0, 0..<4] = \(Array(grads.dq.values[(39 * 8) * 64..<(39 * 8) * 64 + 4]))")
guard worst < 1e-5 else { fatalError("the result differs from the naive loop") }

// Errors are thrown, never crashes: here k's head dimension does not match q's.
do {
    _ = try Attention.forward(q: q, k: tensor(1, 56, 2, 32, seed: 4), v: tensor(1, 56, 2, 32, seed: 5))
} catch {
    print("rejected as expected: \(error)")
}

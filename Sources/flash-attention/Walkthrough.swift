import CFlashAttention
import FlashAttention
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#elseif canImport(Musl)
import Musl
#endif

/// The FlashAttention algorithm on eight tokens, step by step, small enough to follow by hand.
///
/// The sentence is split into 2 query blocks × 2 key blocks of 4 tokens. Each query block keeps, per row, a
/// running max m and a running sum l of exp(score − m), and an unnormalised output O. Meeting a key block:
///     m' = max(m, rowmax(S))      S = Q_block K_blockᵀ · scale
///     P  = exp(S − m')
///     l' = exp(m − m') · l + rowsum(P)
///     O' = exp(m − m') · O + P V_block
/// and at the end out = O / l. The full 8 × 8 score matrix is never needed; it is printed here only to show
/// that the answer equals the ordinary softmax.
enum Walkthrough {
    static let tokens = ["I", "want", "to", "learn", "deep", "learning", "today", "."]

    /// Small hand-made embeddings (head_dim 4): "learn" and "learning" are close, "to" and "." are close.
    static let embeddings: [[Double]] = [
        [0.9, -0.2, 0.1, 0.3],  // I
        [0.2, 0.8, -0.5, 0.1],  // want
        [-0.1, 0.1, 0.2, -0.9],  // to
        [0.1, 0.5, 0.9, 0.2],  // learn
        [0.7, 0.3, 0.4, -0.3],  // deep
        [0.2, 0.6, 0.8, 0.3],  // learning
        [-0.6, 0.4, -0.2, 0.5],  // today
        [0.0, -0.1, 0.1, -0.8],  // .
    ].map { $0.map { $0 * 2 } }  // doubled so the softmax is visibly peaked

    static let blockSize = 4

    /// Runs the walkthrough; returns false if any check fails.
    static func run() -> Bool {
        let n = tokens.count, d = embeddings[0].count
        let scale = 1 / Double(d).squareRoot()
        let q = embeddings, k = embeddings, v = embeddings  // self-attention, no projections
        func score(_ i: Int, _ j: Int) -> Double { zip(q[i], k[j]).map(*).reduce(0, +) * scale }

        print("FlashAttention walkthrough: \(n) tokens \"\(tokens.joined(separator: " "))\", head_dim \(d),")
        print("split into \(n / blockSize) query blocks × \(n / blockSize) key blocks of \(blockSize) tokens.\n")
        var tiled = [[Double]](repeating: [Double](repeating: 0, count: d), count: n)
        var lse = [Double](repeating: 0, count: n)
        for qb in 0..<(n / blockSize) {
            let rows = Array((qb * blockSize)..<((qb + 1) * blockSize))
            var m = [Double](repeating: -.infinity, count: blockSize)
            var l = [Double](repeating: 0, count: blockSize)
            var o = [[Double]](repeating: [Double](repeating: 0, count: d), count: blockSize)
            for kb in 0..<(n / blockSize) {
                let cols = Array((kb * blockSize)..<((kb + 1) * blockSize))
                print("Step Q\(qb + 1)×K\(kb + 1): queries \(label(rows)) meet keys \(label(cols))")
                for (r, i) in rows.enumerated() {
                    let s = cols.map { score(i, $0) }
                    let newMax = max(m[r], s.max()!)
                    let rescale = exp(m[r] - newMax)  // 0 on the first block (m = −inf)
                    let p = s.map { exp($0 - newMax) }
                    l[r] = rescale * l[r] + p.reduce(0, +)
                    for c in 0..<d {
                        o[r][c] = rescale * o[r][c] + zip(p, cols).map { $0 * v[$1][c] }.reduce(0, +)
                    }
                    m[r] = newMax
                    print("    \(pad(tokens[i], 9)) running max \(fixed(m[r]))   running sum \(fixed(l[r]))")
                }
            }
            for (r, i) in rows.enumerated() {
                tiled[i] = o[r].map { $0 / l[r] }
                lse[i] = m[r] + log(l[r])
            }
            print("")
        }

        // The ordinary softmax over the full matrix, for comparison.
        print("Attention matrix softmax(Q Kᵀ · scale), rows = queries (from the tiled run's LSE):")
        print(pad("", 10) + tokens.map { pad($0, 9) }.joined())
        var reference = [[Double]](repeating: [Double](repeating: 0, count: d), count: n)
        for i in 0..<n {
            let s = (0..<n).map { score(i, $0) }
            let mx = s.max()!
            let e = s.map { exp($0 - mx) }
            let total = e.reduce(0, +)
            for c in 0..<d { reference[i][c] = zip(e, v).map { $0 * $1[c] }.reduce(0, +) / total }
            print(pad(tokens[i], 10) + (0..<n).map { pad(fixed(exp(score(i, $0) - lse[i]), 3), 9) }.joined())
        }
        let tiledError = maxDifference(tiled, reference)
        print("\nTiled (online softmax) output vs full softmax: max |difference| = \(scientific(tiledError))")

        // The same problem through the library's C entry point.
        let flat = embeddings.flatMap { $0.map(Float.init) }
        var out = [Float](repeating: 0, count: flat.count)
        var params = flash_attention_params()
        _ = flash_attention_params_init(&params, MemoryLayout<flash_attention_params>.size)
        (params.batch, params.seqlen_q, params.seqlen_k) = (1, Int64(n), Int64(n))
        (params.heads_q, params.heads_kv, params.head_dim) = (1, 1, Int64(d))
        let status = flat.withUnsafeBufferPointer { input in
            out.withUnsafeMutableBufferPointer { output in
                params.q = UnsafeRawPointer(input.baseAddress)
                params.k = params.q
                params.v = params.q
                params.out = UnsafeMutableRawPointer(output.baseAddress)
                for strides in [
                    \flash_attention_params.q_row_stride, \.k_row_stride, \.v_row_stride, \.out_row_stride,
                ] { params[keyPath: strides] = Int64(d) }
                return flash_attention_forward(&params)
            }
        }
        guard status == FA_OK else {
            print("library call failed: \(String(cString: flash_attention_last_error()))")
            return false
        }
        let library = (0..<n).map { i in (0..<d).map { Double(out[i * d + $0]) } }
        let libraryError = maxDifference(library, reference)
        print("libFlashAttention output vs full softmax:     max |difference| = \(scientific(libraryError))")
        let ok = tiledError < 1e-12 && libraryError < 1e-5
        print(ok ? "Walkthrough check: PASS\n" : "Walkthrough check: FAIL\n")
        return ok
    }

    static func label(_ indices: [Int]) -> String { "\"" + indices.map { tokens[$0] }.joined(separator: " ") + "\"" }
}

func maxDifference(_ a: [[Double]], _ b: [[Double]]) -> Double {
    zip(a, b).map { zip($0, $1).map { abs($0 - $1) }.max()! }.max()!
}

func pad(_ s: String, _ width: Int) -> String { s.count >= width ? s + " " : s + String(repeating: " ", count: width - s.count) }

func fixed(_ x: Double, _ digits: Int = 4) -> String {
    if x.isInfinite { return x < 0 ? "-inf" : "inf" }
    return format("%.\(digits)f", x)
}

func scientific(_ x: Double) -> String { format("%.2e", x) }

/// printf-style formatting of one number (Foundation's String(format:) is not used, to keep the tool small).
func format(_ pattern: String, _ x: Double) -> String {
    var buffer = [CChar](repeating: 0, count: 64)
    _ = withVaList([x]) { vsnprintf(&buffer, buffer.count, pattern, $0) }
    return String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
}

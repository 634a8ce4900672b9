import CFlashAttention
import FlashAttention
import Glibc

/// `flash-attention demo | info`: the walkthrough plus one realistic-size run, or what the library is.

func usage() -> Never {
    print("usage: flash-attention [demo | info]")
    exit(2)
}

func now() -> Double {
    var t = timespec()
    clock_gettime(CLOCK_MONOTONIC, &t)
    return Double(t.tv_sec) + Double(t.tv_nsec) * 1e-9
}

/// Times batch 1, 16 heads, 2048 tokens, head_dim 128 at 1 thread and at every core, and checks sampled
/// rows against a float64 reference computed here.
func realisticRun() -> Bool {
    let (heads, seqlen, dim) = (16, 2048, 128)
    let count = seqlen * heads * dim
    var state: UInt64 = 7
    func value() -> Float {  // deterministic, roughly N(0, 1) (sum of 4 uniforms, centred and scaled)
        var sum: Float = 0
        for _ in 0..<4 {
            state = state &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
            sum += Float(state >> 40) / Float(1 << 24)
        }
        return (sum - 2) * 1.732
    }
    let q = (0..<count).map { _ in value() }, k = (0..<count).map { _ in value() }
    let v = (0..<count).map { _ in value() }
    var out = [Float](repeating: 0, count: count)
    let flops = 4.0 * Double(heads) * Double(seqlen) * Double(seqlen) * Double(dim)
    print("Realistic size: batch 1, \(heads) heads, \(seqlen) tokens, head_dim \(dim), float32, non-causal")
    for threads in [1, Int(flash_attention_default_num_threads())] {
        var times: [Double] = []
        for _ in 0..<3 {
            let status = q.withUnsafeBufferPointer { qp in
                k.withUnsafeBufferPointer { kp in
                    v.withUnsafeBufferPointer { vp in
                        out.withUnsafeMutableBufferPointer { op in
                            var p = flash_attention_params()
                            _ = flash_attention_params_init(&p, MemoryLayout<flash_attention_params>.size)
                            (p.batch, p.seqlen_q, p.seqlen_k) = (1, Int64(seqlen), Int64(seqlen))
                            (p.heads_q, p.heads_kv, p.head_dim) = (Int64(heads), Int64(heads), Int64(dim))
                            p.num_threads = Int32(threads)
                            (p.q, p.k, p.v) = (UnsafeRawPointer(qp.baseAddress), UnsafeRawPointer(kp.baseAddress), UnsafeRawPointer(vp.baseAddress))
                            p.out = UnsafeMutableRawPointer(op.baseAddress)
                            (p.q_row_stride, p.k_row_stride, p.v_row_stride, p.out_row_stride) = (Int64(heads * dim), Int64(heads * dim), Int64(heads * dim), Int64(heads * dim))
                            (p.q_head_stride, p.k_head_stride, p.v_head_stride, p.out_head_stride) = (Int64(dim), Int64(dim), Int64(dim), Int64(dim))
                            let start = now()
                            let status = flash_attention_forward(&p)
                            times.append(now() - start)
                            return status
                        }
                    }
                }
            }
            guard status == FA_OK else {
                print("library call failed: \(String(cString: flash_attention_last_error()))")
                return false
            }
        }
        let best = times.min()!
        print("  \(threads) thread\(threads == 1 ? " " : "s"): \(fixed(best * 1000, 1)) ms  \(fixed(flops / best / 1e9, 1)) GFLOP/s (best of 3)")
    }
    // Float64 reference on 64 sampled (row, head) pairs.
    var worst = 0.0
    for sample in 0..<64 {
        let i = (sample * 613) % seqlen, h = (sample * 5) % heads
        var scores = [Double](repeating: 0, count: seqlen)
        for j in 0..<seqlen {
            var dot = 0.0
            for c in 0..<dim { dot += Double(q[(i * heads + h) * dim + c]) * Double(k[(j * heads + h) * dim + c]) }
            scores[j] = dot / Double(dim).squareRoot()
        }
        let mx = scores.max()!
        let e = scores.map { exp($0 - mx) }
        let total = e.reduce(0, +)
        for c in 0..<dim {
            var acc = 0.0
            for j in 0..<seqlen { acc += e[j] * Double(v[(j * heads + h) * dim + c]) }
            worst = max(worst, abs(acc / total - Double(out[(i * heads + h) * dim + c])))
        }
    }
    let ok = worst <= 1e-5
    print("  max |out − float64 reference| over 64 sampled rows: \(scientific(worst)) \(ok ? "PASS" : "FAIL")")
    return ok
}

func info() {
    print("libFlashAttention \(String(cString: flash_attention_version_string())) (ABI \(flash_attention_abi_version()))")
    print("kernel instruction set: \(String(cString: flash_attention_kernel_isa()))")
    print("default threads: \(flash_attention_default_num_threads())")
}

let arguments = CommandLine.arguments.dropFirst()
switch arguments.first ?? "demo" {
case "demo":
    info()
    print("")
    let walkthroughOK = Walkthrough.run()
    let realisticOK = realisticRun()
    exit(walkthroughOK && realisticOK ? 0 : 1)
case "info":
    info()
default:
    usage()
}

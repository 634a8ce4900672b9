import CFlashAttention
import FlashAttention
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#elseif canImport(Musl)
import Musl
#endif

/// `flash-attention demo | bench | info | isas`: the walkthrough plus one realistic-size run, native timings of
/// the prefill shapes (Bench.swift), what the library is, or the kernel paths this CPU can run (one line,
/// space-separated, the default first: for scripts that run something once per path with FLASH_ATTENTION_ISA).

let usageText = "usage: flash-attention [demo | bench [options] | info | isas]"

/// An unknown command is an error: the usage goes to stderr and the status is 2.
func usage() -> Never {
    writeStandardError(usageText + "\n")
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
    let shape = AttentionShape(batch: 1, headsQ: 16, headsKV: 16, seqlen: 2048, headDim: 128)
    let (heads, seqlen, dim) = (shape.headsQ, shape.seqlen, shape.headDim)
    var random = PseudoRandom(seed: 7)
    let q = random.floats(shape.queryCount), k = random.floats(shape.keyCount), v = random.floats(shape.keyCount)
    var out = [Float](repeating: 0, count: shape.queryCount)
    print("Realistic size: batch 1, \(heads) heads, \(seqlen) tokens, head_dim \(dim), float32, non-causal")
    for threads in [1, Int(flash_attention_default_num_threads())] {
        var times: [Double] = []
        for _ in 0..<3 {
            guard let time = timeForward(shape, causal: false, threads: threads, q: q, k: k, v: v, out: &out) else { return false }
            times.append(time)
        }
        let best = times.min()!
        print("  \(threads) thread\(threads == 1 ? " " : "s"): \(fixed(best * 1000, 1)) ms  \(fixed(shape.flops(causal: false) / best / 1e9, 1)) GFLOP/s (best of 3)")
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
    print("kernel instruction set: \(String(cString: flash_attention_kernel_isa()))"
          + " (available here: \(String(cString: flash_attention_available_isas()).split(separator: ",").joined(separator: ", "));"
          + " FLASH_ATTENTION_ISA picks one)")
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
case "bench":
    exit(Bench.run(Bench.parse(arguments.dropFirst())) ? 0 : 1)
case "info":
    info()
case "isas":
    print(String(cString: flash_attention_available_isas()).split(separator: ",").joined(separator: " "))
case "--help", "-h":
    print(usageText)
default:
    usage()
}

import CFlashAttention
import FlashAttention
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#elseif canImport(Musl)
import Musl
#endif

/// `flash-attention bench`: this library's float32 forward timed natively on the project's prefill shapes.
///
/// Native, so it needs no Python; the side-by-side comparison with numpy and PyTorch stays in bench/bench.py.
enum Bench {
    /// The prefill shapes of the speed issue, the same list as `PREFILL` in bench/bench.py.
    static let prefillShapes = [
        AttentionShape(batch: 1, headsQ: 8, headsKV: 8, seqlen: 1024, headDim: 64),
        AttentionShape(batch: 1, headsQ: 8, headsKV: 8, seqlen: 4096, headDim: 64),
        AttentionShape(batch: 1, headsQ: 16, headsKV: 16, seqlen: 2048, headDim: 128),
        AttentionShape(batch: 4, headsQ: 32, headsKV: 32, seqlen: 512, headDim: 128),
        AttentionShape(batch: 1, headsQ: 32, headsKV: 8, seqlen: 2048, headDim: 128),
    ]

    struct Options {
        var threads = Array(Set([1, Int(flash_attention_default_num_threads())])).sorted()
        var repeats = 5
        var quick = false
        var shapes: [AttentionShape] = []
    }

    static let usage = """
        usage: flash-attention bench [--threads 1,2] [--repeats N] [--quick] [--shape b,hq,hkv,s,d]...
        Times this library's float32 forward, non-causal and causal, on the standard prefill shapes:
        the median of N calls after one warm-up, for each thread count.
          --threads LIST        comma-separated thread counts (default: \(Options().threads.map(String.init).joined(separator: ",")), i.e. 1 and all cores)
          --repeats N           timed calls per cell (default 5)
          --quick               only the first two shapes
          --shape b,hq,hkv,s,d  time this shape instead of the standard list (repeatable)
          --help                show this message
        """

    /// Reads the options after `bench`; a bad one prints the usage on stderr and exits with status 2.
    static func parse(_ arguments: ArraySlice<String>) -> Options {
        func fail(_ message: String) -> Never {
            writeStandardError("flash-attention bench: \(message)\n\(usage)\n")
            exit(2)
        }
        /// Comma-separated positive integers, `count` of them when given.
        func integers(_ text: String, for option: String, count: Int? = nil) -> [Int] {
            let values = text.split(separator: ",", omittingEmptySubsequences: false).map { Int($0) }
            guard !values.isEmpty, values.allSatisfy({ ($0 ?? 0) > 0 }), count == nil || values.count == count else {
                let wanted = count == 1 ? "a positive integer" : "\(count.map { "\($0) " } ?? "")comma-separated positive integers"
                fail("\(option) needs \(wanted), got '\(text)'")
            }
            return values.compactMap { $0 }
        }
        var options = Options(), rest = arguments
        var shapes: [AttentionShape] = []
        while let option = rest.popFirst() {
            switch option {
            case "--help", "-h":
                print(usage)
                exit(0)
            case "--quick":
                options.quick = true
            case "--threads", "--repeats", "--shape":
                guard let value = rest.popFirst() else { fail("\(option) needs a value") }
                if option == "--threads" {
                    options.threads = integers(value, for: option)
                } else if option == "--repeats" {
                    options.repeats = integers(value, for: option, count: 1)[0]
                } else {
                    let n = integers(value, for: option, count: 5)
                    shapes.append(AttentionShape(batch: n[0], headsQ: n[1], headsKV: n[2], seqlen: n[3], headDim: n[4]))
                }
            default:
                fail("unknown option '\(option)'")
            }
        }
        options.shapes = shapes.isEmpty ? prefillShapes : shapes
        if options.quick { options.shapes = Array(options.shapes.prefix(2)) }
        return options
    }

    /// Prints one table row per (shape, causal, threads) as it completes; false if a library call failed.
    static func run(_ options: Options) -> Bool {
        print("libFlashAttention \(String(cString: flash_attention_version_string())), kernel \(String(cString: flash_attention_kernel_isa())),"
              + " float32 forward, median of \(options.repeats) after 1 warm-up")
        let shapeWidth = max(5, options.shapes.map(\.label.count).max() ?? 0)
        func row(_ shape: String, _ causal: String, _ threads: String, _ ms: String, _ gflops: String) -> String {
            pad(shape, shapeWidth + 1) + pad(causal, 7) + padLeft(threads, 7) + padLeft(ms, 11) + padLeft(gflops, 10)
        }
        print(row("shape", "causal", "threads", "median ms", "GFLOP/s"))
        var progress = Progress(total: options.shapes.count * 2 * options.threads.count)
        for shape in options.shapes {
            var random = PseudoRandom(seed: 7)  // inputs made once per shape, shared by all its cells
            let q = random.floats(shape.queryCount), k = random.floats(shape.keyCount), v = random.floats(shape.keyCount)
            var out = [Float](repeating: 0, count: shape.queryCount)
            for causal in [false, true] {
                for threads in options.threads {
                    progress.advance("\(shape.label) \(causal ? "causal" : "non-causal") \(threads)T")
                    var times: [Double] = []
                    for _ in 0...options.repeats {  // one more than asked: the first is the warm-up
                        guard let time = timeForward(shape, causal: causal, threads: threads, q: q, k: k, v: v, out: &out) else {
                            progress.clear()
                            return false
                        }
                        times.append(time)
                    }
                    let seconds = median(times.dropFirst())
                    progress.clear()
                    print(row(shape.label, causal ? "yes" : "no", "\(threads)", fixed(seconds * 1e3, 2),
                              fixed(shape.flops(causal: causal) / seconds / 1e9, 1)))
                }
            }
        }
        print("\nside-by-side with numpy and PyTorch: python3 bench/bench.py")
        return true
    }
}

/// A self-attention problem (seqlen_q = seqlen_k) over contiguous [batch, seqlen, heads, head_dim] tensors.
struct AttentionShape {
    var batch, headsQ, headsKV, seqlen, headDim: Int

    var queryCount: Int { batch * seqlen * headsQ * headDim }
    var keyCount: Int { batch * seqlen * headsKV * headDim }
    var label: String { "(\(batch),\(headsQ),\(headsKV),\(seqlen),\(headDim))" }

    /// 4·b·h_q·s²·d: two s × s × d products per head (Q Kᵀ and P V); the causal mask skips half of them.
    func flops(causal: Bool) -> Double {
        4 * Double(batch) * Double(headsQ) * Double(seqlen) * Double(seqlen) * Double(headDim) / (causal ? 2 : 1)
    }
}

/// Deterministic, roughly N(0, 1) floats (a 64-bit LCG, Knuth's MMIX constants): the same inputs on every run.
struct PseudoRandom {
    var state: UInt64

    init(seed: UInt64) { state = seed }

    /// The sum of 4 uniforms, centred and scaled to unit variance (4 · 1/12 · 1.732² ≈ 1).
    mutating func next() -> Float {
        var sum: Float = 0
        for _ in 0..<4 {
            state = state &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
            sum += Float(state >> 40) / Float(1 << 24)
        }
        return (sum - 2) * 1.732
    }

    mutating func floats(_ count: Int) -> [Float] { (0..<count).map { _ in next() } }
}

/// Runs one float32 forward of `shape` through the C entry point and returns its wall time in seconds, or nil
/// after printing the library's message on stderr.
func timeForward(_ shape: AttentionShape, causal: Bool, threads: Int, q: [Float], k: [Float], v: [Float],
                 out: inout [Float]) -> Double? {
    var p = flash_attention_params()
    _ = flash_attention_params_init(&p, MemoryLayout<flash_attention_params>.size)
    (p.batch, p.seqlen_q, p.seqlen_k) = (Int64(shape.batch), Int64(shape.seqlen), Int64(shape.seqlen))
    (p.heads_q, p.heads_kv, p.head_dim) = (Int64(shape.headsQ), Int64(shape.headsKV), Int64(shape.headDim))
    (p.causal, p.num_threads) = (causal ? 1 : 0, Int32(threads))
    let (qRow, kvRow) = (Int64(shape.headsQ * shape.headDim), Int64(shape.headsKV * shape.headDim))
    (p.q_row_stride, p.out_row_stride, p.k_row_stride, p.v_row_stride) = (qRow, qRow, kvRow, kvRow)
    (p.q_batch_stride, p.out_batch_stride) = (qRow * p.seqlen_q, qRow * p.seqlen_q)
    (p.k_batch_stride, p.v_batch_stride) = (kvRow * p.seqlen_k, kvRow * p.seqlen_k)
    (p.q_head_stride, p.k_head_stride, p.v_head_stride, p.out_head_stride) = (p.head_dim, p.head_dim, p.head_dim, p.head_dim)
    var seconds = 0.0
    let status = q.withUnsafeBufferPointer { qp in
        k.withUnsafeBufferPointer { kp in
            v.withUnsafeBufferPointer { vp in
                out.withUnsafeMutableBufferPointer { op in
                    (p.q, p.k, p.v) = (UnsafeRawPointer(qp.baseAddress), UnsafeRawPointer(kp.baseAddress), UnsafeRawPointer(vp.baseAddress))
                    p.out = UnsafeMutableRawPointer(op.baseAddress)
                    let start = now()
                    let status = flash_attention_forward(&p)
                    seconds = now() - start
                    return status
                }
            }
        }
    }
    guard status == FA_OK else {
        writeStandardError("library call failed: \(String(cString: flash_attention_last_error()))\n")
        return nil
    }
    return seconds
}

/// The one-line `[ 3/20] …` indicator on stderr, drawn only when stderr is a terminal so that logs and pipes
/// receive the table alone.
struct Progress {
    let total: Int
    let enabled = isatty(STDERR_FILENO) != 0
    private var step = 0, drawn = 0

    init(total: Int) { self.total = total }

    mutating func advance(_ text: String) {
        step += 1
        guard enabled else { return }
        let line = "[\(padLeft("\(step)", "\(total)".count))/\(total)] \(text) ..."
        writeStandardError("\r" + line + String(repeating: " ", count: max(0, drawn - line.count)))
        drawn = line.count
    }

    /// Blanks the line, so that whatever is printed next starts on a clean one.
    mutating func clear() {
        guard drawn > 0 else { return }
        writeStandardError("\r" + String(repeating: " ", count: drawn) + "\r")
        drawn = 0
    }
}

func median(_ values: ArraySlice<Double>) -> Double {
    let sorted = values.sorted(), middle = sorted.count / 2
    return sorted.count % 2 == 1 ? sorted[middle] : (sorted[middle - 1] + sorted[middle]) / 2
}

func padLeft(_ s: String, _ width: Int) -> String { String(repeating: " ", count: max(0, width - s.count)) + s }

/// Unbuffered, through the file descriptor: Glibc's `stderr` global cannot be referenced in Swift 6 mode.
func writeStandardError(_ text: String) {
    var text = text
    text.withUTF8 { _ = write(STDERR_FILENO, $0.baseAddress, $0.count) }
}

import CFlashAttention
import Dispatch
import FlashAttention
import FlashAttentionCore
import Testing

/// Many callers at once share the worker pool: every result must equal the single-threaded one bitwise.
@Test("concurrent callers get correct results", arguments: tiledPaths)
func concurrentCallersGetCorrectResults(_ isa: KernelISA) {
    let problems = (0..<8).map { i in
        Problem(
            batch: 1 + i % 2, seqlenQ: 50 + 37 * i, seqlenK: 80 + 23 * i, headsQ: 4, headsKV: 1 + i % 2 * 1,
            headDim: [16, 40, 64, 128][i % 4], causal: i % 3 == 0, seed: UInt64(60 + i))
    }
    let expected = problems.map { problem in
        let (q, k, v) = problem.inputs()
        return onPath(isa) { runLibrary(problem, q: q, k: k, v: v, threads: 1).out.storage.map(\.bitPattern) }
    }
    let results = UnsafeMutableBufferPointer<Bool>.allocate(capacity: 8 * 10)
    results.initialize(repeating: false)
    defer { results.deallocate() }
    let shared = UncheckedBox(results)
    DispatchQueue.concurrentPerform(iterations: 8 * 10) { n in
        let problem = problems[n % 8]
        let (q, k, v) = problem.inputs()
        let output = onPath(isa) { runLibrary(problem, q: q, k: k, v: v, threads: Int32(n % 3)) }
        shared.value[n] = output.status == FA_OK && output.out.storage.map(\.bitPattern) == expected[n % 8]
    }
    #expect(results.allSatisfy { $0 })
}

/// Hands a buffer whose elements are written by distinct iterations to concurrentPerform.
final class UncheckedBox<T>: @unchecked Sendable {
    let value: T
    init(_ value: T) { self.value = value }
}

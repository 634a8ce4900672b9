import FlashAttentionKernels
import Glibc

/// The plain reference path: for each query row, every score in float64, the full softmax, then the
/// weighted sum of V — no tiling, no online rescaling. It is the fallback on CPUs without the tiled
/// kernel's instructions and the path `FA_ALGORITHM_REFERENCE` forces for testing. Its scratch is one row
/// of scores, O(seqlen_k).
struct ReferenceForward: WorkPlan {
    let problem: AttentionProblem
    /// Query rows per work item.
    static let rowsPerItem = 16

    var rowBlocks: Int { (problem.seqlenQ + Self.rowsPerItem - 1) / Self.rowsPerItem }
    var itemCount: Int { problem.batch * problem.headsQ * rowBlocks }
    var scratchBytes: Int { max(1, problem.seqlenK) * MemoryLayout<Double>.size }

    func run(item: Int, scratch: UnsafeMutableRawPointer) {
        let p = problem
        let scores = scratch.assumingMemoryBound(to: Double.self)
        let bh = item / rowBlocks
        let b = bh / p.headsQ, h = bh % p.headsQ, kvHead = h / p.groupSize
        let first = (item % rowBlocks) * Self.rowsPerItem
        for i in first..<min(first + Self.rowsPerItem, p.seqlenQ) {
            let q = p.q.row(batch: b, head: h, row: i)
            let out = p.out.row(batch: b, head: h, row: i)
            let visible = p.keyEnd(forQuery: i)
            var maximum = -Double.infinity
            for j in 0..<visible {
                let k = p.k.row(batch: b, head: kvHead, row: j)
                var dot = 0.0
                for c in 0..<p.headDim { dot += Double(q[c]) * Double(k[c]) }
                scores[j] = dot * Double(p.scale)
                maximum = max(maximum, scores[j])
            }
            var sum = 0.0
            for j in 0..<visible {
                scores[j] = exp(scores[j] - maximum)
                sum += scores[j]
            }
            for c in 0..<p.headDim {
                var acc = 0.0
                for j in 0..<visible { acc += scores[j] * Double(p.v.row(batch: b, head: kvHead, row: j)[c]) }
                out[c] = visible == 0 ? 0 : Float(acc / sum)
            }
            p.lse?.row(batch: b, head: h, row: i).pointee = visible == 0 ? -.infinity : Float(maximum + log(sum))
        }
    }
}

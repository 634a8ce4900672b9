import FlashAttentionKernels
import Glibc

/// The plain reference path: for each query row, every visible score in float64 (softcap and ALiBi
/// applied), the full softmax with the sink in its denominator, then the weighted sum of V — no tiling, no
/// online rescaling. It is the fallback on CPUs without the tiled kernel's instructions and the path
/// `FA_ALGORITHM_REFERENCE` forces for testing. Its scratch is one row of scores, O(seqlen_k).
struct ReferenceForward: WorkPlan {
    let problem: AttentionProblem

    /// One item per (sequence, query head).
    var itemCount: Int { problem.batch * problem.headsQ }
    var scratchBytes: Int { max(1, problem.maxSeqlenK) * MemoryLayout<Double>.size }

    func run(item: Int, scratch: UnsafeMutableRawPointer) {
        let p = problem
        let scores = scratch.assumingMemoryBound(to: Double.self)
        let s = p.sequence(item / p.headsQ)
        let h = item % p.headsQ, kvHead = h / p.groupSize
        let slope = p.alibiSlopes.map { Double($0[s.batch * p.alibiBatchStride + h]) } ?? 0
        let sink = p.sinks.map { Double($0[h]) } ?? -.infinity
        let cap = Double(p.softcap)
        for i in 0..<s.seqlenQ {
            let q = p.q.row(batch: s.qBatch, head: h, row: s.qRow + i)
            let out = p.out.row(batch: s.qBatch, head: h, row: s.qRow + i)
            let keys = p.keyRange(position: i, seqlenQ: s.seqlenQ, seqlenK: s.seqlenK)
            var maximum = sink
            for j in keys {
                let k = p.keyRow(p.k, s, head: kvHead, position: j)
                var dot = 0.0
                for c in 0..<p.headDim { dot += Double(q[c]) * Double(k[c]) }
                var score = dot * Double(p.scale)
                if cap > 0 { score = cap * tanh(score / cap) }
                score -= slope * Double(abs(i + s.seqlenK - s.seqlenQ - j))
                scores[j] = score
                maximum = Swift.max(maximum, score)
            }
            var sum = maximum == -.infinity ? 0 : exp(sink - maximum)
            for j in keys {
                scores[j] = exp(scores[j] - maximum)
                sum += scores[j]
            }
            for c in 0..<p.headDim {
                var acc = 0.0
                for j in keys { acc += scores[j] * Double(p.keyRow(p.v, s, head: kvHead, position: j)[c]) }
                out[c] = keys.isEmpty ? 0 : Float(acc / sum)
            }
            p.lse?.row(batch: s.qBatch, head: h, row: s.qRow + i).pointee =
                maximum == -.infinity ? -.infinity : Float(maximum + log(sum))
        }
    }
}

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#elseif canImport(Musl)
import Musl
#endif

/// The plain reference path: for each query row, every visible score in float64 (softcap and ALiBi
/// applied), the full softmax with the sink in its denominator, then the weighted sum of V — no tiling, no
/// online rescaling. It is the fallback on CPUs without the tiled kernel's instructions and the path
/// `FA_ALGORITHM_REFERENCE` forces for testing. Its scratch is one row of scores, O(seqlen_k).
public struct ReferenceForward: WorkPlan {
    let problem: AttentionProblem

    public init(problem: AttentionProblem) { self.problem = problem }

    /// One item per (sequence, query head).
    public var itemCount: Int { problem.batch * problem.headsQ }
    public var scratchBytes: Int { max(1, problem.maxSeqlenK) * MemoryLayout<Double>.size }

    public func run(item: Int, scratch: UnsafeMutableRawPointer) {
        let p = problem
        let scores = scratch.assumingMemoryBound(to: Double.self)
        let s = p.sequence(item / p.headsQ)
        let h = item % p.headsQ, kvHead = h / p.groupSize
        let slope = p.alibiSlopes.map { Double($0[s.batch * p.alibiBatchStride + h]) } ?? 0
        let sink = p.sinks.map { Double($0[h]) } ?? -.infinity
        let cap = Double(p.softcap)
        let width = max(p.headDim, p.headDimV)
        withUnsafeTemporaryAllocation(of: Float.self, capacity: 3 * width) { rows in
            let q = rows.baseAddress!, key = q + width, out = key + width
            func read(_ tensor: TensorView, _ row: UnsafeRawPointer, into target: UnsafeMutablePointer<Float>) {
                tensor.element.loadRow(row, count: p.headDim, into: target)
            }
            /// Key (or, with `count` = head_dim_v, value) position j, dequantized (times its row's scale) for
            /// an 8-bit cache.
            func readKey(_ tensor: TensorView, position j: Int, count: Int, into target: UnsafeMutablePointer<Float>) {
                let scale = tensor.scale == nil ? 1 : p.keyScale(tensor, s, head: kvHead, position: j).pointee
                tensor.element.loadRow(p.keyRow(tensor, s, head: kvHead, position: j), count: count, scale: scale, into: target)
            }
            for i in 0..<s.seqlenQ {
                read(p.q, p.q.row(batch: s.qBatch, head: h, row: s.qRow + i), into: q)
                let keys = p.keyRange(position: i, seqlenQ: s.seqlenQ, seqlenK: s.seqlenK)
                var maximum = sink
                var sawNaN = false  // a NaN score: the row's output and LSE are NaN (see finishRow)
                for j in keys {
                    readKey(p.k, position: j, count: p.headDim, into: key)
                    var dot = 0.0
                    for c in 0..<p.headDim { dot += Double(q[c]) * Double(key[c]) }
                    var score = dot * Double(p.scale)
                    if cap > 0 { score = cap * tanh(score / cap) }
                    score -= slope * Double(abs(i + s.seqlenK - s.seqlenQ - j))
                    if let mask = p.attnMask {
                        score += Double(mask.bias(at: mask.rowOffset(batch: s.batch, head: h, position: i) + j * mask.colStride))
                    }
                    scores[j] = score
                    sawNaN = sawNaN || score.isNaN
                    maximum = Swift.max(maximum, score)
                }
                // Every score −inf (and no sink): the row saw no key; exp(−inf − −inf) would make NaN.
                let sawNoKey = maximum == -.infinity
                var sum = sawNoKey ? 0 : exp(sink - maximum)
                for j in keys {
                    scores[j] = sawNoKey ? 0 : exp(scores[j] - maximum)
                    sum += scores[j]
                }
                var accumulators = [Double](repeating: 0, count: p.headDimV)
                // Dropout scales each probability in P·V only: the sum (and so the LSE) is the undropped one.
                let dropoutRow = p.dropout?.row(batch: s.batch, head: h, position: i)
                for j in keys {
                    readKey(p.v, position: j, count: p.headDimV, into: key)
                    let weight = scores[j] * Double(dropoutRow.map { p.dropout!.factor($0, key: j) } ?? 1)
                    for c in 0..<p.headDimV { accumulators[c] += weight * Double(key[c]) }
                }
                for c in 0..<p.headDimV {
                    out[c] = sawNaN ? .nan : keys.isEmpty || sawNoKey ? 0 : Float(accumulators[c] / sum)
                }
                p.out.element.storeRow(out, count: p.headDimV, scale: 1, into: p.out.row(batch: s.qBatch, head: h, row: s.qRow + i))
                p.lse?.row(batch: s.qBatch, head: h, row: s.qRow + i).pointee =
                    sawNaN ? .nan : maximum == -.infinity ? -.infinity : Float(maximum + log(sum))
            }
        }
    }
}

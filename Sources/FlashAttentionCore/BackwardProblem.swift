/// The validated backward problem and its work decomposition (FlashAttention-2, recomputing the
/// probabilities from the forward LSE), in three phases with one owner per output element — no atomics, and
/// bitwise identical results for every thread count:
///
/// 1. `rows`: D_i = rowsum(dO_i ∘ O_i) per query row, and each (sequence, head)'s share of the sink
///    gradient; one item per (sequence, query head).
/// 2. `keyValue`: dK and dV, and each key chunk's own dQ partial; one item per (key chunk, sequence, kv
///    head).
/// 3. `query`: dQ = scale · the sum of the chunks' partials, in chunk order; one item per (sequence,
///    query head).
///
/// The keys are cut into chunks so that there are enough items to share among threads; the chunk count
/// depends on the shape and the kernel copy's key block only (never on the thread count), which is what
/// keeps the dQ sums deterministic.

public enum BackwardPhase: Sendable {
    case rows, keyValue, query
}

/// A validated backward problem: the forward problem (with its `out` and `lse`) and the gradients.
public struct BackwardProblem: @unchecked Sendable {
    public var forward: AttentionProblem
    public var dout: TensorView
    public var dq: TensorView
    public var dk: TensorView
    public var dv: TensorView
    public var dsinks: UnsafeMutablePointer<Float>?
    /// Keys per block, blocks per key chunk, key chunks (phase 2 items per sequence and kv head), and the
    /// floats between rows of the dQ partials; set by `cut(keyBlock:rowStride:)`.
    public private(set) var keyBlock = 1
    public private(set) var blocksPerChunk = 1
    public private(set) var chunks = 1
    public private(set) var partialStride = 1
    /// D per (query batch entry, head, row), [qBatches][headsQ][seqlenQ] with seqlenQ the q tensor's rows;
    /// set by the driver.
    public var rowDots: UnsafeMutablePointer<Float>?
    /// Each (sequence, head)'s share of the sink gradient, [batch][headsQ]; set by the driver.
    public var sinkShares: UnsafeMutablePointer<Float>?
    /// The chunks' dQ partials, `partialFloats` zero-filled floats; set by the driver.
    public var partials: UnsafeMutablePointer<Float>?

    public init(
        forward: AttentionProblem, dout: TensorView, dq: TensorView, dk: TensorView, dv: TensorView,
        dsinks: UnsafeMutablePointer<Float>?
    ) {
        self.forward = forward
        self.dout = dout
        self.dq = dq
        self.dk = dk
        self.dv = dv
        self.dsinks = dsinks
    }

    /// Cuts the keys into chunks of `keyBlock`-key blocks: enough chunks for 32 items, as long as the dQ
    /// partials stay within max(64 MiB, 2 × dQ in float32). `rowStride` is the partials' row stride (floats).
    public mutating func cut(keyBlock: Int, rowStride: Int) {
        self.keyBlock = keyBlock
        partialStride = rowStride
        let f = forward
        let keyBlocks = max(1, (f.maxSeqlenK + keyBlock - 1) / keyBlock)
        let units = max(1, f.batch * f.headsKV)
        let chunkBytes = chunkFloats * MemoryLayout<Float>.size
        let budget = max(64 << 20, 2 * chunkBytes)
        let wanted = min(keyBlocks, (32 + units - 1) / units, max(1, budget / max(1, chunkBytes)))
        blocksPerChunk = (keyBlocks + wanted - 1) / wanted
        chunks = (keyBlocks + blocksPerChunk - 1) / blocksPerChunk
    }

    /// Items of each phase.
    public func itemCount(_ phase: BackwardPhase) -> Int {
        switch phase {
        case .rows, .query: return forward.batch * forward.headsQ
        case .keyValue: return chunks * forward.batch * forward.headsKV
        }
    }

    /// Index of row `row` (q-tensor row) of head h in `rowDots`.
    @inlinable @inline(__always)
    public func rowIndex(_ s: Sequence, head h: Int, row: Int) -> Int {
        (s.qBatch * forward.headsQ + h) * forward.seqlenQ + row
    }

    /// Floats of `rowDots`.
    public var rowDotCount: Int { qBatches * forward.headsQ * forward.seqlenQ }

    @usableFromInline var qBatches: Int {
        if case .varlen = forward.layout { return 1 } else { return forward.batch }
    }

    private var chunkFloats: Int { qBatches * forward.headsQ * forward.seqlenQ * partialStride }

    /// Floats of `partials`.
    public var partialFloats: Int { chunks * chunkFloats }

    /// Row `row` of sequence `s`, head h, in chunk `chunk`'s dQ partial (rows `partialStride` apart).
    @inlinable @inline(__always)
    public func partialRow(chunk: Int, _ s: Sequence, head h: Int, row: Int) -> UnsafeMutablePointer<Float> {
        let f = forward
        let region = chunk * qBatches * f.headsQ + s.qBatch * f.headsQ + h
        return partials! + (region * f.seqlenQ + s.qRow + row) * partialStride
    }
}

/// The validated problem the kernels run: tensor views, where each sequence of the batch lives, and the
/// options. Only the `FlashAttention` module builds these (from `flash_attention_params`), after checking
/// every size, stride and index, so the kernels trust every field. The accessors are `@inlinable`: every
/// kernel copy inlines them into its own loops, compiled with its own flags.

/// A tensor `[batch, seq, heads, dim]` of `element`s seen through element strides (dim stride 1).
///
/// The pointer is to element (0, 0, 0, 0); strides may be negative or zero for inputs. Validation has
/// checked that every addressed element lies inside the caller's buffer.
public struct TensorView: @unchecked Sendable {
    public var base: UnsafeMutableRawPointer
    public var element: ElementType
    public var batchStride: Int
    public var rowStride: Int
    public var headStride: Int
    /// The row scales of an 8-bit cache (element int8 or float8e4m3), laid out like the rows; nil otherwise.
    public var scale: ScaleView?

    public init(
        base: UnsafeMutableRawPointer, element: ElementType, batchStride: Int, rowStride: Int, headStride: Int,
        scale: ScaleView? = nil
    ) {
        self.base = base
        self.element = element
        self.batchStride = batchStride
        self.rowStride = rowStride
        self.headStride = headStride
        self.scale = scale
    }

    /// Address of element (b, row, h, 0).
    @inlinable @inline(__always)
    public func row(batch b: Int, head h: Int, row: Int) -> UnsafeMutableRawPointer {
        base + (b &* batchStride &+ row &* rowStride &+ h &* headStride) &* element.size
    }

    /// Bytes between consecutive rows.
    @inlinable @inline(__always) public var rowBytes: Int { rowStride &* element.size }
}

/// The log-sum-exp output `[batch, heads_q, seqlen_q]` seen through element strides.
public struct LSEView: @unchecked Sendable {
    public var base: UnsafeMutablePointer<Float>
    public var batchStride: Int
    public var headStride: Int
    public var rowStride: Int

    public init(base: UnsafeMutablePointer<Float>, batchStride: Int, headStride: Int, rowStride: Int) {
        self.base = base
        self.batchStride = batchStride
        self.headStride = headStride
        self.rowStride = rowStride
    }

    @inlinable @inline(__always)
    public func row(batch b: Int, head h: Int, row: Int) -> UnsafeMutablePointer<Float> {
        base + (b &* batchStride &+ h &* headStride &+ row &* rowStride)
    }
}

/// Where the batch's sequences live.
public enum SequenceLayout: @unchecked Sendable {
    /// Every batch entry has the problem's seqlenQ queries and seqlenK keys.
    case dense
    /// Packed sequences: batch b holds q rows cuQ[b] ..< cuQ[b+1] and k/v rows cuK[b] ..< cuK[b+1].
    case varlen(cuQ: UnsafePointer<Int32>, cuK: UnsafePointer<Int32>)
    /// A KV cache: batch b attends to seqlens[b] + appended keys of cache entry batchIndex[b] (or b).
    case cache(seqlens: UnsafePointer<Int32>, batchIndex: UnsafePointer<Int32>?, appended: Int)
}

/// How key/value rows are found in k and v.
public enum KeyValueStorage: @unchecked Sendable {
    /// Row j of kv batch entry e is element (e, j, head, 0).
    case contiguous
    /// Position j of batch b is row j % pageSize of block table[b * tableStride + j / pageSize].
    case paged(table: UnsafePointer<Int32>, tableStride: Int, pageSize: Int)
}

/// One sequence of the batch, resolved.
public struct Sequence: Sendable {
    /// Batch index (for the query/output tensors, block table, ALiBi slopes).
    public var batch: Int
    /// Batch index of q/out and lse views (0 for varlen, whose batch strides are unused).
    public var qBatch: Int
    /// First q/out row of the sequence (cu_seqlens_q[b] for varlen, else 0).
    public var qRow: Int
    public var seqlenQ: Int
    /// Batch entry of k/v (cache_batch_idx[b] for a cache; 0 for varlen).
    public var kvBatch: Int
    /// First k/v row (cu_seqlens_k[b] for varlen, else 0).
    public var kRow: Int
    public var seqlenK: Int

    @inlinable
    public init(batch: Int, qBatch: Int, qRow: Int, seqlenQ: Int, kvBatch: Int, kRow: Int, seqlenK: Int) {
        (self.batch, self.qBatch, self.qRow, self.seqlenQ) = (batch, qBatch, qRow, seqlenQ)
        (self.kvBatch, self.kRow, self.seqlenK) = (kvBatch, kRow, seqlenK)
    }
}

/// One validated forward problem.
public struct AttentionProblem: @unchecked Sendable {
    public var batch: Int
    /// seqlen_q for dense and cache problems; total rows of q for varlen.
    public var seqlenQ: Int
    /// seqlen_k for dense problems; total rows of k for varlen; unused for caches.
    public var seqlenK: Int
    public var headsQ: Int
    public var headsKV: Int
    /// Head size of q and k (the score's depth).
    public var headDim: Int
    /// Head size of v and out (MLA's value heads are narrower than its key heads); = headDim by default.
    public var headDimV: Int
    public var q: TensorView
    public var k: TensorView
    public var v: TensorView
    public var out: TensorView
    public var lse: LSEView?
    /// The softmax scale actually applied (0 in the params has been resolved to 1/sqrt(head_dim)).
    public var scale: Float
    /// Keys before / after the aligned diagonal each query sees; nil = unbounded (causal is right = 0).
    public var windowLeft: Int?
    public var windowRight: Int?
    /// ALiBi slopes [batch, heads_q] with this batch stride (0: shared), or nil.
    public var alibiSlopes: UnsafePointer<Float>?
    public var alibiBatchStride: Int
    /// Softcap (> 0), or 0 for none.
    public var softcap: Float
    /// Sink logits [heads_q], or nil.
    public var sinks: UnsafePointer<Float>?
    public var layout: SequenceLayout
    public var storage: KeyValueStorage
    /// The longest sequence's query and key counts (= seqlenQ / seqlenK for dense problems).
    public var maxSeqlenQ: Int
    public var maxSeqlenK: Int
    /// Attention dropout (dense and varlen forward and backward), or nil.
    public var dropout: Dropout?
    /// A caller's mask over (sequence, query head, query, key), or nil.
    public var attnMask: AttentionMask?

    public init(
        batch: Int, seqlenQ: Int, seqlenK: Int, headsQ: Int, headsKV: Int, headDim: Int, headDimV: Int? = nil,
        q: TensorView, k: TensorView, v: TensorView, out: TensorView, lse: LSEView?, scale: Float,
        windowLeft: Int?, windowRight: Int?, alibiSlopes: UnsafePointer<Float>?, alibiBatchStride: Int,
        softcap: Float, sinks: UnsafePointer<Float>?, layout: SequenceLayout, storage: KeyValueStorage,
        maxSeqlenQ: Int, maxSeqlenK: Int, dropout: Dropout? = nil, attnMask: AttentionMask? = nil
    ) {
        self.batch = batch
        self.seqlenQ = seqlenQ
        self.seqlenK = seqlenK
        self.headsQ = headsQ
        self.headsKV = headsKV
        self.headDim = headDim
        self.headDimV = headDimV ?? headDim
        self.q = q
        self.k = k
        self.v = v
        self.out = out
        self.lse = lse
        self.scale = scale
        self.windowLeft = windowLeft
        self.windowRight = windowRight
        self.alibiSlopes = alibiSlopes
        self.alibiBatchStride = alibiBatchStride
        self.softcap = softcap
        self.sinks = sinks
        self.layout = layout
        self.storage = storage
        self.maxSeqlenQ = maxSeqlenQ
        self.maxSeqlenK = maxSeqlenK
        self.dropout = dropout
        self.attnMask = attnMask
    }

    /// Query heads per kv head (GQA group size); query head h reads kv head h / groupSize.
    @inlinable @inline(__always) public var groupSize: Int { headsQ / headsKV }

    /// Sequence b of the batch.
    @inlinable @inline(__always) public func sequence(_ b: Int) -> Sequence {
        switch layout {
        case .dense:
            return Sequence(batch: b, qBatch: b, qRow: 0, seqlenQ: seqlenQ, kvBatch: b, kRow: 0, seqlenK: seqlenK)
        case .varlen(let cuQ, let cuK):
            let q0 = Int(cuQ[b]), k0 = Int(cuK[b])
            return Sequence(
                batch: b, qBatch: 0, qRow: q0, seqlenQ: Int(cuQ[b + 1]) - q0, kvBatch: 0, kRow: k0,
                seqlenK: Int(cuK[b + 1]) - k0)
        case .cache(let seqlens, let batchIndex, let appended):
            return Sequence(
                batch: b, qBatch: b, qRow: 0, seqlenQ: seqlenQ, kvBatch: batchIndex.map { Int($0[b]) } ?? b,
                kRow: 0, seqlenK: Int(seqlens[b]) + appended)
        }
    }

    /// Address of key (or value, with `tensor` = v) position j of sequence `s` in kv head h.
    @inlinable @inline(__always)
    public func keyRow(_ tensor: TensorView, _ s: Sequence, head h: Int, position j: Int) -> UnsafeMutableRawPointer {
        switch storage {
        case .contiguous:
            return tensor.row(batch: s.kvBatch, head: h, row: s.kRow + j)
        case .paged(let table, let tableStride, let pageSize):
            let page = Int(table[s.batch * tableStride + j / pageSize])
            return tensor.row(batch: page, head: h, row: j % pageSize)
        }
    }

    /// The scale of key (or value) position j of sequence `s` in kv head h, for a tensor with row scales.
    @inlinable @inline(__always)
    public func keyScale(_ tensor: TensorView, _ s: Sequence, head h: Int, position j: Int) -> UnsafeMutablePointer<Float> {
        let scale = tensor.scale!
        switch storage {
        case .contiguous:
            return scale.at(batch: s.kvBatch, head: h, row: s.kRow + j)
        case .paged(let table, let tableStride, let pageSize):
            let page = Int(table[s.batch * tableStride + j / pageSize])
            return scale.at(batch: page, head: h, row: j % pageSize)
        }
    }

    /// The keys query position i of a sequence with `seqlenK` keys and `seqlenQ` queries may see:
    /// [i + offset − left, i + offset + right] ∩ [0, seqlenK), offset = seqlenK − seqlenQ (bottom-right).
    @inlinable @inline(__always)
    public func keyRange(position i: Int, seqlenQ: Int, seqlenK: Int) -> Range<Int> {
        let aligned = i + seqlenK - seqlenQ
        let lower = windowLeft.map { max(0, aligned - $0) } ?? 0
        let upper = windowRight.map { min(seqlenK, aligned + $0 + 1) } ?? seqlenK
        return lower < upper ? lower..<upper : 0..<0
    }
}

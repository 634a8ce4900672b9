/// A float32 tensor `[batch, seq, heads, dim]` seen through element strides (dim stride 1).
///
/// The pointer is to element (0, 0, 0, 0); strides may be negative or zero for inputs. Validation (in the
/// `FlashAttention` module) has checked that every addressed element lies inside the caller's buffer.
package struct TensorView: @unchecked Sendable {
    package var base: UnsafeMutablePointer<Float>
    package var batchStride: Int
    package var rowStride: Int
    package var headStride: Int

    package init(base: UnsafeMutablePointer<Float>, batchStride: Int, rowStride: Int, headStride: Int) {
        self.base = base
        self.batchStride = batchStride
        self.rowStride = rowStride
        self.headStride = headStride
    }

    /// Pointer to element (b, row, h, 0).
    @inline(__always)
    package func row(batch b: Int, head h: Int, row: Int) -> UnsafeMutablePointer<Float> {
        base + (b &* batchStride &+ row &* rowStride &+ h &* headStride)
    }
}

/// The log-sum-exp output `[batch, heads_q, seqlen_q]` seen through element strides.
package struct LSEView: @unchecked Sendable {
    package var base: UnsafeMutablePointer<Float>
    package var batchStride: Int
    package var headStride: Int
    package var rowStride: Int

    package init(base: UnsafeMutablePointer<Float>, batchStride: Int, headStride: Int, rowStride: Int) {
        self.base = base
        self.batchStride = batchStride
        self.headStride = headStride
        self.rowStride = rowStride
    }

    @inline(__always)
    package func row(batch b: Int, head h: Int, row: Int) -> UnsafeMutablePointer<Float> {
        base + (b &* batchStride &+ h &* headStride &+ row &* rowStride)
    }
}

/// One validated forward problem: shapes, tensor views and options, already checked and normalised.
///
/// Only the `FlashAttention` module creates these (from `flash_attention_params`), so the kernels trust
/// every field: sizes are in range, views address only the caller's memory, `scale` is finite and final.
package struct AttentionProblem: @unchecked Sendable {
    package var batch: Int
    package var seqlenQ: Int
    package var seqlenK: Int
    package var headsQ: Int
    package var headsKV: Int
    package var headDim: Int
    package var q: TensorView
    package var k: TensorView
    package var v: TensorView
    package var out: TensorView
    package var lse: LSEView?
    /// The softmax scale actually applied (0 in the params has been resolved to 1/sqrt(head_dim)).
    package var scale: Float
    package var causal: Bool

    package init(
        batch: Int, seqlenQ: Int, seqlenK: Int, headsQ: Int, headsKV: Int, headDim: Int,
        q: TensorView, k: TensorView, v: TensorView, out: TensorView, lse: LSEView?,
        scale: Float, causal: Bool
    ) {
        self.batch = batch
        self.seqlenQ = seqlenQ
        self.seqlenK = seqlenK
        self.headsQ = headsQ
        self.headsKV = headsKV
        self.headDim = headDim
        self.q = q
        self.k = k
        self.v = v
        self.out = out
        self.lse = lse
        self.scale = scale
        self.causal = causal
    }

    /// Query heads per kv head (GQA group size); query head h reads kv head h / groupSize.
    @inline(__always) package var groupSize: Int { headsQ / headsKV }

    /// Causal alignment offset: query i may see key j iff j <= i + causalOffset (bottom-right aligned).
    @inline(__always) package var causalOffset: Int { seqlenK - seqlenQ }

    /// One past the last key query row `i` may see.
    @inline(__always) package func keyEnd(forQuery i: Int) -> Int {
        causal ? max(0, min(seqlenK, i + causalOffset + 1)) : seqlenK
    }
}

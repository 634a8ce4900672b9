import CFlashAttention
import FlashAttentionCore

/// A forward call's params made into an `AttentionProblem`, one concern at a time: sizes, options, tensors,
/// then where the sequences live (SequenceValidation.swift), then that no output aliases an input.

/// Params fields that are not part of the problem, checked and normalised.
struct ForwardOptions {
    let numThreads: Int
    let algorithm: Int32
}

/// The sizes every entry point shares, checked.
struct ProblemSizes {
    let batch, seqlenQ, seqlenK, headsQ, headsKV, headDim: Int
    /// head_dim_v, resolved (0 in the params means head_dim).
    let headDimV: Int
    /// Varlen tensors have one "batch" entry; the sequences come from cu_seqlens.
    let tensorBatch: Int
}

/// The options that shape the arithmetic and the element types, checked.
struct ScoreOptions {
    let scale: Float
    let windowLeft: Int?
    let windowRight: Int?
    let dropout: Dropout?
    let qType: ElementType
    let kvType: ElementType
    /// The type of k_new/v_new (the cache's, or kv_new_dtype).
    let newType: ElementType
}

/// The tensors of a forward call as described by the caller, and the bytes each addresses (nil: no elements).
struct ForwardTensors {
    let q, out, k, v: TensorArgument
    let lse, alibi, sinks: TensorArgument?
    let qRange, outRange, kRange, vRange, lseRange, alibiRange, sinksRange: AddressRange?
    /// k and v are a paged cache ([num_blocks, block size, heads_kv, head_dim]) read through block_table.
    let paged: Bool
}

extension AttentionProblem {
    /// Validates `params` (already widened to the current struct) for `entry`. Also returns the address range
    /// of every tensor and array the call touches, by name, for callers that add outputs of their own.
    static func validated(_ params: flash_attention_params, entry: Entry) throws(FlashAttentionError) -> (
        AttentionProblem, ForwardOptions, CacheAppend?, InputRanges
    ) {
        let sizes = try validatedSizes(params, entry: entry)
        let options = try validatedOptions(params)
        let score = try validatedScoreOptions(params, entry: entry, headDim: sizes.headDim)
        let tensors = try validatedTensors(params, entry: entry, sizes, score)
        let sequences: SequenceSetup
        switch entry {
        case .dense: sequences = SequenceSetup(maxSeqlenQ: sizes.seqlenQ, maxSeqlenK: sizes.seqlenK)
        case .varlen: sequences = try validatedVarlen(params, sizes, tensors)
        case .kvcache: sequences = try validatedCache(params, sizes, tensors, score)
        }
        let (mask, maskRange) = try validatedMask(params, sizes, sequences)
        try checkOutputsAliasNothing(tensors, sequences, maskRange, entry: entry)
        let t = tensors
        let problem = AttentionProblem(
            batch: sizes.batch, seqlenQ: sizes.seqlenQ, seqlenK: sizes.seqlenK, headsQ: sizes.headsQ,
            headsKV: sizes.headsKV, headDim: sizes.headDim, headDimV: sizes.headDimV, q: view(t.q, t.qRange, score.qType),
            k: view(t.k, t.kRange, score.kvType, scale: sequences.scales.k),
            v: view(t.v, t.vRange, score.kvType, scale: sequences.scales.v), out: view(t.out, t.outRange, score.qType),
            lse: t.lse.map { lse in
                let (base, batchStride, headStride, rowStride, _) = strided(lse, t.lseRange)
                return LSEView(base: base, batchStride: batchStride, headStride: headStride, rowStride: rowStride)
            },
            scale: score.scale, windowLeft: score.windowLeft, windowRight: score.windowRight,
            alibiSlopes: t.alibiRange == nil ? nil : params.alibi_slopes,
            alibiBatchStride: Int(params.alibi_batch_stride), softcap: params.softcap,
            sinks: t.sinksRange == nil ? nil : params.sinks, layout: sequences.layout, storage: sequences.storage,
            maxSeqlenQ: sequences.maxSeqlenQ, maxSeqlenK: sequences.maxSeqlenK, dropout: score.dropout,
            attnMask: mask)
        let ranges = InputRanges(
            q: t.qRange, k: t.kRange, v: t.vRange, out: t.outRange, lse: t.lseRange, alibi: t.alibiRange,
            sinks: t.sinksRange, mask: maskRange, indices: sequences.indexRanges, varlen: entry == .varlen)
        return (problem, options, sequences.append, ranges)
    }

    /// batch, seqlens, heads, head_dim and head_dim_v.
    private static func validatedSizes(_ params: flash_attention_params, entry: Entry) throws(FlashAttentionError) -> ProblemSizes {
        let batch = Int(params.batch), seqlenQ = Int(params.seqlen_q)
        let headsQ = Int(params.heads_q), headsKV = Int(params.heads_kv), headDim = Int(params.head_dim)
        // For a cache the key length comes from cache_seqlens; the field is ignored.
        let seqlenK = entry == .kvcache ? 0 : Int(params.seqlen_k)
        if batch < 0 { throw .invalidShape("batch (\(batch)) must be >= 0") }
        if seqlenQ < 0 { throw .invalidShape("seqlen_q (\(seqlenQ)) must be >= 0") }
        if seqlenK < 0 { throw .invalidShape("seqlen_k (\(seqlenK)) must be >= 0") }
        if headsKV < 1 { throw .invalidShape("heads_kv (\(headsKV)) must be >= 1") }
        if headsQ < 1 { throw .invalidShape("heads_q (\(headsQ)) must be >= 1") }
        if headsQ % headsKV != 0 {
            throw .invalidShape("heads_q (\(headsQ)) is not a multiple of heads_kv (\(headsKV))")
        }
        if headDim < 1 || headDim > Int(FA_MAX_HEAD_DIM) {
            throw .invalidShape("head_dim (\(headDim)) must be in 1...\(FA_MAX_HEAD_DIM)")
        }
        let headDimV = params.head_dim_v == 0 ? headDim : Int(params.head_dim_v)
        if headDimV < 1 || headDimV > Int(FA_MAX_HEAD_DIM) {
            throw .invalidShape("head_dim_v (\(params.head_dim_v)) must be in 1...\(FA_MAX_HEAD_DIM), or 0 for head_dim")
        }
        return ProblemSizes(
            batch: batch, seqlenQ: seqlenQ, seqlenK: seqlenK, headsQ: headsQ, headsKV: headsKV, headDim: headDim,
            headDimV: headDimV, tensorBatch: entry == .varlen ? 1 : batch)
    }

    /// num_threads and algorithm.
    private static func validatedOptions(_ params: flash_attention_params) throws(FlashAttentionError) -> ForwardOptions {
        if params.num_threads < 0 {
            throw .invalidArgument("num_threads (\(params.num_threads)) must be >= 0 (0 = all online cores)")
        }
        if params.algorithm != FA_ALGORITHM_AUTO && params.algorithm != FA_ALGORITHM_REFERENCE
            && params.algorithm != FA_ALGORITHM_TILED
        {
            throw .invalidArgument(
                "algorithm (\(params.algorithm)) must be FA_ALGORITHM_AUTO (0), FA_ALGORITHM_REFERENCE (1)"
                    + " or FA_ALGORITHM_TILED (2)")
        }
        return ForwardOptions(numThreads: Int(params.num_threads), algorithm: params.algorithm)
    }

    /// Softmax scale, softcap, windows, dropout, reserved fields and element types.
    private static func validatedScoreOptions(
        _ params: flash_attention_params, entry: Entry, headDim: Int
    ) throws(FlashAttentionError) -> ScoreOptions {
        if !params.softmax_scale.isFinite {
            throw .invalidArgument("softmax_scale (\(params.softmax_scale)) must be finite")
        }
        if !(params.softcap >= 0 && params.softcap.isFinite) {
            throw .invalidArgument("softcap (\(params.softcap)) must be finite and >= 0 (0 = off)")
        }
        if params.reserved0 != 0 { throw .invalidArgument("reserved0 (\(params.reserved0)) must be 0") }
        let qType = try floatType(params.dtype, "dtype")
        let kvType = entry == .kvcache ? try cacheType(params.kv_dtype) : try floatType(params.kv_dtype, "kv_dtype")
        if params.reserved1 != 0 { throw .invalidArgument("reserved1 (\(params.reserved1)) must be 0") }
        // k_new/v_new: the cache's type, or (kv_new_dtype) a float type converted or quantized as it is appended.
        let newType = params.kv_new_dtype == -1 ? kvType : try floatType(params.kv_new_dtype, "kv_new_dtype")
        if params.window_left < -1 { throw .invalidArgument("window_left (\(params.window_left)) must be >= -1") }
        if params.window_right < -1 { throw .invalidArgument("window_right (\(params.window_right)) must be >= -1") }
        return ScoreOptions(
            scale: params.softmax_scale == 0 ? 1 / Float(headDim).squareRoot() : params.softmax_scale,
            windowLeft: params.window_left < 0 ? nil : Int(params.window_left),
            windowRight: params.causal != 0 ? 0 : params.window_right < 0 ? nil : Int(params.window_right),
            dropout: try validatedDropout(params, entry: entry), qType: qType, kvType: kvType, newType: newType)
    }

    /// The dropout fields: probability in [0, 1), training entry points only.
    private static func validatedDropout(_ params: flash_attention_params, entry: Entry) throws(FlashAttentionError) -> Dropout? {
        if params.reserved2 != 0 { throw .invalidArgument("reserved2 (\(params.reserved2)) must be 0") }
        let p = params.dropout_p
        if !(p >= 0 && p < 1) { throw .invalidArgument("dropout_p (\(p)) must be in [0, 1) (0 = off)") }
        if p > 0 && entry == .kvcache {
            throw .invalidArgument("dropout_p (\(p)) must be 0 for a KV-cache call (dropout is a training option)")
        }
        return Dropout(probability: p, seed: params.dropout_seed)
    }

    /// q, out, k, v (the cache, or a paged cache for varlen with block_table), lse, ALiBi slopes and sinks:
    /// pointers, alignment, strides and the ranges they address.
    private static func validatedTensors(
        _ params: flash_attention_params, entry: Entry, _ sizes: ProblemSizes, _ score: ScoreOptions
    ) throws(FlashAttentionError) -> ForwardTensors {
        let s = sizes, varlen = entry == .varlen
        let q = tensor4("q", params.q, score.qType, s.tensorBatch, s.seqlenQ, s.headsQ, s.headDim,
                        params.q_batch_stride, params.q_row_stride, params.q_head_stride, params.q_dim_stride,
                        ("q_batch_stride", "q_row_stride", "q_head_stride", "q_dim_stride"), ignoreBatch: varlen)
        let out = tensor4("out", UnsafeRawPointer(params.out), score.qType, s.tensorBatch, s.seqlenQ, s.headsQ, s.headDimV,
                          params.out_batch_stride, params.out_row_stride, params.out_head_stride, params.out_dim_stride,
                          ("out_batch_stride", "out_row_stride", "out_head_stride", "out_dim_stride"), ignoreBatch: varlen)
        // A KV cache, or varlen keys in a paged cache, are described by cache_batch × cache_seqlen.
        let paged = entry != .dense && params.block_table != nil
        let cached = entry == .kvcache || paged
        let kvBatch = cached ? Int(params.cache_batch) : s.tensorBatch
        let kvRows = cached ? Int(params.cache_seqlen) : s.seqlenK
        if cached {
            if kvBatch < 0 { throw .invalidShape("cache_batch (\(kvBatch)) must be >= 0") }
            if kvRows < (paged ? 1 : 0) {
                throw .invalidShape("cache_seqlen (\(kvRows)) must be >= \(paged ? "1 (the block size)" : "0")")
            }
        }
        let k = tensor4("k", params.k, score.kvType, kvBatch, kvRows, s.headsKV, s.headDim,
                        params.k_batch_stride, params.k_row_stride, params.k_head_stride, params.k_dim_stride,
                        ("k_batch_stride", "k_row_stride", "k_head_stride", "k_dim_stride"), ignoreBatch: varlen && !paged)
        let v = tensor4("v", params.v, score.kvType, kvBatch, kvRows, s.headsKV, s.headDimV,
                        params.v_batch_stride, params.v_row_stride, params.v_head_stride, params.v_dim_stride,
                        ("v_batch_stride", "v_row_stride", "v_head_stride", "v_dim_stride"), ignoreBatch: varlen && !paged)
        try checkDimStride(q)
        try checkDimStride(out)
        try checkDimStride(k)
        try checkDimStride(v)
        let lse: TensorArgument? = params.lse.map {
            TensorArgument(
                "lse", UnsafeRawPointer($0),
                Axis(size: s.tensorBatch, stride: varlen ? 0 : Int(params.lse_batch_stride), field: "lse_batch_stride"),
                Axis(size: s.headsQ, stride: Int(params.lse_head_stride), field: "lse_head_stride"),
                Axis(size: s.seqlenQ, stride: Int(params.lse_row_stride), field: "lse_row_stride"),
                Axis(size: 1, stride: 0, field: ""))
        }
        let alibi: TensorArgument? = params.alibi_slopes.map {
            TensorArgument(
                "alibi_slopes", UnsafeRawPointer($0),
                Axis(size: 1, stride: 0, field: ""), Axis(size: 1, stride: 0, field: ""),
                Axis(size: s.batch, stride: Int(params.alibi_batch_stride), field: "alibi_batch_stride"),
                Axis(size: s.headsQ, stride: 1, field: ""))
        }
        let sinks: TensorArgument? = params.sinks.map { TensorArgument("sinks", UnsafeRawPointer($0), count: s.headsQ) }
        let tensors = ForwardTensors(
            q: q, out: out, k: k, v: v, lse: lse, alibi: alibi, sinks: sinks, qRange: try q.validate(),
            outRange: try out.validate(), kRange: try k.validate(), vRange: try v.validate(),
            lseRange: try lse?.validate(), alibiRange: try alibi?.validate(), sinksRange: try sinks?.validate(),
            paged: paged)
        if tensors.outRange != nil { try out.validateNoSelfOverlap() }
        if tensors.lseRange != nil { try lse?.validateNoSelfOverlap() }
        if let alibi, tensors.alibiRange != nil { try checkFinite(alibi, "alibi_slopes") }
        if let sinks, tensors.sinksRange != nil { try checkFinite(sinks, "sinks") }
        return tensors
    }

    /// attn_mask: its type, and strides addressing [batch, heads_q, longest queries, longest keys] (zero
    /// strides broadcast); nil when NULL or empty.
    private static func validatedMask(
        _ params: flash_attention_params, _ sizes: ProblemSizes, _ sequences: SequenceSetup
    ) throws(FlashAttentionError) -> (AttentionMask?, AddressRange?) {
        if params.reserved3 != 0 { throw .invalidArgument("reserved3 (\(params.reserved3)) must be 0") }
        guard params.attn_mask != nil else { return (nil, nil) }
        if params.attn_mask_dtype != FA_DTYPE_BOOL && params.attn_mask_dtype != FA_DTYPE_FLOAT32 {
            throw .invalidArgument(
                "attn_mask_dtype (\(params.attn_mask_dtype)) must be FA_DTYPE_BOOL (5) or FA_DTYPE_FLOAT32 (0)")
        }
        let isBool = params.attn_mask_dtype == FA_DTYPE_BOOL
        let mask = TensorArgument(
            "attn_mask", params.attn_mask, elementSize: isBool ? 1 : 4,
            Axis(size: sizes.batch, stride: Int(params.attn_mask_batch_stride), field: "attn_mask_batch_stride"),
            Axis(size: sizes.headsQ, stride: Int(params.attn_mask_head_stride), field: "attn_mask_head_stride"),
            Axis(size: sequences.maxSeqlenQ, stride: Int(params.attn_mask_row_stride), field: "attn_mask_row_stride"),
            Axis(size: sequences.maxSeqlenK, stride: Int(params.attn_mask_col_stride), field: "attn_mask_col_stride"))
        guard let range = try mask.validate() else { return (nil, nil) }
        let view = AttentionMask(
            base: params.attn_mask!, isBool: isBool, batchStride: Int(params.attn_mask_batch_stride),
            headStride: Int(params.attn_mask_head_stride), rowStride: Int(params.attn_mask_row_stride),
            colStride: Int(params.attn_mask_col_stride))
        return (view, range)
    }

    /// Outputs never overlap an input (out may be exactly q, for in-place use) or each other. (No arrays: the
    /// success path allocates nothing.)
    private static func checkOutputsAliasNothing(
        _ t: ForwardTensors, _ sequences: SequenceSetup, _ maskRange: AddressRange?, entry: Entry
    ) throws(FlashAttentionError) {
        let indices = sequences.indexRanges
        func checkInputs(_ output: StaticString, _ range: AddressRange?) throws(FlashAttentionError) {
            guard let range else { return }
            func check(_ name: StaticString, _ other: AddressRange?) throws(FlashAttentionError) {
                if range.overlaps(other) { throw .invalidArgument("\(output) overlaps \(name); outputs must not alias inputs") }
            }
            try check("k", t.kRange)
            try check("v", t.vRange)
            try check("alibi_slopes", t.alibiRange)
            try check("sinks", t.sinksRange)
            try check(entry == .varlen ? "cu_seqlens_q" : "cache_seqlens", indices.0)
            try check(entry == .varlen ? "cu_seqlens_k" : "cache_batch_idx", indices.1)
            try check("block_table", indices.2)
            try check("k_scale", sequences.scales.kRange)
            try check("v_scale", sequences.scales.vRange)
            try check("attn_mask", maskRange)
        }
        try checkInputs("out", t.outRange)
        try checkInputs("lse", t.lseRange)
        if let outRange = t.outRange, outRange.overlaps(t.qRange), !t.out.sameView(as: t.q) {
            throw .invalidArgument("out partially overlaps q; it must be either the same view as q or disjoint")
        }
        if let lseRange = t.lseRange, lseRange.overlaps(t.qRange) || lseRange.overlaps(t.outRange) {
            throw .invalidArgument("lse overlaps \(lseRange.overlaps(t.qRange) ? "q" : "out"); outputs must not alias other tensors")
        }
    }
}

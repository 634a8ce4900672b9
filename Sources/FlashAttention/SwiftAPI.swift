import CFlashAttention

/// The Swift API: typed tensors in, typed results out, `AttentionError` thrown. Each function checks what only
/// Swift knows (that every array holds as many elements as the shapes it implies, since the C library trusts
/// pointers), fills a `flash_attention_params` and calls the C entry point, which validates everything else
/// and runs the kernels. Three layers, as in swift-system: this file → Exports.swift → the kernel driver.
///
///     let q = try AttentionTensor(batch: 1, seqlen: 128, heads: 8, headDim: 64, values: ...)
///     let result = try Attention.forward(q: q, k: k, v: v, options: .init(causal: true))
///     let grads = try Attention.backward(dout: dout, q: q, k: k, v: v, result: result, options: .init(causal: true))
public enum Attention {
    // MARK: Forward and backward

    /// Exact attention softmax(Q Kᵀ · scale) V, computed tile by tile.
    /// - Parameters:
    ///   - q: [batch, seqlenQ, headsQ, headDim].
    ///   - k, v: [batch, seqlenK, headsKV, headDim]; headsQ must be a multiple of headsKV (grouped-query
    ///     attention: query head h reads kv head h / (headsQ / headsKV)). v may have a head size of its own
    ///     (multi-head latent attention), which out then has.
    /// - Returns: out, like q but with v's headDim, and the LSE [batch, headsQ, seqlenQ] (cheap, and what
    ///   `backward` needs).
    public static func forward(
        q: AttentionTensor, k: AttentionTensor, v: AttentionTensor, options: AttentionOptions = .init()
    ) throws(AttentionError) -> AttentionResult {
        try checkKeysValues(q: q, k: k, v: v, batch: q.batch)
        try checkMask(options, rows: q.seqlen, cols: k.seqlen)
        var params = try makeParams(options, batch: q.batch, headsQ: q.heads)
        setSizes(&params, q: q, k: k, v: v)
        return try runForward(params, q: q, k: k, v: v, options: options, indices: []) { flash_attention_forward($0) }
    }

    /// Gradients of a loss L with respect to q, k and v (and the sinks), given dout = ∂L/∂out and the
    /// forward's `result`, whose LSE lets the pass recompute the probabilities instead of storing them.
    /// `options` must be those of the forward call.
    public static func backward(
        dout: AttentionTensor, q: AttentionTensor, k: AttentionTensor, v: AttentionTensor, result: AttentionResult,
        options: AttentionOptions = .init()
    ) throws(AttentionError) -> AttentionGradients {
        try checkKeysValues(q: q, k: k, v: v, batch: q.batch)
        try checkMask(options, rows: q.seqlen, cols: k.seqlen)
        var params = try makeParams(options, batch: q.batch, headsQ: q.heads)
        setSizes(&params, q: q, k: k, v: v)
        return try runBackward(params, dout: dout, q: q, k: k, v: v, result: result, options: options, indices: [])
    }

    // MARK: Variable-length batches

    /// Attention over sequences of different lengths packed along the rows: q is [1, totalQ, headsQ,
    /// headDim] and sequence b owns its rows cuSeqlensQ[b] ..< cuSeqlensQ[b + 1] (likewise k and v with
    /// cuSeqlensK). Every option applies per sequence; alibiSlopes may be [batch, headsQ] with batch =
    /// cuSeqlensQ.count − 1. The LSE is [headsQ, totalQ].
    public static func forwardVarlen(
        q: AttentionTensor, k: AttentionTensor, v: AttentionTensor, cuSeqlensQ: [Int], cuSeqlensK: [Int],
        options: AttentionOptions = .init()
    ) throws(AttentionError) -> AttentionResult {
        let (cuQ, cuK) = try checkPacked(q: q, k: k, v: v, cuSeqlensQ: cuSeqlensQ, cuSeqlensK: cuSeqlensK)
        try checkMask(options, rows: longest(cuSeqlensQ), cols: longest(cuSeqlensK))
        var params = try makeParams(options, batch: cuQ.count - 1, headsQ: q.heads)
        setSizes(&params, q: q, k: k, v: v)
        params.batch = Int64(cuQ.count - 1)
        return try runForward(params, q: q, k: k, v: v, options: options, indices: [cuQ, cuK]) {
            flash_attention_forward_varlen($0)
        }
    }

    /// The backward pass of `forwardVarlen`; arguments as there and in `backward`.
    public static func backwardVarlen(
        dout: AttentionTensor, q: AttentionTensor, k: AttentionTensor, v: AttentionTensor, result: AttentionResult,
        cuSeqlensQ: [Int], cuSeqlensK: [Int], options: AttentionOptions = .init()
    ) throws(AttentionError) -> AttentionGradients {
        let (cuQ, cuK) = try checkPacked(q: q, k: k, v: v, cuSeqlensQ: cuSeqlensQ, cuSeqlensK: cuSeqlensK)
        try checkMask(options, rows: longest(cuSeqlensQ), cols: longest(cuSeqlensK))
        var params = try makeParams(options, batch: cuQ.count - 1, headsQ: q.heads)
        setSizes(&params, q: q, k: k, v: v)
        params.batch = Int64(cuQ.count - 1)
        return try runBackward(
            params, dout: dout, q: q, k: k, v: v, result: result, options: options, indices: [cuQ, cuK])
    }

    // MARK: KV cache

    /// Attention of new queries against a KV cache (decoding, chunked prefill), optionally appending new keys
    /// and values to it first.
    /// - Parameters:
    ///   - q: [batch, seqlenQ, headsQ, headDim].
    ///   - kCache, vCache: [cacheBatch, cacheSeqlen, headsKV, headDim]; with `blockTable`, a paged cache
    ///     [numBlocks, blockSize, headsKV, headDim]; vCache may have a headDim of its own (out then has it).
    ///     Written only when `newK`/`newV` are given.
    ///   - cacheSeqlens: [batch], the keys already cached per batch entry. Advance it yourself after an append.
    ///   - newK, newV: [batch, seqlenNew, headsKV, headDim] (newV: vCache's headDim), written at positions
    ///     cacheSeqlens[b] ... first.
    ///   - cacheBatchIndex: [batch], which cache row each entry uses (contiguous cache only).
    ///   - blockTable: batch rows of equal length: the blocks of each sequence, in order.
    /// Entry b attends to cacheSeqlens[b] + seqlenNew keys, its seqlenK for causal and window alignment.
    /// Every index is checked before anything is read or written; on error the cache is unchanged.
    public static func forwardKVCache(
        q: AttentionTensor, kCache: inout AttentionTensor, vCache: inout AttentionTensor, cacheSeqlens: [Int],
        newK: AttentionTensor? = nil, newV: AttentionTensor? = nil, cacheBatchIndex: [Int]? = nil,
        blockTable: [[Int]]? = nil, options: AttentionOptions = .init()
    ) throws(AttentionError) -> AttentionResult {
        try runKVCache(q, &kCache, &vCache, cacheSeqlens, newK, newV, cacheBatchIndex, blockTable, options)
    }

    /// `forwardKVCache` against an 8-bit cache (int8 or float8 E4M3, one format for both), a quarter of a
    /// float32 cache's memory: exact attention over the dequantized cache (each row's values × its scale).
    /// `newK`/`newV` (float32) are quantized as they are appended, bit for bit as
    /// `QuantizedTensor(quantizing:as:)` does, and their scales written into the caches' `scales`. Other
    /// arguments and guarantees as in the float32 form.
    public static func forwardKVCache(
        q: AttentionTensor, kCache: inout QuantizedTensor, vCache: inout QuantizedTensor, cacheSeqlens: [Int],
        newK: AttentionTensor? = nil, newV: AttentionTensor? = nil, cacheBatchIndex: [Int]? = nil,
        blockTable: [[Int]]? = nil, options: AttentionOptions = .init()
    ) throws(AttentionError) -> AttentionResult {
        guard kCache.format == vCache.format else {
            throw .invalidArgument("kCache (\(kCache.format)) and vCache (\(vCache.format)) must have one format")
        }
        return try runKVCache(q, &kCache, &vCache, cacheSeqlens, newK, newV, cacheBatchIndex, blockTable, options)
    }

    // MARK: Merging partial results

    /// The exact attention over the union of two disjoint key sets, from the results over each (split-KV,
    /// chunked prefill, ring attention). A side that saw no key (LSE −inf) contributes nothing.
    public static func merge(_ a: AttentionResult, _ b: AttentionResult) throws(AttentionError) -> AttentionResult {
        let shape = a.out.shape
        let rows = a.out.batch * a.out.heads * a.out.seqlen
        guard b.out.shape == shape, a.lse.count == rows, b.lse.count == rows else {
            throw .invalidShape(
                "results of shapes \(a.out.shape) and \(b.out.shape) with \(a.lse.count) and \(b.lse.count) LSE values"
                    + " cannot be merged; both must be \(shape) with \(rows)")
        }
        var out = AttentionTensor(batch: a.out.batch, seqlen: a.out.seqlen, heads: a.out.heads, headDim: a.out.headDim)
        var lse = [Float](repeating: 0, count: rows)
        let (seqlen, heads, dim) = (a.out.seqlen, a.out.heads, a.out.headDim)
        if rows == 0 { return AttentionResult(out: out, lse: lse) }
        // One call per (batch, head): its rows are seqlen apart in lse and heads·dim apart in out.
        let status = withAddresses([a.out.values, a.lse, b.out.values, b.lse]) { p in
            out.withMutableValues { op in
                lse.withUnsafeMutableBufferPointer { lp in
                    for bh in 0..<(a.out.batch * heads) {
                        let (outOffset, lseOffset) = ((bh / heads * seqlen * heads + bh % heads) * dim, bh * seqlen)
                        // map: an empty out (headDim 0) may have no address; the library then names the error.
                        let status = flash_attention_merge(
                            Int64(seqlen), Int64(dim), p[0].map { $0 + outOffset }, Int64(heads * dim),
                            p[1].map { $0 + lseOffset }, 1, p[2].map { $0 + outOffset }, Int64(heads * dim),
                            p[3].map { $0 + lseOffset }, 1, op.baseAddress.map { $0 + outOffset }, Int64(heads * dim),
                            lp.baseAddress.map { $0 + lseOffset }, 1)
                        if status != FA_OK { return status }
                    }
                    return FA_OK
                }
            }
        }
        try check(status)
        return AttentionResult(out: out, lse: lse)
    }

    // MARK: Library information

    /// The library's "MAJOR.MINOR.PATCH".
    public static var version: String { String(cString: flash_attention_version_string()) }
    /// Bumped when an existing C declaration changes meaning or layout.
    public static var abiVersion: Int { Int(flash_attention_abi_version()) }
    /// The kernel instruction set calls use here ("avx512", "avx2", "portable" or "reference"; "invalid"
    /// when the FLASH_ATTENTION_ISA override names one this CPU cannot run).
    public static var kernelISA: String { String(cString: flash_attention_kernel_isa()) }
    /// The kernel instruction sets this CPU can run, the default first (FLASH_ATTENTION_ISA accepts each).
    public static var availableKernelISAs: [String] {
        String(cString: flash_attention_available_isas()).split(separator: ",").map(String.init)
    }
    /// The threads `numThreads = 0` stands for (the online cores).
    public static var defaultThreadCount: Int { Int(flash_attention_default_num_threads()) }
}

// MARK: - Checks the C library cannot make

extension Attention {
    /// k and v must be [batch, seqlenK, headsKV, q.headDim] (v: its own headDim): the params carry one batch
    /// and one head_dim, so a mismatch would make the library read past an array.
    private static func checkKeysValues(
        q: AttentionTensor, k: AttentionTensor, v: AttentionTensor, batch: Int
    ) throws(AttentionError) {
        guard k.shape.dropLast() == v.shape.dropLast() else {
            throw .invalidShape("v \(v.shape) must have the shape of k \(k.shape) but in headDim")
        }
        guard k.batch == batch, k.headDim == q.headDim else {
            throw .invalidShape("k \(k.shape) must match q \(q.shape) in batch and headDim")
        }
    }

    /// Packed tensors have batch 1; the offsets are int32 [batch + 1] for the C API.
    private static func checkPacked(
        q: AttentionTensor, k: AttentionTensor, v: AttentionTensor, cuSeqlensQ: [Int], cuSeqlensK: [Int]
    ) throws(AttentionError) -> ([Int32], [Int32]) {
        guard q.batch == 1 else { throw .invalidShape("packed q must have batch 1 (rows along seqlen), got \(q.shape)") }
        try checkKeysValues(q: q, k: k, v: v, batch: 1)
        guard !cuSeqlensQ.isEmpty else { throw .invalidShape("cuSeqlensQ must have batch + 1 >= 1 elements") }
        return (try int32s(cuSeqlensQ, "cuSeqlensQ", count: cuSeqlensQ.count),
                try int32s(cuSeqlensK, "cuSeqlensK", count: cuSeqlensQ.count))
    }

    /// An index array as the int32 values the C API reads, after checking its count.
    private static func int32s(_ values: [Int], _ name: String, count: Int) throws(AttentionError) -> [Int32] {
        guard values.count == count else { throw .invalidShape("\(name) must have \(count) elements, got \(values.count)") }
        var result = [Int32]()
        result.reserveCapacity(count)
        for (i, x) in values.enumerated() {
            guard let narrow = Int32(exactly: x) else { throw .invalidIndex("\(name)[\(i)] (\(x)) does not fit in int32") }
            result.append(narrow)
        }
        return result
    }

    // MARK: - Params

    /// The library's defaults with `options` applied; checks the option arrays' counts, which the params
    /// imply but cannot carry.
    private static func makeParams(
        _ options: AttentionOptions, batch: Int, headsQ: Int
    ) throws(AttentionError) -> flash_attention_params {
        var params = flash_attention_params()
        try check(flash_attention_params_init(&params, MemoryLayout<flash_attention_params>.size))
        if let scale = options.scale {
            // 0 would silently mean the default in C; nil says that here.
            guard scale != 0 else { throw .invalidArgument("scale (0.0) must be nonzero; nil means 1/sqrt(headDim)") }
            params.softmax_scale = scale
        }
        params.causal = options.causal ? 1 : 0
        (params.window_left, params.window_right) = (Int64(options.windowLeft ?? -1), Int64(options.windowRight ?? -1))
        params.softcap = options.softcap ?? 0
        params.num_threads = Int32(clamping: options.numThreads)
        params.algorithm =
            switch options.algorithm {
            case .auto: FA_ALGORITHM_AUTO
            case .reference: FA_ALGORITHM_REFERENCE
            case .tiled: FA_ALGORITHM_TILED
            }
        if let slopes = options.alibiSlopes {
            if slopes.count == headsQ {
                params.alibi_batch_stride = 0
            } else if slopes.count == batch * headsQ {
                params.alibi_batch_stride = Int64(headsQ)
            } else {
                throw .invalidShape("alibiSlopes has \(slopes.count) elements; it must be [headsQ] (\(headsQ)) or [batch, headsQ] (\(batch * headsQ))")
            }
        }
        if let sinks = options.sinks, sinks.count != headsQ {
            throw .invalidShape("sinks has \(sinks.count) elements; it must be [headsQ] (\(headsQ))")
        }
        (params.dropout_p, params.dropout_seed) = (options.dropout, options.dropoutSeed)
        if let mask = options.mask {
            guard mask.batch == 1 || mask.batch == batch, mask.heads == 1 || mask.heads == headsQ else {
                throw .invalidShape("mask is [\(mask.batch), \(mask.heads), …]; it must be [1 or \(batch), 1 or \(headsQ), …]")
            }
            params.attn_mask_dtype = FA_DTYPE_FLOAT32
            let (rows, cols) = (Int64(mask.rows), Int64(mask.cols))
            params.attn_mask_batch_stride = mask.batch == 1 ? 0 : Int64(mask.heads) * rows * cols
            params.attn_mask_head_stride = mask.heads == 1 ? 0 : rows * cols
            (params.attn_mask_row_stride, params.attn_mask_col_stride) = (cols, 1)
        }
        return params
    }

    /// The mask must cover the queries and keys the call reads (the library trusts its extent): exactly
    /// `rows` × `cols`, or at least that many with `atLeast` (a KV cache's mask may span the whole cache).
    private static func checkMask(_ options: AttentionOptions, rows: Int, cols: Int, atLeast: Bool = false) throws(AttentionError) {
        guard let mask = options.mask else { return }
        let fits = atLeast ? mask.rows == rows && mask.cols >= cols : mask.rows == rows && mask.cols == cols
        guard fits else {
            throw .invalidShape("mask is [\(mask.rows), \(mask.cols)] per head; this call needs \(rows) × \(atLeast ? "at least " : "")\(cols)")
        }
    }

    /// The longest sequence of cumulative offsets.
    private static func longest(_ cu: [Int]) -> Int { zip(cu.dropFirst(), cu).map { $0 - $1 }.max() ?? 0 }

    /// The params of a KV-cache call but its pointers: sizes, element types (new rows are float32), and the
    /// dense strides of the new rows and of the row scales; checks the shapes the library cannot compare (it is
    /// given one head_dim and one heads_kv).
    private static func kvCacheParams<Cache: KVCacheStorage>(
        _ q: AttentionTensor, _ kCache: Cache, _ vCache: Cache, _ newK: AttentionTensor?, _ newV: AttentionTensor?,
        _ options: AttentionOptions
    ) throws(AttentionError) -> flash_attention_params {
        guard kCache.shape.dropLast() == vCache.shape.dropLast(), kCache.headDim == q.headDim else {
            throw .invalidShape(
                "kCache \(kCache.shape) and vCache \(vCache.shape) must have one shape but in headDim, kCache q's (\(q.headDim))")
        }
        guard (newK == nil) == (newV == nil) else { throw .invalidArgument("newK and newV must be given together") }
        var params = try makeParams(options, batch: q.batch, headsQ: q.heads)
        if let newK, let newV {
            let expected = [q.batch, newK.seqlen, kCache.heads]
            guard newK.shape == expected + [q.headDim], newV.shape == expected + [vCache.headDim] else {
                throw .invalidShape(
                    "newK \(newK.shape) and newV \(newV.shape) must be \(expected + [q.headDim]) and \(expected + [vCache.headDim])")
            }
            (params.k_new_batch_stride, params.k_new_row_stride, params.k_new_head_stride) = strides(newK.shape)
            (params.v_new_batch_stride, params.v_new_row_stride, params.v_new_head_stride) = strides(newV.shape)
            params.seqlen_new = Int64(newK.seqlen)
        }
        (params.batch, params.seqlen_q, params.heads_q) = (Int64(q.batch), Int64(q.seqlen), Int64(q.heads))
        (params.heads_kv, params.head_dim, params.head_dim_v) = (Int64(kCache.heads), Int64(q.headDim), Int64(vCache.headDim))
        (params.cache_batch, params.cache_seqlen) = (Int64(kCache.batch), Int64(kCache.seqlen))
        (params.kv_dtype, params.kv_new_dtype) = (kCache.dtype, FA_DTYPE_FLOAT32)
        // Row scales (read only for 8-bit caches): dense [cacheBatch, cacheSeqlen, headsKV].
        let scaleStrides = (Int64(kCache.seqlen * kCache.heads), Int64(kCache.heads), Int64(1))
        (params.k_scale_batch_stride, params.k_scale_row_stride, params.k_scale_head_stride) = scaleStrides
        (params.v_scale_batch_stride, params.v_scale_row_stride, params.v_scale_head_stride) = scaleStrides
        return params
    }

    /// The block table as the int32 rows the C API reads; sets its width in the params.
    private static func setBlockTable(
        _ params: inout flash_attention_params, _ blockTable: [[Int]], batch: Int
    ) throws(AttentionError) -> [Int32] {
        let width = blockTable.first?.count ?? 0
        guard blockTable.count == batch, blockTable.allSatisfy({ $0.count == width }) else {
            throw .invalidShape("blockTable must have \(batch) rows (q.batch) of one length")
        }
        (params.block_table_batch_stride, params.max_blocks_per_seq) = (Int64(width), Int64(width))
        return try int32s(blockTable.flatMap { $0 }, "blockTable", count: batch * width)
    }

    private static func setSizes(
        _ params: inout flash_attention_params, q: AttentionTensor, k: AttentionTensor, v: AttentionTensor
    ) {
        (params.batch, params.seqlen_q, params.seqlen_k) = (Int64(q.batch), Int64(q.seqlen), Int64(k.seqlen))
        (params.heads_q, params.heads_kv, params.head_dim) = (Int64(q.heads), Int64(k.heads), Int64(q.headDim))
        params.head_dim_v = Int64(v.headDim)
    }

    /// Element strides (batch, row, head) of a dense [batch, seqlen, heads, headDim] tensor.
    private static func strides(_ shape: [Int]) -> (Int64, Int64, Int64) {
        (Int64(shape[1] * shape[2] * shape[3]), Int64(shape[2] * shape[3]), Int64(shape[3]))
    }

    /// An empty out for q and values of v's head size (head_dim_v).
    private static func outTensor(_ q: AttentionTensor, valueHeadDim: Int) -> AttentionTensor {
        AttentionTensor(batch: q.batch, seqlen: q.seqlen, heads: q.heads, headDim: valueHeadDim)
    }

    /// Points the params at q, k, v, out (all dense: k and v of the given shapes, a KV cache's or a tensor's;
    /// out shaped like q with v's head size) and a dense [batch, heads, seqlen] LSE, plus the option arrays.
    private static func setPointers(
        _ params: inout flash_attention_params, q qPointer: UnsafePointer<Float>?, k: UnsafeRawPointer?,
        v: UnsafeRawPointer?, out: UnsafeMutablePointer<Float>?, lse: UnsafeMutablePointer<Float>?,
        alibi: UnsafePointer<Float>?, sinks: UnsafePointer<Float>?, shape q: AttentionTensor, kShape: [Int],
        vShape: [Int]
    ) {
        (params.q, params.out, params.lse) = (UnsafeRawPointer(qPointer), UnsafeMutableRawPointer(out), lse)
        (params.q_batch_stride, params.q_row_stride, params.q_head_stride) = strides(q.shape)
        (params.out_batch_stride, params.out_row_stride, params.out_head_stride) = strides(q.shape.dropLast() + [vShape[3]])
        (params.lse_batch_stride, params.lse_head_stride, params.lse_row_stride) = (Int64(q.heads * q.seqlen), Int64(q.seqlen), 1)
        (params.k, params.v) = (k, v)
        (params.k_batch_stride, params.k_row_stride, params.k_head_stride) = strides(kShape)
        (params.v_batch_stride, params.v_row_stride, params.v_head_stride) = strides(vShape)
        (params.alibi_slopes, params.sinks) = (alibi, sinks)
    }

    // MARK: - Calls

    /// Pins q, k, v and the option and index arrays, allocates out and the LSE, and calls `entry`.
    private static func runForward(
        _ params: flash_attention_params, q: AttentionTensor, k: AttentionTensor, v: AttentionTensor,
        options: AttentionOptions, indices: [[Int32]],
        entry: (UnsafePointer<flash_attention_params>) -> flash_attention_status
    ) throws(AttentionError) -> AttentionResult {
        var params = params
        var out = outTensor(q, valueHeadDim: v.headDim)
        var lse = [Float](repeating: 0, count: q.batch * q.heads * q.seqlen)
        let status = withAddresses([q.values, k.values, v.values, options.alibiSlopes, options.sinks, options.mask?.values]) { f in
            withAddresses(indices + [nil, nil]) { i in
                out.withMutableValues { op in
                    lse.withUnsafeMutableBufferPointer { lp in
                        setPointers(&params, q: f[0], k: f[1], v: f[2], out: op.baseAddress, lse: lp.baseAddress,
                                    alibi: f[3], sinks: f[4], shape: q, kShape: k.shape, vShape: v.shape)
                        params.attn_mask = UnsafeRawPointer(f[5])
                        (params.cu_seqlens_q, params.cu_seqlens_k) = (i[0], i[1])
                        return entry(&params)
                    }
                }
            }
        }
        try check(status)
        return AttentionResult(out: out, lse: lse)
    }

    /// Both forms of `forwardKVCache`: checks what the library cannot see, fills the params, pins every array
    /// and calls the C entry point.
    private static func runKVCache<Cache: KVCacheStorage>(
        _ q: AttentionTensor, _ kCache: inout Cache, _ vCache: inout Cache, _ cacheSeqlens: [Int],
        _ newK: AttentionTensor?, _ newV: AttentionTensor?, _ cacheBatchIndex: [Int]?, _ blockTable: [[Int]]?,
        _ options: AttentionOptions
    ) throws(AttentionError) -> AttentionResult {
        var params = try kvCacheParams(q, kCache, vCache, newK, newV, options)
        let seqlens = try int32s(cacheSeqlens, "cacheSeqlens", count: q.batch)
        try checkMask(options, rows: q.seqlen, cols: (cacheSeqlens.max() ?? 0) + (newK?.seqlen ?? 0), atLeast: true)
        let batchIndex = try cacheBatchIndex.map { (x) throws(AttentionError) in try int32s(x, "cacheBatchIndex", count: q.batch) }
        let table = try blockTable.map { (x) throws(AttentionError) in try setBlockTable(&params, x, batch: q.batch) }
        var out = outTensor(q, valueHeadDim: vCache.headDim)
        var lse = [Float](repeating: 0, count: q.batch * q.heads * q.seqlen)
        let (kShape, vShape) = (kCache.shape, vCache.shape)
        let status = withAddresses([q.values, newK?.values, newV?.values, options.alibiSlopes, options.sinks, options.mask?.values]) { f in
            withAddresses([seqlens, batchIndex, table]) { i in
                kCache.withMutableStorage { kp, ks in
                    vCache.withMutableStorage { vp, vs in
                        out.withMutableValues { op in
                            lse.withUnsafeMutableBufferPointer { lp in
                                setPointers(&params, q: f[0], k: kp, v: vp, out: op.baseAddress, lse: lp.baseAddress,
                                            alibi: f[3], sinks: f[4], shape: q, kShape: kShape, vShape: vShape)
                                (params.k_new, params.v_new) = (UnsafeRawPointer(f[1]), UnsafeRawPointer(f[2]))
                                params.attn_mask = UnsafeRawPointer(f[5])
                                (params.k_scale, params.v_scale) = (ks, vs)
                                (params.cache_seqlens, params.cache_batch_idx, params.block_table) = (i[0], i[1], i[2])
                                return flash_attention_forward_kvcache(&params)
                            }
                        }
                    }
                }
            }
        }
        try check(status)
        return AttentionResult(out: out, lse: lse)
    }

    /// Pins the forward's inputs and result and dout, allocates the gradients and calls the backward entry.
    private static func runBackward(
        _ params: flash_attention_params, dout: AttentionTensor, q: AttentionTensor, k: AttentionTensor,
        v: AttentionTensor, result: AttentionResult, options: AttentionOptions, indices: [[Int32]]
    ) throws(AttentionError) -> AttentionGradients {
        let outShape = outTensor(q, valueHeadDim: v.headDim).shape
        guard dout.shape == outShape, result.out.shape == outShape else {
            throw .invalidShape("dout \(dout.shape) and result.out \(result.out.shape) must be \(outShape) (q's shape, v's headDim)")
        }
        guard result.lse.count == q.batch * q.heads * q.seqlen else {
            throw .invalidShape("result.lse has \(result.lse.count) elements; q \(q.shape) needs \(q.batch * q.heads * q.seqlen)")
        }
        var forward = params
        var dq = AttentionTensor(batch: q.batch, seqlen: q.seqlen, heads: q.heads, headDim: q.headDim)
        var dk = AttentionTensor(batch: k.batch, seqlen: k.seqlen, heads: k.heads, headDim: k.headDim)
        var dv = AttentionTensor(batch: v.batch, seqlen: v.seqlen, heads: v.heads, headDim: v.headDim)
        var dsinks = [Float](repeating: 0, count: options.sinks == nil ? 0 : q.heads)
        let inputs: [[Float]?] = [
            q.values, k.values, v.values, options.alibiSlopes, options.sinks, result.out.values, result.lse, dout.values,
            options.mask?.values,
        ]
        let status = withAddresses(inputs) { f in
            withAddresses(indices + [nil, nil]) { i in
                dq.withMutableValues { dqp in
                    dk.withMutableValues { dkp in
                        dv.withMutableValues { dvp in
                            dsinks.withUnsafeMutableBufferPointer { dsp in
                                // The library only reads out and lse of the forward params here.
                                setPointers(&forward, q: f[0], k: f[1], v: f[2], out: UnsafeMutablePointer(mutating: f[5]),
                                            lse: UnsafeMutablePointer(mutating: f[6]), alibi: f[3], sinks: f[4], shape: q,
                                            kShape: k.shape, vShape: v.shape)
                                (forward.cu_seqlens_q, forward.cu_seqlens_k) = (i[0], i[1])
                                forward.attn_mask = UnsafeRawPointer(f[8])
                                var backward = flash_attention_backward_params()
                                let initStatus = flash_attention_backward_params_init(
                                    &backward, MemoryLayout<flash_attention_backward_params>.size)
                                guard initStatus == FA_OK else { return initStatus }
                                return withUnsafePointer(to: &forward) { forwardPointer in
                                    backward.forward = forwardPointer
                                    backward.dout = UnsafeRawPointer(f[7])
                                    (backward.dout_batch_stride, backward.dout_row_stride, backward.dout_head_stride) = strides(outShape)
                                    backward.dq = UnsafeMutableRawPointer(dqp.baseAddress)
                                    (backward.dq_batch_stride, backward.dq_row_stride, backward.dq_head_stride) = strides(q.shape)
                                    backward.dk = UnsafeMutableRawPointer(dkp.baseAddress)
                                    (backward.dk_batch_stride, backward.dk_row_stride, backward.dk_head_stride) = strides(k.shape)
                                    backward.dv = UnsafeMutableRawPointer(dvp.baseAddress)
                                    (backward.dv_batch_stride, backward.dv_row_stride, backward.dv_head_stride) = strides(v.shape)
                                    backward.dsinks = options.sinks == nil ? nil : dsp.baseAddress
                                    return flash_attention_backward(&backward)
                                }
                            }
                        }
                    }
                }
            }
        }
        try check(status)
        return AttentionGradients(dq: dq, dk: dk, dv: dv, dsinks: options.sinks == nil ? nil : dsinks)
    }

    /// Turns a status into `AttentionError` with the calling thread's last-error message.
    private static func check(_ status: flash_attention_status) throws(AttentionError) {
        guard status != FA_OK else { return }
        throw AttentionError(status: status, message: String(cString: flash_attention_last_error()))
    }
}

/// Calls `body` with the base address of each array (nil for a nil array), all valid until `body` returns.
/// The recursion keeps a dozen nested `withUnsafeBufferPointer` closures out of the call sites.
private func withAddresses<T, R>(
    _ arrays: [[T]?], _ body: ([UnsafePointer<T>?]) -> R
) -> R {
    func pin(_ rest: ArraySlice<[T]?>, _ pinned: [UnsafePointer<T>?]) -> R {
        guard let first = rest.first else { return body(pinned) }
        guard let array = first else { return pin(rest.dropFirst(), pinned + [nil]) }
        return array.withUnsafeBufferPointer { pin(rest.dropFirst(), pinned + [$0.baseAddress]) }
    }
    return pin(arrays[...], [])
}

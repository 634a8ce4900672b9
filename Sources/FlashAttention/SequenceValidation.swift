import CFlashAttention
import FlashAttentionCore

/// Where a call's sequences live, validated: varlen offsets, a KV cache's lengths and indices, a block table,
/// the rows a cache call appends and an 8-bit cache's scales. Every index is read from caller memory and checked
/// here, in full, before anything else happens.

/// The sequences' layout and storage, the arrays that define them and what a cache call appends.
struct SequenceSetup {
    var layout = SequenceLayout.dense
    var storage = KeyValueStorage.contiguous
    var maxSeqlenQ: Int
    var maxSeqlenK: Int
    /// cu_seqlens_q or cache_seqlens; cu_seqlens_k or cache_batch_idx; block_table.
    var indexRanges: (AddressRange?, AddressRange?, AddressRange?) = (nil, nil, nil)
    var append: CacheAppend?
    var scales = CacheScales()
}

/// A stand-in for index arrays with no elements: never read.
nonisolated(unsafe) private let noIndices = UnsafePointer(UnsafeMutablePointer<Int32>.allocate(capacity: 1))

extension AttentionProblem {
    /// cu_seqlens_q/k (and, with block_table, the pages of each sequence's keys).
    static func validatedVarlen(
        _ params: flash_attention_params, _ sizes: ProblemSizes, _ tensors: ForwardTensors
    ) throws(FlashAttentionError) -> SequenceSetup {
        let batch = sizes.batch
        if batch == .max { throw .invalidShape("batch (\(batch)) is too large: cu_seqlens_q needs batch + 1 entries") }
        let cuQ = TensorArgument("cu_seqlens_q", params.cu_seqlens_q, count: batch + 1)
        let cuK = TensorArgument("cu_seqlens_k", params.cu_seqlens_k, count: batch + 1)
        var setup = SequenceSetup(maxSeqlenQ: 0, maxSeqlenK: 0)
        setup.indexRanges = (try cuQ.validate(), try cuK.validate(), nil)
        setup.maxSeqlenQ = try checkCumulative(params.cu_seqlens_q!, "cu_seqlens_q", batch: batch, total: sizes.seqlenQ, "seqlen_q")
        setup.maxSeqlenK = try checkCumulative(params.cu_seqlens_k!, "cu_seqlens_k", batch: batch, total: sizes.seqlenK, "seqlen_k")
        if params.max_seqlen_q > 0 && setup.maxSeqlenQ > params.max_seqlen_q {
            throw .invalidIndex("a sequence has \(setup.maxSeqlenQ) queries, more than max_seqlen_q (\(params.max_seqlen_q))")
        }
        if params.max_seqlen_k > 0 && setup.maxSeqlenK > params.max_seqlen_k {
            throw .invalidIndex("a sequence has \(setup.maxSeqlenK) keys, more than max_seqlen_k (\(params.max_seqlen_k))")
        }
        setup.layout = .varlen(cuQ: params.cu_seqlens_q!, cuK: params.cu_seqlens_k!)
        if tensors.paged {
            let cuK = params.cu_seqlens_k!
            setup.indexRanges.2 = try validatedPages(params, batch: batch) { b in Int(cuK[b + 1]) - Int(cuK[b]) }
            setup.storage = .paged(
                table: params.block_table!, tableStride: Int(params.block_table_batch_stride),
                pageSize: Int(params.cache_seqlen))
        }
        return setup
    }

    /// A KV-cache call: cache_seqlens, cache_batch_idx, the block table, the append and the scales.
    static func validatedCache(
        _ params: flash_attention_params, _ sizes: ProblemSizes, _ t: ForwardTensors, _ score: ScoreOptions
    ) throws(FlashAttentionError) -> SequenceSetup {
        let batch = sizes.batch, cacheBatch = Int(params.cache_batch), cacheRows = Int(params.cache_seqlen)
        let appendCount = Int(params.seqlen_new)
        if appendCount < 0 { throw .invalidShape("seqlen_new (\(appendCount)) must be >= 0") }
        if (params.k_new == nil) != (params.v_new == nil) {
            throw .nullPointer("k_new and v_new must be both set or both NULL")
        }
        if params.k_new == nil && appendCount > 0 {
            throw .nullPointer("k_new is NULL but seqlen_new is \(appendCount)")
        }
        var setup = SequenceSetup(maxSeqlenQ: sizes.seqlenQ, maxSeqlenK: 0)
        setup.indexRanges.0 = try TensorArgument("cache_seqlens", params.cache_seqlens, count: batch).validate()
        setup.indexRanges.1 = try params.cache_batch_idx.map { TensorArgument("cache_batch_idx", $0, count: batch) }?.validate()
        if t.paged && params.cache_batch_idx != nil {
            throw .invalidArgument("cache_batch_idx cannot be combined with block_table (a paged cache)")
        }
        // Without an index, entry b reads (and appends to) cache row b: every entry needs its own row.
        if !t.paged && params.cache_batch_idx == nil && batch > cacheBatch {
            throw .invalidShape(
                "batch (\(batch)) exceeds cache_batch (\(cacheBatch)): without cache_batch_idx entry b uses cache row b")
        }
        let capacity = t.paged ? pagedCapacity(params) : cacheRows
        for b in 0..<batch {
            let cached = Int(params.cache_seqlens![b])
            if cached < 0 { throw .invalidIndex("cache_seqlens[\(b)] (\(cached)) must be >= 0") }
            let (total, overflow) = cached.addingReportingOverflow(appendCount)
            if overflow || total > capacity {
                throw .invalidIndex(
                    "cache_seqlens[\(b)] (\(cached)) + seqlen_new (\(appendCount)) exceeds the cache capacity"
                        + " (\(capacity) positions)")
            }
            setup.maxSeqlenK = max(setup.maxSeqlenK, total)
            if let index = params.cache_batch_idx?[b], index < 0 || Int(index) >= cacheBatch {
                throw .invalidIndex("cache_batch_idx[\(b)] (\(index)) is not in 0..<cache_batch (\(cacheBatch))")
            }
        }
        if t.paged {
            setup.indexRanges.2 = try validatedPages(params, batch: batch) { b in Int(params.cache_seqlens![b]) + appendCount }
            setup.storage = .paged(table: params.block_table!, tableStride: Int(params.block_table_batch_stride), pageSize: cacheRows)
        }
        var appended: ValidatedAppend?
        if appendCount > 0 {
            if t.paged || params.cache_batch_idx != nil {
                try checkAppendTargetsDistinct(params, batch: batch, appendCount: appendCount, pageSize: t.paged ? cacheRows : 0)
            }
            appended = try validatedAppend(params, sizes, t, score, count: appendCount)
        }
        setup.append = appended?.append
        // Appending writes the scales too: then they must overlap nothing the call reads or writes.
        setup.scales = try validatedScales(
            params, kvType: score.kvType, cacheBatch: cacheBatch, cacheRows: cacheRows, headsKV: sizes.headsKV,
            written: appended.map { [(t.q, t.qRange), (t.k, t.kRange), (t.v, t.vRange)] + $0.arguments } ?? [])
        // With batch 0 the index arrays may be NULL; nothing will read them.
        setup.layout = .cache(
            seqlens: params.cache_seqlens ?? noIndices, batchIndex: params.cache_batch_idx, appended: appendCount)
        return setup
    }

    /// Positions a sequence's blocks can hold: max_blocks_per_seq × block size.
    private static func pagedCapacity(_ params: flash_attention_params) -> Int {
        let (product, overflow) = Int(params.max_blocks_per_seq).multipliedReportingOverflow(by: Int(params.cache_seqlen))
        return overflow ? Int.max : product
    }

    /// The block table: max_blocks_per_seq >= 1, its strides, and every block that sequence b's `keys(b)`
    /// positions use within max_blocks_per_seq and naming a block of the cache.
    private static func validatedPages(
        _ params: flash_attention_params, batch: Int, keys: (Int) -> Int
    ) throws(FlashAttentionError) -> AddressRange? {
        let blocks = Int(params.max_blocks_per_seq), pageSize = Int(params.cache_seqlen), count = Int(params.cache_batch)
        if blocks < 1 { throw .invalidShape("max_blocks_per_seq (\(blocks)) must be >= 1 with a block_table") }
        let table = TensorArgument(
            "block_table", params.block_table, Axis(size: 1, stride: 0, field: ""), Axis(size: 1, stride: 0, field: ""),
            Axis(size: batch, stride: Int(params.block_table_batch_stride), field: "block_table_batch_stride"),
            Axis(size: blocks, stride: 1, field: ""))
        let range = try table.validate()
        let capacity = pagedCapacity(params)
        for b in 0..<batch {
            let total = keys(b)
            if total > capacity {
                throw .invalidIndex(
                    "sequence \(b) has \(total) keys, more than its blocks hold (max_blocks_per_seq \(blocks) × block"
                        + " size \(pageSize))")
            }
            let row = params.block_table! + b * Int(params.block_table_batch_stride)
            for j in 0..<((total + pageSize - 1) / pageSize) where row[j] < 0 || Int(row[j]) >= count {
                throw .invalidIndex("block_table[\(b)][\(j)] (\(row[j])) is not in 0..<cache_batch (\(count) blocks)")
            }
        }
        return range
    }

    /// k_new/v_new: a float type, valid strides, and (the cache becomes an output) no overlap between the
    /// cache and what the call reads.
    private static func validatedAppend(
        _ params: flash_attention_params, _ sizes: ProblemSizes, _ t: ForwardTensors, _ score: ScoreOptions, count: Int
    ) throws(FlashAttentionError) -> ValidatedAppend {
        if score.newType.isQuantized {
            throw .invalidArgument(
                "kv_new_dtype (-1, the cache's type) must name the float type of k_new/v_new"
                    + " (FA_DTYPE_FLOAT32, FA_DTYPE_FLOAT16 or FA_DTYPE_BFLOAT16) to append to an 8-bit cache")
        }
        let keys = tensor4("k_new", params.k_new, score.newType, sizes.batch, count, sizes.headsKV, sizes.headDim,
                           params.k_new_batch_stride, params.k_new_row_stride, params.k_new_head_stride,
                           params.k_new_dim_stride,
                           ("k_new_batch_stride", "k_new_row_stride", "k_new_head_stride", "k_new_dim_stride"))
        let values = tensor4("v_new", params.v_new, score.newType, sizes.batch, count, sizes.headsKV, sizes.headDimV,
                             params.v_new_batch_stride, params.v_new_row_stride, params.v_new_head_stride,
                             params.v_new_dim_stride,
                             ("v_new_batch_stride", "v_new_row_stride", "v_new_head_stride", "v_new_dim_stride"))
        try checkDimStride(keys)
        try checkDimStride(values)
        let keysRange = try keys.validate(), valuesRange = try values.validate()
        for (cache, cacheRange) in [(t.k, t.kRange), (t.v, t.vRange)] {
            guard let cacheRange else { continue }
            try cache.validateNoSelfOverlap()
            for (other, otherRange) in [(t.q, t.qRange), (keys, keysRange), (values, valuesRange)]
            where cacheRange.overlaps(otherRange) {
                throw .invalidArgument("\(cache.name) (the cache, written by the append) overlaps \(other.name)")
            }
        }
        if let kRange = t.kRange, kRange.overlaps(t.vRange) {
            throw .invalidArgument("k and v caches overlap; the append would write one into the other")
        }
        return ValidatedAppend(
            keys: keys, keysRange: keysRange, values: values, valuesRange: valuesRange,
            append: CacheAppend(
                keys: view(keys, keysRange, score.newType), values: view(values, valuesRange, score.newType), count: count))
    }
}

/// The rows a cache call appends: the arguments (for overlap checks) and the trusted views.
struct ValidatedAppend {
    let keys: TensorArgument
    let keysRange: AddressRange?
    let values: TensorArgument
    let valuesRange: AddressRange?
    let append: CacheAppend

    var arguments: [(TensorArgument, AddressRange?)] { [(keys, keysRange), (values, valuesRange)] }
}

/// The row scales of an 8-bit KV cache, validated, and the memory they take.
struct CacheScales {
    var k: ScaleView?
    var v: ScaleView?
    var kRange: AddressRange?
    var vRange: AddressRange?
}

/// Checks k_scale/v_scale against the cache type: required, [cache_batch, cache_seqlen, heads_kv] with valid
/// strides, for an 8-bit cache; absent otherwise. Appending writes them, so then they must overlap neither each
/// other nor anything in `written` (the call's other inputs and the cache).
private func validatedScales(
    _ params: flash_attention_params, kvType: ElementType, cacheBatch: Int, cacheRows: Int, headsKV: Int,
    written: [(TensorArgument, AddressRange?)]
) throws(FlashAttentionError) -> CacheScales {
    guard kvType.isQuantized else {
        if params.k_scale != nil || params.v_scale != nil {
            throw .invalidArgument("k_scale/v_scale are set, but kv_dtype (\(params.kv_dtype)) is not an 8-bit type")
        }
        return CacheScales()
    }
    func argument(_ name: StaticString, _ pointer: UnsafeMutablePointer<Float>?, _ strides: (Int64, Int64, Int64),
                  _ fields: (StaticString, StaticString, StaticString)) throws(FlashAttentionError) -> TensorArgument {
        guard pointer != nil || cacheBatch * cacheRows == 0 else {
            throw .nullPointer("\(name) is NULL; an 8-bit cache (kv_dtype \(params.kv_dtype)) needs its row scales")
        }
        return TensorArgument(
            name, UnsafeRawPointer(pointer), Axis(size: 1, stride: 0, field: ""),
            Axis(size: cacheBatch, stride: Int(strides.0), field: fields.0),
            Axis(size: cacheRows, stride: Int(strides.1), field: fields.1),
            Axis(size: headsKV, stride: Int(strides.2), field: fields.2))
    }
    let k = try argument("k_scale", params.k_scale, (params.k_scale_batch_stride, params.k_scale_row_stride,
                         params.k_scale_head_stride), ("k_scale_batch_stride", "k_scale_row_stride", "k_scale_head_stride"))
    let v = try argument("v_scale", params.v_scale, (params.v_scale_batch_stride, params.v_scale_row_stride,
                         params.v_scale_head_stride), ("v_scale_batch_stride", "v_scale_row_stride", "v_scale_head_stride"))
    var scales = CacheScales(kRange: try k.validate(), vRange: try v.validate())
    if !written.isEmpty {
        for (scale, range) in [(k, scales.kRange), (v, scales.vRange)] where range != nil {
            try scale.validateNoSelfOverlap()
            for (other, otherRange) in written where range!.overlaps(otherRange) {
                throw .invalidArgument("\(scale.name) (written by the append) overlaps \(other.name)")
            }
        }
        if let kRange = scales.kRange, kRange.overlaps(scales.vRange) {
            throw .invalidArgument("k_scale and v_scale overlap; the append would write one into the other")
        }
    }
    func view(_ t: TensorArgument, _ range: AddressRange?) -> ScaleView? {
        let (base, _, b, r, h) = strided(t, range)
        return range == nil ? nil : ScaleView(base: base, batchStride: b, rowStride: r, headStride: h)
    }
    (scales.k, scales.v) = (view(k, scales.kRange), view(v, scales.vRange))
    return scales
}

/// Checks that cu_seqlens starts at 0, never decreases and stays within `total` rows; returns the longest
/// sequence.
private func checkCumulative(
    _ cu: UnsafePointer<Int32>, _ name: StaticString, batch: Int, total: Int, _ totalName: StaticString
) throws(FlashAttentionError) -> Int {
    if cu[0] != 0 { throw .invalidIndex("\(name)[0] (\(cu[0])) must be 0") }
    var longest = 0
    for b in 0..<batch {
        if cu[b + 1] < cu[b] {
            throw .invalidIndex("\(name)[\(b + 1)] (\(cu[b + 1])) is less than \(name)[\(b)] (\(cu[b]))")
        }
        longest = max(longest, Int(cu[b + 1]) - Int(cu[b]))
    }
    if Int(cu[batch]) > total {
        throw .invalidIndex("\(name)[\(batch)] (\(cu[batch])) exceeds \(totalName) (\(total)), the rows of the packed tensor")
    }
    return longest
}

/// Two batch entries appending into one cache row (or one page) would race and overwrite each other's keys;
/// reading a shared row or page (a common prefix) is fine. `pageSize` 0 means a contiguous cache.
private func checkAppendTargetsDistinct(
    _ params: flash_attention_params, batch: Int, appendCount: Int, pageSize: Int
) throws(FlashAttentionError) {
    var writer = [Int32: Int]()
    for b in 0..<batch {
        let cached = Int(params.cache_seqlens![b])
        let targets: [Int32]
        if pageSize > 0 {
            let row = params.block_table! + b * Int(params.block_table_batch_stride)
            targets = (cached / pageSize...(cached + appendCount - 1) / pageSize).map { row[$0] }
        } else {
            targets = [params.cache_batch_idx![b]]
        }
        for target in targets {
            guard let other = writer.updateValue(b, forKey: target), other != b else { continue }
            throw .invalidIndex(
                pageSize > 0
                    ? "block_table: entries \(other) and \(b) both append into block \(target)"
                    : "cache_batch_idx[\(other)] and cache_batch_idx[\(b)] are both \(target): two entries cannot append to one cache row")
        }
    }
}

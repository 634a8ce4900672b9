import CFlashAttention
import FlashAttentionCore

/// Turns a caller's `flash_attention_params` into a trusted `AttentionProblem`, or throws an error that
/// names the offending argument and value. Everything a kernel relies on is checked here, before any
/// memory is read or written: sizes, options, NULLs, alignment, every stride's addressed range (with
/// overflow checks), every index read from caller memory, and that outputs overlap neither themselves nor
/// any input. The success path allocates nothing: names are static strings, messages are built only when
/// an error is thrown.

/// Which entry point the params came through.
enum Entry {
    case dense, varlen, kvcache
}

/// Byte interval [lower, upper) that an argument addresses.
/// Where a validated forward call's tensors and arrays lie, for a caller that adds outputs of its own (the
/// backward). Plain fields, so the forward's small calls pay nothing for it; `named` lists them on demand.
struct InputRanges {
    var q, k, v, out, lse, alibi, sinks: AddressRange?
    var indices: (AddressRange?, AddressRange?, AddressRange?)
    var varlen: Bool

    var named: [(String, AddressRange?)] {
        [("q", q), ("k", k), ("v", v), ("out", out), ("lse", lse), ("alibi_slopes", alibi), ("sinks", sinks),
         (varlen ? "cu_seqlens_q" : "cache_seqlens", indices.0), (varlen ? "cu_seqlens_k" : "cache_batch_idx", indices.1),
         ("block_table", indices.2)]
    }
}

struct AddressRange {
    let lower: UInt
    let upper: UInt
    func overlaps(_ other: AddressRange?) -> Bool { other.map { lower < $0.upper && $0.lower < upper } ?? false }
}

/// One axis of a strided argument: its size, its stride in elements, and the stride's field name.
struct Axis {
    var size: Int
    var stride: Int
    var field: StaticString
}

/// One strided argument as the caller described it (up to four axes, innermost last).
struct TensorArgument {
    let name: StaticString
    let pointer: UnsafeRawPointer?
    let elementSize: Int
    let axes: (Axis, Axis, Axis, Axis)

    init(_ name: StaticString, _ pointer: UnsafeRawPointer?, elementSize: Int = 4, _ a: Axis, _ b: Axis, _ c: Axis, _ d: Axis) {
        self.name = name
        self.pointer = pointer
        self.elementSize = elementSize
        axes = (a, b, c, d)
    }

    /// A 1-D argument of `count` contiguous elements.
    init(_ name: StaticString, _ pointer: UnsafeRawPointer?, elementSize: Int = 4, count: Int) {
        let unit = Axis(size: 1, stride: 0, field: "")
        self.init(name, pointer, elementSize: elementSize, unit, unit, unit, Axis(size: count, stride: 1, field: ""))
    }

    func axis(_ i: Int) -> Axis {
        switch i {
        case 0: return axes.0
        case 1: return axes.1
        case 2: return axes.2
        default: return axes.3
        }
    }

    /// Checks the pointer and strides; returns the addressed bytes, or nil for an argument with no elements
    /// (whose pointer may then be NULL and whose strides are never used).
    func validate() throws(FlashAttentionError) -> AddressRange? {
        var count = 1
        for i in 0..<4 {
            let (product, overflow) = count.multipliedReportingOverflow(by: axis(i).size)
            if overflow { throw .invalidShape("\(name) has more elements than int64 can count") }
            count = product
        }
        if count == 0 { return nil }
        guard let pointer else { throw .nullPointer("\(name) is NULL but has \(count) elements") }
        let address = UInt(bitPattern: pointer)
        if address % UInt(elementSize) != 0 {
            throw .invalidArgument("\(name) (0x\(String(address, radix: 16))) is not aligned to \(elementSize) bytes")
        }
        // Lowest and highest element offsets over all indices, from the per-axis extremes.
        var low = 0, high = 0
        for i in 0..<4 {
            let a = axis(i)
            let (extent, overflow) = (a.size - 1).multipliedReportingOverflow(by: a.stride)
            if overflow { throw .invalidStride("\(a.field) (\(a.stride)) × \(a.size - 1) overflows int64") }
            let (sum, sumOverflow) = extent < 0 ? low.addingReportingOverflow(extent) : high.addingReportingOverflow(extent)
            if sumOverflow { throw .invalidStride("\(name): its strides address a range that overflows int64") }
            if extent < 0 { low = sum } else { high = sum }
        }
        // Every step is checked before its result is used: a wrapped value must never reach a conversion.
        let outside = FlashAttentionError.invalidStride("\(name): its strides address memory outside the address space")
        let (lowBytes, lowOverflow) = low.multipliedReportingOverflow(by: elementSize)
        let (highBytes, highOverflow) = high.multipliedReportingOverflow(by: elementSize)
        if lowOverflow || highOverflow { throw outside }
        let (lower, underflow) = address.subtractingReportingOverflow(lowBytes.magnitude)
        let (upper, beyond) = address.addingReportingOverflow(highBytes.magnitude + UInt(elementSize))
        if underflow || beyond { throw outside }
        return AddressRange(lower: lower, upper: upper)
    }

    /// Checks that no two distinct elements share an address, so concurrent writes never collide. Sufficient
    /// rule: sorted by |stride|, each axis steps past everything the smaller axes reach.
    func validateNoSelfOverlap() throws(FlashAttentionError) {
        var order = (0, 1, 2, 3)
        withUnsafeMutableBytes(of: &order) { raw in
            let o = raw.bindMemory(to: Int.self)
            for i in 1..<4 {  // insertion sort by |stride|
                var j = i
                while j > 0 && axis(o[j - 1]).stride.magnitude > axis(o[j]).stride.magnitude {
                    o.swapAt(j - 1, j)
                    j -= 1
                }
            }
        }
        var reach: UInt = 0
        for position in 0..<4 {
            let a = axis(withUnsafeBytes(of: order) { $0.load(fromByteOffset: position * MemoryLayout<Int>.stride, as: Int.self) })
            if a.size <= 1 { continue }
            if a.stride.magnitude <= reach {
                throw .invalidStride(
                    "\(a.field) (\(a.stride)) makes distinct elements of \(name) overlap; an output needs"
                        + " non-overlapping strides")
            }
            reach += UInt(a.size - 1) * a.stride.magnitude
        }
    }

    func sameView(as other: TensorArgument) -> Bool {
        pointer == other.pointer && (0..<4).allSatisfy { axis($0).stride == other.axis($0).stride && axis($0).size == other.axis($0).size }
    }
}

/// Params fields that are not part of the problem, checked and normalised.
struct ForwardOptions {
    let numThreads: Int
    let algorithm: Int32
}

/// The dropout fields: probability in [0, 1), training entry points only.
private func validatedDropout(_ params: flash_attention_params, entry: Entry) throws(FlashAttentionError) -> Dropout? {
    if params.reserved2 != 0 { throw .invalidArgument("reserved2 (\(params.reserved2)) must be 0") }
    let p = params.dropout_p
    if !(p >= 0 && p < 1) { throw .invalidArgument("dropout_p (\(p)) must be in [0, 1) (0 = off)") }
    if p > 0 && entry == .kvcache {
        throw .invalidArgument("dropout_p (\(p)) must be 0 for a KV-cache call (dropout is a training option)")
    }
    return Dropout(probability: p, seed: params.dropout_seed)
}

/// A stand-in for index arrays with no elements: never read.
nonisolated(unsafe) private let noIndices = UnsafePointer(UnsafeMutablePointer<Int32>.allocate(capacity: 1))

/// A stand-in address for tensors with no elements: never dereferenced, and their strides become 0.
nonisolated(unsafe) private let emptyTensor = UnsafeMutablePointer<Float>.allocate(capacity: 1)

extension AttentionProblem {
    /// Validates `params` (already widened to the current struct) for `entry`. Also returns the address range
    /// of every tensor and array the call touches, by name, for callers that add outputs of their own.
    static func validated(_ params: flash_attention_params, entry: Entry) throws(FlashAttentionError) -> (
        AttentionProblem, ForwardOptions, CacheAppend?, InputRanges
    ) {
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
        let dropout = try validatedDropout(params, entry: entry)

        // Varlen: the packed tensors have one "batch" entry; the sequences come from cu_seqlens.
        let tensorBatch = entry == .varlen ? 1 : batch
        let q = tensor4("q", params.q, qType, tensorBatch, seqlenQ, headsQ, headDim,
                        params.q_batch_stride, params.q_row_stride, params.q_head_stride, params.q_dim_stride,
                        ("q_batch_stride", "q_row_stride", "q_head_stride", "q_dim_stride"), ignoreBatch: entry == .varlen)
        let out = tensor4("out", UnsafeRawPointer(params.out), qType, tensorBatch, seqlenQ, headsQ, headDim,
                          params.out_batch_stride, params.out_row_stride, params.out_head_stride, params.out_dim_stride,
                          ("out_batch_stride", "out_row_stride", "out_head_stride", "out_dim_stride"), ignoreBatch: entry == .varlen)
        let paged = entry == .kvcache && params.block_table != nil
        let kvBatch = entry == .kvcache ? Int(params.cache_batch) : tensorBatch
        let kvRows = entry == .kvcache ? Int(params.cache_seqlen) : seqlenK
        if entry == .kvcache {
            if kvBatch < 0 { throw .invalidShape("cache_batch (\(kvBatch)) must be >= 0") }
            if kvRows < (paged ? 1 : 0) {
                throw .invalidShape("cache_seqlen (\(kvRows)) must be >= \(paged ? "1 (the block size)" : "0")")
            }
        }
        let k = tensor4("k", params.k, kvType, kvBatch, kvRows, headsKV, headDim,
                        params.k_batch_stride, params.k_row_stride, params.k_head_stride, params.k_dim_stride,
                        ("k_batch_stride", "k_row_stride", "k_head_stride", "k_dim_stride"), ignoreBatch: entry == .varlen)
        let v = tensor4("v", params.v, kvType, kvBatch, kvRows, headsKV, headDim,
                        params.v_batch_stride, params.v_row_stride, params.v_head_stride, params.v_dim_stride,
                        ("v_batch_stride", "v_row_stride", "v_head_stride", "v_dim_stride"), ignoreBatch: entry == .varlen)
        try checkDimStride(q)
        try checkDimStride(out)
        try checkDimStride(k)
        try checkDimStride(v)
        let lse: TensorArgument? = params.lse.map {
            TensorArgument(
                "lse", UnsafeRawPointer($0),
                Axis(size: tensorBatch, stride: entry == .varlen ? 0 : Int(params.lse_batch_stride), field: "lse_batch_stride"),
                Axis(size: headsQ, stride: Int(params.lse_head_stride), field: "lse_head_stride"),
                Axis(size: seqlenQ, stride: Int(params.lse_row_stride), field: "lse_row_stride"),
                Axis(size: 1, stride: 0, field: ""))
        }
        let alibi: TensorArgument? = params.alibi_slopes.map {
            TensorArgument(
                "alibi_slopes", UnsafeRawPointer($0),
                Axis(size: 1, stride: 0, field: ""), Axis(size: 1, stride: 0, field: ""),
                Axis(size: batch, stride: Int(params.alibi_batch_stride), field: "alibi_batch_stride"),
                Axis(size: headsQ, stride: 1, field: ""))
        }
        let sinks: TensorArgument? = params.sinks.map { TensorArgument("sinks", UnsafeRawPointer($0), count: headsQ) }

        let qRange = try q.validate(), outRange = try out.validate()
        let kRange = try k.validate(), vRange = try v.validate()
        let lseRange = try lse?.validate(), alibiRange = try alibi?.validate(), sinksRange = try sinks?.validate()
        if outRange != nil { try out.validateNoSelfOverlap() }
        if lseRange != nil { try lse?.validateNoSelfOverlap() }
        if let alibi, alibiRange != nil { try checkFinite(alibi, "alibi_slopes") }
        if let sinks, sinksRange != nil { try checkFinite(sinks, "sinks") }

        // Sequences: index arrays are read and checked in full before anything else happens.
        var layout = SequenceLayout.dense
        var storage = KeyValueStorage.contiguous
        var maxSeqlenQ = seqlenQ, maxSeqlenK = seqlenK
        var indexRanges: (AddressRange?, AddressRange?, AddressRange?, AddressRange?) = (nil, nil, nil, nil)
        var append: (keys: TensorArgument, values: TensorArgument, valuesRange: AddressRange?, count: Int)? = nil
        var scales = CacheScales()
        switch entry {
        case .dense:
            break
        case .varlen:
            if batch == .max { throw .invalidShape("batch (\(batch)) is too large: cu_seqlens_q needs batch + 1 entries") }
            let cuQ = TensorArgument("cu_seqlens_q", params.cu_seqlens_q, count: batch + 1)
            let cuK = TensorArgument("cu_seqlens_k", params.cu_seqlens_k, count: batch + 1)
            indexRanges.0 = try cuQ.validate()
            indexRanges.1 = try cuK.validate()
            maxSeqlenQ = try checkCumulative(params.cu_seqlens_q!, "cu_seqlens_q", batch: batch, total: seqlenQ, "seqlen_q")
            maxSeqlenK = try checkCumulative(params.cu_seqlens_k!, "cu_seqlens_k", batch: batch, total: seqlenK, "seqlen_k")
            if params.max_seqlen_q > 0 && maxSeqlenQ > params.max_seqlen_q {
                throw .invalidIndex("a sequence has \(maxSeqlenQ) queries, more than max_seqlen_q (\(params.max_seqlen_q))")
            }
            if params.max_seqlen_k > 0 && maxSeqlenK > params.max_seqlen_k {
                throw .invalidIndex("a sequence has \(maxSeqlenK) keys, more than max_seqlen_k (\(params.max_seqlen_k))")
            }
            layout = .varlen(cuQ: params.cu_seqlens_q!, cuK: params.cu_seqlens_k!)
        case .kvcache:
            let appendCount = Int(params.seqlen_new)
            if appendCount < 0 { throw .invalidShape("seqlen_new (\(appendCount)) must be >= 0") }
            if (params.k_new == nil) != (params.v_new == nil) {
                throw .nullPointer("k_new and v_new must be both set or both NULL")
            }
            if params.k_new == nil && appendCount > 0 {
                throw .nullPointer("k_new is NULL but seqlen_new is \(appendCount)")
            }
            let seqlens = TensorArgument("cache_seqlens", params.cache_seqlens, count: batch)
            indexRanges.0 = try seqlens.validate()
            let batchIndex = params.cache_batch_idx.map { TensorArgument("cache_batch_idx", $0, count: batch) }
            indexRanges.1 = try batchIndex?.validate()
            if paged && params.cache_batch_idx != nil {
                throw .invalidArgument("cache_batch_idx cannot be combined with block_table (a paged cache)")
            }
            // Without an index, entry b reads (and appends to) cache row b: every entry needs its own row.
            if !paged && params.cache_batch_idx == nil && batch > kvBatch {
                throw .invalidShape(
                    "batch (\(batch)) exceeds cache_batch (\(kvBatch)): without cache_batch_idx entry b uses cache row b")
            }
            let capacity: Int
            if paged {
                let blocks = Int(params.max_blocks_per_seq)
                if blocks < 1 { throw .invalidShape("max_blocks_per_seq (\(blocks)) must be >= 1 with a block_table") }
                let table = TensorArgument(
                    "block_table", params.block_table, Axis(size: 1, stride: 0, field: ""),
                    Axis(size: 1, stride: 0, field: ""),
                    Axis(size: batch, stride: Int(params.block_table_batch_stride), field: "block_table_batch_stride"),
                    Axis(size: blocks, stride: 1, field: ""))
                indexRanges.2 = try table.validate()
                let (product, overflow) = blocks.multipliedReportingOverflow(by: kvRows)
                capacity = overflow ? Int.max : product
            } else {
                capacity = kvRows
            }
            maxSeqlenK = 0
            for b in 0..<batch {
                let cached = Int(params.cache_seqlens![b])
                if cached < 0 { throw .invalidIndex("cache_seqlens[\(b)] (\(cached)) must be >= 0") }
                let (total, overflow) = cached.addingReportingOverflow(appendCount)
                if overflow || total > capacity {
                    throw .invalidIndex(
                        "cache_seqlens[\(b)] (\(cached)) + seqlen_new (\(appendCount)) exceeds the cache capacity"
                            + " (\(capacity) positions)")
                }
                maxSeqlenK = max(maxSeqlenK, total)
                if let index = params.cache_batch_idx?[b], index < 0 || Int(index) >= kvBatch {
                    throw .invalidIndex("cache_batch_idx[\(b)] (\(index)) is not in 0..<cache_batch (\(kvBatch))")
                }
                if paged {
                    let row = params.block_table! + b * Int(params.block_table_batch_stride)
                    for j in 0..<((total + kvRows - 1) / kvRows) where row[j] < 0 || Int(row[j]) >= kvBatch {
                        throw .invalidIndex(
                            "block_table[\(b)][\(j)] (\(row[j])) is not in 0..<cache_batch (\(kvBatch) blocks)")
                    }
                }
            }
            if appendCount > 0 && (paged || params.cache_batch_idx != nil) {
                try checkAppendTargetsDistinct(params, batch: batch, appendCount: appendCount, pageSize: paged ? kvRows : 0)
            }
            if appendCount > 0 {
                if newType.isQuantized {
                    throw .invalidArgument(
                        "kv_new_dtype (-1, the cache's type) must name the float type of k_new/v_new"
                            + " (FA_DTYPE_FLOAT32, FA_DTYPE_FLOAT16 or FA_DTYPE_BFLOAT16) to append to an 8-bit cache")
                }
                let keys = tensor4("k_new", params.k_new, newType, batch, appendCount, headsKV, headDim,
                                   params.k_new_batch_stride, params.k_new_row_stride, params.k_new_head_stride,
                                   params.k_new_dim_stride,
                                   ("k_new_batch_stride", "k_new_row_stride", "k_new_head_stride", "k_new_dim_stride"))
                let values = tensor4("v_new", params.v_new, newType, batch, appendCount, headsKV, headDim,
                                     params.v_new_batch_stride, params.v_new_row_stride, params.v_new_head_stride,
                                     params.v_new_dim_stride,
                                     ("v_new_batch_stride", "v_new_row_stride", "v_new_head_stride", "v_new_dim_stride"))
                try checkDimStride(keys)
                try checkDimStride(values)
                indexRanges.3 = try keys.validate()
                let valuesRange = try values.validate()
                // The cache becomes an output: it must not overlap what the call reads or writes elsewhere.
                for (cache, cacheRange) in [(k, kRange), (v, vRange)] {
                    guard let cacheRange else { continue }
                    try cache.validateNoSelfOverlap()
                    for (other, otherRange) in [(q, qRange), (keys, indexRanges.3), (values, valuesRange)]
                    where cacheRange.overlaps(otherRange) {
                        throw .invalidArgument("\(cache.name) (the cache, written by the append) overlaps \(other.name)")
                    }
                }
                if let kRange, kRange.overlaps(vRange) {
                    throw .invalidArgument("k and v caches overlap; the append would write one into the other")
                }
                append = (keys, values, valuesRange, appendCount)
            }
            scales = try validatedScales(
                params, kvType: kvType, cacheBatch: kvBatch, cacheRows: kvRows, headsKV: headsKV,
                written: append == nil ? [] : [(q, qRange), (k, kRange), (v, vRange), (append!.keys, indexRanges.3),
                                               (append!.values, append!.valuesRange)])
            // With batch 0 the index arrays may be NULL; nothing will read them.
            layout = .cache(
                seqlens: params.cache_seqlens ?? noIndices, batchIndex: params.cache_batch_idx, appended: appendCount)
            if paged {
                storage = .paged(
                    table: params.block_table!, tableStride: Int(params.block_table_batch_stride), pageSize: kvRows)
            }
        }

        // Outputs never overlap an input (out may be exactly q, for in-place use) or each other.
        func checkInputs(_ output: StaticString, _ range: AddressRange?) throws(FlashAttentionError) {
            guard let range else { return }
            func check(_ name: StaticString, _ other: AddressRange?) throws(FlashAttentionError) {
                if range.overlaps(other) { throw .invalidArgument("\(output) overlaps \(name); outputs must not alias inputs") }
            }
            try check("k", kRange)
            try check("v", vRange)
            try check("alibi_slopes", alibiRange)
            try check("sinks", sinksRange)
            try check(entry == .varlen ? "cu_seqlens_q" : "cache_seqlens", indexRanges.0)
            try check(entry == .varlen ? "cu_seqlens_k" : "cache_batch_idx", indexRanges.1)
            try check("block_table", indexRanges.2)
            try check("k_scale", scales.kRange)
            try check("v_scale", scales.vRange)
        }
        try checkInputs("out", outRange)
        try checkInputs("lse", lseRange)
        if let outRange, outRange.overlaps(qRange), !out.sameView(as: q) {
            throw .invalidArgument("out partially overlaps q; it must be either the same view as q or disjoint")
        }
        if let lseRange, lseRange.overlaps(qRange) || lseRange.overlaps(outRange) {
            throw .invalidArgument("lse overlaps \(lseRange.overlaps(qRange) ? "q" : "out"); outputs must not alias other tensors")
        }

        let scale = params.softmax_scale == 0 ? 1 / Float(headDim).squareRoot() : params.softmax_scale
        let causal = params.causal != 0
        let problem = AttentionProblem(
            batch: batch, seqlenQ: seqlenQ, seqlenK: seqlenK, headsQ: headsQ, headsKV: headsKV, headDim: headDim,
            q: view(q, qRange, qType), k: view(k, kRange, kvType, scale: scales.k),
            v: view(v, vRange, kvType, scale: scales.v),
            out: view(out, outRange, qType),
            lse: lse.map { t in
                let (base, batchStride, headStride, rowStride, _) = strided(t, lseRange)
                return LSEView(base: base, batchStride: batchStride, headStride: headStride, rowStride: rowStride)
            },
            scale: scale, windowLeft: params.window_left < 0 ? nil : Int(params.window_left),
            windowRight: causal ? 0 : params.window_right < 0 ? nil : Int(params.window_right),
            alibiSlopes: alibiRange == nil ? nil : params.alibi_slopes,
            alibiBatchStride: Int(params.alibi_batch_stride), softcap: params.softcap,
            sinks: sinksRange == nil ? nil : params.sinks, layout: layout, storage: storage,
            maxSeqlenQ: maxSeqlenQ, maxSeqlenK: maxSeqlenK, dropout: dropout)
        let cacheAppend = append.map {
            CacheAppend(
                keys: view($0.keys, indexRanges.3, newType), values: view($0.values, $0.valuesRange, newType), count: $0.count)
        }
        let ranges = InputRanges(
            q: qRange, k: kRange, v: vRange, out: outRange, lse: lseRange, alibi: alibiRange, sinks: sinksRange,
            indices: (indexRanges.0, indexRanges.1, indexRanges.2), varlen: entry == .varlen)
        let options = ForwardOptions(numThreads: Int(params.num_threads), algorithm: params.algorithm)
        return (problem, options, cacheAppend, ranges)
    }
}

/// A [batch, rows, heads, dim] tensor argument; `ignoreBatch` (varlen) pins the batch stride to 0.
private func tensor4(
    _ name: StaticString, _ pointer: UnsafeRawPointer?, _ element: ElementType, _ batch: Int, _ rows: Int,
    _ heads: Int, _ dim: Int,
    _ batchStride: Int64, _ rowStride: Int64, _ headStride: Int64, _ dimStride: Int64,
    _ fields: (StaticString, StaticString, StaticString, StaticString), ignoreBatch: Bool = false
) -> TensorArgument {
    TensorArgument(
        name, pointer, elementSize: element.size, Axis(size: batch, stride: ignoreBatch ? 0 : Int(batchStride), field: fields.0),
        Axis(size: rows, stride: Int(rowStride), field: fields.1), Axis(size: heads, stride: Int(headStride), field: fields.2),
        Axis(size: dim, stride: Int(dimStride), field: fields.3))
}

/// A tensor with no elements is never read or written; its view is pinned to a dummy address with zero
/// strides so that no offset computed from the caller's (unchecked) strides can overflow.
private func strided(_ t: TensorArgument, _ range: AddressRange?) -> (UnsafeMutablePointer<Float>, Int, Int, Int, Int) {
    guard range != nil, let pointer = t.pointer else { return (emptyTensor, 0, 0, 0, 0) }
    return (UnsafeMutablePointer(mutating: pointer.assumingMemoryBound(to: Float.self)),
            t.axes.0.stride, t.axes.1.stride, t.axes.2.stride, t.axes.3.stride)
}

private func view(_ t: TensorArgument, _ range: AddressRange?, _ element: ElementType, scale: ScaleView? = nil) -> TensorView {
    let (base, b, r, h, _) = strided(t, range)
    return TensorView(
        base: UnsafeMutableRawPointer(base), element: element, batchStride: b, rowStride: r, headStride: h, scale: scale)
}

/// A float element type (q, out, gradients, dense and varlen k/v, k_new/v_new).
private func floatType(_ code: flash_attention_dtype, _ field: StaticString) throws(FlashAttentionError) -> ElementType {
    guard let type = ElementType(rawValue: code), !type.isQuantized else {
        throw .invalidArgument(
            "\(field) (\(code)) must be FA_DTYPE_FLOAT32 (0), FA_DTYPE_FLOAT16 (1) or FA_DTYPE_BFLOAT16 (2)"
                + (code == FA_DTYPE_INT8 || code == FA_DTYPE_FLOAT8_E4M3 ? "; 8-bit types are for KV caches only" : ""))
    }
    return type
}

/// A KV cache's element type: a float type or an 8-bit one.
private func cacheType(_ code: flash_attention_dtype) throws(FlashAttentionError) -> ElementType {
    guard let type = ElementType(rawValue: code) else {
        throw .invalidArgument(
            "kv_dtype (\(code)) must be FA_DTYPE_FLOAT32 (0), FA_DTYPE_FLOAT16 (1), FA_DTYPE_BFLOAT16 (2), FA_DTYPE_INT8 (3)"
                + " or FA_DTYPE_FLOAT8_E4M3 (4)")
    }
    return type
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

private func checkDimStride(_ t: TensorArgument) throws(FlashAttentionError) {
    if t.axes.3.stride != 1 { throw .invalidStride("\(t.axes.3.field) (\(t.axes.3.stride)) must be 1") }
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

/// ALiBi slopes and sinks must be finite: a NaN or infinite bias would silently poison or empty rows.
private func checkFinite(_ t: TensorArgument, _ name: StaticString) throws(FlashAttentionError) {
    guard let base = t.pointer?.assumingMemoryBound(to: Float.self) else { return }
    // A zero batch stride repeats one row for every batch entry (and batch may be huge when nothing else is).
    let rows = t.axes.2.stride == 0 ? min(t.axes.2.size, 1) : t.axes.2.size
    for outer in 0..<rows {
        for i in 0..<t.axes.3.size {
            let x = base[outer * t.axes.2.stride + i * t.axes.3.stride]
            if !x.isFinite { throw .invalidArgument("\(name) has a non-finite value (\(x)) at index \(outer * t.axes.3.size + i)") }
        }
    }
}

extension BackwardProblem {
    /// Validates backward params: the forward params as for a forward call (dense, or varlen when
    /// cu_seqlens_q is set), their out and lse as inputs, and the gradients as outputs that overlap
    /// nothing else.
    static func validated(_ params: flash_attention_backward_params) throws(FlashAttentionError) -> (
        BackwardProblem, ForwardOptions
    ) {
        guard let forwardParams = params.forward else { throw .nullPointer("forward is NULL") }
        let widened = try widen(forwardParams)
        let entry: Entry = widened.cu_seqlens_q != nil ? .varlen : .dense
        let (problem, options, _, forwardTensors) = try AttentionProblem.validated(widened, entry: entry)
        let p = widened
        let qElements = problem.batch * problem.seqlenQ * problem.headsQ
        if qElements > 0 && p.lse == nil {
            throw .nullPointer("forward->lse is NULL; the backward pass needs the forward's log-sum-exp")
        }
        let qType = ElementType(rawValue: p.dtype) ?? .float32, kvType = ElementType(rawValue: p.kv_dtype) ?? .float32
        let tensorBatch = entry == .varlen ? 1 : problem.batch
        let varlen = entry == .varlen
        let dout = tensor4("dout", params.dout, qType, tensorBatch, problem.seqlenQ, problem.headsQ, problem.headDim,
                           params.dout_batch_stride, params.dout_row_stride, params.dout_head_stride, params.dout_dim_stride,
                           ("dout_batch_stride", "dout_row_stride", "dout_head_stride", "dout_dim_stride"), ignoreBatch: varlen)
        let dq = tensor4("dq", UnsafeRawPointer(params.dq), qType, tensorBatch, problem.seqlenQ, problem.headsQ, problem.headDim,
                         params.dq_batch_stride, params.dq_row_stride, params.dq_head_stride, params.dq_dim_stride,
                         ("dq_batch_stride", "dq_row_stride", "dq_head_stride", "dq_dim_stride"), ignoreBatch: varlen)
        let dk = tensor4("dk", UnsafeRawPointer(params.dk), kvType, tensorBatch, problem.seqlenK, problem.headsKV, problem.headDim,
                         params.dk_batch_stride, params.dk_row_stride, params.dk_head_stride, params.dk_dim_stride,
                         ("dk_batch_stride", "dk_row_stride", "dk_head_stride", "dk_dim_stride"), ignoreBatch: varlen)
        let dv = tensor4("dv", UnsafeRawPointer(params.dv), kvType, tensorBatch, problem.seqlenK, problem.headsKV, problem.headDim,
                         params.dv_batch_stride, params.dv_row_stride, params.dv_head_stride, params.dv_dim_stride,
                         ("dv_batch_stride", "dv_row_stride", "dv_head_stride", "dv_dim_stride"), ignoreBatch: varlen)
        for t in [dout, dq, dk, dv] { try checkDimStride(t) }
        let doutRange = try dout.validate()
        let dqRange = try dq.validate(), dkRange = try dk.validate(), dvRange = try dv.validate()
        let dsinks: TensorArgument? = params.dsinks.map { TensorArgument("dsinks", UnsafeRawPointer($0), count: problem.headsQ) }
        let dsinksRange = try dsinks?.validate()
        for (output, range) in [(dq, dqRange), (dk, dkRange), (dv, dvRange)] where range != nil {
            try output.validateNoSelfOverlap()
        }
        // The gradients overlap no input and no other gradient.
        let outputs: [(String, AddressRange?)] = [("dq", dqRange), ("dk", dkRange), ("dv", dvRange), ("dsinks", dsinksRange)]
        let inputs = forwardTensors.named + [("dout", doutRange)]
        for (i, (name, range)) in outputs.enumerated() {
            guard let range else { continue }
            for (other, otherRange) in inputs where range.overlaps(otherRange) {
                throw .invalidArgument("\(name) overlaps \(other); gradients must not alias inputs")
            }
            for (other, otherRange) in outputs[(i + 1)...] where range.overlaps(otherRange) {
                throw .invalidArgument("\(name) overlaps \(other); gradients must not alias each other")
            }
        }
        let backward = BackwardProblem(
            forward: problem, dout: view(dout, doutRange, qType), dq: view(dq, dqRange, qType),
            dk: view(dk, dkRange, kvType), dv: view(dv, dvRange, kvType),
            dsinks: problem.sinks == nil || dsinksRange == nil ? nil : params.dsinks)
        return (backward, options)
    }
}

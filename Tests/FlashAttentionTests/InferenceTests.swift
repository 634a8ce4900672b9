import CFlashAttention
import FlashAttention
import FlashAttentionCore
import Testing

/// The inference entry points through the C ABI, checked by properties that must hold exactly: packing
/// sequences (varlen) or paging a cache changes where rows live, never the arithmetic.

/// A contiguous float buffer with [batch, seq, heads, dim] strides, at a stable address.
final class Dense {
    let batch: Int, seq: Int, heads: Int, dim: Int
    let buffer: UnsafeMutableBufferPointer<Float>
    init(batch: Int, seq: Int, heads: Int, dim: Int, rng: inout SeededRandom) {
        (self.batch, self.seq, self.heads, self.dim) = (batch, seq, heads, dim)
        buffer = .allocate(capacity: max(1, batch * seq * heads * dim))
        for i in buffer.indices { buffer[i] = rng.normal() }
    }
    init(zeros batch: Int, seq: Int, heads: Int, dim: Int) {
        (self.batch, self.seq, self.heads, self.dim) = (batch, seq, heads, dim)
        buffer = .allocate(capacity: max(1, batch * seq * heads * dim))
        buffer.initialize(repeating: 0)
    }
    deinit { buffer.deallocate() }
    var values: [Float] { Array(buffer) }
    var pointer: UnsafeMutablePointer<Float> { buffer.baseAddress! }
    var strides: (Int64, Int64, Int64) { (Int64(seq * heads * dim), Int64(heads * dim), Int64(dim)) }
    /// Copies `count` floats from `source` at `from` to this buffer at `to`.
    func copy(_ source: Dense, from: Int, to: Int, count: Int) {
        (pointer + to).update(from: source.pointer + from, count: count)
    }
}

func defaultParams() -> flash_attention_params {
    var p = flash_attention_params()
    _ = flash_attention_params_init(&p, MemoryLayout<flash_attention_params>.size)
    return p
}

/// Sets q/k/v/out pointers and strides of `p`.
func setTensors(_ p: inout flash_attention_params, q: Dense, k: Dense, v: Dense, out: Dense) {
    p.q = UnsafeRawPointer(q.pointer)
    (p.q_batch_stride, p.q_row_stride, p.q_head_stride) = q.strides
    p.k = UnsafeRawPointer(k.pointer)
    (p.k_batch_stride, p.k_row_stride, p.k_head_stride) = k.strides
    p.v = UnsafeRawPointer(v.pointer)
    (p.v_batch_stride, p.v_row_stride, p.v_head_stride) = v.strides
    p.out = UnsafeMutableRawPointer(out.pointer)
    (p.out_batch_stride, p.out_row_stride, p.out_head_stride) = out.strides
}

@Test("varlenEqualsOneCallPerSequence", arguments: tiledPaths)
func varlenEqualsOneCallPerSequence(_ isa: KernelISA) {
    onPath(isa) {
        var rng = SeededRandom(seed: 71)
        let cuQ: [Int32] = [0, 5, 5, 300, 301], cuK: [Int32] = [0, 17, 40, 300, 900]
        // head_dim 36 is not a whole number of micro-tile columns on any path, so the one-query sequence,
        // called alone, takes the query-block path as it does inside the batch (a decoding-path call would
        // sum its dot products in another order).
        let (hq, hk, d) = (4, 2, 36)
        let q = Dense(batch: 1, seq: 301, heads: hq, dim: d, rng: &rng)
        let k = Dense(batch: 1, seq: 900, heads: hk, dim: d, rng: &rng)
        let v = Dense(batch: 1, seq: 900, heads: hk, dim: d, rng: &rng)
        let out = Dense(zeros: 1, seq: 301, heads: hq, dim: d)
        var p = defaultParams()
        (p.batch, p.seqlen_q, p.seqlen_k, p.heads_q, p.heads_kv, p.head_dim, p.causal) = (4, 301, 900, Int64(hq), Int64(hk), Int64(d), 1)
        let status = cuQ.withUnsafeBufferPointer { cq in
            cuK.withUnsafeBufferPointer { ck in
                p.cu_seqlens_q = cq.baseAddress
                p.cu_seqlens_k = ck.baseAddress
                setTensors(&p, q: q, k: k, v: v, out: out)
                return flash_attention_forward_varlen(&p)
            }
        }
        #expect(status == FA_OK, "\(String(cString: flash_attention_last_error()))")
        for b in 0..<4 {
            let (q0, q1, k0, k1) = (Int(cuQ[b]), Int(cuQ[b + 1]), Int(cuK[b]), Int(cuK[b + 1]))
            guard q1 > q0 else { continue }
            let rowsQ = (q1 - q0) * hq * d, rowsK = (k1 - k0) * hk * d
            let qs = Dense(zeros: 1, seq: q1 - q0, heads: hq, dim: d)
            let ks = Dense(zeros: 1, seq: k1 - k0, heads: hk, dim: d)
            let vs = Dense(zeros: 1, seq: k1 - k0, heads: hk, dim: d)
            let single = Dense(zeros: 1, seq: q1 - q0, heads: hq, dim: d)
            qs.copy(q, from: q0 * hq * d, to: 0, count: rowsQ)
            ks.copy(k, from: k0 * hk * d, to: 0, count: rowsK)
            vs.copy(v, from: k0 * hk * d, to: 0, count: rowsK)
            var sp = defaultParams()
            (sp.batch, sp.seqlen_q, sp.seqlen_k, sp.heads_q, sp.heads_kv, sp.head_dim, sp.causal) =
                (1, Int64(q1 - q0), Int64(k1 - k0), Int64(hq), Int64(hk), Int64(d), 1)
            setTensors(&sp, q: qs, k: ks, v: vs, out: single)
            #expect(flash_attention_forward(&sp) == FA_OK)
            #expect(Array(single.values[0..<rowsQ]).map(\.bitPattern) == Array(out.values[(q0 * hq * d)..<(q1 * hq * d)]).map(\.bitPattern), "sequence \(b)")
        }
    }
}

@Test("causalIsTheWindowWithNoRightSide", arguments: tiledPaths)
func causalIsTheWindowWithNoRightSide(_ isa: KernelISA) {
    onPath(isa) {
        var rng = SeededRandom(seed: 72)
        let q = Dense(batch: 2, seq: 333, heads: 2, dim: 64, rng: &rng)
        let k = Dense(batch: 2, seq: 400, heads: 2, dim: 64, rng: &rng)
        let v = Dense(batch: 2, seq: 400, heads: 2, dim: 64, rng: &rng)
        let a = Dense(zeros: 2, seq: 333, heads: 2, dim: 64), b = Dense(zeros: 2, seq: 333, heads: 2, dim: 64)
        var p = defaultParams()
        (p.batch, p.seqlen_q, p.seqlen_k, p.heads_q, p.heads_kv, p.head_dim) = (2, 333, 400, 2, 2, 64)
        p.causal = 1
        setTensors(&p, q: q, k: k, v: v, out: a)
        #expect(flash_attention_forward(&p) == FA_OK)
        p.causal = 0
        p.window_right = 0
        setTensors(&p, q: q, k: k, v: v, out: b)
        #expect(flash_attention_forward(&p) == FA_OK)
        #expect(a.values.map(\.bitPattern) == b.values.map(\.bitPattern))
    }
}

/// Runs the cache entry point on q against `cache` (contiguous [1, capacity, hk, d] or paged through `table`).
func runCache(
    q: Dense, kCache: Dense, vCache: Dense, seqlens: [Int32], table: [Int32]?, new: (k: Dense, v: Dense)?,
    batchIndex: [Int32]? = nil
) -> (status: flash_attention_status, out: Dense) {
    let out = Dense(zeros: q.batch, seq: q.seq, heads: q.heads, dim: q.dim)
    var p = defaultParams()
    (p.batch, p.seqlen_q, p.heads_q, p.heads_kv, p.head_dim) = (Int64(q.batch), Int64(q.seq), Int64(q.heads), Int64(kCache.heads), Int64(q.dim))
    (p.cache_batch, p.cache_seqlen, p.causal) = (Int64(kCache.batch), Int64(kCache.seq), 1)
    let tableValues = table ?? [0]
    let index = batchIndex ?? [0]
    let status = seqlens.withUnsafeBufferPointer { sl in
        tableValues.withUnsafeBufferPointer { tb in
            index.withUnsafeBufferPointer { ix in
                        p.cache_seqlens = sl.baseAddress
                        if table != nil {
                            p.block_table = tb.baseAddress
                            p.max_blocks_per_seq = Int64(table!.count / q.batch)
                            p.block_table_batch_stride = p.max_blocks_per_seq
                        }
                        if batchIndex != nil { p.cache_batch_idx = ix.baseAddress }
                        if let new {
                            p.seqlen_new = Int64(new.k.seq)
                            p.k_new = UnsafeRawPointer(new.k.pointer)
                            (p.k_new_batch_stride, p.k_new_row_stride, p.k_new_head_stride) = new.k.strides
                            p.v_new = UnsafeRawPointer(new.v.pointer)
                            (p.v_new_batch_stride, p.v_new_row_stride, p.v_new_head_stride) = new.v.strides
                        }
                        setTensors(&p, q: q, k: kCache, v: vCache, out: out)
                        return flash_attention_forward_kvcache(&p)
            }
        }
    }
    return (status, out)
}

@Test("a paged cache gives bitwise the result of a contiguous one", arguments: tiledPaths, [1, 16, 100])
func pagedEqualsContiguous(_ isa: KernelISA, pageRows: Int) {
    onPath(isa) {
        var rng = SeededRandom(seed: 73)
        let (batch, capacity, hk, d) = (2, 1200, 2, 64)
        let q = Dense(batch: batch, seq: 3, heads: 8, dim: d, rng: &rng)
        let kc = Dense(batch: batch, seq: capacity, heads: hk, dim: d, rng: &rng)
        let vc = Dense(batch: batch, seq: capacity, heads: hk, dim: d, rng: &rng)
        let new = (k: Dense(batch: batch, seq: 3, heads: hk, dim: d, rng: &rng), v: Dense(batch: batch, seq: 3, heads: hk, dim: d, rng: &rng))
        let seqlens: [Int32] = [1000, 37]
        // The same rows scattered over shuffled pages: batch b's page j is block table[b][j].
        let perSequence = (capacity + pageRows - 1) / pageRows
        var blocks = Array(0..<(batch * perSequence))
        for i in blocks.indices.reversed() { blocks.swapAt(i, Int(rng.next() % UInt64(i + 1))) }
        let kp = Dense(zeros: batch * perSequence, seq: pageRows, heads: hk, dim: d)
        let vp = Dense(zeros: batch * perSequence, seq: pageRows, heads: hk, dim: d)
        let row = hk * d
        for b in 0..<batch {
            for j in 0..<capacity {
                let block = blocks[b * perSequence + j / pageRows], offset = j % pageRows
                let target = (block * pageRows + offset) * row, source = (b * capacity + j) * row
                kp.copy(kc, from: source, to: target, count: row)
                vp.copy(vc, from: source, to: target, count: row)
            }
        }
        let contiguous = runCache(q: q, kCache: kc, vCache: vc, seqlens: seqlens, table: nil, new: new)
        let paged = runCache(q: q, kCache: kp, vCache: vp, seqlens: seqlens, table: blocks.map(Int32.init), new: new)
        #expect(contiguous.status == FA_OK && paged.status == FA_OK, "\(String(cString: flash_attention_last_error()))")
        #expect(contiguous.out.values.map(\.bitPattern) == paged.out.values.map(\.bitPattern))
        // Both caches received the appended rows at positions 1000...1002 and 37...39.
        for b in 0..<batch {
            for j in 0..<3 {
                let position = Int(seqlens[b]) + j
                let block = blocks[b * perSequence + position / pageRows]
                let pagedRow = (block * pageRows + position % pageRows) * row
                let contiguousRow = (b * capacity + position) * row
                let newRow = (b * 3 + j) * row
                #expect(Array(kp.values[pagedRow..<(pagedRow + row)]) == Array(new.k.values[newRow..<(newRow + row)]))
                #expect(Array(kc.values[contiguousRow..<(contiguousRow + row)]) == Array(new.k.values[newRow..<(newRow + row)]))
            }
        }
    }
}

@Test func badCacheIndicesLeaveTheCacheUnchanged() {
    var rng = SeededRandom(seed: 74)
    let q = Dense(batch: 2, seq: 1, heads: 4, dim: 16, rng: &rng)
    let kc = Dense(batch: 4, seq: 16, heads: 2, dim: 16, rng: &rng)
    let vc = Dense(batch: 4, seq: 16, heads: 2, dim: 16, rng: &rng)
    let new = (k: Dense(batch: 2, seq: 2, heads: 2, dim: 16, rng: &rng), v: Dense(batch: 2, seq: 2, heads: 2, dim: 16, rng: &rng))
    let before = kc.values
    let cases: [([Int32], [Int32]?, [Int32]?, String)] = [
        ([3, 15], nil, nil, "cache_seqlens[1] (15) + seqlen_new (2) exceeds the cache capacity (16 positions)"),
        ([3, -1], nil, nil, "cache_seqlens[1] (-1) must be >= 0"),
        ([3, 3], [1, 4], nil, "cache_batch_idx[1] (4) is not in 0..<cache_batch (4)"),
        ([3, 3], nil, [0, 1, 9, 2], "block_table[1][0] (9) is not in 0..<cache_batch (4 blocks)"),
    ]
    for (seqlens, index, table, message) in cases {
        let result = runCache(q: q, kCache: kc, vCache: vc, seqlens: seqlens, table: table, new: new, batchIndex: index)
        #expect(result.status == FA_ERROR_INVALID_INDEX)
        #expect(String(cString: flash_attention_last_error()) == message)
        let unchanged = kc.values == before
        #expect(unchanged, "the cache changed")
    }
}

@Test func mergeCombinesAndHandlesEmptySides() {
    // Two states over disjoint keys of one row: a over {x1}, b over {x2}, head_dim 2.
    let outA: [Float] = [1, 2], outB: [Float] = [3, 5]
    let lseA: [Float] = [0.5], lseB: [Float] = [-1]
    var out = [Float](repeating: .nan, count: 2), lse: [Float] = [.nan]
    #expect(flash_attention_merge(1, 2, outA, 2, lseA, 1, outB, 2, lseB, 1, &out, 2, &lse, 1) == FA_OK)
    let total = LibM.log(LibM.exp(0.5) + LibM.exp(-1.0))
    let wa = Float(LibM.exp(0.5 - total)), wb = Float(LibM.exp(-1 - total))
    #expect(abs(lse[0] - Float(total)) < 1e-6)
    #expect(abs(out[0] - (wa * 1 + wb * 3)) < 1e-6 && abs(out[1] - (wa * 2 + wb * 5)) < 1e-6)
    // An empty side contributes nothing; two empty sides give 0 and −inf, never NaN.
    let empty: [Float] = [-.infinity]
    #expect(flash_attention_merge(1, 2, outA, 2, lseA, 1, [0, 0], 2, empty, 1, &out, 2, &lse, 1) == FA_OK)
    #expect(out == outA && lse == lseA)
    #expect(flash_attention_merge(1, 2, [7, 7], 2, empty, 1, [9, 9], 2, empty, 1, &out, 2, &lse, 1) == FA_OK)
    #expect(out == [0, 0] && lse == [-.infinity])
    // Errors: negative rows, NULL inputs, an output overlapping side b.
    #expect(flash_attention_merge(-1, 2, outA, 2, lseA, 1, outB, 2, lseB, 1, &out, 2, &lse, 1) == FA_ERROR_INVALID_SHAPE)
    #expect(flash_attention_merge(1, 2, nil, 2, lseA, 1, outB, 2, lseB, 1, &out, 2, &lse, 1) == FA_ERROR_NULL_POINTER)
    var shared: [Float] = [3, 5, -1]
    let status = shared.withUnsafeMutableBufferPointer { s in
        flash_attention_merge(1, 2, outA, 2, lseA, 1, s.baseAddress, 2, s.baseAddress! + 2, 1, s.baseAddress, 2, &lse, 1)
    }
    #expect(status == FA_ERROR_INVALID_ARGUMENT)
}

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#elseif canImport(Musl)
import Musl
#endif

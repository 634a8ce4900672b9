import CFlashAttention
import FlashAttention
import FlashAttentionCore
import Testing

/// The Swift API's 8-bit KV caches (`QuantizedTensor`, `forwardKVCache` over it): exact attention over the
/// dequantized cache against the naive float64 loop of SwiftAPITests.swift, on contiguous, indexed and paged
/// caches, GQA and odd head dims, with appends that must land as the bytes `QuantizedTensor(quantizing:as:)`
/// gives; and the errors, which leave the caches unchanged.

/// Where each batch entry's keys live: its own cache row, a row chosen by cacheBatchIndex, or pages.
enum CacheStorage: String, CaseIterable, Sendable {
    case contiguous, indexed
    /// Pages of 5 rows (odd, so that sequences end mid-page), listed in a shuffled order.
    case paged
}

/// One quantized-cache problem.
struct QuantizedCacheCase: CustomTestStringConvertible, Sendable {
    var name: String
    var batch = 2, seqlenQ = 1, seqlenNew = 0, headsQ = 2, headsKV = 2, headDim = 16
    var cached: [Int]
    var options = AttentionOptions()
    var testDescription: String {
        "b\(batch)-h\(headsQ)/\(headsKV)-s\(seqlenQ)+\(seqlenNew)-d\(headDim)-\(name)"
    }
}

let quantizedCacheCases: [QuantizedCacheCase] = [
    QuantizedCacheCase(name: "decode-mha", batch: 3, headsQ: 2, headsKV: 2, headDim: 40, cached: [37, 5, 0]),
    QuantizedCacheCase(name: "decode-gqa4-append", batch: 2, seqlenNew: 1, headsQ: 8, headsKV: 2, headDim: 59,
                       cached: [40, 0], options: .init(causal: true)),
    QuantizedCacheCase(name: "chunk-append-window", batch: 2, seqlenQ: 3, seqlenNew: 3, headsQ: 3, headsKV: 1,
                       headDim: 1, cached: [20, 9], options: .init(causal: true, windowLeft: 7)),
]

let cacheCapacity = 44
let pageSize = 5

/// The cache tensor's (batch, seqlen) for a storage, and its index array or block table.
func cacheLayout(_ storage: CacheStorage, batch: Int) -> (rows: Int, seqlen: Int, index: [Int]?, table: [[Int]]?) {
    switch storage {
    case .contiguous: return (batch, cacheCapacity, nil, nil)
    case .indexed: return (batch + 1, cacheCapacity, (0..<batch).map { batch - $0 }, nil)
    case .paged:
        let perSequence = (cacheCapacity + pageSize - 1) / pageSize
        let blocks = (0..<(batch * perSequence)).map { ($0 * 7) % (batch * perSequence) }  // 7 is coprime to 18, 27
        return (batch * perSequence, pageSize, nil, (0..<batch).map { Array(blocks[($0 * perSequence)..<(($0 + 1) * perSequence)]) })
    }
}

/// The cache row (tensor batch index, row) of position `j` of batch entry `b`.
func cacheRow(_ b: Int, _ j: Int, index: [Int]?, table: [[Int]]?) -> (Int, Int) {
    if let table { return (table[b][j / pageSize], j % pageSize) }
    return (index?[b] ?? b, j)
}

/// Positions 0..<count of entry b, dequantized, as a [1, count, heads, headDim] tensor.
func cachedRows(_ cache: QuantizedTensor, _ b: Int, count: Int, index: [Int]?, table: [[Int]]?) -> AttentionTensor {
    var t = AttentionTensor(batch: 1, seqlen: count, heads: cache.heads, headDim: cache.headDim)
    for j in 0..<count {
        let (row, position) = cacheRow(b, j, index: index, table: table)
        for h in 0..<cache.heads { for c in 0..<cache.headDim { t[0, j, h, c] = cache[row, position, h, c] } }
    }
    return t
}

/// The values and scales `cache` should hold after appending `new` at positions cached[b] ... of `before`.
func expectedAppend(
    _ before: QuantizedTensor, _ new: AttentionTensor, cached: [Int], index: [Int]?, table: [[Int]]?
) -> (values: [UInt8], scales: [Float]) {
    let quantized = QuantizedTensor(quantizing: new, as: before.format)
    var (values, scales) = (before.values, before.scales)
    let (heads, dim) = (before.heads, before.headDim)
    for b in 0..<new.batch { for j in 0..<new.seqlen { for h in 0..<heads {
        let (row, position) = cacheRow(b, cached[b] + j, index: index, table: table)
        let (target, source) = ((row * before.seqlen + position) * heads + h, (b * new.seqlen + j) * heads + h)
        scales[target] = quantized.scales[source]
        values.replaceSubrange((target * dim)..<((target + 1) * dim), with: quantized.values[(source * dim)..<((source + 1) * dim)])
    } } }
    return (values, scales)
}

@Test("Quantized KV cache matches float64 over the dequantized cache", arguments: tiledPaths, CacheStorage.allCases)
func quantizedKVCache(_ isa: KernelISA, _ storage: CacheStorage) throws {
    try onPath(isa) {
        for format in [QuantizedTensor.Format.int8, .float8E4M3] {
            for c in quantizedCacheCases { try checkQuantizedKVCache(c, format, storage) }
        }
    }
}

/// One case: the appended bytes and scales, then each batch entry's output and LSE against the naive loop.
func checkQuantizedKVCache(_ c: QuantizedCacheCase, _ format: QuantizedTensor.Format, _ storage: CacheStorage) throws {
    let label = "\(c.testDescription)-\(format)-\(storage)"
    var rng = SeededRandom(seed: UInt64(c.headDim * 31 + c.batch))
    let layout = cacheLayout(storage, batch: c.batch)
    var kCache = QuantizedTensor(quantizing: randomTensor(layout.rows, layout.seqlen, c.headsKV, c.headDim, &rng), as: format)
    var vCache = QuantizedTensor(quantizing: randomTensor(layout.rows, layout.seqlen, c.headsKV, c.headDim, &rng), as: format)
    let q = randomTensor(c.batch, c.seqlenQ, c.headsQ, c.headDim, &rng)
    let newK = randomTensor(c.batch, c.seqlenNew, c.headsKV, c.headDim, &rng)
    let newV = randomTensor(c.batch, c.seqlenNew, c.headsKV, c.headDim, &rng)
    let expected = [(kCache, newK), (vCache, newV)].map {
        expectedAppend($0.0, $0.1, cached: c.cached, index: layout.index, table: layout.table)
    }
    let appends = c.seqlenNew > 0
    let result = try Attention.forwardKVCache(
        q: q, kCache: &kCache, vCache: &vCache, cacheSeqlens: c.cached, newK: appends ? newK : nil,
        newV: appends ? newV : nil, cacheBatchIndex: layout.index, blockTable: layout.table, options: c.options)
    #expect(kCache.values == expected[0].values && kCache.scales == expected[0].scales, "\(label)")
    #expect(vCache.values == expected[1].values && vCache.scales == expected[1].scales, "\(label)")
    let lseRows = c.headsQ * c.seqlenQ
    for b in 0..<c.batch {
        // The cache now holds the dequantized rows the attention is exact over, appended ones included.
        let keys = c.cached[b] + c.seqlenNew
        let reference = naiveAttention(
            q: try rows(q, 0..<c.seqlenQ, batch: b),
            k: cachedRows(kCache, b, count: keys, index: layout.index, table: layout.table),
            v: cachedRows(vCache, b, count: keys, index: layout.index, table: layout.table), options: c.options)
        let part = try AttentionResult(
            out: rows(result.out, 0..<c.seqlenQ, batch: b), lse: Array(result.lse[(b * lseRows)..<((b + 1) * lseRows)]))
        let errors = maxErrors(part, reference)
        #expect(errors.out <= Errors.absoluteBound && errors.lse <= Errors.lseBound, "\(label) batch \(b): \(errors)")
    }
}

@Test func quantizingRoundsEachRowToItsNearestStep() {
    var rng = SeededRandom(seed: 1001)
    var x = randomTensor(2, 3, 2, 24, &rng)
    for c in 0..<24 { x[1, 2, 1, c] = 0 }  // a row of zeros: scale 0, values 0
    for (format, largest) in [(QuantizedTensor.Format.int8, Float(127)), (.float8E4M3, 448)] {
        let q = QuantizedTensor(quantizing: x, as: format)
        #expect(q.shape == x.shape && q.scales.count == 12 && q.scales[11] == 0 && q.values.suffix(24).allSatisfy { $0 == 0 })
        let dequantized = q.dequantized()
        for row in 0..<12 {
            let values = x.values[(row * 24)..<((row + 1) * 24)]
            #expect(q.scales[row] == values.map(abs).max()! / largest)
            for (i, v) in values.enumerated() {
                let error = abs(dequantized.values[row * 24 + i] - v)
                // int8: half a step; E4M3 (3 mantissa bits): 2^-4 relative, or half the subnormal step 2^-10 · scale.
                let bound = format == .int8 ? 0.5 * q.scales[row] : max(abs(v) / 16, q.scales[row] / 1024)
                #expect(error <= bound * (1 + 1e-5) + 1e-12, "row \(row) element \(i)")
            }
        }
    }
}

@Test func quantizedKVCacheErrorsLeaveTheCacheUnchanged() {
    var rng = SeededRandom(seed: 1002)
    let q = randomTensor(2, 1, 4, 8, &rng), newK = randomTensor(2, 2, 2, 8, &rng)
    var kCache = QuantizedTensor(quantizing: randomTensor(2, 10, 2, 8, &rng), as: .int8)
    var vCache = QuantizedTensor(quantizing: randomTensor(2, 10, 2, 8, &rng), as: .int8)
    var float8 = QuantizedTensor(quantizing: randomTensor(2, 10, 2, 8, &rng), as: .float8E4M3)
    let before = [kCache, vCache, float8]
    expectAttentionError(FA_ERROR_INVALID_SHAPE, "needs 8 and 4") {
        _ = try QuantizedTensor(format: .int8, batch: 1, seqlen: 2, heads: 2, headDim: 2, values: [UInt8](repeating: 0, count: 8), scales: [1, 1])
    }
    expectAttentionError(FA_ERROR_INVALID_ARGUMENT, "kCache (int8) and vCache (float8E4M3) must have one format") {
        _ = try Attention.forwardKVCache(q: q, kCache: &kCache, vCache: &float8, cacheSeqlens: [3, 3])
    }
    expectAttentionError(FA_ERROR_INVALID_INDEX, "cache_seqlens[1] (9) + seqlen_new (2) exceeds the cache capacity") {
        _ = try Attention.forwardKVCache(
            q: q, kCache: &kCache, vCache: &vCache, cacheSeqlens: [3, 9], newK: newK, newV: newK)
    }
    expectAttentionError(FA_ERROR_INVALID_INDEX, "block_table[0][1] (5)") {
        _ = try Attention.forwardKVCache(
            q: q, kCache: &kCache, vCache: &vCache, cacheSeqlens: [12, 3], newK: newK, newV: newK,
            blockTable: [[0, 5], [1, 0]])
    }
    #expect([kCache, vCache, float8] == before)
}

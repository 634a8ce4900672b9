import FlashAttentionShims

/// Software prefetches of whole rows, for the rows the hardware prefetcher cannot guess: rows of a strided
/// tensor on other pages, cache pages at random addresses.

/// Prefetches the cache lines of `bytes` bytes from `row` into L1.
@inline(__always)
func prefetchRow(_ row: UnsafeRawPointer, bytes: Int) {
    var offset = 0
    while offset < bytes {
        fa_prefetch(row + offset)
        offset += 64
    }
}

/// Prefetches the cache lines of `bytes` bytes from `row` into L2 only.
@inline(__always)
func prefetchRowToL2(_ row: UnsafeRawPointer, bytes: Int) {
    var offset = 0
    while offset < bytes {
        fa_prefetch_l2(row + offset)
        offset += 64
    }
}

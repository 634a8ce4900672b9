/// A caller's attention mask, validated: one value per (sequence, query head, query position, key position),
/// either a byte (nonzero attends, else −inf) or a float32 added to the score. The kernels stage it tile by
/// tile (or skip a key block it masks entirely); the reference loop and the backward read it per element.
public struct AttentionMask: @unchecked Sendable {
    public let base: UnsafeRawPointer
    /// Bytes (FA_DTYPE_BOOL) rather than additive float32 values.
    public let isBool: Bool
    public let batchStride, headStride, rowStride, colStride: Int

    public init(base: UnsafeRawPointer, isBool: Bool, batchStride: Int, headStride: Int, rowStride: Int, colStride: Int) {
        self.base = base
        self.isBool = isBool
        (self.batchStride, self.headStride, self.rowStride, self.colStride) = (batchStride, headStride, rowStride, colStride)
    }

    /// The element offset of key 0 of query row (b, h, i); key j is `colStride · j` further.
    @inlinable @inline(__always)
    public func rowOffset(batch b: Int, head h: Int, position i: Int) -> Int {
        b &* batchStride &+ h &* headStride &+ i &* rowStride
    }

    /// What the element at `offset` adds to its score: 0 or −inf for a boolean mask, the value for an additive one.
    @inlinable @inline(__always)
    public func bias(at offset: Int) -> Float {
        if isBool { return base.load(fromByteOffset: offset, as: UInt8.self) != 0 ? 0 : -.infinity }
        return base.load(fromByteOffset: offset &* 4, as: Float.self)
    }
}

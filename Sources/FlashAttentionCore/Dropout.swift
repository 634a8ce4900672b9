/// Attention dropout's mask: which probabilities survive, as a pure function of the caller's seed and the
/// element's coordinates, so that any thread count, tiling, kernel path and the backward all draw the same
/// mask without storing it (FlashAttention-2 does the same with Philox on GPUs).
///
/// Element (b, h, i, j) — sequence b, query head h, query position i, key position j — is kept iff
///
///     r = splitmix64 chained over (seed, b, h, i)          (64 bits per query row, computed once per row)
///     x = lowbias32(low32(r) ^ (j · 0x9E3779B9 + high32(r)))   (mod 2^32)
///     x >> 8 < threshold = round((1 − p) · 2^24)
///
/// lowbias32 is a bijection of 32-bit words (x ^= x >> 16; x *= 0x7FEB352D; x ^= x >> 15; x *= 0x846CA68B;
/// x ^= x >> 16), so the keys of one row give distinct words, and each row starts from its own random 64-bit
/// state. One integer multiply-xorshift chain per element vectorises over a key or a query vector; the
/// Python reference (`flash_attention.reference.dropout_mask`) computes the same words with numpy.

/// A call's dropout: its seed, the 24-bit keep threshold and the scale of kept probabilities.
public struct Dropout: Sendable, Equatable {
    public let probability: Float
    public let seed: UInt64
    /// An element is kept iff its 24 random bits are below this: keep probability threshold / 2^24 ≈ 1 − p.
    public let threshold: UInt32
    /// 1 / (1 − p), so that a kept probability's expectation is the probability itself.
    public let scale: Float

    /// nil for p = 0 (no dropout); p must be in [0, 1) (validated by the caller).
    public init?(probability p: Float, seed: UInt64) {
        guard p > 0 else { return nil }
        probability = p
        self.seed = seed
        threshold = UInt32(((1 - Double(p)) * 16_777_216).rounded())
        scale = Float(1 / (1 - Double(p)))
    }

    /// The random state of query row (b, h, i).
    @inlinable public func row(batch b: Int, head h: Int, position i: Int) -> DropoutRow {
        let r = Self.mix64(
            Self.mix64(Self.mix64(Self.mix64(seed) ^ UInt64(truncatingIfNeeded: b)) ^ UInt64(truncatingIfNeeded: h))
                ^ UInt64(truncatingIfNeeded: i))
        return DropoutRow(low: UInt32(truncatingIfNeeded: r), high: UInt32(truncatingIfNeeded: r >> 32))
    }

    /// SplitMix64's finaliser of z + the golden-ratio increment.
    @inlinable static func mix64(_ z: UInt64) -> UInt64 {
        var z = z &+ 0x9E37_79B9_7F4A_7C15
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }

    /// The 24 random bits of each lane's element (row state low_l/high_l, key key_l); kept iff below
    /// `threshold`. Any vector width, so a kernel copy vectorises over keys (one row) or over queries (one key)
    /// with the same words. Only arithmetic here: the comparison is the caller's, on its concrete vector type,
    /// whose `.<` is one instruction (in generic code it compiles to a lane-by-lane loop).
    @inlinable @inline(__always)
    public func bits<V: DropoutWords>(low: V, high: V, key: V) -> V {
        var x = low ^ (key &* V(repeating: 0x9E37_79B9) &+ high)
        x = x ^ (x &>> V(repeating: 16))
        x = x &* V(repeating: 0x7FEB_352D)
        x = x ^ (x &>> V(repeating: 15))
        x = x &* V(repeating: 0x846C_A68B)
        x = x ^ (x &>> V(repeating: 16))
        return x &>> V(repeating: 8)
    }

    /// The factor probability (row, key) is multiplied by: `scale` if kept, else 0 (the reference loop's
    /// scalar form).
    @inlinable public func factor(_ row: DropoutRow, key j: Int) -> Float {
        let word = bits(
            low: SIMD2(repeating: row.low), high: SIMD2(repeating: row.high),
            key: SIMD2(repeating: UInt32(truncatingIfNeeded: j)))
        return word[0] < threshold ? scale : 0
    }
}

/// The random state of one query row (see `Dropout`).
public struct DropoutRow: Sendable {
    public let low: UInt32
    public let high: UInt32

    @inlinable public init(low: UInt32, high: UInt32) {
        self.low = low
        self.high = high
    }
}

/// Vectors of words whose operators the hash uses, as requirements: each concrete width's conformance binds
/// them to the standard library's concrete (one-instruction) implementations, where a plain `SIMD`-generic
/// body would get the lane-by-lane protocol-extension ones and full-width vectors would not survive.
public protocol DropoutWords: SIMD where Scalar == UInt32 {
    static func &* (a: Self, b: Self) -> Self
    static func &+ (a: Self, b: Self) -> Self
    static func ^ (a: Self, b: Self) -> Self
    static func &>> (a: Self, b: Self) -> Self
}

extension SIMD2: DropoutWords where Scalar == UInt32 {}
extension SIMD4: DropoutWords where Scalar == UInt32 {}
extension SIMD8: DropoutWords where Scalar == UInt32 {}
extension SIMD16: DropoutWords where Scalar == UInt32 {}


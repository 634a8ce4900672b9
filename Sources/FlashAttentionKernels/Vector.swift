import FlashAttentionCore
import FlashAttentionShims

/// The one ISA-specific file of the kernel source: the vector type of this compiled copy, its tile shapes and
/// block sizes, and the few operations whose best form depends on the instruction set. Everything else in
/// the kernels is written over `Vec` and the sizes below, never over a literal width. The package manifest
/// compiles this source once per instruction set, each copy with its own FA_KERNEL_* define and flags.

#if FA_KERNEL_AVX512
/// 16 floats: one zmm register.
typealias Vec = SIMD16<Float>
typealias VecBits = SIMD16<UInt32>
typealias HalfVec = SIMD16<Float16>
#if FA_AMX
/// The same copy with AMX tiles: bfloat16 q/k/v products in AMX tiles (AMXTiles.swift).
let kernelISA = KernelISA.amxbf16
#elseif FA_BF16_PAIRS
/// The same copy with AVX512_BF16: bfloat16 q/k/v take the pair products (PairProducts.swift).
let kernelISA = KernelISA.avx512bf16
#else
let kernelISA = KernelISA.avx512
#endif
/// Tile shapes and block sizes measured on Zen 5 (48 KiB L1, 1 MiB L2 per core) at 1 thread, best of
/// interleaved runs: at head_dim 128 non-causal every Bq ∈ {288, 384, 448, 576} × Bk ∈ {64, 96, 128} ×
/// sub-block ∈ {32, 64, 96} landed within 185–198 GFLOP/s, and Bq 576 with 64-row sub-blocks was at or near
/// the top on every shape (head_dim 64: 183 against 167 for Bq 288). Bk 96 rather than 128: short causal
/// sequences spend less on the diagonal blocks ((4, 32, 32, 512, 128) causal 134 against 123 GFLOP/s) at no
/// measurable cost elsewhere. The workspace at head_dim 128 (~700 KiB) fits the 1 MiB L2 of Zen 4/5 and the
/// 2 MiB of Sapphire Rapids.
let geometry = TileGeometry(
    lanes: 16, microRows: MicroRows.count, queryBlock: 576, keyBlock: 96, subBlockRows: subBlockRows, thinBlockKeys: 16, backwardKeyBlock: 96)
#elseif FA_KERNEL_AVX2
/// 8 floats: one ymm register.
typealias Vec = SIMD8<Float>
typealias VecBits = SIMD8<UInt32>
typealias HalfVec = SIMD8<Float16>
let kernelISA = KernelISA.avx2
/// 288 × 96 measured best on Zen 3 of Bq ∈ {96, 192, 288, 384} × Bk ∈ {48, 96, 192} at head_dim 64 and 128.
let geometry = TileGeometry(
    lanes: 8, microRows: MicroRows.count, queryBlock: 288, keyBlock: 96, subBlockRows: subBlockRows, thinBlockKeys: 16, backwardKeyBlock: 96)
#elseif FA_KERNEL_NEON
/// 8 floats: two q registers (ARMv8.0 Advanced SIMD; 32 of them). The micro-tile keeps AVX2's 6 × 16 shape:
/// 24 accumulator registers, 4 for the two loaded vectors, and the broadcasts folded into `fmla` by element.
typealias Vec = SIMD8<Float>
typealias VecBits = SIMD8<UInt32>
typealias HalfVec = SIMD8<Float16>
let kernelISA = KernelISA.neon
/// AVX2's shapes (same vector width), not measured on ARM: the 128 KiB L1 of Apple's performance cores and the
/// 64 KiB of Neoverse V1/N2 hold the 48 × 96 score block and the packed key panel with room to spare.
let geometry = TileGeometry(
    lanes: 8, microRows: MicroRows.count, queryBlock: 288, keyBlock: 96, subBlockRows: subBlockRows, thinBlockKeys: 16, backwardKeyBlock: 96)
#else
/// 4 floats: one SSE or NEON register, the width every 64-bit target has.
typealias Vec = SIMD4<Float>
typealias VecBits = SIMD4<UInt32>
typealias HalfVec = SIMD4<Float16>
let kernelISA = KernelISA.portable
let geometry = TileGeometry(
    lanes: 4, microRows: MicroRows.count, queryBlock: 288, keyBlock: 96, subBlockRows: subBlockRows, thinBlockKeys: 16, backwardKeyBlock: 96)
#endif

/// Query rows that go through score → softmax → output together: a multiple of a score panel (`microCols`)
/// and of an output tile (`microRows`), small enough that their key block × this many scores stay in L1
/// from the score tiles through the output tiles (AVX-512: 64 × 128 keys, 32 KiB; else 48 × 96, 18 KiB).
#if FA_KERNEL_AVX512
@inline(__always) var subBlockRows: Int { 64 }
#else
@inline(__always) var subBlockRows: Int { 48 }
#endif

/// Rows of the micro-tiles. Six rows of two vectors are twelve accumulators, which leaves room for the two
/// loaded vectors and a broadcast in 16 registers (AVX2, SSE). AVX-512 has 32: 6, 8 and 12 rows all ran
/// at ~229 GFLOP/s in L1 on Zen 5 (14 spill); 8 rows make 8 × 32 tiles, whose row count divides the panel
/// width, so that sub-blocks can be 32 or 64 rows instead of lcm(6, 32) = 96.
#if FA_KERNEL_AVX512
typealias MicroRows = EightRows
#else
typealias MicroRows = SixRows
#endif

/// Floats per vector, columns of a micro-tile (two vectors) and its rows. Computed properties rather than
/// globals, so that they are compile-time constants in every loop (a global would be read through a
/// lazy-initialisation check).
@inline(__always) var lanes: Int { Vec.scalarCount }
@inline(__always) var microCols: Int { 2 * Vec.scalarCount }
@inline(__always) var microRows: Int { MicroRows.count }

/// Lane indices 0, 1, 2, … as floats (folded to a constant).
@inline(__always) var laneIndices: Vec {
    var x = Vec()
    for i in 0..<Vec.scalarCount { x[i] = Float(i) }
    return x
}

/// Lane indices 0, 1, 2, … as words (dropout's key indices).
@inline(__always) var laneBits: VecBits {
    var x = VecBits()
    for i in 0..<VecBits.scalarCount { x[i] = UInt32(i) }
    return x
}

/// a · b + c: one FMA where the copy has FMA instructions. The portable copy on x86-64 (SSE2 only) would
/// turn `addingProduct` into one `fmaf` call per lane, so it multiplies and adds instead (rounded twice).
@inline(__always)
func muladd(_ a: Vec, _ b: Vec, _ c: Vec) -> Vec {
    #if FA_KERNEL_PORTABLE && arch(x86_64)
    return a * b + c
    #else
    return c.addingProduct(a, b)
    #endif
}

@inline(__always) func load(_ p: UnsafePointer<Float>) -> Vec {
    UnsafeRawPointer(p).loadUnaligned(as: Vec.self)
}

@inline(__always) func load(_ p: UnsafeMutablePointer<Float>) -> Vec {
    UnsafeRawPointer(p).loadUnaligned(as: Vec.self)
}

@inline(__always) func store(_ x: Vec, _ p: UnsafeMutablePointer<Float>) {
    UnsafeMutableRawPointer(p).storeBytes(of: x, as: Vec.self)
}

/// Lane-wise max that compiles to one `vmaxps`/`maxps` (the stdlib's generic `pointwiseMax` is an
/// out-of-line call here). If `b` is NaN the result is `a`; NaN scores still poison their row through exp2.
@inline(__always)
func maximum(_ a: Vec, _ b: Vec) -> Vec {
    a.replacing(with: b, where: b .> a)
}

/// Lane-wise min (one `vminps`/`minps`).
@inline(__always)
func minimum(_ a: Vec, _ b: Vec) -> Vec {
    a.replacing(with: b, where: b .< a)
}

/// [a.even + a.odd | b.even + b.odd]: each lane the sum of two neighbouring lanes, a's in the low half and
/// b's in the high half (two two-source shuffles and an add).
@inline(__always)
func foldPairs(_ a: Vec, _ b: Vec) -> Vec {
    #if FA_KERNEL_AVX512
    return fa_fold_pairs_x16(a, b)
    #elseif FA_KERNEL_AVX2 || FA_KERNEL_NEON
    return fa_fold_pairs_x8(a, b)
    #else
    return fa_fold_pairs_x4(a, b)
    #endif
}

/// One vector of float16 values at `p`, widened: F16C / AVX-512 conversions where the copy has them.
@inline(__always)
func loadFloat16(_ p: UnsafeRawPointer) -> Vec {
    #if FA_KERNEL_AVX512
    return fa_load_f16x16(p)
    #elseif FA_KERNEL_AVX2 || FA_KERNEL_NEON
    return fa_load_f16x8(p)
    #else
    return Vec(p.loadUnaligned(as: HalfVec.self))
    #endif
}

/// Rounds one vector to float16 (nearest even) and stores it at `p`.
@inline(__always)
func storeFloat16(_ x: Vec, _ p: UnsafeMutableRawPointer) {
    #if FA_KERNEL_AVX512
    fa_store_f16x16(x, p)
    #elseif FA_KERNEL_AVX2 || FA_KERNEL_NEON
    fa_store_f16x8(x, p)
    #else
    p.storeBytes(of: HalfVec(x), as: HalfVec.self)
    #endif
}

/// One vector of int8 or float8 (E4M3FN) cache values at `p`, widened (the row's scale is the caller's).
@inline(__always)
func loadInt8(_ p: UnsafeRawPointer) -> Vec {
    #if FA_KERNEL_AVX512
    return fa_load_i8x16(p)
    #elseif FA_KERNEL_AVX2 || FA_KERNEL_NEON
    return fa_load_i8x8(p)
    #else
    return fa_load_i8x4(p)
    #endif
}

@inline(__always)
func loadFloat8(_ p: UnsafeRawPointer) -> Vec {
    #if FA_KERNEL_AVX512
    return fa_load_e4m3x16(p)
    #elseif FA_KERNEL_AVX2 || FA_KERNEL_NEON
    return fa_load_e4m3x8(p)
    #else
    return fa_load_e4m3x4(p)
    #endif
}

/// One vector of bfloat16 values at `p`, widened (Swift's generic SIMD integer widening is an out-of-line
/// call, so each width has its own C helper).
@inline(__always)
func loadBFloat16(_ p: UnsafeRawPointer) -> Vec {
    #if FA_KERNEL_AVX512
    return fa_load_bf16x16(p)
    #elseif FA_KERNEL_AVX2 || FA_KERNEL_NEON
    return fa_load_bf16x8(p)
    #else
    return fa_load_bf16x4(p)
    #endif
}

/// Rounds one vector to bfloat16 (nearest even, NaN kept) and stores it at `p`.
@inline(__always)
func storeBFloat16(_ x: Vec, _ p: UnsafeMutableRawPointer) {
    #if FA_KERNEL_AVX512
    fa_store_bf16x16(x, p)
    #elseif FA_KERNEL_AVX2 || FA_KERNEL_NEON
    fa_store_bf16x8(x, p)
    #else
    fa_store_bf16x4(x, p)
    #endif
}

/// Rows of a transpose block: `transposeBlock` turns `transposeSize` × `transposeSize` floats around.
#if FA_KERNEL_PORTABLE
@inline(__always) var transposeSize: Int { 4 }
#else
@inline(__always) var transposeSize: Int { 8 }
#endif

/// Transposes the square block of `transposeSize` rows at `source` (rows `sourceStride` apart) into
/// `target` (rows `targetStride` apart). The backward pass turns dS [query][key] into [key][query] this way.
@inline(__always)
func transposeBlock(_ source: UnsafePointer<Float>, _ sourceStride: Int, _ target: UnsafeMutablePointer<Float>, _ targetStride: Int) {
    #if FA_KERNEL_PORTABLE
    fa_transpose4x4(source, sourceStride, target, targetStride)
    #else
    fa_transpose8x8(source, sourceStride, target, targetStride)
    #endif
}

/// Whether this copy has bfloat16 pair products (`dotPairs` in one instruction): only then do bfloat16 q/k/v
/// take PairProducts.swift's kernels. A compile-time constant, so the other copies carry no pair code.
#if FA_BF16_PAIRS
@inline(__always) var hasPairProducts: Bool { true }
#else
@inline(__always) var hasPairProducts: Bool { false }
#endif

/// Whether this copy forms bfloat16 q/k/v products in AMX tiles (AMXTiles.swift): a compile-time constant, as above.
#if FA_AMX
@inline(__always) var hasAMXTiles: Bool { true }
#else
@inline(__always) var hasAMXTiles: Bool { false }
#endif

/// acc + a.high·b.high + a.low·b.low lane by lane, where each 32-bit lane of a and b holds two bfloat16 values
/// (element 2i in the low half): one `vdpbf16ps` in the avx512bf16 copy. The other copies never run the pair
/// kernels; their form (two float32 FMAs, no flush of subnormals) only keeps the shared source compiling.
@inline(__always)
func dotPairs(_ acc: Vec, _ a: VecBits, _ b: VecBits) -> Vec {
    #if FA_BF16_PAIRS
    return fa_dot_pairs_x16(acc, a, b)
    #else
    let high = VecBits(repeating: 0xFFFF_0000)
    @inline(__always) func float(_ x: VecBits) -> Vec { unsafeBitCast(x, to: Vec.self) }
    let sum = muladd(float(a & high), float(b & high), acc)
    return muladd(float(a &<< 16), float(b &<< 16), sum)
    #endif
}

/// Rounds two vectors to bfloat16 (nearest even, NaN kept) and interleaves them into pairs: lane i holds
/// `low[i]` in its low half and `high[i]` in its high half (`vcvtne2ps2bf16` and `vpermw` in the avx512bf16 copy).
@inline(__always)
func roundPairs(_ low: Vec, _ high: Vec) -> VecBits {
    #if FA_BF16_PAIRS
    return fa_round_pairs_x16(low, high)
    #else
    var x = VecBits()
    for i in 0..<VecBits.scalarCount { x[i] = bfloat16Bits(low[i]) | bfloat16Bits(high[i]) << 16 }
    return x
    #endif
}

/// Rounds 2·`lanes` consecutive floats (`low`, then `high`) to bfloat16 and keeps their order: word i holds elements
/// 2i and 2i + 1, a row's own VNNI pairs (`vcvtne2ps2bf16` in the avx512bf16 copy).
@inline(__always)
func roundAdjacentPairs(_ low: Vec, _ high: Vec) -> VecBits {
    #if FA_BF16_PAIRS
    return fa_round_adjacent_x16(low, high)
    #else
    var x = VecBits()
    for i in 0..<VecBits.scalarCount {
        let even = 2 * i < lanes ? low[2 * i] : high[2 * i - lanes], odd = 2 * i < lanes ? low[2 * i + 1] : high[2 * i + 1 - lanes]
        x[i] = bfloat16Bits(even) | bfloat16Bits(odd) << 16
    }
    return x
    #endif
}

/// Rounds 32 rows × 16 columns of floats (row k at `p + k * ldP`) to bfloat16 and writes them transposed, as 16
/// rows of 16 words (`dst + c * ldDst`): column c's 32 values in row order, so the word of rows (2j, 2j + 1) is a
/// VNNI pair (two 16 × 16 transposes and `vcvtne2ps2bf16` in the avx512bf16 copy).
@inline(__always)
func packTransposedPairs(_ p: UnsafePointer<Float>, ldP: Int, into dst: UnsafeMutablePointer<UInt32>, ldDst: Int) {
    #if FA_BF16_PAIRS
    fa_pack_probability_rows(p, ldP, dst, ldDst)
    #else
    for c in 0..<16 {
        for j in 0..<16 { dst[c * ldDst + j] = bfloat16Bits(p[2 * j * ldP + c]) | bfloat16Bits(p[(2 * j + 1) * ldP + c]) << 16 }
    }
    #endif
}

/// x rounded to bfloat16 (nearest even, NaN kept quiet), as its 16 bits.
@inline(__always)
func bfloat16Bits(_ x: Float) -> UInt32 {
    let bits = x.bitPattern
    if x.isNaN { return (bits | 0x40_0000) >> 16 }
    return (bits &+ 0x7FFF &+ ((bits >> 16) & 1)) >> 16
}

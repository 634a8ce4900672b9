/* Internal C helpers of the Swift implementation (not API): what Swift cannot express directly. */
#ifndef FA_SHIMS_H
#define FA_SHIMS_H

#define FA_CPU_AVX2_FMA 1u     /* AVX2, FMA and F16C instructions, with YMM state enabled by the OS */
#define FA_CPU_AVX512 2u       /* AVX-512 F, BW, DQ and VL (plus AVX2_FMA), with ZMM state enabled by the OS */
#define FA_CPU_AVX512_BF16 4u  /* AVX512_BF16 (vdpbf16ps, vcvtne2ps2bf16) on top of FA_CPU_AVX512 */
#define FA_CPU_AMX_BF16 16u     /* AMX-TILE and AMX-BF16 with the tile state enabled in XCR0, and the OS has granted
                                    this process the tile data (arch_prctl ARCH_REQ_XCOMP_PERM), with FA_CPU_AVX512_BF16 */
#define FA_CPU_BF16_FULL_RATE 8u /* with FA_CPU_AVX512_BF16, an AMD core: vdpbf16ps does twice the FLOPs of a
                                    float32 FMA there (Zen 4/5); on Intel cores it does half (bench/RESULTS.md) */

/* Bit set of FA_CPU_* features this CPU and OS can run; 0 on non-x86 machines (aarch64 needs no probe: Advanced
 * SIMD is part of the ARMv8.0 baseline the NEON copy targets). Compiled without ISA
 * flags (cpu_features.c), so it runs on any CPU. */
unsigned fa_cpu_features(void);

/* Sets the function run when the library is finally unloaded (at process exit: the library is linked
 * -z nodelete, so dlclose never unmaps code that worker threads may be sleeping in). The pool uses it to
 * stop and join its workers, so that they never outlive the code they run. */
void fa_set_unload_hook(void (*hook)(void));

/* Asks for the cache line at p ahead of use. Static inline so that Swift inlines it into the kernels:
 * Swift has no prefetch of its own, and a load whose value is unused is optimised away. */
static inline void fa_prefetch(const void *p) { __builtin_prefetch(p, 0, 3); }

/* The same into L2 only (prefetcht1): for data needed a little later, which must not evict the L1 working set
 * on its way (the decoding kernel's next block of rows is larger than L1). */
static inline void fa_prefetch_l2(const void *p) { __builtin_prefetch(p, 0, 2); }

/* Vector helpers of the kernel copies, one set per vector width (Swift's generic SIMD integer widening is an
 * out-of-line call, and Swift has no shuffles). The vector types import into Swift as SIMD4/8/16<Float>.
 * Each x86 helper carries its instruction set as a target attribute, so that every module may include this
 * header; only the kernel copy of that width calls it, after the library's CPU check. */
typedef float fa_float4 __attribute__((ext_vector_type(4)));
typedef float fa_float8 __attribute__((ext_vector_type(8)));
typedef float fa_float16 __attribute__((ext_vector_type(16)));

/* bfloat16 <-> float32 for the portable copy, in plain C (any target): widening shifts the bits up; rounding
 * is to nearest even, and a NaN stays a quiet NaN. */
static inline fa_float4 fa_load_bf16x4(const void *p) {
    const unsigned short *h = (const unsigned short *)p;
    fa_float4 x;
    for (int i = 0; i < 4; i++) {
        unsigned bits = (unsigned)h[i] << 16;
        __builtin_memcpy((char *)&x + 4 * i, &bits, 4);
    }
    return x;
}

static inline void fa_store_bf16x4(fa_float4 x, void *p) {
    unsigned short *h = (unsigned short *)p;
    for (int i = 0; i < 4; i++) {
        unsigned bits;
        __builtin_memcpy(&bits, (const char *)&x + 4 * i, 4);
        h[i] = (unsigned short)(x[i] != x[i] ? (bits >> 16) | 0x40 : (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
    }
}

/* [a0+a1, a2+a3, ..., b0+b1, b2+b3, ...]: sums of neighbouring lanes, a's in the low half, b's in the high
 * half; one level of the decoding kernel's transpose-and-add reduction (Swift's evenHalf/oddHalf went through
 * memory for 8-lane vectors). */
static inline fa_float4 fa_fold_pairs_x4(fa_float4 a, fa_float4 b) {
    return __builtin_shufflevector(a, b, 0, 2, 4, 6) + __builtin_shufflevector(a, b, 1, 3, 5, 7);
}

/* 8-bit KV-cache rows widened to float32 (the row's scale is applied by the caller): int8, and OCP E4M3FN
 * (1 sign, 4 exponent bits with bias 7, 3 mantissa bits; exponent 0 subnormal, m × 2^-9; 0x7F/0xFF NaN).
 * An E4M3FN magnitude em = byte & 0x7F placed at bit 20 of a float32 has the right mantissa and an exponent
 * 120 short: adding 120 << 23 gives normal values exactly; subnormals are m × 2^-9, converted directly. */
static inline float fa_e4m3_to_float(unsigned byte) {
    unsigned em = byte & 0x7F, bits = (em << 20) + (120u << 23);
    float x;
    __builtin_memcpy(&x, &bits, 4);
    if (em < 8) x = (float)em * 0x1p-9f;
    if (em == 0x7F) x = __builtin_nanf("");
    return byte & 0x80 ? -x : x;
}

static inline fa_float4 fa_load_i8x4(const void *p) {
    const signed char *b = (const signed char *)p;
    return (fa_float4){(float)b[0], (float)b[1], (float)b[2], (float)b[3]};
}

static inline fa_float4 fa_load_e4m3x4(const void *p) {
    const unsigned char *b = (const unsigned char *)p;
    return (fa_float4){fa_e4m3_to_float(b[0]), fa_e4m3_to_float(b[1]), fa_e4m3_to_float(b[2]), fa_e4m3_to_float(b[3])};
}

/* Transposes the 4 × 4 floats at src (rows ld_src apart) into dst (rows ld_dst apart). */
static inline void fa_transpose4x4(const float *src, long ld_src, float *dst, long ld_dst) {
    for (int r = 0; r < 4; r++)
        for (int c = 0; c < 4; c++) dst[c * ld_dst + r] = src[r * ld_src + c];
}

#if defined(__x86_64__)
#include <immintrin.h>

/* float16 <-> float32, 16 lanes (vcvtph2ps / vcvtps2ph, rounding to nearest even), and 8 lanes with F16C:
 * Swift's generic SIMD conversion was compiled as an out-of-line call per vector. */
__attribute__((target("avx512f"))) static inline fa_float16 fa_load_f16x16(const void *p) {
    return (fa_float16)_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
}

__attribute__((target("avx512f"))) static inline void fa_store_f16x16(fa_float16 x, void *p) {
    _mm256_storeu_si256((__m256i *)p, _mm512_cvtps_ph((__m512)x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

__attribute__((target("avx,f16c"))) static inline fa_float8 fa_load_f16x8(const void *p) {
    return (fa_float8)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
}

__attribute__((target("avx,f16c"))) static inline void fa_store_f16x8(fa_float8 x, void *p) {
    _mm_storeu_si128((__m128i *)p, _mm256_cvtps_ph((__m256)x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

/* fa_fold_pairs_x4 for 16 and 8 lanes. */
__attribute__((target("avx512f"))) static inline fa_float16 fa_fold_pairs_x16(fa_float16 a, fa_float16 b) {
    return __builtin_shufflevector(a, b, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
           __builtin_shufflevector(a, b, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

__attribute__((target("avx2"))) static inline fa_float8 fa_fold_pairs_x8(fa_float8 a, fa_float8 b) {
    return __builtin_shufflevector(a, b, 0, 2, 4, 6, 8, 10, 12, 14) + __builtin_shufflevector(a, b, 1, 3, 5, 7, 9, 11, 13, 15);
}

__attribute__((target("avx512f"))) static inline fa_float16 fa_load_i8x16(const void *p) {
    return (fa_float16)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}

__attribute__((target("avx2"))) static inline fa_float8 fa_load_i8x8(const void *p) {
    return (fa_float8)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

__attribute__((target("avx512f"))) static inline fa_float16 fa_load_e4m3x16(const void *p) {
    __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
    __m512i em = _mm512_and_si512(bytes, _mm512_set1_epi32(0x7F));
    __m512i sign = _mm512_slli_epi32(_mm512_and_si512(bytes, _mm512_set1_epi32(0x80)), 24);
    __m512 normal = _mm512_castsi512_ps(_mm512_add_epi32(_mm512_slli_epi32(em, 20), _mm512_set1_epi32(120 << 23)));
    __m512 subnormal = _mm512_mul_ps(_mm512_cvtepi32_ps(em), _mm512_set1_ps(0x1p-9f));
    __m512 x = _mm512_mask_blend_ps(_mm512_cmplt_epi32_mask(em, _mm512_set1_epi32(8)), normal, subnormal);
    x = _mm512_mask_blend_ps(_mm512_cmpeq_epi32_mask(em, _mm512_set1_epi32(0x7F)), x, _mm512_set1_ps(__builtin_nanf("")));
    return (fa_float16)_mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(x), sign));
}

__attribute__((target("avx2"))) static inline fa_float8 fa_load_e4m3x8(const void *p) {
    __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
    __m256i em = _mm256_and_si256(bytes, _mm256_set1_epi32(0x7F));
    __m256i sign = _mm256_slli_epi32(_mm256_and_si256(bytes, _mm256_set1_epi32(0x80)), 24);
    __m256 normal = _mm256_castsi256_ps(_mm256_add_epi32(_mm256_slli_epi32(em, 20), _mm256_set1_epi32(120 << 23)));
    __m256 subnormal = _mm256_mul_ps(_mm256_cvtepi32_ps(em), _mm256_set1_ps(0x1p-9f));
    __m256 x = _mm256_blendv_ps(normal, subnormal, _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(8), em)));
    x = _mm256_blendv_ps(x, _mm256_set1_ps(__builtin_nanf("")),
                         _mm256_castsi256_ps(_mm256_cmpeq_epi32(em, _mm256_set1_epi32(0x7F))));
    return (fa_float8)_mm256_castsi256_ps(_mm256_or_si256(_mm256_castps_si256(x), sign));
}

/* Widens 16 bfloat16 values at p. */
__attribute__((target("avx512f"))) static inline fa_float16 fa_load_bf16x16(const void *p) {
    __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return (fa_float16)_mm512_slli_epi32(wide, 16);
}

/* Rounds 16 floats to bfloat16 (nearest even; NaN stays a quiet NaN) and stores them at p. */
__attribute__((target("avx512f"))) static inline void fa_store_bf16x16(fa_float16 x, void *p) {
    __m512i bits = (__m512i)x;
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), lsb));
    __mmask16 nan = _mm512_cmp_ps_mask((__m512)x, (__m512)x, _CMP_UNORD_Q);
    __m512i quiet = _mm512_or_si512(bits, _mm512_set1_epi32(0x400000));
    __m512i high = _mm512_srli_epi32(_mm512_mask_blend_epi32(nan, rounded, quiet), 16);
    _mm256_storeu_si256((__m256i *)p, _mm512_cvtepi32_epi16(high));
}

/* Widens 8 bfloat16 values at p (the top halves of float32s). */
__attribute__((target("avx2"))) static inline fa_float8 fa_load_bf16x8(const void *p) {
    __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return (fa_float8)_mm256_slli_epi32(wide, 16);
}

/* Rounds 8 floats to bfloat16 (nearest even; NaN stays a quiet NaN) and stores them at p. */
__attribute__((target("avx2"))) static inline void fa_store_bf16x8(fa_float8 x, void *p) {
    __m256i bits = (__m256i)x;
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    __m256i rounded = _mm256_add_epi32(bits, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), lsb));
    __m256i nan = _mm256_castps_si256(_mm256_cmp_ps((__m256)x, (__m256)x, _CMP_UNORD_Q));
    __m256i quiet = _mm256_or_si256(bits, _mm256_set1_epi32(0x400000));
    __m256i high = _mm256_srli_epi32(_mm256_blendv_epi8(rounded, quiet, nan), 16);
    __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(high), _mm256_extracti128_si256(high, 1));
    _mm_storeu_si128((__m128i *)p, packed);
}

/* bfloat16 products (AVX512_BF16), for the avx512bf16 kernel copy only (compiled with -mavx512bf16, entered after
 * the CPU check). A pair vector holds 16 words, each two bfloat16 values: element 2i in the low half of word i,
 * element 2i + 1 in the high half (little-endian memory order, so a pair is two adjacent bfloat16s in memory). */
typedef unsigned fa_uint16 __attribute__((ext_vector_type(16)));

/* acc[i] + a.high[i]·b.high[i] + a.low[i]·b.low[i] in float32 (vdpbf16ps: exact products, each sum rounded to
 * nearest even, subnormal inputs and results flushed to zero). */
__attribute__((target("avx512f,avx512bf16"))) static inline fa_float16 fa_dot_pairs_x16(fa_float16 acc, fa_uint16 a, fa_uint16 b) {
    return (fa_float16)_mm512_dpbf16_ps((__m512)acc, (__m512bh)a, (__m512bh)b);
}

/* 32 floats rounded to bfloat16 (nearest even; NaN stays NaN) and packed: word i = (hi[i] << 16) | lo[i], so that
 * two keys' probabilities form the pairs of vdpbf16ps (vcvtne2ps2bf16, then vpermw to interleave the halves). */
__attribute__((target("avx512f,avx512bw,avx512bf16"))) static inline fa_uint16 fa_round_pairs_x16(fa_float16 lo, fa_float16 hi) {
    __m512i halves = (__m512i)_mm512_cvtne2ps_pbh((__m512)hi, (__m512)lo); /* lo in words 0-15, hi in 16-31 */
    __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5,
                                          20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    return (fa_uint16)_mm512_permutexvar_epi16(interleave, halves);
}

/* 32 consecutive floats (lo, then hi) rounded to bfloat16 (nearest even; NaN stays NaN) in their own order: word i
 * holds elements 2i and 2i + 1, the VNNI pairs of a row whose products sum along it (vcvtne2ps2bf16 alone). */
__attribute__((target("avx512f,avx512bf16"))) static inline fa_uint16 fa_round_adjacent_x16(fa_float16 lo, fa_float16 hi) {
    return (fa_uint16)_mm512_cvtne2ps_pbh((__m512)hi, (__m512)lo);
}

/* Transposes 16 vectors of 16 floats in place (x[i][j] becomes x[j][i]): pairs of rows interleaved, then quads
 * within 128-bit lanes, then the 128-bit lanes of four rows gathered (imm 0x88: lanes 0 and 2, 0xDD: 1 and 3). */
__attribute__((target("avx512f"))) static inline void fa_transpose16x16(__m512 x[16]) {
    __m512 t[16], u[16];
    for (int i = 0; i < 16; i += 4) {
        t[i] = _mm512_unpacklo_ps(x[i], x[i + 1]), t[i + 1] = _mm512_unpackhi_ps(x[i], x[i + 1]);
        t[i + 2] = _mm512_unpacklo_ps(x[i + 2], x[i + 3]), t[i + 3] = _mm512_unpackhi_ps(x[i + 2], x[i + 3]);
    }
    for (int i = 0; i < 16; i += 4) { /* u[i + j]: column j of each 128-bit lane, rows i to i + 3 */
        u[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44), u[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
        u[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44), u[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
    }
    for (int j = 0; j < 4; j++) { /* output row 4L + j gathers lane L of u[j], u[4 + j], u[8 + j], u[12 + j] */
        __m512 even0 = _mm512_shuffle_f32x4(u[j], u[4 + j], 0x88), odd0 = _mm512_shuffle_f32x4(u[j], u[4 + j], 0xDD);
        __m512 even1 = _mm512_shuffle_f32x4(u[8 + j], u[12 + j], 0x88), odd1 = _mm512_shuffle_f32x4(u[8 + j], u[12 + j], 0xDD);
        x[j] = _mm512_shuffle_f32x4(even0, even1, 0x88), x[8 + j] = _mm512_shuffle_f32x4(even0, even1, 0xDD);
        x[4 + j] = _mm512_shuffle_f32x4(odd0, odd1, 0x88), x[12 + j] = _mm512_shuffle_f32x4(odd0, odd1, 0xDD);
    }
}

/* The A operand of P·V in AMX tiles: the probabilities of 32 keys × 16 rows (key k's 16 rows at p + k·ld_p floats)
 * rounded to bfloat16 (nearest even, NaN stays NaN) and written row by row, row r's 32 values in key order at
 * dst + r·ld_dst words — adjacent bfloat16s, so the word of keys (2j, 2j + 1) is the VNNI pair tdpbf16ps takes. */
__attribute__((target("avx512f,avx512bf16"))) static inline void fa_pack_probability_rows(const float *p, long ld_p,
                                                                                          unsigned *dst, long ld_dst) {
    __m512 low[16], high[16];
    for (int k = 0; k < 16; k++) low[k] = _mm512_loadu_ps(p + k * ld_p), high[k] = _mm512_loadu_ps(p + (16 + k) * ld_p);
    fa_transpose16x16(low);
    fa_transpose16x16(high);
    for (int r = 0; r < 16; r++) _mm512_storeu_si512(dst + r * ld_dst, (__m512i)_mm512_cvtne2ps_pbh(high[r], low[r]));
}

/* AMX tiles for the amxbf16 copy (compiled with -mamx-tile -mamx-bf16; entered only where the CPU probe found AMX and
 * the OS granted the tile state). Tile numbers are immediates, so each use is its own one-instruction function:
 * tiles 0-3 accumulate (C, 16 rows × 16 floats), 4 and 5 are A operands, 6 and 7 B operands (16 rows × 64 bytes),
 * and C(2i + j) += A(i)·B(j): two A row blocks times two B column halves, four independent sums. */
struct fa_tile_config {
    unsigned char palette, start_row, reserved[14];
    unsigned short bytes_per_row[16];
    unsigned char rows[16];
};

#if defined(FA_AMX_EMULATION)
/* A software model of the eight tiles (shims.c), for testing the amxbf16 copy's own code on CPUs without AMX:
 * `make test-amx-emulated` builds the whole library with -DFA_AMX_EMULATION, which also makes the CPU probe report
 * AMX wherever AVX512_BF16 is. tdpbf16ps is modelled in its documented order (per pair, the even product then the
 * odd one added to the float32 sum), without its flushing of subnormals. */
void fa_amx_emulated_zero(int tile);
void fa_amx_emulated_load(int tile, const void *p, long stride);
void fa_amx_emulated_store(int tile, void *p, long stride);
void fa_amx_emulated_dot(int c, int a, int b);
#define FA_AMX_OP(attributes, name, params, body) static inline void name params { body; }
#define FA_TILE_ZERO(t) fa_amx_emulated_zero(t)
#define FA_TILE_LOAD(t, p, stride) fa_amx_emulated_load(t, p, stride)
#define FA_TILE_STORE(t, p, stride) fa_amx_emulated_store(t, p, stride)
#define FA_TILE_DOT(c, a, b) fa_amx_emulated_dot(c, a, b)
static inline void fa_amx_configure(void) {}
static inline void fa_amx_release(void) {}
#else
#define FA_AMX_OP(attributes, name, params, body) __attribute__((target(attributes))) static inline void name params { body; }
#define FA_TILE_ZERO(t) _tile_zero(t)
#define FA_TILE_LOAD(t, p, stride) _tile_loadd(t, p, stride)
#define FA_TILE_STORE(t, p, stride) _tile_stored(t, p, stride)
#define FA_TILE_DOT(c, a, b) _tile_dpbf16ps(c, a, b)
/* Loads the tile configuration (ldtilecfg) of a thread: palette 1, tiles 0-7 of 16 rows × 64 bytes. */
__attribute__((target("amx-tile"))) static inline void fa_amx_configure(void) {
    struct fa_tile_config config = {1, 0, {0}, {0}, {0}};
    for (int t = 0; t < 8; t++) { config.rows[t] = 16; config.bytes_per_row[t] = 64; }
    _tile_loadconfig(&config);
}
__attribute__((target("amx-tile"))) static inline void fa_amx_release(void) { _tile_release(); }
#endif
FA_AMX_OP("amx-tile", fa_amx_zero_c, (void), FA_TILE_ZERO(0); FA_TILE_ZERO(1); FA_TILE_ZERO(2); FA_TILE_ZERO(3))
/* Loads the four C tiles from 32 rows × 32 floats at p, rows ld floats apart (C += A·B onto stored sums). */
FA_AMX_OP("amx-tile", fa_amx_load_c, (const float *p, long ld),
          FA_TILE_LOAD(0, p, 4 * ld); FA_TILE_LOAD(1, p + 16, 4 * ld); FA_TILE_LOAD(2, p + 16 * ld, 4 * ld);
          FA_TILE_LOAD(3, p + 16 * ld + 16, 4 * ld))
FA_AMX_OP("amx-tile", fa_amx_load_a0, (const void *p, long stride), FA_TILE_LOAD(4, p, stride))
FA_AMX_OP("amx-tile", fa_amx_load_a1, (const void *p, long stride), FA_TILE_LOAD(5, p, stride))
FA_AMX_OP("amx-tile", fa_amx_load_b0, (const void *p, long stride), FA_TILE_LOAD(6, p, stride))
FA_AMX_OP("amx-tile", fa_amx_load_b1, (const void *p, long stride), FA_TILE_LOAD(7, p, stride))
/* C += A·B over bfloat16 pairs, float32 accumulation (tdpbf16ps), for all four (A, B) pairs. */
FA_AMX_OP("amx-tile,amx-bf16", fa_amx_dot_c, (void),
          FA_TILE_DOT(0, 4, 6); FA_TILE_DOT(1, 4, 7); FA_TILE_DOT(2, 5, 6); FA_TILE_DOT(3, 5, 7))
FA_AMX_OP("amx-tile", fa_amx_store_c0, (void *p, long stride), FA_TILE_STORE(0, p, stride))
FA_AMX_OP("amx-tile", fa_amx_store_c1, (void *p, long stride), FA_TILE_STORE(1, p, stride))
FA_AMX_OP("amx-tile", fa_amx_store_c2, (void *p, long stride), FA_TILE_STORE(2, p, stride))
FA_AMX_OP("amx-tile", fa_amx_store_c3, (void *p, long stride), FA_TILE_STORE(3, p, stride))

/* Transposes the 8 × 8 floats at src (rows ld_src apart) into dst (rows ld_dst apart): the backward pass
 * turns dS [query][key] into [key][query] this way for the dQ product's broadcasts. */
__attribute__((target("avx2"))) static inline void fa_transpose8x8(const float *src, long ld_src, float *dst, long ld_dst) {
    __m256 r0 = _mm256_loadu_ps(src), r1 = _mm256_loadu_ps(src + ld_src);
    __m256 r2 = _mm256_loadu_ps(src + 2 * ld_src), r3 = _mm256_loadu_ps(src + 3 * ld_src);
    __m256 r4 = _mm256_loadu_ps(src + 4 * ld_src), r5 = _mm256_loadu_ps(src + 5 * ld_src);
    __m256 r6 = _mm256_loadu_ps(src + 6 * ld_src), r7 = _mm256_loadu_ps(src + 7 * ld_src);
    __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
    __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
    __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
    __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
    __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
    __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    _mm256_storeu_ps(dst, _mm256_permute2f128_ps(u0, u4, 0x20));
    _mm256_storeu_ps(dst + ld_dst, _mm256_permute2f128_ps(u1, u5, 0x20));
    _mm256_storeu_ps(dst + 2 * ld_dst, _mm256_permute2f128_ps(u2, u6, 0x20));
    _mm256_storeu_ps(dst + 3 * ld_dst, _mm256_permute2f128_ps(u3, u7, 0x20));
    _mm256_storeu_ps(dst + 4 * ld_dst, _mm256_permute2f128_ps(u0, u4, 0x31));
    _mm256_storeu_ps(dst + 5 * ld_dst, _mm256_permute2f128_ps(u1, u5, 0x31));
    _mm256_storeu_ps(dst + 6 * ld_dst, _mm256_permute2f128_ps(u2, u6, 0x31));
    _mm256_storeu_ps(dst + 7 * ld_dst, _mm256_permute2f128_ps(u3, u7, 0x31));
}
#elif defined(__aarch64__)
/* The 8-lane helpers for the NEON copy (ARMv8.0 baseline: every aarch64 CPU has Advanced SIMD and the
 * half-precision conversions fcvtl/fcvtn). Plain clang vector C, no <arm_neon.h>, so that the same header also
 * compiles for the bare-metal target of the emulated tests (Tests/arm64); an 8-float vector is two q
 * registers, and each operation below lowers to one NEON instruction per half. */
typedef _Float16 fa_half8 __attribute__((ext_vector_type(8)));
typedef unsigned short fa_ushort8 __attribute__((ext_vector_type(8)));
typedef unsigned fa_uint8 __attribute__((ext_vector_type(8)));
typedef int fa_int8 __attribute__((ext_vector_type(8)));
typedef signed char fa_schar8 __attribute__((ext_vector_type(8)));
typedef unsigned char fa_uchar8 __attribute__((ext_vector_type(8)));

/* float16 <-> float32, 8 lanes (fcvtl/fcvtl2; fcvtn/fcvtn2 rounding to nearest even, the FPCR default). */
static inline fa_float8 fa_load_f16x8(const void *p) {
    fa_half8 h;
    __builtin_memcpy(&h, p, sizeof h);
    return __builtin_convertvector(h, fa_float8);
}

static inline void fa_store_f16x8(fa_float8 x, void *p) {
    fa_half8 h = __builtin_convertvector(x, fa_half8);
    __builtin_memcpy(p, &h, sizeof h);
}

static inline fa_float8 fa_fold_pairs_x8(fa_float8 a, fa_float8 b) {
    return __builtin_shufflevector(a, b, 0, 2, 4, 6, 8, 10, 12, 14) + __builtin_shufflevector(a, b, 1, 3, 5, 7, 9, 11, 13, 15);
}

static inline fa_float8 fa_load_i8x8(const void *p) {
    fa_schar8 b;
    __builtin_memcpy(&b, p, sizeof b);
    return __builtin_convertvector(b, fa_float8);
}

/* E4M3FN as in fa_e4m3_to_float, a vector at a time (shifts, an add and selects). */
static inline fa_float8 fa_load_e4m3x8(const void *p) {
    fa_uchar8 b;
    __builtin_memcpy(&b, p, sizeof b);
    fa_uint8 bytes = __builtin_convertvector(b, fa_uint8);
    fa_uint8 em = bytes & 0x7Fu;
    fa_uint8 normalBits = (em << 20) + (120u << 23);
    fa_float8 normal = (fa_float8)normalBits;
    fa_float8 subnormal = __builtin_convertvector(em, fa_float8) * 0x1p-9f;
    fa_int8 small = em < 8u, nan = em == 0x7Fu;
    fa_uint8 bits = (fa_uint8)((fa_int8)normal & ~small) | (fa_uint8)((fa_int8)subnormal & small);
    bits = (bits & (fa_uint8)~nan) | ((fa_uint8)nan & 0x7FC00000u);
    return (fa_float8)(bits | ((bytes & 0x80u) << 24));
}

/* bfloat16 <-> float32 by shifts: widening is the bits shifted up (ushll); rounding to nearest even, a NaN
 * kept quiet. */
static inline fa_float8 fa_load_bf16x8(const void *p) {
    fa_ushort8 h;
    __builtin_memcpy(&h, p, sizeof h);
    return (fa_float8)(__builtin_convertvector(h, fa_uint8) << 16);
}

static inline void fa_store_bf16x8(fa_float8 x, void *p) {
    fa_uint8 bits = (fa_uint8)x;
    fa_uint8 rounded = bits + 0x7FFFu + ((bits >> 16) & 1u);
    fa_uint8 nan = (fa_uint8)(x != x);
    fa_uint8 chosen = (rounded & ~nan) | ((bits | 0x400000u) & nan);
    fa_ushort8 h = __builtin_convertvector(chosen >> 16, fa_ushort8);
    __builtin_memcpy(p, &h, sizeof h);
}

/* Transposes the 8 × 8 floats at src (rows ld_src apart) into dst (rows ld_dst apart), as the x86 version. */
static inline void fa_transpose8x8(const float *src, long ld_src, float *dst, long ld_dst) {
    for (int r = 0; r < 8; r++)
        for (int c = 0; c < 8; c++) dst[c * ld_dst + r] = src[r * ld_src + c];
}
#endif

#endif

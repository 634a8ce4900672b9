/*
 * flash_attention.h — the whole C ABI of libFlashAttention.
 *
 * Exact attention  out = softmax(Q Kᵀ · scale) V  computed FlashAttention-style on the CPU: a block of
 * queries meets one block of keys/values at a time and an online softmax (running row max and row sum)
 * rescales the partial output, so the seqlen_q × seqlen_k score matrix is never stored.
 *
 * Anything not declared in this header is not API. Every function is prefixed `flash_attention_`, every
 * macro and constant `FA_`.
 *
 * Conventions
 * - Sizes and strides are int64_t. Strides count ELEMENTS, not bytes. The head-dim stride must be 1; every
 *   other stride is free (any sign, zero for broadcast inputs), so both the [batch, seq, heads, dim] layout
 *   and a [batch, heads, seq, dim] view of the same tensor are passed without a copy.
 * - Functions return a flash_attention_status. On any error nothing has been written to any output, and
 *   flash_attention_last_error() on the same thread says which argument was rejected and why.
 * - Nothing in this library traps or aborts on bad input.
 * - Thread safety: every function may be called from any number of threads at once. The library's only
 *   shared state is its worker pool (internally locked) and per-thread scratch memory.
 */
#ifndef FLASH_ATTENTION_H
#define FLASH_ATTENTION_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- Versions ------------------------------------------------------------------------------------- */

#define FA_VERSION_MAJOR 0
#define FA_VERSION_MINOR 1
#define FA_VERSION_PATCH 0
/* MAJOR*10000 + MINOR*100 + PATCH, comparable with flash_attention_version(). */
#define FA_VERSION_NUMBER (FA_VERSION_MAJOR * 10000 + FA_VERSION_MINOR * 100 + FA_VERSION_PATCH)
/* Bumped whenever an existing declaration changes meaning or layout. Appending fields to the params struct
 * (announced by struct_size) or adding functions does not bump it. Bindings compare it at load time. */
#define FA_ABI_VERSION 1

/* The library's FA_VERSION_NUMBER (may be newer than the header the caller was compiled with). */
int32_t flash_attention_version(void);
/* The library's version as "MAJOR.MINOR.PATCH"; static storage, never NULL. */
const char *flash_attention_version_string(void);
/* The library's FA_ABI_VERSION. */
int32_t flash_attention_abi_version(void);

/* ---- Status codes ----------------------------------------------------------------------------------- */

/* Codes are never renumbered; new ones are only appended. */
typedef int32_t flash_attention_status;
#define FA_OK 0
#define FA_ERROR_NULL_POINTER 1     /* a pointer that must be set is NULL */
#define FA_ERROR_INVALID_SHAPE 2    /* a size is negative, out of range, or inconsistent with another */
#define FA_ERROR_INVALID_STRIDE 3   /* a stride is not allowed, or the addressed range overflows */
#define FA_ERROR_INVALID_ARGUMENT 4 /* an option or pointer value is not allowed (e.g. num_threads < 0) */
#define FA_ERROR_UNSUPPORTED 5      /* unknown params struct size, or a path this CPU cannot run */
#define FA_ERROR_OUT_OF_MEMORY 6    /* scratch memory could not be allocated; out is then unspecified */
#define FA_ERROR_INTERNAL 7         /* a bug in this library; please report it */

/* A fixed English description of a status code ("unknown status code" for codes this library does not
 * know); static storage, never NULL. */
const char *flash_attention_status_string(flash_attention_status status);

/* The detailed message of the most recent failing call made on the calling thread, naming the argument and
 * the reason (e.g. "heads_q (12) is not a multiple of heads_kv (5)"); "" after a successful call. The
 * pointer is thread-local and valid until the next flash_attention_* call on the same thread; never NULL. */
const char *flash_attention_last_error(void);

/* ---- Options ---------------------------------------------------------------------------------------- */

/* Which implementation runs. AUTO picks the tiled SIMD kernel where the CPU has it (x86-64 with AVX2 and
 * FMA) and the reference path elsewhere. REFERENCE forces the plain, untiled float64-accumulating loop
 * (slow; for testing). TILED forces the tiled kernel and fails with FA_ERROR_UNSUPPORTED where the CPU
 * lacks its instructions. */
#define FA_ALGORITHM_AUTO 0
#define FA_ALGORITHM_REFERENCE 1
#define FA_ALGORITHM_TILED 2

/* Largest head_dim accepted. */
#define FA_MAX_HEAD_DIM 1024

/* ---- Forward ---------------------------------------------------------------------------------------- */

/*
 * Everything one attention call needs. Always initialise with flash_attention_params_init, then set fields.
 * New fields are only ever appended; struct_size tells the library which fields the caller knows, and
 * fields beyond it take their defaults.
 *
 * Shapes (element type float32):
 *   q    [batch, seqlen_q, heads_q,  head_dim]
 *   k, v [batch, seqlen_k, heads_kv, head_dim]
 *   out  [batch, seqlen_q, heads_q,  head_dim]   written
 *   lse  [batch, heads_q,  seqlen_q]             written if lse != NULL (natural log of the softmax sum)
 * Element (b, s, h, d) of q is at q + b*q_batch_stride + s*q_row_stride + h*q_head_stride + d*q_dim_stride.
 *
 * Grouped-query / multi-query attention: heads_q must be a multiple of heads_kv, and query head h reads
 * kv head h / (heads_q / heads_kv).
 *
 * Causal masking is aligned to the bottom-right corner (as in FlashAttention >= 2.1): query i may see key
 * j iff  j <= i + seqlen_k - seqlen_q.  Examples (1 = visible):
 *
 *   seqlen_q = 2, seqlen_k = 5        seqlen_q = 5, seqlen_k = 2
 *          k0 k1 k2 k3 k4                    k0 k1
 *     q0 [  1  1  1  1  0 ]            q0 [  0  0 ]   <- sees no key
 *     q1 [  1  1  1  1  1 ]            q1 [  0  0 ]   <- sees no key
 *                                      q2 [  0  0 ]   <- sees no key
 *                                      q3 [  1  0 ]
 *                                      q4 [  1  1 ]
 *
 * A query row that sees no key (causal with seqlen_q > seqlen_k, or seqlen_k == 0) gets out = 0 and
 * lse = -inf, never NaN.
 *
 * Sizes: batch, seqlen_q, seqlen_k >= 0 (zero-size work succeeds without touching memory);
 * heads_kv >= 1; heads_q a positive multiple of heads_kv; 1 <= head_dim <= FA_MAX_HEAD_DIM.
 * Pointers: q, out must be non-NULL when the tensor has elements, likewise k and v; all must be aligned to
 * 4 bytes. out and lse must not overlap each other, k or v; out may be the very same view as q (in place).
 */
typedef struct flash_attention_params {
    /* sizeof(flash_attention_params) as the caller compiled it; set by flash_attention_params_init. */
    uint64_t struct_size;

    int64_t batch;
    int64_t seqlen_q;
    int64_t seqlen_k;
    int64_t heads_q;
    int64_t heads_kv;
    int64_t head_dim;

    const void *q;
    int64_t q_batch_stride, q_row_stride, q_head_stride, q_dim_stride;
    const void *k;
    int64_t k_batch_stride, k_row_stride, k_head_stride, k_dim_stride;
    const void *v;
    int64_t v_batch_stride, v_row_stride, v_head_stride, v_dim_stride;
    void *out;
    int64_t out_batch_stride, out_row_stride, out_head_stride, out_dim_stride;
    float *lse; /* optional */
    int64_t lse_batch_stride, lse_head_stride, lse_row_stride;

    /* Multiplies Q Kᵀ before the softmax; 0 means 1/sqrt(head_dim). Must be finite. */
    float softmax_scale;
    /* Nonzero: bottom-right aligned causal mask (see above). */
    int32_t causal;
    /* 0: all online cores; 1: the calling thread only; n: at most n threads (clamped to the core count).
     * The result is bitwise identical for every value. */
    int32_t num_threads;
    /* FA_ALGORITHM_*. */
    int32_t algorithm;
} flash_attention_params;

/*
 * Fills *params with defaults: struct_size = struct_size argument, every size 0, pointers NULL, dim strides
 * 1, other strides 0, softmax_scale 0, causal 0, num_threads 0, algorithm FA_ALGORITHM_AUTO.
 * Pass sizeof(flash_attention_params): the library writes only that many bytes, so a caller compiled
 * against an older, smaller struct stays safe. Fails with FA_ERROR_NULL_POINTER or FA_ERROR_UNSUPPORTED
 * (a size this library does not know).
 */
flash_attention_status flash_attention_params_init(flash_attention_params *params, size_t struct_size);

/*
 * Computes out (and lse when requested) for the problem in *params. Validates everything first; on error
 * returns the code, sets the thread's last-error message and touches no output.
 */
flash_attention_status flash_attention_forward(const flash_attention_params *params);

/* ---- Introspection ---------------------------------------------------------------------------------- */

/* The instruction set the tiled kernel uses on this CPU ("avx2+fma"), or "none" where only the reference
 * path can run; static storage, never NULL. */
const char *flash_attention_kernel_isa(void);

/* The number of threads num_threads = 0 stands for (the online cores). */
int32_t flash_attention_default_num_threads(void);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* FLASH_ATTENTION_H */

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
#define FA_VERSION_MINOR 6
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
#define FA_ERROR_INVALID_INDEX 8    /* an index read from caller memory (cu_seqlens, cache_seqlens,
                                     * block_table, cache_batch_idx) is out of range or out of order */

/* A fixed English description of a status code ("unknown status code" for codes this library does not
 * know); static storage, never NULL. */
const char *flash_attention_status_string(flash_attention_status status);

/* The detailed message of the most recent failing call made on the calling thread, naming the argument and
 * the reason (e.g. "heads_q (12) is not a multiple of heads_kv (5)"); "" after a successful call. The
 * pointer is thread-local and valid until the next flash_attention_* call on the same thread; never NULL. */
const char *flash_attention_last_error(void);

/* ---- Options ---------------------------------------------------------------------------------------- */

/* Which implementation runs. AUTO runs the tiled SIMD kernels of the selected instruction set (see
 * "Kernel instruction sets" below), or the reference loop where FLASH_ATTENTION_ISA=reference. REFERENCE
 * forces the plain, untiled float64-accumulating loop (slow; for testing). TILED forces the tiled kernels
 * (the portable copy where FLASH_ATTENTION_ISA=reference); since 0.5 every CPU has them. */
#define FA_ALGORITHM_AUTO 0
#define FA_ALGORITHM_REFERENCE 1
#define FA_ALGORITHM_TILED 2

/* Element types of tensors (arithmetic and accumulation are always float32, and so is lse). float16 is IEEE
 * binary16; bfloat16 the top 16 bits of a float32. Outputs are rounded to nearest even. */
typedef int32_t flash_attention_dtype;
#define FA_DTYPE_FLOAT32 0
#define FA_DTYPE_FLOAT16 1
#define FA_DTYPE_BFLOAT16 2
/* 8-bit KV-cache element types (0.5), for k and v of flash_attention_forward_kvcache only: each row of
 * head_dim values (head_dim_v for v) of a (cache position, kv head) is stored with one float32 scale (k_scale, v_scale) and stands
 * for value × scale. INT8 is symmetric (scale = max|x| / 127, values rounded to nearest even and clamped to
 * ±127); FLOAT8_E4M3 is OCP FP8 E4M3FN (scale = max|x| / 448; 1 sign, 4 exponent (bias 7) and 3 mantissa
 * bits, no infinities, 0x7F/0xFF NaN). The attention is exact over the dequantized cache. */
#define FA_DTYPE_INT8 3
#define FA_DTYPE_FLOAT8_E4M3 4
/* A boolean attention mask element (0.6), for attn_mask only: one byte, nonzero = the query attends to the key. */
#define FA_DTYPE_BOOL 5

/* Largest head_dim accepted. */
#define FA_MAX_HEAD_DIM 1024

/* ---- Forward ---------------------------------------------------------------------------------------- */

/*
 * Everything one attention call needs. Always initialise with flash_attention_params_init, then set fields.
 * New fields are only ever appended; struct_size tells the library which fields the caller knows, and
 * fields beyond it take their defaults.
 *
 * Shapes (element types: dtype for q and out, kv_dtype for k and v; float32 by default; head_dim_v is
 * head_dim unless set, see the field):
 *   q    [batch, seqlen_q, heads_q,  head_dim]
 *   k    [batch, seqlen_k, heads_kv, head_dim]
 *   v    [batch, seqlen_k, heads_kv, head_dim_v]
 *   out  [batch, seqlen_q, heads_q,  head_dim_v]   written
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
 * heads_kv >= 1; heads_q a positive multiple of heads_kv; 1 <= head_dim, head_dim_v <= FA_MAX_HEAD_DIM.
 * Pointers: q, out must be non-NULL when the tensor has elements, likewise k and v; all must be aligned to
 * their element size. out and lse must not overlap each other, k or v; out may be the very same view as q (in place).
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

    /* ---- Inference options (appended in 0.2; all default to "off") ----------------------------------- */

    /* Sliding window: query i sees keys j with
     *     i + seqlen_k - seqlen_q - window_left  <=  j  <=  i + seqlen_k - seqlen_q + window_right,
     * -1 meaning unbounded on that side (the default for both). causal != 0 is the same as window_right 0.
     * Key blocks wholly outside every row's window are never visited. */
    int64_t window_left;
    int64_t window_right;
    /* ALiBi: adds -slope * |i + seqlen_k - seqlen_q - j| to the scaled score of query i and key j. float32
     * slopes [batch, heads_q] with alibi_batch_stride (0: one [heads_q] row shared by every batch); NULL =
     * off. */
    const float *alibi_slopes;
    int64_t alibi_batch_stride;
    /* Softcap > 0: score <- softcap * tanh(score / softcap), applied to the scaled score before ALiBi and
     * masking (masked keys never gain probability). 0 = off. */
    float softcap;
    int32_t reserved0; /* must be 0 */
    /* Attention sinks: float32 [heads_q] logits that join each row's softmax denominator and contribute no
     * value (not multiplied by softmax_scale). A row that sees no key then outputs 0 and lse = its sink.
     * NULL = off. */
    const float *sinks;

    /* ---- Variable-length batches: flash_attention_forward_varlen (0.2) ---------------------------------- */

    /* int32 [batch + 1], non-decreasing, starting at 0: sequence b holds rows cu_seqlens_q[b] ..
     * cu_seqlens_q[b + 1] - 1 of the packed q [seqlen_q = total_q, heads_q, head_dim] (likewise k, v with
     * total_k = seqlen_k rows). Batch strides are ignored; lse is [heads_q, total_q] (lse_batch_stride
     * ignored). max_seqlen_q / max_seqlen_k: 0, or an upper bound the library checks.
     * With block_table set (0.6), k and v are a paged cache as for flash_attention_forward_kvcache
     * ([cache_batch = num_blocks, cache_seqlen = block size, heads_kv, head_dim], block_table [batch,
     * max_blocks_per_seq]): sequence b's keys are positions 0 .. cu_seqlens_k[b + 1] - cu_seqlens_k[b] - 1 of
     * its blocks (cu_seqlens_k then gives only the lengths). Forward only: the backward refuses it. */
    const int32_t *cu_seqlens_q;
    const int32_t *cu_seqlens_k;
    int64_t max_seqlen_q;
    int64_t max_seqlen_k;

    /* ---- KV cache: flash_attention_forward_kvcache (0.2) ------------------------------------------------- */

    /* k and v describe the cache:
     *   contiguous: [cache_batch, cache_seqlen, heads_kv, head_dim], batch b uses cache row
     *               cache_batch_idx[b] (or b when cache_batch_idx is NULL);
     *   paged:      [cache_batch = num_blocks, cache_seqlen = block size, heads_kv, head_dim], position j of
     *               batch b lives in block block_table[b * block_table_batch_stride + j / cache_seqlen].
     * cache_seqlens int32 [batch]: keys already in the cache for each batch. If k_new/v_new are set,
     * their seqlen_new rows [batch, seqlen_new, heads_kv, head_dim (v_new: head_dim_v)] are first written at
     * positions cache_seqlens[b] ... (in place; the caller advances cache_seqlens afterwards). Batch b then
     * attends to its cache_seqlens[b] + seqlen_new keys, which is the seqlen_k used for causal/window
     * alignment; the params' seqlen_k is ignored. Every index is validated before anything is read or
     * written; on error the cache is unchanged. */
    const int32_t *cache_seqlens;
    const int32_t *cache_batch_idx;
    const int32_t *block_table;
    int64_t block_table_batch_stride;
    int64_t max_blocks_per_seq;
    int64_t cache_batch;
    int64_t cache_seqlen;
    const void *k_new;
    int64_t k_new_batch_stride, k_new_row_stride, k_new_head_stride, k_new_dim_stride;
    const void *v_new;
    int64_t v_new_batch_stride, v_new_row_stride, v_new_head_stride, v_new_dim_stride;
    int64_t seqlen_new;

    /* ---- Element types (appended in 0.3; both default to FA_DTYPE_FLOAT32) -------------------------- */

    /* Element type of q and out (FA_DTYPE_*). */
    flash_attention_dtype dtype;
    /* Element type of k and v, and of k_new/v_new: a KV cache may be stored in another type than q. */
    flash_attention_dtype kv_dtype;

    /* ---- Quantized KV caches (appended in 0.5) ---------------------------------------------------------- */

    /* Element type of k_new/v_new when it differs from the cache's (FA_DTYPE_FLOAT32/FLOAT16/BFLOAT16); -1 (the
     * default) means kv_dtype. With an 8-bit cache the new rows are quantized as they are appended (see
     * FA_DTYPE_INT8), and their scales written into k_scale/v_scale. */
    flash_attention_dtype kv_new_dtype;
    int32_t reserved1; /* must be 0 */
    /* Required with kv_dtype FA_DTYPE_INT8 or FA_DTYPE_FLOAT8_E4M3 (NULL otherwise): float32 scales shaped like
     * the cache without head_dim, [cache_batch, cache_seqlen, heads_kv] (contiguous) or [num_blocks, block
     * size, heads_kv] (paged), element strides. Read for every cached row; written for appended rows. */
    float *k_scale;
    int64_t k_scale_batch_stride, k_scale_row_stride, k_scale_head_stride;
    float *v_scale;
    int64_t v_scale_batch_stride, v_scale_row_stride, v_scale_head_stride;

    /* ---- Attention dropout, for training (appended in 0.6) --------------------------------------------- */

    /* FlashAttention-2's dropout: each probability is kept with probability 1 - dropout_p and then scaled by
     * 1 / (1 - dropout_p) before P V; the softmax sum and the lse are those without dropout (as in FA2), and
     * flash_attention_backward regenerates the same mask from these fields of its forward params.
     * Element (b, h, i, j) (sequence b of the batch, query head h, query position i and key position j within
     * the sequence) is kept iff a hash of (dropout_seed, b, h, i, j) falls below (1 - dropout_p) * 2^24
     * (README: "Dropout" gives the hash), so the mask depends on the seed and the element only: the same for
     * every num_threads, tiling and kernel path. In [0, 1); 0 = off. Dense and varlen calls only (a KV-cache
     * call with dropout_p != 0 is FA_ERROR_INVALID_ARGUMENT). */
    float dropout_p;
    int32_t reserved2; /* must be 0 */
    uint64_t dropout_seed;

    /* ---- Attention mask (appended in 0.6) --------------------------------------------------------------- */

    /* An optional mask over every (sequence b, query head h, query position i, key position j), positions
     * counted within the sequence (for a KV cache, j is the cache position): element
     *     attn_mask + b*attn_mask_batch_stride + h*attn_mask_head_stride + i*attn_mask_row_stride
     *               + j*attn_mask_col_stride
     * (element strides, any of them 0 to broadcast: [1, 1, seqlen_q, seqlen_k] is one mask for every batch
     * entry and head). Shape [batch, heads_q, max queries, max keys of a sequence] (dense: seqlen_q, seqlen_k;
     * varlen: the longest sequence's; KV cache: seqlen_q and the longest cache_seqlens[b] + seqlen_new).
     * attn_mask_dtype FA_DTYPE_BOOL: uint8, nonzero attends; FA_DTYPE_FLOAT32: added to the score after the
     * softcap and ALiBi (-inf masks). It combines with causal, windows, ALiBi, softcap and sinks; a row that
     * sees no key gets out 0 and lse -inf; a NaN in a float mask makes its row NaN. Key blocks whose mask is
     * entirely masked for an item's rows are skipped, so block-sparse masks cost less. The backward reads the
     * same mask from its forward params. NULL = off. */
    const void *attn_mask;
    flash_attention_dtype attn_mask_dtype;
    int32_t reserved3; /* must be 0 */
    int64_t attn_mask_batch_stride, attn_mask_head_stride, attn_mask_row_stride, attn_mask_col_stride;

    /* ---- Value head size (appended in 0.6) -------------------------------------------------------------- */

    /* Head size of v, out, v_new (and of dv and dout in the backward) when it differs from head_dim, which
     * stays the head size of q, k and k_new (and dq, dk): multi-head latent attention (DeepSeek-V2/V3) has
     * keys of 192 and values of 128 in prefill, and keys of 576 and values of 512 when decoding against its
     * compressed cache (where v may be a view of the first 512 columns of k: inputs may overlap; such a call
     * cannot append, since k_new and v_new would then write the same memory). The shapes above then read
     * v [.., head_dim_v], out [.., head_dim_v]; the merge takes head_dim_v as its head_dim.
     * 1 <= head_dim_v <= FA_MAX_HEAD_DIM; 0 (the default) means head_dim. The default softmax_scale stays
     * 1/sqrt(head_dim); MLA models use their own (DeepSeek-V3: mscale^2 / sqrt(192)), so pass it. */
    int64_t head_dim_v;
} flash_attention_params;

/* sizeof(flash_attention_params) in earlier versions (0.1 ended at `algorithm`, 0.2 at `seqlen_new`, 0.3 and
 * 0.4 at `kv_dtype`, 0.5 at `v_scale_head_stride`, the 0.6 header before head_dim_v at
 * `attn_mask_col_stride`); all are still accepted. */
#define FA_PARAMS_SIZE_V1 264
#define FA_PARAMS_SIZE_V2 488
#define FA_PARAMS_SIZE_V3 496
#define FA_PARAMS_SIZE_V4 568
#define FA_PARAMS_SIZE_V5 632

/*
 * Fills *params with defaults: struct_size = struct_size argument, every size 0, pointers NULL, dim strides
 * 1, other strides 0, softmax_scale 0, causal 0, num_threads 0, algorithm FA_ALGORITHM_AUTO, windows -1.
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

/*
 * Variable-length batches: like flash_attention_forward, with the sequences of the batch packed along the
 * row axis and delimited by cu_seqlens_q / cu_seqlens_k (see the params). Every option applies per
 * sequence (causal and window alignment use each sequence's own lengths).
 */
flash_attention_status flash_attention_forward_varlen(const flash_attention_params *params);

/*
 * Attention against a KV cache (decoding and chunked prefill): optionally appends k_new/v_new to the cache,
 * then attends q [batch, seqlen_q, heads_q, head_dim] to each batch's cache_seqlens[b] + seqlen_new keys
 * (see the params). Decoding shapes (few queries, long caches) are split along the keys into chunks that
 * run in parallel and are merged by LSE; the split depends on the shape only, so results stay bitwise
 * identical for every num_threads. The query heads that share a kv head are processed together, so each
 * key and value is read once per step.
 */
flash_attention_status flash_attention_forward_kvcache(const flash_attention_params *params);

/*
 * Combines two attention results over disjoint key sets of the same queries into the exact result over
 * their union (the building block of split-KV, chunked prefill and ring attention):
 *     lse = log(exp(lse_a) + exp(lse_b)),  out = out_a * exp(lse_a - lse) + out_b * exp(lse_b - lse).
 * out_* are float32 [rows, head_dim] and lse_* float32 [rows], each with its own row stride (elements);
 * out/lse may be the same memory as out_a/lse_a (in place). A side with lse = -inf (no key) contributes
 * nothing; both -inf gives out 0 and lse -inf, never NaN.
 */
flash_attention_status flash_attention_merge(int64_t rows, int64_t head_dim,
                                             const float *out_a, int64_t out_a_row_stride,
                                             const float *lse_a, int64_t lse_a_stride,
                                             const float *out_b, int64_t out_b_row_stride,
                                             const float *lse_b, int64_t lse_b_stride,
                                             float *out, int64_t out_row_stride,
                                             float *lse, int64_t lse_stride);

/* ---- Backward ---------------------------------------------------------------------------------------- */

/*
 * Gradients of a forward call (0.4). `forward` points to the params of the forward call being
 * differentiated: shapes, options and q, k, v as given to it, plus its `out` and `lse` (both required
 * here, as inputs). dout is laid out like out; dq like q; dk and dv like k and v, each with its own
 * strides (dout and dq of the forward `dtype`, dk and dv of its `kv_dtype`; accumulation is float32).
 * With grouped-query heads, dk and dv of a kv head sum over the query heads that share it. With sinks,
 * dsinks [heads_q] (float32, optional) receives the gradient of the sink logits.
 *
 * Algorithm (FlashAttention-2): D_i = rowsum(dO_i ∘ O_i); per tile, P = exp(S·scale − LSE) is recomputed,
 * dV += Pᵀ dO, dP = dO Vᵀ, dS = P ∘ (dP − D) (times 1 − tanh² under softcap), dQ += dS K · scale,
 * dK += dSᵀ Q · scale. dK and dV have one owner per (sequence, kv head, key block) and dQ one per query
 * block: no atomics, and results are bitwise identical for every num_threads. Workspace is O(seqlen) row
 * statistics plus per-thread tiles; nothing of size seqlen_q × seqlen_k.
 */
typedef struct flash_attention_backward_params {
    /* sizeof(flash_attention_backward_params); set by flash_attention_backward_params_init. */
    uint64_t struct_size;
    /* The forward call's params (its own struct_size may be any accepted one). */
    const flash_attention_params *forward;
    const void *dout;
    int64_t dout_batch_stride, dout_row_stride, dout_head_stride, dout_dim_stride;
    void *dq;
    int64_t dq_batch_stride, dq_row_stride, dq_head_stride, dq_dim_stride;
    void *dk;
    int64_t dk_batch_stride, dk_row_stride, dk_head_stride, dk_dim_stride;
    void *dv;
    int64_t dv_batch_stride, dv_row_stride, dv_head_stride, dv_dim_stride;
    float *dsinks; /* optional, [heads_q] */
} flash_attention_backward_params;

/* Fills *params with defaults (NULL pointers, dim strides 1, other strides 0); pass sizeof(*params). */
flash_attention_status flash_attention_backward_params_init(flash_attention_backward_params *params,
                                                           size_t struct_size);

/* Gradients for a dense or variable-length forward (varlen when forward->cu_seqlens_q is set; batch strides
 * of dout/dq/dk/dv are then ignored). KV-cache forwards have no backward. */
flash_attention_status flash_attention_backward(const flash_attention_backward_params *params);

/* ---- Introspection ---------------------------------------------------------------------------------- */

/* Kernel instruction sets (0.5). The kernels are one source compiled once per instruction set; the library
 * picks the widest the CPU (and OS) can run the first time it needs one (but avx512 before avx512bf16 on Intel
 * cores, whose vdpbf16ps does half the FLOPs of a float32 FMA and so gains nothing over float32):
 *   "amxbf16"   the avx512bf16 copy on a CPU with AMX-BF16 tiles whose OS grants this process the tile state
 *               (Sapphire Rapids and later; asked once, with arch_prctl, when the library picks its path): for
 *               bfloat16 q, k and v both products run in AMX tiles (tdpbf16ps, float32 accumulation; P rounded to
 *               bfloat16 as on "avx512bf16"), the softmax in float32. Appended last below.
 *   "avx512bf16" the avx512 copy on a CPU with AVX512_BF16 as well (Zen 4/5, Cooper Lake, Sapphire Rapids and
 *               later): bfloat16 q, k and v multiply in bfloat16 pairs (vdpbf16ps) accumulating in float32, with
 *               the softmax in float32 and the probabilities rounded to bfloat16 for P·V (as FlashAttention on
 *               GPUs and PyTorch's SDPA on CPUs); every other input, the backward and decoding run as "avx512".
 *               Its constant is appended last below, so the others keep their place.
 *   "avx512"    AVX-512 F/BW/DQ/VL + FMA + F16C, 16-float vectors (x86-64)
 *   "avx2"      AVX2 + FMA + F16C, 8-float vectors (x86-64)
 *   "portable"  no ISA extensions (SSE2 on x86-64), 4-float vectors; any CPU
 *   "neon"      ARMv8.0 Advanced SIMD, 8-float vectors as pairs of q registers (aarch64 builds only; appended
 *               last, so the constants above keep their place)
 *   "reference" the plain float64-accumulating forward loop (the backward runs the portable kernels)
 * The environment variable FLASH_ATTENTION_ISA, read once at that moment, forces one of these names (for
 * tests and benchmarks). A name the CPU cannot run, or an unknown name, makes every attention call fail with
 * FA_ERROR_UNSUPPORTED and a message saying why — never an illegal instruction. Results are bitwise
 * identical for every num_threads within one instruction set, not across them. */
#define FA_ISA_AVX512 "avx512"
#define FA_ISA_AVX2 "avx2"
#define FA_ISA_PORTABLE "portable"
#define FA_ISA_REFERENCE "reference"
#define FA_ISA_NEON "neon"
#define FA_ISA_AVX512BF16 "avx512bf16"
#define FA_ISA_AMXBF16 "amxbf16"

/* The instruction set attention calls use (one of the FA_ISA_* names), or "invalid" when FLASH_ATTENTION_ISA
 * names one this CPU cannot run or none at all; static storage, never NULL. */
const char *flash_attention_kernel_isa(void);

/* The FA_ISA_* names this CPU can run, the default first, then narrower ones, separated by commas (e.g.
 * "avx2,portable,reference"; "avx512,avx512bf16,avx2,portable,reference" on an Intel core with AVX512_BF16);
 * static storage, never NULL. (0.5) */
const char *flash_attention_available_isas(void);

/* The number of threads num_threads = 0 stands for (the online cores). */
int32_t flash_attention_default_num_threads(void);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* FLASH_ATTENTION_H */

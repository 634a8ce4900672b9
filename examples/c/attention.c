/*
 * attention.c: calling libFlashAttention from C.
 *
 * Runs one causal grouped-query attention forward (with the log-sum-exp of every row) and checks it against
 * a plain double-precision loop in this file. Exits 0 when the results agree, 1 otherwise.
 *
 * Build and run against an installed copy (`make install PREFIX=...`; add PREFIX/lib/pkgconfig to
 * PKG_CONFIG_PATH when PREFIX is not a system prefix):
 *
 *     cc -std=c99 attention.c $(pkg-config --cflags --libs flash-attention) -lm -o attention
 *     ./attention            (LD_LIBRARY_PATH=PREFIX/lib ./attention if PREFIX/lib is not searched by default)
 *
 * (-lm is for this file's own exp/log in the reference loop; the library itself needs nothing more.)
 */
#include <flash_attention.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>

/* The problem: 2 sequences, 5 queries attending to 7 keys, 4 query heads sharing 2 key/value heads. */
enum { BATCH = 2, SEQLEN_Q = 5, SEQLEN_K = 7, HEADS_Q = 4, HEADS_KV = 2, HEAD_DIM = 16 };

/* All tensors are contiguous [batch, seq, heads, head_dim]; lse is [batch, heads_q, seqlen_q]. */
#define Q_INDEX(b, s, h, d) ((((size_t)(b) * SEQLEN_Q + (s)) * HEADS_Q + (h)) * HEAD_DIM + (d))
#define KV_INDEX(b, s, h, d) ((((size_t)(b) * SEQLEN_K + (s)) * HEADS_KV + (h)) * HEAD_DIM + (d))
#define LSE_INDEX(b, h, s) ((((size_t)(b) * HEADS_Q + (h)) * SEQLEN_Q) + (s))

static float q[BATCH * SEQLEN_Q * HEADS_Q * HEAD_DIM];
static float k[BATCH * SEQLEN_K * HEADS_KV * HEAD_DIM];
static float v[BATCH * SEQLEN_K * HEADS_KV * HEAD_DIM];
static float out[BATCH * SEQLEN_Q * HEADS_Q * HEAD_DIM];
static float lse[BATCH * HEADS_Q * SEQLEN_Q];

/* A deterministic pattern in [-1, 1]: no random numbers, so every run computes the same thing. */
static void fill(float *x, size_t n, unsigned salt) {
    for (size_t i = 0; i < n; i++) {
        x[i] = (float)((i * 37u + salt * 11u) % 101u) / 50.0f - 1.0f;
    }
}

/* The larger of two errors, where NaN counts as the largest and stays. */
static double worse(double max_err, double err) { return (isnan(err) || err > max_err) ? err : max_err; }

int main(void) {
    /* A library older or ABI-incompatible with this header would misread the params struct. */
    if (flash_attention_abi_version() != FA_ABI_VERSION) {
        fprintf(stderr, "libFlashAttention ABI %d, but this program was compiled for ABI %d\n",
                (int)flash_attention_abi_version(), FA_ABI_VERSION);
        return 1;
    }
    printf("libFlashAttention %s (ABI %d, kernel %s)\n", flash_attention_version_string(),
           (int)flash_attention_abi_version(), flash_attention_kernel_isa());

    fill(q, sizeof q / sizeof q[0], 1);
    fill(k, sizeof k / sizeof k[0], 2);
    fill(v, sizeof v / sizeof v[0], 3);

    /* Always start from the library's defaults, then set what this call needs. */
    flash_attention_params p;
    flash_attention_status status = flash_attention_params_init(&p, sizeof p);
    if (status != FA_OK) {
        fprintf(stderr, "flash_attention_params_init: %s: %s\n", flash_attention_status_string(status),
                flash_attention_last_error());
        return 1;
    }
    p.batch = BATCH;
    p.seqlen_q = SEQLEN_Q;
    p.seqlen_k = SEQLEN_K;
    p.heads_q = HEADS_Q;
    p.heads_kv = HEADS_KV;
    p.head_dim = HEAD_DIM;
    /* Strides count elements; the dim strides are already 1. */
    p.q = q;
    p.q_batch_stride = SEQLEN_Q * HEADS_Q * HEAD_DIM;
    p.q_row_stride = HEADS_Q * HEAD_DIM;
    p.q_head_stride = HEAD_DIM;
    p.k = k;
    p.k_batch_stride = SEQLEN_K * HEADS_KV * HEAD_DIM;
    p.k_row_stride = HEADS_KV * HEAD_DIM;
    p.k_head_stride = HEAD_DIM;
    p.v = v;
    p.v_batch_stride = p.k_batch_stride;
    p.v_row_stride = p.k_row_stride;
    p.v_head_stride = p.k_head_stride;
    p.out = out;
    p.out_batch_stride = p.q_batch_stride;
    p.out_row_stride = p.q_row_stride;
    p.out_head_stride = p.q_head_stride;
    p.lse = lse;
    p.lse_batch_stride = HEADS_Q * SEQLEN_Q;
    p.lse_head_stride = SEQLEN_Q;
    p.lse_row_stride = 1;
    p.causal = 1; /* bottom-right aligned: query i sees keys j <= i + SEQLEN_K - SEQLEN_Q */
    /* softmax_scale 0 means 1/sqrt(head_dim); num_threads 0 means all cores. */

    status = flash_attention_forward(&p);
    if (status != FA_OK) {
        fprintf(stderr, "flash_attention_forward: %s: %s\n", flash_attention_status_string(status),
                flash_attention_last_error());
        return 1;
    }

    /* The same attention, one row at a time, in double precision. */
    const double scale = 1.0 / sqrt((double)HEAD_DIM);
    const int group = HEADS_Q / HEADS_KV; /* query head h reads kv head h / group */
    double max_err_out = 0.0, max_err_lse = 0.0;
    for (int b = 0; b < BATCH; b++) {
        for (int h = 0; h < HEADS_Q; h++) {
            const int hk = h / group;
            for (int i = 0; i < SEQLEN_Q; i++) {
                const int last = i + SEQLEN_K - SEQLEN_Q; /* last visible key (here always >= 0) */
                double s[SEQLEN_K], row_max = -INFINITY, sum = 0.0;
                for (int j = 0; j <= last; j++) {
                    double dot = 0.0;
                    for (int d = 0; d < HEAD_DIM; d++) {
                        dot += (double)q[Q_INDEX(b, i, h, d)] * (double)k[KV_INDEX(b, j, hk, d)];
                    }
                    s[j] = dot * scale;
                    if (s[j] > row_max) row_max = s[j];
                }
                for (int j = 0; j <= last; j++) {
                    s[j] = exp(s[j] - row_max);
                    sum += s[j];
                }
                for (int d = 0; d < HEAD_DIM; d++) {
                    double acc = 0.0;
                    for (int j = 0; j <= last; j++) acc += s[j] * (double)v[KV_INDEX(b, j, hk, d)];
                    max_err_out = worse(max_err_out, fabs(acc / sum - (double)out[Q_INDEX(b, i, h, d)]));
                }
                max_err_lse = worse(max_err_lse, fabs(row_max + log(sum) - (double)lse[LSE_INDEX(b, h, i)]));
            }
        }
    }

    const double tolerance = 1e-4;
    printf("causal GQA forward: batch %d, seqlen_q %d, seqlen_k %d, heads %d/%d, head_dim %d\n", BATCH, SEQLEN_Q,
           SEQLEN_K, HEADS_Q, HEADS_KV, HEAD_DIM);
    printf("max |error| vs float64 reference: out %.3g, lse %.3g (tolerance %.0e)\n", max_err_out, max_err_lse,
           tolerance);
    if (!(max_err_out <= tolerance && max_err_lse <= tolerance)) {
        fprintf(stderr, "FAIL: the result differs from the reference\n");
        return 1;
    }
    printf("ok\n");
    return 0;
}

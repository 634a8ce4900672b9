/* Prints the median nanoseconds of a (batch 1, 1 query, H heads, 1 key, head_dim 64) flash_attention_forward
 * call, H = argv[1] (default 1): the fixed cost of a call (validation, dispatch, tiny work items). Built and
 * run by bench.py (H = 1) and bench/transformers_bench.py (H = 8, a one-token decode step of 8 heads). */
#include "flash_attention.h"

#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e9 + t.tv_nsec;
}

static int by_value(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    enum { MAX_HEADS = 64 };
    static float q[64 * MAX_HEADS], k[64 * MAX_HEADS], v[64 * MAX_HEADS], out[64 * MAX_HEADS];
    int heads = argc > 1 ? atoi(argv[1]) : 1;
    if (heads < 1 || heads > MAX_HEADS) return 2;
    for (int i = 0; i < 64 * heads; i++) { q[i] = (i % 64) * 0.01f; k[i] = 0.5f; v[i] = (float)(i % 64); }
    flash_attention_params p;
    flash_attention_params_init(&p, sizeof p);
    p.batch = p.seqlen_q = p.seqlen_k = 1;
    p.heads_q = p.heads_kv = heads;
    p.head_dim = 64;
    /* [1, 1, heads, 64] contiguous: row stride heads * 64, head stride 64. */
    p.q_row_stride = p.k_row_stride = p.v_row_stride = p.out_row_stride = heads * 64;
    p.q_head_stride = p.k_head_stride = p.v_head_stride = p.out_head_stride = 64;
    p.q_batch_stride = p.k_batch_stride = p.v_batch_stride = p.out_batch_stride = heads * 64;
    p.q = q; p.k = k; p.v = v; p.out = out;
    enum { ROUNDS = 51, CALLS = 2000 };
    double samples[ROUNDS];
    for (int i = 0; i < 1000; i++) flash_attention_forward(&p);
    for (int r = 0; r < ROUNDS; r++) {
        double start = now_ns();
        for (int i = 0; i < CALLS; i++) flash_attention_forward(&p);
        samples[r] = (now_ns() - start) / CALLS;
    }
    qsort(samples, ROUNDS, sizeof samples[0], by_value);
    printf("%.1f ns per call (median of %d rounds of %d calls)\n", samples[ROUNDS / 2], ROUNDS, CALLS);
    return out[0] == out[0] ? 0 : 1;
}

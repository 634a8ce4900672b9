/* Prints the median nanoseconds of a (batch 1, 1 head, 1 query, 1 key, head_dim 64) flash_attention_forward
 * call: the fixed cost of a call (validation, dispatch, one tiny work item). Built and run by bench.py. */
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

int main(void) {
    static float q[64], k[64], v[64], out[64];
    for (int i = 0; i < 64; i++) { q[i] = i * 0.01f; k[i] = 0.5f; v[i] = (float)i; }
    flash_attention_params p;
    flash_attention_params_init(&p, sizeof p);
    p.batch = p.seqlen_q = p.seqlen_k = p.heads_q = p.heads_kv = 1;
    p.head_dim = 64;
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

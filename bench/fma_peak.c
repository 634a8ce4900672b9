/* The float32 FMA peak of this CPU for one kernel path, measured: each thread runs twelve independent chains of
 * vector FMAs (enough to cover the FMA latency of every current x86 core), and the program prints the total
 * GFLOP/s. Built and run by bench.py beside the attention measurements, so that "% of peak" compares with a
 * peak of the same machine, at the same moment, on the same number of threads.
 *
 *     fma_peak <avx512bf16|avx512|avx2|portable> <threads>
 *
 * avx512bf16 measures vdpbf16ps (bfloat16 pair products, 4 FLOPs per float32 lane), the peak of that path's
 * products; it issues at the FMA rate on AMD Zen 4/5 and at half of it on Intel cores.
 *
 * Each path's loop carries its instruction set as a target attribute; the caller asks only for paths the
 * library reports as available (flash_attention_available_isas), so no instruction is illegal. The
 * portable path's loop multiplies and adds (SSE2 has no FMA), as the portable kernels do. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#define CHAINS 12
#define STEPS 20000000L

typedef float float16v __attribute__((vector_size(64)));
typedef float float8v __attribute__((vector_size(32)));
typedef float float4v __attribute__((vector_size(16)));

/* Each returns FLOPs done; `seed` keeps the compiler from folding the chains. */
#if defined(__x86_64__)
__attribute__((target("avx512f,fma"))) static double run_avx512(float seed) {
    float16v acc[CHAINS], a = {0}, b = {0};
    for (int i = 0; i < 16; i++) { a[i] = seed; b[i] = 1.0f - seed; }
    for (int c = 0; c < CHAINS; c++) acc[c] = a * (float)c;
    for (long s = 0; s < STEPS; s++)
#pragma GCC unroll 16
        for (int c = 0; c < CHAINS; c++) acc[c] = __builtin_ia32_vfmaddps512_mask(acc[c], a, b, -1, 4);
    float sink = 0;
    for (int c = 0; c < CHAINS; c++) sink += acc[c][0];
    if (sink == 12345.0f) puts("");
    return 2.0 * 16 * CHAINS * STEPS;
}

__attribute__((target("avx2,fma"))) static double run_avx2(float seed) {
    float8v acc[CHAINS], a = {0}, b = {0};
    for (int i = 0; i < 8; i++) { a[i] = seed; b[i] = 1.0f - seed; }
    for (int c = 0; c < CHAINS; c++) acc[c] = a * (float)c;
    for (long s = 0; s < STEPS; s++)
#pragma GCC unroll 16
        for (int c = 0; c < CHAINS; c++) acc[c] = __builtin_ia32_vfmaddps256(acc[c], a, b);
    float sink = 0;
    for (int c = 0; c < CHAINS; c++) sink += acc[c][0];
    if (sink == 12345.0f) puts("");
    return 2.0 * 8 * CHAINS * STEPS;
}

/* The avx512bf16 path's products: vdpbf16ps, two bfloat16 products and two adds per float32 lane (4 FLOPs). */
typedef short short32v __attribute__((vector_size(64)));
__attribute__((target("avx512f,avx512bf16"))) static double run_avx512bf16(float seed) {
    float16v acc[CHAINS];
    short32v a, b;
    for (int i = 0; i < 32; i++) { a[i] = (short)(0x3f80 + (seed < 1)); b[i] = 0x3f7f; }
    for (int c = 0; c < CHAINS; c++) acc[c] = (float16v){0} + (float)c;
    for (long s = 0; s < STEPS; s++)
#pragma GCC unroll 16
        for (int c = 0; c < CHAINS; c++) acc[c] = (float16v)_mm512_dpbf16_ps((__m512)acc[c], (__m512bh)a, (__m512bh)b);
    float sink = 0;
    for (int c = 0; c < CHAINS; c++) sink += acc[c][0];
    if (sink == 12345.0f) puts("");
    return 4.0 * 16 * CHAINS * STEPS;
}
#endif

static double run_portable(float seed) {
    float4v acc[CHAINS], a = {seed, seed, seed, seed}, b = {1 - seed, 1 - seed, 1 - seed, 1 - seed};
    for (int c = 0; c < CHAINS; c++) acc[c] = a * (float)c;
    for (long s = 0; s < STEPS; s++)
#pragma GCC unroll 16
        for (int c = 0; c < CHAINS; c++) acc[c] = acc[c] * a + b;
    float sink = 0;
    for (int c = 0; c < CHAINS; c++) sink += acc[c][0];
    if (sink == 12345.0f) puts("");
    return 2.0 * 4 * CHAINS * STEPS;
}

static double (*kernel)(float);

static void *worker(void *arg) {
    *(double *)arg = kernel(0.999999f);
    return NULL;
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(int argc, char **argv) {
    if (argc != 3) { fprintf(stderr, "usage: %s <avx512bf16|avx512|avx2|portable> <threads>\n", argv[0]); return 2; }
    int threads = atoi(argv[2]);
    if (strcmp(argv[1], "portable") == 0) kernel = run_portable;
#if defined(__x86_64__)
    else if (strcmp(argv[1], "avx512") == 0) kernel = run_avx512;
    else if (strcmp(argv[1], "avx2") == 0) kernel = run_avx2;
    else if (strcmp(argv[1], "avx512bf16") == 0) kernel = run_avx512bf16;
#endif
    if (!kernel || threads < 1 || threads > 1024) { fprintf(stderr, "unknown path or thread count\n"); return 2; }
    pthread_t ids[1024];
    double flops[1024];
    double start = now();
    for (int t = 0; t < threads; t++) pthread_create(&ids[t], NULL, worker, &flops[t]);
    double total = 0;
    for (int t = 0; t < threads; t++) { pthread_join(ids[t], NULL); total += flops[t]; }
    printf("%.1f\n", total / (now() - start) / 1e9);
    return 0;
}

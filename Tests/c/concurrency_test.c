/* Calls flash_attention_forward from 8 pthreads at once, 40 calls each, with different shapes and
 * num_threads, and checks every result bitwise against the same call made alone on one thread: the
 * shared worker pool must neither mix up jobs nor change a single bit. Then unloads the library with
 * dlclose and loads it again (the pool must survive unloading) before exiting (it must shut down cleanly).
 * Usage: concurrency_test path/to/libFlashAttention.so */
#include "flash_attention.h"

#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef flash_attention_status (*forward_fn)(const flash_attention_params *);
typedef flash_attention_status (*init_fn)(flash_attention_params *, size_t);

enum { THREADS = 8, CALLS = 40, SHAPES = 4 };

typedef struct {
    int seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, causal;
    float *q, *k, *v, *expected;
    size_t out_count;
} shape_t;

static shape_t shapes[SHAPES] = {
    {37, 53, 4, 2, 24, 1, NULL, NULL, NULL, NULL, 0},
    {300, 300, 2, 2, 64, 0, NULL, NULL, NULL, NULL, 0},
    {1, 700, 8, 2, 128, 1, NULL, NULL, NULL, NULL, 0},
    {129, 65, 3, 1, 40, 1, NULL, NULL, NULL, NULL, 0},
};
static forward_fn forward;
static init_fn init;
static int failures;
static pthread_mutex_t failure_lock = PTHREAD_MUTEX_INITIALIZER;

static void set_params(flash_attention_params *p, const shape_t *s, float *out, int threads) {
    init(p, sizeof *p);
    p->batch = 1; p->seqlen_q = s->seqlen_q; p->seqlen_k = s->seqlen_k;
    p->heads_q = s->heads_q; p->heads_kv = s->heads_kv; p->head_dim = s->head_dim; p->causal = s->causal;
    p->q = s->q; p->q_row_stride = s->heads_q * s->head_dim; p->q_head_stride = s->head_dim;
    p->k = s->k; p->k_row_stride = s->heads_kv * s->head_dim; p->k_head_stride = s->head_dim;
    p->v = s->v; p->v_row_stride = s->heads_kv * s->head_dim; p->v_head_stride = s->head_dim;
    p->out = out; p->out_row_stride = s->heads_q * s->head_dim; p->out_head_stride = s->head_dim;
    p->num_threads = threads;
}

static void *worker(void *arg) {
    int id = (int)(size_t)arg;
    for (int call = 0; call < CALLS; call++) {
        const shape_t *s = &shapes[(id + call) % SHAPES];
        float *out = malloc(s->out_count * sizeof(float));
        flash_attention_params p;
        set_params(&p, s, out, (id + call) % 3);
        flash_attention_status status = forward(&p);
        if (status != FA_OK || memcmp(out, s->expected, s->out_count * sizeof(float)) != 0) {
            pthread_mutex_lock(&failure_lock);
            failures++;
            pthread_mutex_unlock(&failure_lock);
        }
        free(out);
    }
    return NULL;
}

static void *load(const char *path) {
    void *lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!lib) { printf("FAIL: dlopen: %s\n", dlerror()); exit(1); }
    forward = (forward_fn)dlsym(lib, "flash_attention_forward");
    init = (init_fn)dlsym(lib, "flash_attention_params_init");
    if (!forward || !init) { printf("FAIL: missing symbols\n"); exit(1); }
    return lib;
}

int main(int argc, char **argv) {
    if (argc < 2) { printf("usage: %s libFlashAttention.so\n", argv[0]); return 2; }
    void *lib = load(argv[1]);
    unsigned state = 7;
    for (int i = 0; i < SHAPES; i++) {
        shape_t *s = &shapes[i];
        size_t nq = (size_t)s->seqlen_q * s->heads_q * s->head_dim, nk = (size_t)s->seqlen_k * s->heads_kv * s->head_dim;
        s->q = malloc(nq * sizeof(float)); s->k = malloc(nk * sizeof(float)); s->v = malloc(nk * sizeof(float));
        s->expected = malloc(nq * sizeof(float)); s->out_count = nq;
        for (size_t j = 0; j < nq; j++) { state = state * 1664525u + 1013904223u; s->q[j] = (float)(state >> 8) / 16777216.0f - 0.5f; }
        for (size_t j = 0; j < nk; j++) { state = state * 1664525u + 1013904223u; s->k[j] = (float)(state >> 8) / 16777216.0f - 0.5f; }
        for (size_t j = 0; j < nk; j++) { state = state * 1664525u + 1013904223u; s->v[j] = (float)(state >> 8) / 16777216.0f - 0.5f; }
        flash_attention_params p;
        set_params(&p, s, s->expected, 1);
        if (forward(&p) != FA_OK) { printf("FAIL: single-threaded call\n"); return 1; }
    }
    pthread_t threads[THREADS];
    for (int t = 0; t < THREADS; t++) pthread_create(&threads[t], NULL, worker, (void *)(size_t)t);
    for (int t = 0; t < THREADS; t++) pthread_join(threads[t], NULL);
    if (failures) { printf("FAIL: %d of %d concurrent calls differed from the single-threaded result\n", failures, THREADS * CALLS); return 1; }

    /* Unload with workers alive, load again, use the pool again. */
    dlclose(lib);
    lib = load(argv[1]);
    float *out = malloc(shapes[1].out_count * sizeof(float));
    flash_attention_params p;
    set_params(&p, &shapes[1], out, 0);
    if (forward(&p) != FA_OK || memcmp(out, shapes[1].expected, shapes[1].out_count * sizeof(float)) != 0) {
        printf("FAIL: call after dlclose/dlopen\n");
        return 1;
    }
    free(out);
    dlclose(lib);
    printf("ok: %d concurrent calls from %d threads matched bitwise; dlclose/dlopen and exit clean\n", THREADS * CALLS, THREADS);
    return 0;
}

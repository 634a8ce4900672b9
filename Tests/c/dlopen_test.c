/* Loads libFlashAttention.so with dlopen, the way a C inference engine would, checks a small attention
 * problem (forward, then backward) against naive C loops, and checks that bad input returns error codes
 * without writing output.
 * Usage: dlopen_test path/to/libFlashAttention.so */
#include "flash_attention.h"

#include <dlfcn.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef flash_attention_status (*forward_fn)(const flash_attention_params *);
typedef flash_attention_status (*init_fn)(flash_attention_params *, size_t);
typedef const char *(*string_fn)(void);
typedef const char *(*status_string_fn)(flash_attention_status);
typedef int32_t (*int_fn)(void);
typedef flash_attention_status (*backward_fn)(const flash_attention_backward_params *);
typedef flash_attention_status (*backward_init_fn)(flash_attention_backward_params *, size_t);

static int failures = 0;
#define CHECK(cond, ...)                                                                                       \
    do {                                                                                                       \
        if (!(cond)) {                                                                                         \
            failures++;                                                                                        \
            printf("FAIL %s:%d: ", __FILE__, __LINE__);                                                        \
            printf(__VA_ARGS__);                                                                               \
            printf("\n");                                                                                      \
        }                                                                                                      \
    } while (0)

static void *must_sym(void *lib, const char *name) {
    void *sym = dlsym(lib, name);
    if (!sym) {
        printf("FAIL: missing symbol %s\n", name);
        exit(1);
    }
    return sym;
}

/* Deterministic values in [-1, 1). */
static float next_value(unsigned *state) {
    *state = *state * 1664525u + 1013904223u;
    return (float)((*state >> 8) & 0xFFFF) / 32768.0f - 1.0f;
}

/* Naive attention in double: [s, h, d] layouts, GQA, bottom-right causal. */
static void naive(const float *q, const float *k, const float *v, double *out, double *lse, int sq, int sk, int hq,
                  int hk, int d, int causal) {
    double scale = 1.0 / sqrt((double)d);
    double *p = malloc(sizeof(double) * (sk > 0 ? sk : 1));
    for (int h = 0; h < hq; h++) {
        int kh = h / (hq / hk);
        for (int i = 0; i < sq; i++) {
            double m = -INFINITY, sum = 0;
            for (int j = 0; j < sk; j++) {
                if (causal && j > i + sk - sq) { p[j] = -INFINITY; continue; }
                double dot = 0;
                for (int c = 0; c < d; c++) dot += (double)q[(i * hq + h) * d + c] * k[(j * hk + kh) * d + c];
                p[j] = dot * scale;
                if (p[j] > m) m = p[j];
            }
            for (int j = 0; j < sk; j++) { p[j] = m == -INFINITY ? 0 : exp(p[j] - m); sum += p[j]; }
            for (int c = 0; c < d; c++) {
                double acc = 0;
                for (int j = 0; j < sk; j++) acc += p[j] * v[(j * hk + kh) * d + c];
                out[(i * hq + h) * d + c] = sum > 0 ? acc / sum : 0;
            }
            lse[h * sq + i] = sum > 0 ? m + log(sum) : -INFINITY;
        }
    }
    free(p);
}

/* Naive gradients in double: [s, h, d] layouts, GQA (dk/dv summed over the query heads of a kv head),
 * bottom-right causal. P from the scores row by row, D = rowsum(dout * out), dv += P^T dout,
 * dP = dout v^T, dS = P * (dP - D), dq = scale * dS k, dk = scale * dS^T q. */
static void naive_backward(const float *q, const float *k, const float *v, const float *dout, double *dq, double *dk,
                           double *dv, int sq, int sk, int hq, int hk, int d, int causal) {
    double scale = 1.0 / sqrt((double)d);
    double *p = malloc(sizeof(double) * (sk > 0 ? sk : 1));
    double *o = malloc(sizeof(double) * d);
    memset(dq, 0, sizeof(double) * sq * hq * d);
    memset(dk, 0, sizeof(double) * sk * hk * d);
    memset(dv, 0, sizeof(double) * sk * hk * d);
    for (int h = 0; h < hq; h++) {
        int kh = h / (hq / hk);
        for (int i = 0; i < sq; i++) {
            int visible = causal ? i + sk - sq + 1 : sk;
            if (visible > sk) visible = sk;
            if (visible <= 0) continue; /* no key: every gradient of the row is 0 */
            const float *qi = q + (i * hq + h) * d, *doi = dout + (i * hq + h) * d;
            double m = -INFINITY, sum = 0, row_dot = 0;
            for (int j = 0; j < visible; j++) {
                double dot = 0;
                for (int c = 0; c < d; c++) dot += (double)qi[c] * k[(j * hk + kh) * d + c];
                p[j] = dot * scale;
                if (p[j] > m) m = p[j];
            }
            for (int j = 0; j < visible; j++) { p[j] = exp(p[j] - m); sum += p[j]; }
            for (int j = 0; j < visible; j++) p[j] /= sum;
            for (int c = 0; c < d; c++) {
                o[c] = 0;
                for (int j = 0; j < visible; j++) o[c] += p[j] * v[(j * hk + kh) * d + c];
                row_dot += doi[c] * o[c];
            }
            for (int j = 0; j < visible; j++) {
                const float *kj = k + (j * hk + kh) * d, *vj = v + (j * hk + kh) * d;
                double dp = 0;
                for (int c = 0; c < d; c++) dp += (double)doi[c] * vj[c];
                double ds = p[j] * (dp - row_dot);
                for (int c = 0; c < d; c++) {
                    dv[(j * hk + kh) * d + c] += p[j] * doi[c];
                    dq[(i * hq + h) * d + c] += scale * ds * kj[c];
                    dk[(j * hk + kh) * d + c] += scale * ds * qi[c];
                }
            }
        }
    }
    free(o);
    free(p);
}

/* max |x - ref| / max(max |ref|, 1e-30); 1e30 if any x is not finite. */
static double max_relative(const float *x, const double *ref, int n) {
    double worst = 0, largest = 1e-30;
    for (int i = 0; i < n; i++) {
        if (!isfinite(x[i])) return 1e30;
        worst = fmax(worst, fabs(x[i] - ref[i]));
        largest = fmax(largest, fabs(ref[i]));
    }
    return worst / largest;
}

static void set_tensor(const void **ptr, int64_t *strides, const void *data, int seq, int heads, int d) {
    *ptr = data;
    strides[0] = (int64_t)seq * heads * d; /* batch */
    strides[1] = (int64_t)heads * d;       /* row */
    strides[2] = d;                        /* head */
}

int main(int argc, char **argv) {
    if (argc < 2) { printf("usage: %s libFlashAttention.so\n", argv[0]); return 2; }
    void *lib = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (!lib) { printf("FAIL: dlopen: %s\n", dlerror()); return 1; }
    forward_fn forward = (forward_fn)must_sym(lib, "flash_attention_forward");
    init_fn init = (init_fn)must_sym(lib, "flash_attention_params_init");
    string_fn last_error = (string_fn)must_sym(lib, "flash_attention_last_error");
    status_string_fn status_string = (status_string_fn)must_sym(lib, "flash_attention_status_string");
    int_fn abi = (int_fn)must_sym(lib, "flash_attention_abi_version");
    string_fn version = (string_fn)must_sym(lib, "flash_attention_version_string");
    string_fn kernel_isa = (string_fn)must_sym(lib, "flash_attention_kernel_isa");
    string_fn available_isas = (string_fn)must_sym(lib, "flash_attention_available_isas");
    CHECK(abi() == FA_ABI_VERSION, "ABI %d, header %d", abi(), FA_ABI_VERSION);
    /* The path in use is one this CPU can run (FLASH_ATTENTION_ISA, when set, names it). */
    const char *forced = getenv("FLASH_ATTENTION_ISA");
    CHECK(strstr(available_isas(), kernel_isa()) != NULL, "kernel_isa %s not in %s", kernel_isa(), available_isas());
    CHECK(!forced || !*forced || strcmp(forced, kernel_isa()) == 0, "FLASH_ATTENTION_ISA=%s but kernel_isa %s", forced, kernel_isa());

    enum { SQ = 37, SK = 53, HQ = 4, HK = 2, D = 24 };
    static float q[SQ * HQ * D], k[SK * HK * D], v[SK * HK * D], out[SQ * HQ * D], lse[HQ * SQ];
    static double ref[SQ * HQ * D], ref_lse[HQ * SQ];
    unsigned state = 42;
    for (int i = 0; i < SQ * HQ * D; i++) q[i] = next_value(&state);
    for (int i = 0; i < SK * HK * D; i++) { k[i] = next_value(&state); v[i] = next_value(&state); }

    for (int causal = 0; causal <= 1; causal++) {
        flash_attention_params p;
        CHECK(init(&p, sizeof p) == FA_OK, "params_init");
        p.batch = 1; p.seqlen_q = SQ; p.seqlen_k = SK; p.heads_q = HQ; p.heads_kv = HK; p.head_dim = D;
        p.causal = causal;
        int64_t s[3];
        set_tensor(&p.q, s, q, SQ, HQ, D); p.q_batch_stride = s[0]; p.q_row_stride = s[1]; p.q_head_stride = s[2];
        set_tensor(&p.k, s, k, SK, HK, D); p.k_batch_stride = s[0]; p.k_row_stride = s[1]; p.k_head_stride = s[2];
        set_tensor(&p.v, s, v, SK, HK, D); p.v_batch_stride = s[0]; p.v_row_stride = s[1]; p.v_head_stride = s[2];
        p.out = out; p.out_batch_stride = SQ * HQ * D; p.out_row_stride = HQ * D; p.out_head_stride = D;
        p.lse = lse; p.lse_batch_stride = HQ * SQ; p.lse_head_stride = SQ; p.lse_row_stride = 1;
        flash_attention_status status = forward(&p);
        CHECK(status == FA_OK, "forward: %s", last_error());
        CHECK(strcmp(last_error(), "") == 0, "last_error after success: '%s'", last_error());
        naive(q, k, v, ref, ref_lse, SQ, SK, HQ, HK, D, causal);
        double worst = 0, worst_lse = 0;
        for (int i = 0; i < SQ * HQ * D; i++) worst = fmax(worst, fabs(out[i] - ref[i]));
        for (int i = 0; i < HQ * SQ; i++) worst_lse = fmax(worst_lse, fabs(lse[i] - ref_lse[i]));
        CHECK(worst <= 1e-5, "causal=%d max |out - ref| = %g", causal, worst);
        CHECK(worst_lse <= 1e-5, "causal=%d max |lse - ref| = %g", causal, worst_lse);

        /* head_dim_v: the values' first 7 columns (v read in place through its D-wide strides) give out's
         * first 7 columns, each output column depending on its value column only. */
        static float narrow[SQ * HQ * 7];
        flash_attention_params mla = p;
        mla.head_dim_v = 7;
        mla.out = narrow; mla.out_batch_stride = SQ * HQ * 7; mla.out_row_stride = HQ * 7; mla.out_head_stride = 7;
        CHECK(forward(&mla) == FA_OK, "head_dim_v forward: %s", last_error());
        worst = 0;
        for (int i = 0; i < SQ * HQ; i++)
            for (int c = 0; c < 7; c++) worst = fmax(worst, fabs(narrow[i * 7 + c] - ref[i * D + c]));
        CHECK(worst <= 1e-5, "causal=%d head_dim_v 7: max |out - ref| = %g", causal, worst);
        mla.head_dim_v = 1025;
        CHECK(forward(&mla) == FA_ERROR_INVALID_SHAPE, "head_dim_v 1025");
        CHECK(strstr(last_error(), "head_dim_v (1025)") != NULL, "message: %s", last_error());
        /* A caller compiled against 0.5 or the 0.6 header before head_dim_v (FA_PARAMS_SIZE_V4, _V5) has no
         * head_dim_v: whatever lies in its place is not read, and v and out keep head_dim columns. */
        for (int size = 0; size < 2; size++) {
            flash_attention_params old = p;
            old.struct_size = size ? FA_PARAMS_SIZE_V5 : FA_PARAMS_SIZE_V4;
            old.head_dim_v = 7;
            CHECK(forward(&old) == FA_OK, "params of size %d: %s", (int)old.struct_size, last_error());
            worst = 0;
            for (int i = 0; i < SQ * HQ * D; i++) worst = fmax(worst, fabs(out[i] - ref[i]));
            CHECK(worst <= 1e-5, "causal=%d params of size %d: max |out - ref| = %g", causal, (int)old.struct_size, worst);
        }

        /* Bad input: an error code, a message naming the argument, and out left untouched. */
        memset(out, 0x7f, sizeof out);
        flash_attention_params bad = p;
        bad.heads_kv = 3;
        CHECK(forward(&bad) == FA_ERROR_INVALID_SHAPE, "heads_q %% heads_kv");
        CHECK(strstr(last_error(), "heads_q (4) is not a multiple of heads_kv (3)") != NULL, "message: %s", last_error());
        bad = p; bad.k = NULL;
        CHECK(forward(&bad) == FA_ERROR_NULL_POINTER, "NULL k");
        CHECK(strstr(last_error(), "k is NULL") != NULL, "message: %s", last_error());
        bad = p; bad.head_dim = 0;
        CHECK(forward(&bad) == FA_ERROR_INVALID_SHAPE, "head_dim 0");
        bad = p; bad.q_dim_stride = 3;
        CHECK(forward(&bad) == FA_ERROR_INVALID_STRIDE, "q_dim_stride");
        bad = p; bad.num_threads = -4;
        CHECK(forward(&bad) == FA_ERROR_INVALID_ARGUMENT, "num_threads");
        bad = p; bad.struct_size = 3;
        CHECK(forward(&bad) == FA_ERROR_UNSUPPORTED, "struct_size");
        CHECK(forward(NULL) == FA_ERROR_NULL_POINTER, "NULL params");
        unsigned char sentinel[sizeof out];
        memset(sentinel, 0x7f, sizeof sentinel);
        CHECK(memcmp(out, sentinel, sizeof out) == 0, "a rejected call wrote to out");
    }

    /* Backward: forward with lse, then gradients of sum(out * dout), against naive_backward. */
    backward_fn backward = (backward_fn)must_sym(lib, "flash_attention_backward");
    backward_init_fn backward_init = (backward_init_fn)must_sym(lib, "flash_attention_backward_params_init");
    enum { BSQ = 5, BSK = 7, BHQ = 2, BHK = 1, BD = 4 };
    static float bq[BSQ * BHQ * BD], bk[BSK * BHK * BD], bv[BSK * BHK * BD], bout[BSQ * BHQ * BD], blse[BHQ * BSQ];
    static float bdout[BSQ * BHQ * BD], bdq[BSQ * BHQ * BD], bdk[BSK * BHK * BD], bdv[BSK * BHK * BD];
    static double ref_dq[BSQ * BHQ * BD], ref_dk[BSK * BHK * BD], ref_dv[BSK * BHK * BD];
    for (int i = 0; i < BSQ * BHQ * BD; i++) { bq[i] = next_value(&state); bdout[i] = next_value(&state); }
    for (int i = 0; i < BSK * BHK * BD; i++) { bk[i] = next_value(&state); bv[i] = next_value(&state); }
    for (int causal = 0; causal <= 1; causal++) {
        flash_attention_params p;
        CHECK(init(&p, sizeof p) == FA_OK, "params_init");
        p.batch = 1; p.seqlen_q = BSQ; p.seqlen_k = BSK; p.heads_q = BHQ; p.heads_kv = BHK; p.head_dim = BD;
        p.causal = causal;
        int64_t s[3];
        set_tensor(&p.q, s, bq, BSQ, BHQ, BD); p.q_batch_stride = s[0]; p.q_row_stride = s[1]; p.q_head_stride = s[2];
        set_tensor(&p.k, s, bk, BSK, BHK, BD); p.k_batch_stride = s[0]; p.k_row_stride = s[1]; p.k_head_stride = s[2];
        set_tensor(&p.v, s, bv, BSK, BHK, BD); p.v_batch_stride = s[0]; p.v_row_stride = s[1]; p.v_head_stride = s[2];
        p.out = bout; p.out_batch_stride = BSQ * BHQ * BD; p.out_row_stride = BHQ * BD; p.out_head_stride = BD;
        p.lse = blse; p.lse_batch_stride = BHQ * BSQ; p.lse_head_stride = BSQ; p.lse_row_stride = 1;
        CHECK(forward(&p) == FA_OK, "forward for backward: %s", last_error());

        flash_attention_backward_params bp;
        CHECK(backward_init(&bp, sizeof bp) == FA_OK, "backward_params_init");
        bp.forward = &p;
        bp.dout = bdout; bp.dout_batch_stride = BSQ * BHQ * BD; bp.dout_row_stride = BHQ * BD; bp.dout_head_stride = BD;
        bp.dq = bdq; bp.dq_batch_stride = BSQ * BHQ * BD; bp.dq_row_stride = BHQ * BD; bp.dq_head_stride = BD;
        bp.dk = bdk; bp.dk_batch_stride = BSK * BHK * BD; bp.dk_row_stride = BHK * BD; bp.dk_head_stride = BD;
        bp.dv = bdv; bp.dv_batch_stride = BSK * BHK * BD; bp.dv_row_stride = BHK * BD; bp.dv_head_stride = BD;
        memset(bdq, 0x7f, sizeof bdq); memset(bdk, 0x7f, sizeof bdk); memset(bdv, 0x7f, sizeof bdv);
        CHECK(backward(&bp) == FA_OK, "backward: %s", last_error());
        CHECK(strcmp(last_error(), "") == 0, "last_error after backward: '%s'", last_error());
        naive_backward(bq, bk, bv, bdout, ref_dq, ref_dk, ref_dv, BSQ, BSK, BHQ, BHK, BD, causal);
        double err_dq = max_relative(bdq, ref_dq, BSQ * BHQ * BD), err_dk = max_relative(bdk, ref_dk, BSK * BHK * BD);
        double err_dv = max_relative(bdv, ref_dv, BSK * BHK * BD);
        CHECK(err_dq <= 1e-5, "causal=%d backward dq: max error / max |ref| = %g", causal, err_dq);
        CHECK(err_dk <= 1e-5, "causal=%d backward dk: max error / max |ref| = %g", causal, err_dk);
        CHECK(err_dv <= 1e-5, "causal=%d backward dv: max error / max |ref| = %g", causal, err_dv);

        /* A NULL dq: an error code, a message naming dq, and no gradient written. */
        memset(bdk, 0x7f, sizeof bdk);
        flash_attention_backward_params bad = bp;
        bad.dq = NULL;
        CHECK(backward(&bad) == FA_ERROR_NULL_POINTER, "backward NULL dq");
        CHECK(strstr(last_error(), "dq is NULL") != NULL, "message: %s", last_error());
        bad = bp; bad.struct_size = 3;
        CHECK(backward(&bad) == FA_ERROR_UNSUPPORTED, "backward struct_size");
        CHECK(strstr(last_error(), "struct_size (3)") != NULL, "message: %s", last_error());
        CHECK(backward(NULL) == FA_ERROR_NULL_POINTER, "backward NULL params");
        unsigned char sentinel[sizeof bdk];
        memset(sentinel, 0x7f, sizeof sentinel);
        CHECK(memcmp(bdk, sentinel, sizeof bdk) == 0, "a rejected backward call wrote to dk");
    }

    CHECK(strcmp(status_string(12345), "unknown status code") == 0, "unknown status string");
    CHECK(status_string(FA_ERROR_NULL_POINTER) != NULL && *status_string(FA_ERROR_NULL_POINTER), "status string");
    printf("%s: dlopen test of libFlashAttention %s on kernel path %s\n", failures ? "FAILED" : "ok", version(), kernel_isa());
    return failures ? 1 : 0;
}

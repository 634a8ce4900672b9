/* Parity tests of the NEON kernel copy, compiled for aarch64 and run under qemu (`make test-arm64`): each case
 * builds a dense problem from seeded N(0, 1) values, runs it through the copy's kernel table (Harness.swift) and
 * compares with a float64 reference computed here from the same stored values.
 *
 * Tolerance policy (the Swift tests' float32 policy, Tests/FlashAttentionTests/Support.swift, widened by the
 * output type's rounding): out  ‖x − ref‖/‖ref‖ ≤ 2e-6 + u and max |x − ref| ≤ 1e-5 + u·|ref| (u = 0 for
 * float32, 2^-11 float16, 2^-8 bfloat16: one rounding of the stored result); LSE (always float32) within 1e-5,
 * −inf exactly where the reference has it; gradients ‖x − ref‖/‖ref‖ ≤ 1e-5 + u; exp2 within 2.3 ulp. */
#include "arm64_harness.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { F32 = 0, F16 = 1, BF16 = 2, I8 = 3, E4M3 = 4 };
static const char *dtype_names[] = {"f32", "f16", "bf16", "i8", "e4m3"};

static int passed, failed;

/* ---- seeded N(0, 1) values ---- */
static unsigned long long rng_state;
static double uniform(void) {
    rng_state = rng_state * 6364136223846793005ULL + 1442695040888963407ULL;
    return ((rng_state >> 11) + 0.5) * (1.0 / 9007199254740992.0);
}
static double normal(void) { return sqrt(-2 * log(uniform())) * cos(6.283185307179586 * uniform()); }

/* ---- storage types ---- */
static size_t element_size(int t) { return t == F32 ? 4 : t <= BF16 ? 2 : 1; }

static double e4m3_value(unsigned char byte) {
    unsigned em = byte & 0x7F;
    double x = em < 8 ? em * ldexp(1, -9) : ldexp(1 + (em & 7) / 8.0, (int)(em >> 3) - 7);
    return byte & 0x80 ? -x : x;
}

static float bf16_to_float(unsigned short h) {
    unsigned bits = (unsigned)h << 16;
    float x;
    memcpy(&x, &bits, 4);
    return x;
}

static unsigned short float_to_bf16(float x) {
    unsigned bits;
    memcpy(&bits, &x, 4);
    return (unsigned short)((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
}

/* Element i of a buffer of type t, as a double (8-bit types without their scale). */
static double get(const void *p, int t, size_t i) {
    switch (t) {
    case F32: return ((const float *)p)[i];
    case F16: return (double)((const _Float16 *)p)[i];
    case BF16: return bf16_to_float(((const unsigned short *)p)[i]);
    case I8: return ((const signed char *)p)[i];
    default: return e4m3_value(((const unsigned char *)p)[i]);
    }
}

/* A buffer of n values of type t drawn from N(0, 1) (8-bit: random codes, NaN codes excluded). */
static void *random_tensor(int t, size_t n) {
    void *p = malloc(n * element_size(t) + 64);
    for (size_t i = 0; i < n; i++) {
        float x = (float)normal();
        switch (t) {
        case F32: ((float *)p)[i] = x; break;
        case F16: ((_Float16 *)p)[i] = (_Float16)x; break;
        case BF16: ((unsigned short *)p)[i] = float_to_bf16(x); break;
        case I8: ((signed char *)p)[i] = (signed char)(uniform() * 255 - 127); break;
        default: {
            unsigned char byte = (unsigned char)(uniform() * 256);
            if ((byte & 0x7F) == 0x7F) byte ^= 1;
            ((unsigned char *)p)[i] = byte;
        }
        }
    }
    return p;
}

static double *to_double(const void *p, int t, size_t n, const float *row_scale, size_t d) {
    double *x = malloc(n * sizeof *x);
    for (size_t i = 0; i < n; i++) x[i] = get(p, t, i) * (row_scale ? row_scale[i / d] : 1.0);
    return x;
}

/* ---- the case ---- */
typedef struct {
    int64_t b, sq, sk, hq, hkv, d;
    int dtype, kv_dtype;
    float softcap;
    int64_t left, right; /* < 0: unbounded */
    int64_t dv;          /* v's, out's (and dout's, dv's) head size; 0: d */
} shape;

static void name_of(const shape *s, const char *kind, char *out, size_t n) {
    char mask[64] = "";
    if (s->right == 0 && s->left < 0) snprintf(mask, sizeof mask, "-causal");
    else if (s->left >= 0 || s->right >= 0) snprintf(mask, sizeof mask, "-window%lld,%lld", (long long)s->left, (long long)s->right);
    char cap[32] = "";
    if (s->softcap > 0) snprintf(cap, sizeof cap, "-softcap%g", s->softcap);
    char types[32];
    if (s->kv_dtype != s->dtype) snprintf(types, sizeof types, "%s/kv-%s", dtype_names[s->dtype], dtype_names[s->kv_dtype]);
    else snprintf(types, sizeof types, "%s", dtype_names[s->dtype]);
    char dv[32] = "";
    if (s->dv) snprintf(dv, sizeof dv, "/%lld", (long long)s->dv);
    snprintf(out, n, "%s %s b%lld-h%lld/%lld-s%lldx%lld-d%lld%s%s%s", kind, types, (long long)s->b, (long long)s->hq,
             (long long)s->hkv, (long long)s->sq, (long long)s->sk, (long long)s->d, dv, mask, cap);
}

static double rounding_of(int t) { return t == F16 ? ldexp(1, -11) : t == BF16 ? ldexp(1, -8) : 0; }

/* Keys [lo, hi) that query i sees (bottom-right aligned). */
static void visible(const shape *s, int64_t i, int64_t *lo, int64_t *hi) {
    int64_t aligned = i + s->sk - s->sq;
    *lo = s->left >= 0 ? (aligned - s->left > 0 ? aligned - s->left : 0) : 0;
    *hi = s->right >= 0 ? (aligned + s->right + 1 < s->sk ? aligned + s->right + 1 : s->sk) : s->sk;
    if (*lo >= *hi) *lo = *hi = 0;
}

/* Index of element (b, row, h, c) in a [b, rows, heads, d] tensor. */
static size_t at(int64_t b, int64_t row, int64_t h, int64_t c, int64_t rows, int64_t heads, int64_t d) {
    return (size_t)(((b * rows + row) * heads + h) * d + c);
}

typedef struct {
    shape s;
    fa_arm64_problem p;
    double *q, *k, *v; /* the stored values as doubles (8-bit: times their scale) */
    double scale;
} problem;

static problem make_problem(shape s, unsigned long long seed) {
    if (!s.dv) s.dv = s.d;
    problem P = {.s = s};
    rng_state = seed;
    size_t nq = (size_t)(s.b * s.sq * s.hq * s.d), nk = (size_t)(s.b * s.sk * s.hkv * s.d);
    size_t nv = (size_t)(s.b * s.sk * s.hkv * s.dv), nout = (size_t)(s.b * s.sq * s.hq * s.dv);
    fa_arm64_problem *p = &P.p;
    memset(p, 0, sizeof *p);
    p->batch = s.b, p->seqlen_q = s.sq, p->seqlen_k = s.sk, p->heads_q = s.hq, p->heads_kv = s.hkv, p->head_dim = s.d;
    p->head_dim_v = s.dv;
    p->dtype = s.dtype, p->kv_dtype = s.kv_dtype;
    P.scale = (float)(1 / sqrt((double)s.d));
    p->scale = (float)P.scale, p->softcap = s.softcap, p->window_left = s.left, p->window_right = s.right;
    p->q = random_tensor(s.dtype, nq);
    p->k = random_tensor(s.kv_dtype, nk);
    p->v = random_tensor(s.kv_dtype, nv);
    if (s.kv_dtype >= I8) {
        size_t rows = (size_t)(s.b * s.sk * s.hkv);
        p->k_scale = malloc(rows * sizeof(float));
        p->v_scale = malloc(rows * sizeof(float));
        /* Values of order 1, as the N(0, 1) cases (E4M3 codes reach 448, int8 127), so one bound fits all. */
        double unit = s.kv_dtype == E4M3 ? 1.0 / 256 : 1.0 / 64;
        for (size_t r = 0; r < rows; r++) {
            p->k_scale[r] = (float)(unit * (0.5 + uniform()));
            p->v_scale[r] = (float)(unit * (0.5 + uniform()));
        }
    }
    p->out = calloc(nout + 16, element_size(s.dtype));
    p->lse = calloc((size_t)(s.b * s.hq * s.sq) + 16, sizeof(float));
    P.q = to_double(p->q, s.dtype, nq, NULL, 1);
    P.k = to_double(p->k, s.kv_dtype, nk, p->k_scale, (size_t)s.d);
    P.v = to_double(p->v, s.kv_dtype, nv, p->v_scale, (size_t)s.dv);
    return P;
}

/* The score of query (b, i, h) against key j as the forward computes it (scaled, then softcapped). */
static double score(const problem *P, int64_t b, int64_t i, int64_t h, int64_t j) {
    const shape *s = &P->s;
    int64_t kh = h / (s->hq / s->hkv);
    double acc = 0;
    for (int64_t c = 0; c < s->d; c++)
        acc += P->q[at(b, i, h, c, s->sq, s->hq, s->d)] * P->k[at(b, j, kh, c, s->sk, s->hkv, s->d)];
    acc *= P->scale;
    return s->softcap > 0 ? s->softcap * tanh(acc / s->softcap) : acc;
}

/* Reference forward: out [b, sq, hq, dv] and lse [b, hq, sq] in float64. */
static void reference_forward(const problem *P, double *out, double *lse) {
    const shape *s = &P->s;
    double *w = malloc((size_t)s->sk * sizeof *w);
    for (int64_t b = 0; b < s->b; b++)
        for (int64_t h = 0; h < s->hq; h++)
            for (int64_t i = 0; i < s->sq; i++) {
                int64_t lo, hi, kh = h / (s->hq / s->hkv);
                visible(s, i, &lo, &hi);
                double m = -INFINITY, total = 0;
                for (int64_t j = lo; j < hi; j++) {
                    w[j] = score(P, b, i, h, j);
                    if (w[j] > m) m = w[j];
                }
                for (int64_t j = lo; j < hi; j++) total += (w[j] = exp(w[j] - m));
                for (int64_t c = 0; c < s->dv; c++) {
                    double acc = 0;
                    for (int64_t j = lo; j < hi; j++) acc += w[j] * P->v[at(b, j, kh, c, s->sk, s->hkv, s->dv)];
                    out[at(b, i, h, c, s->sq, s->hq, s->dv)] = hi > lo ? acc / total : 0;
                }
                lse[(b * s->hq + h) * s->sq + i] = hi > lo ? m + log(total) : -INFINITY;
            }
    free(w);
}

static void report(const char *name, int ok, const char *detail) {
    if (ok) passed++;
    else failed++;
    printf("%s %s  %s\n", ok ? "ok  " : "FAIL", name, detail);
}

static void free_problem(problem *P) {
    free(P->p.q), free(P->p.k), free(P->p.v), free(P->p.out), free(P->p.lse), free(P->p.k_scale), free(P->p.v_scale);
    free(P->q), free(P->k), free(P->v);
}

static void forward_case(shape s) {
    char name[160];
    name_of(&s, "forward", name, sizeof name);
    problem P = make_problem(s, 1234 + (unsigned long long)(s.sq * 7919 + s.sk * 31 + s.d));
    size_t nq = (size_t)(s.b * s.sq * s.hq * P.s.dv), nl = (size_t)(s.b * s.hq * s.sq);
    double *ref = malloc(nq * sizeof *ref), *ref_lse = malloc(nl * sizeof *ref_lse);
    reference_forward(&P, ref, ref_lse);
    int splits = fa_arm64_forward(&P.p);
    double u = rounding_of(s.dtype), diff2 = 0, ref2 = 0, worst = 0, lse_worst = 0;
    int inf_agree = 1;
    for (size_t i = 0; i < nq; i++) {
        double x = get(P.p.out, s.dtype, i), r = ref[i];
        diff2 += (x - r) * (x - r), ref2 += r * r;
        double excess = isnan(x) ? INFINITY : fabs(x - r) - u * fabs(r);
        if (excess > worst) worst = excess;
    }
    for (size_t i = 0; i < nl; i++) {
        if (ref_lse[i] == -INFINITY) inf_agree &= P.p.lse[i] == -INFINITY;
        else {
            double e = isnan(P.p.lse[i]) ? INFINITY : fabs(P.p.lse[i] - ref_lse[i]);
            if (e > lse_worst) lse_worst = e;
        }
    }
    double relative = ref2 == 0 ? sqrt(diff2) : sqrt(diff2 / ref2);
    int ok = relative <= 2e-6 + u && worst <= 1e-5 && lse_worst <= 1e-5 && inf_agree;
    char detail[160];
    snprintf(detail, sizeof detail, "rel %.2e  max-excess %.2e  lse %.2e%s  splits %d", relative, worst, lse_worst,
             inf_agree ? "" : "  (-inf LSE mismatch)", splits);
    report(name, ok, detail);
    free(ref), free(ref_lse);
    free_problem(&P);
}

/* ‖x − ref‖/‖ref‖ of a stored tensor (the absolute norm where ‖ref‖ ≤ 1e-6). */
static double relative_error(const void *x, int t, const double *ref, size_t n) {
    double diff2 = 0, ref2 = 0;
    for (size_t i = 0; i < n; i++) {
        double v = get(x, t, i);
        if (!isfinite(v)) return INFINITY;
        diff2 += (v - ref[i]) * (v - ref[i]), ref2 += ref[i] * ref[i];
    }
    return sqrt(ref2) <= 1e-6 ? sqrt(diff2) : sqrt(diff2 / ref2);
}

static void backward_case(shape s) {
    char name[160];
    name_of(&s, "backward", name, sizeof name);
    problem P = make_problem(s, 777 + (unsigned long long)(s.sq * 131 + s.sk * 17 + s.d));
    const int64_t e = P.s.dv; /* values' head size */
    size_t nq = (size_t)(s.b * s.sq * s.hq * s.d), nk = (size_t)(s.b * s.sk * s.hkv * s.d), nl = (size_t)(s.b * s.hq * s.sq);
    size_t no = (size_t)(s.b * s.sq * s.hq * e), nv = (size_t)(s.b * s.sk * s.hkv * e);
    fa_arm64_problem *p = &P.p;
    p->dout = random_tensor(s.dtype, no);
    p->dq = calloc(nq + 16, element_size(s.dtype));
    p->dk = calloc(nk + 16, element_size(s.kv_dtype));
    p->dv = calloc(nv + 16, element_size(s.kv_dtype));
    fa_arm64_forward(p);
    double *ref_out = malloc(no * sizeof(double)), *lse = malloc(nl * sizeof(double));
    reference_forward(&P, ref_out, lse);
    double *dout = to_double(p->dout, s.dtype, no, NULL, 1), *out = to_double(p->out, s.dtype, no, NULL, 1);
    double *dq = calloc(nq, sizeof(double)), *dk = calloc(nk, sizeof(double)), *dv = calloc(nv, sizeof(double));
    int64_t g = s.hq / s.hkv;
    for (int64_t b = 0; b < s.b; b++)
        for (int64_t h = 0; h < s.hq; h++)
            for (int64_t i = 0; i < s.sq; i++) {
                int64_t lo, hi, kh = h / g;
                visible(&s, i, &lo, &hi);
                double D = 0; /* rowsum(dO ∘ O) with O as the forward stored it, as FlashAttention-2 does */
                for (int64_t c = 0; c < e; c++) D += dout[at(b, i, h, c, s.sq, s.hq, e)] * out[at(b, i, h, c, s.sq, s.hq, e)];
                for (int64_t j = lo; j < hi; j++) {
                    double raw = 0;
                    for (int64_t c = 0; c < s.d; c++) raw += P.q[at(b, i, h, c, s.sq, s.hq, s.d)] * P.k[at(b, j, kh, c, s.sk, s.hkv, s.d)];
                    raw *= P.scale;
                    double x = raw, derivative = 1;
                    if (s.softcap > 0) {
                        double t = tanh(raw / s.softcap);
                        x = s.softcap * t, derivative = 1 - t * t;
                    }
                    double pij = exp(x - lse[(b * s.hq + h) * s.sq + i]), dp = 0;
                    for (int64_t c = 0; c < e; c++) dp += dout[at(b, i, h, c, s.sq, s.hq, e)] * P.v[at(b, j, kh, c, s.sk, s.hkv, e)];
                    double ds = pij * (dp - D) * derivative;
                    for (int64_t c = 0; c < s.d; c++) {
                        dq[at(b, i, h, c, s.sq, s.hq, s.d)] += P.scale * ds * P.k[at(b, j, kh, c, s.sk, s.hkv, s.d)];
                        dk[at(b, j, kh, c, s.sk, s.hkv, s.d)] += P.scale * ds * P.q[at(b, i, h, c, s.sq, s.hq, s.d)];
                    }
                    for (int64_t c = 0; c < e; c++) dv[at(b, j, kh, c, s.sk, s.hkv, e)] += pij * dout[at(b, i, h, c, s.sq, s.hq, e)];
                }
            }
    fa_arm64_backward(p);
    double u = rounding_of(s.dtype), bound = 1e-5 + u;
    double eq = relative_error(p->dq, s.dtype, dq, nq), ek = relative_error(p->dk, s.kv_dtype, dk, nk);
    double ev = relative_error(p->dv, s.kv_dtype, dv, nv);
    char detail[160];
    snprintf(detail, sizeof detail, "dq %.2e  dk %.2e  dv %.2e  (bound %.1e)", eq, ek, ev, bound);
    report(name, eq <= bound && ek <= bound && ev <= bound, detail);
    free(p->dout), free(p->dq), free(p->dk), free(p->dv);
    free(ref_out), free(lse), free(dout), free(out), free(dq), free(dk), free(dv);
    free_problem(&P);
}

/* exp2 over [-126, 0] (every 1/1024, plus the grid's odd points), against the float64 value: ≤ 2.3 ulp. */
static void exp2_case(void) {
    enum { N = 126 * 1024 + 1 };
    static float x[N + 3];
    for (int i = 0; i < N; i++) x[i] = -(float)i / 1024.0f - (i % 3 ? 0.000123f * (float)(i % 7) : 0);
    x[N] = -INFINITY, x[N + 1] = NAN, x[N + 2] = 0;
    static float y[N + 3];
    memcpy(y, x, sizeof x);
    fa_arm64_exp2(y, N + 3);
    double worst = 0;
    for (int i = 0; i < N; i++) {
        if (x[i] < -126) continue;
        double r = exp2((double)x[i]), ulp = ldexp(1, ilogb(r) - 23);
        double e = fabs(y[i] - r) / ulp;
        if (!(e <= worst)) worst = e;
    }
    int special = y[N] >= 0 && y[N] < 1e-37f && isnan(y[N + 1]) && y[N + 2] == 1;
    char detail[96];
    snprintf(detail, sizeof detail, "max %.2f ulp over [-126, 0]%s", worst, special ? "" : "  (-inf/NaN/0 wrong)");
    report("exp2 f32 accuracy", worst <= 2.3 && special, detail);
}

int main(void) {
    printf("NEON kernel copy for aarch64: %lld-float vectors, %lld-row micro-tiles\n", (long long)fa_arm64_lanes(),
           (long long)fa_arm64_micro_rows());
    exp2_case();
    /* b, sq, sk, hq, hkv, d, dtype, kv_dtype, softcap, left, right */
    const shape forward[] = {
        {2, 113, 203, 4, 4, 59, F32, F32, 0, -1, -1},
        {1, 113, 203, 4, 2, 59, F32, F32, 0, -1, 0},
        {1, 203, 113, 6, 2, 40, F32, F32, 0, -1, 0},     /* seqlen_q > seqlen_k: rows that see no key */
        {1, 150, 150, 2, 1, 64, F32, F32, 0, 32, 8},
        {1, 97, 130, 2, 2, 111, F32, F32, 5, -1, 0},
        {1, 600, 600, 1, 1, 64, F32, F32, 0, -1, 0},     /* several query and key blocks */
        {1, 33, 47, 1, 1, 1, F32, F32, 0, -1, -1},
        {1, 40, 70, 2, 1, 256, F32, F32, 0, -1, -1},
        {2, 1, 700, 8, 2, 128, F32, F32, 0, -1, -1},     /* decode, GQA 4 */
        {1, 4, 333, 4, 1, 64, F32, F32, 0, -1, 0},       /* decode, causal */
        {1, 3, 190, 4, 4, 48, F32, F32, 0, 50, 0},       /* decode, window */
        {1, 1, 2100, 8, 2, 64, F32, F32, 0, -1, -1},     /* decode split along the keys, merged */
        {1, 2, 1500, 4, 4, 64, BF16, BF16, 0, -1, 0},    /* the same, causal, bfloat16 */
        {1, 113, 203, 4, 2, 64, F16, F16, 0, -1, 0},
        {1, 77, 190, 2, 2, 96, BF16, BF16, 0, 20, -1},
        {1, 1, 500, 8, 2, 128, F16, F16, 0, -1, -1},
        {1, 2, 257, 4, 4, 80, BF16, BF16, 30, -1, -1},
        {1, 1, 300, 8, 2, 64, F32, I8, 0, -1, -1},
        {1, 64, 300, 4, 2, 64, F32, I8, 0, -1, 0},
        {1, 64, 129, 4, 2, 64, F32, E4M3, 0, -1, 0},
        {1, 1, 200, 4, 1, 64, F16, E4M3, 0, -1, -1},
        {1, 61, 75, 4, 2, 48, F32, F32, 0, -1, 0, 24},   /* value heads narrower than keys (MLA) */
        {1, 1, 900, 16, 1, 576, BF16, BF16, 0, -1, -1, 512}, /* MLA decoding: 16 heads on one kv head */
        {1, 37, 40, 2, 2, 17, F32, F32, 0, -1, -1, 40},  /* value heads wider than keys */
    };
    for (size_t i = 0; i < sizeof forward / sizeof *forward; i++) forward_case(forward[i]);
    const shape backward[] = {
        {1, 113, 203, 2, 2, 59, F32, F32, 0, -1, -1},
        {1, 130, 130, 4, 2, 64, F32, F32, 0, -1, 0},
        {1, 97, 150, 2, 1, 40, F32, F32, 0, 30, 10},
        {1, 64, 100, 2, 2, 64, F32, F32, 10, -1, 0},
        {1, 203, 113, 2, 2, 32, F32, F32, 0, -1, 0},
        {2, 300, 250, 4, 2, 64, F32, F32, 0, -1, -1},   /* several key blocks and chunks */
        {1, 113, 203, 2, 2, 64, F16, F16, 0, -1, 0},
        {1, 80, 120, 4, 2, 48, BF16, BF16, 0, -1, -1},
        {1, 7, 9, 1, 1, 1, F32, F32, 0, -1, -1},
        {1, 61, 90, 4, 2, 48, F32, F32, 0, -1, 0, 24},   /* value heads narrower than keys (MLA) */
        {1, 40, 70, 2, 1, 17, F32, F32, 3, -1, -1, 40},  /* value heads wider than keys */
    };
    for (size_t i = 0; i < sizeof backward / sizeof *backward; i++) backward_case(backward[i]);
    printf("%d of %d cases passed\n", passed, passed + failed);
    return failed ? 1 : 0;
}

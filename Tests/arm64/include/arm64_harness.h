/* The test driver's view of the NEON kernels compiled for aarch64 (Harness.swift exports these). */
#ifndef FA_ARM64_HARNESS_H
#define FA_ARM64_HARNESS_H
#include <stdint.h>

/* One dense problem, tensors [batch, seq, heads, head_dim] contiguous. q/out/dout/dq have dtype; k/v (and dk/dv)
 * have kv_dtype (which may be int8 or float8 E4M3 with k_scale/v_scale [batch, seqlen_k, heads_kv] for the
 * forward). Windows < 0 are unbounded; causal is window_right = 0. */
typedef struct {
    int64_t batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim;
    int32_t dtype, kv_dtype;
    float scale, softcap;
    int64_t window_left, window_right;
    void *q, *k, *v, *out;
    float *lse;                 /* [batch, heads_q, seqlen_q] */
    float *k_scale, *v_scale;   /* 8-bit kv_dtype only, else NULL */
    void *dout, *dq, *dk, *dv;  /* backward only */
    int64_t head_dim_v;         /* v's, out's, dout's and dv's head size; 0 means head_dim */
} fa_arm64_problem;

/* Runs the forward through the kernel copy's table (plan, work items, split merge), one thread. 0 on success. */
int32_t fa_arm64_forward(const fa_arm64_problem *p);
/* Runs the backward's three phases through the table (needs out and lse from fa_arm64_forward). */
int32_t fa_arm64_backward(const fa_arm64_problem *p);
/* The copy's exp2 over count floats in place. */
void fa_arm64_exp2(float *values, int64_t count);
/* Floats per vector of the compiled copy, and its micro-tile rows. */
int64_t fa_arm64_lanes(void);
int64_t fa_arm64_micro_rows(void);
#endif

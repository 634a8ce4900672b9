"""The backward pass for bfloat16 q, k, v and dout on every kernel path, and the bfloat16 paths' pair products.

On the avx512bf16 and amxbf16 paths the five backward products multiply bfloat16 pairs accumulated in float32:
S = Q·Kᵀ and dP = dO·Vᵀ from the inputs, then P and dS rounded to bfloat16 for dV = Pᵀ·dO, dK = dSᵀ·Q and
dQ = dS·K, as FlashAttention-2 does on GPUs; the other paths widen to float32. Acceptance rule (FlashAttention-2's,
the issue's): each gradient's error against float64 gradients is at most 3× that of a bfloat16 backward — PyTorch's
bfloat16 SDPA where torch is installed, and always a float64 model of one (P and dS rounded to bfloat16 before
their products, the gradients rounded to bfloat16). `make test-python` runs this file on every path the CPU has.
"""

import numpy as np
import pytest

from flash_attention import flash_attn_backward, flash_attn_func, library_info, reference_attention_backward
from flash_attention.reference import _softmax

from conftest import BF16_PAIR_PATHS, assert_follows_rounding, bf16_problem, max_error, needs_torch, shape_id, torch_bf16_sdpa

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = ml_dtypes.bfloat16
PATH = library_info()["kernel_isa"]
PAIRS = PATH in BF16_PAIR_PATHS


def bf16_rounded(x):
    return np.asarray(x, np.float64).astype(BF16).astype(np.float64)


def bf16_backward_model(dout, q, k, v, out, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                        alibi_slopes=None, sinks=None, attn_mask=None):
    """float64 gradients with the roundings of a bfloat16 backward: P rounded to bfloat16 before dV = Pᵀ·dO, dS
    before dK and dQ, D from the stored (bfloat16) output, and the gradients rounded to bfloat16."""
    q64, v64, dout64 = (np.asarray(x, np.float64) for x in (q, v, dout))
    sk, group, d = k.shape[1], q.shape[2] // k.shape[2], q.shape[3]
    scale = 1 / np.sqrt(d) if softmax_scale is None else softmax_scale
    s = _softmax(q, k, softmax_scale, causal, window_size, softcap, alibi_slopes, sinks, attn_mask)
    p, vr = s["p"][..., :sk], np.repeat(v64, group, axis=2)
    dout_h = dout64.transpose(0, 2, 1, 3)
    dv = np.einsum("bhqk,bhqd->bkhd", bf16_rounded(p), dout_h)
    dp = np.einsum("bhqd,bkhd->bhqk", dout_h, vr)
    ds = p * (dp - np.einsum("bqhd,bqhd->bhq", dout64, np.asarray(out, np.float64))[..., None])
    if softcap > 0:
        ds = ds * (1 - np.tanh(s["raw"] / softcap) ** 2)
    ds = bf16_rounded(ds)
    dq = np.einsum("bhqk,bkhd->bqhd", ds, s["kr"]) * scale
    dk = np.einsum("bhqk,bqhd->bkhd", ds, q64) * scale
    b, _, hk, _ = k.shape
    dk, dv = (x.reshape(b, sk, hk, group, x.shape[3]).sum(axis=3) for x in (dk, dv))
    return tuple(bf16_rounded(x) for x in (dq, dk, dv))


def float32_floor(exact):
    """An error no float32 computation avoids where the rule's reference has none: dS = P ∘ (dP − D) is exactly 0
    in float64 where a row sees one key (dP and D are the same sum), and float32 sums in two orders leave ~1e-7
    of the gradients' scale there; 2^-17 of the largest gradient, a 256th of a bfloat16 ulp."""
    return 2.0**-17 * max(np.abs(g).max(initial=0) for g in exact[:3])


SHAPES = [  # (batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, options)
    (1, 1, 1, 1, 1, 1, {}),
    (1, 7, 13, 1, 1, 3, {"causal": True}),
    (2, 113, 203, 4, 2, 64, {"causal": True}),
    (1, 130, 77, 2, 1, 33, {}),
    (1, 200, 333, 4, 4, 80, {"window_size": (50, 7)}),
    (2, 97, 97, 3, 3, 127, {"window_size": (0, 0)}),
    (1, 150, 150, 2, 2, 64, {"causal": True, "softcap": 5.0}),
    (1, 150, 190, 4, 2, 96, {"alibi_slopes": np.array([0.5, 0.25, 0.125, 0.0625], np.float32)}),
    (1, 300, 300, 2, 2, 128, {"sinks": np.array([0.5, 2.0], np.float32)}),
    (1, 120, 171, 2, 2, 64, {"attn_mask": np.random.default_rng(5).random((120, 171)) < 0.5}),
    (1, 400, 330, 2, 1, 128, {"causal": True}),
]


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_gradients_within_three_times_a_bf16_backward(shape):
    b, sq, sk, hq, hk, d, options = shape
    q, k, v, dout = bf16_problem(90 + d, b, sq, sk, hq, hk, d, dout=True)
    out, lse = flash_attn_func(q, k, v, return_lse=True, **options)
    grads = flash_attn_backward(dout, q, k, v, out, lse, **options)
    assert all(g.dtype == BF16 for g in grads[:3])
    exact = reference_attention_backward(dout, q, k, v, **options)
    model = bf16_backward_model(dout, q, k, v, out, **options)
    for name, got, want, modelled in zip(("dq", "dk", "dv"), grads, exact, model):
        ours, theirs = max_error(got, want), max_error(modelled, want)
        assert ours <= 3 * theirs + float32_floor(exact), f"{PATH} {name}: error {ours:.3g} > 3 × {theirs:.3g} (bfloat16 model)"


def test_the_backward_rounds_probabilities_as_it_says():
    # One query row: dV[k] = P[k] · dO is a single product, exact in float32 once P is a bfloat16, so the pair
    # paths' dV is the model's (P rounded) bit for bit where the two models round apart, and the float32 paths'
    # follows exact gradients there. Widely spread scores make P's rounding visible.
    q, k, v, dout = bf16_problem(91, 1, 1, 64, 1, 1, 32, dout=True)
    q = (q.astype(np.float32) * 4).astype(BF16)
    out, lse = flash_attn_func(q, k, v, return_lse=True)
    dv = np.asarray(flash_attn_backward(dout, q, k, v, out, lse)[2], np.float64)
    rounded = bf16_backward_model(dout, q, k, v, out)[2]
    exact = bf16_rounded(reference_attention_backward(dout, q, k, v, out=out)[2])
    assert_follows_rounding(dv, exact, rounded, PAIRS, PATH)


def test_gradients_do_not_depend_on_the_thread_count():
    q, k, v, dout = bf16_problem(92, 2, 300, 520, 4, 2, 72, dout=True)
    for options in ({}, {"causal": True}, {"window_size": (100, 0)}):
        out, lse = flash_attn_func(q, k, v, return_lse=True, **options)
        one = flash_attn_backward(dout, q, k, v, out, lse, num_threads=1, **options)
        for threads in (2, 3, 0):
            other = flash_attn_backward(dout, q, k, v, out, lse, num_threads=threads, **options)
            assert all(a.tobytes() == b.tobytes() for a, b in zip(one, other)), (options, threads)


@needs_torch
@pytest.mark.parametrize("shape", [(1, 300, 300, 2, 2, 128, {}), (2, 113, 203, 4, 2, 64, {"causal": True}),
                                   (1, 1, 1, 1, 1, 1, {}), (1, 130, 77, 2, 1, 33, {}),
                                   (1, 400, 400, 2, 1, 128, {"causal": True})],
                         ids=shape_id)
def test_gradients_within_three_times_torch_bf16_sdpa(shape):
    b, sq, sk, hq, hk, d, options = shape
    causal = options.get("causal", False)
    q, k, v, dout = bf16_problem(95 + d, b, sq, sk, hq, hk, d, dout=True)
    out, lse = flash_attn_func(q, k, v, causal=causal, return_lse=True)
    grads = flash_attn_backward(dout, q, k, v, out, lse, causal=causal)
    exact = reference_attention_backward(dout, q, k, v, causal=causal)
    theirs = torch_bf16_sdpa(q, k, v, causal, dout)
    for name, got, want, torch_grad in zip(("dq", "dk", "dv"), grads, exact, theirs):
        ours, torch_error = max_error(got, want), max_error(torch_grad, want)
        assert ours <= 3 * torch_error + float32_floor(exact), f"{PATH} {name}: error {ours:.3g} > 3 × torch's {torch_error:.3g}"

"""float16 and bfloat16 storage with float32 arithmetic, for every entry point.

Acceptance rule (FlashAttention's): the error against float64 attention on the same (rounded) inputs is at
most twice the error of a float64 implementation whose output is rounded to the same dtype.
"""

import numpy as np
import pytest

from conftest import random_inputs
from flash_attention import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache, reference_attention
from flash_attention.reference import reference_kvcache_attention, reference_varlen_attention

ml_dtypes = pytest.importorskip("ml_dtypes")
DTYPES = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


def check_rule(out, ref, dtype):
    """out: the library's output in `dtype`; ref: float64 attention on the rounded inputs."""
    ours = np.abs(out.astype(np.float64) - ref).max(initial=0)
    rounded = np.abs(ref.astype(dtype).astype(np.float64) - ref).max(initial=0)
    assert ours <= 2 * rounded + 1e-12, f"error {ours:.3g} > 2 × {rounded:.3g}"
    return ours, rounded


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 113, 203, 4, 2, 64, True), (1, 300, 300, 2, 2, 128, False),
                                   (1, 7, 7, 1, 1, 3, True), (3, 1, 500, 8, 2, 128, True)],
                         ids=lambda s: f"b{s[0]}-s{s[1]}x{s[2]}-h{s[3]}/{s[4]}-d{s[5]}" + ("-causal" if s[6] else ""))
def test_forward_half(dtype, shape):
    b, sq, sk, hq, hk, d, causal = shape
    q, k, v = (x.astype(DTYPES[dtype]) for x in random_inputs(50, b, sq, sk, hq, hk, d))
    out, lse = flash_attn_func(q, k, v, causal=causal, return_lse=True)
    assert out.dtype == DTYPES[dtype] and lse.dtype == np.float32
    ref, ref_lse = reference_attention(q, k, v, causal=causal, return_lse=True)
    check_rule(out, ref, DTYPES[dtype])
    finite = np.isfinite(ref_lse)
    assert np.abs(lse[finite] - ref_lse[finite]).max(initial=0) <= 1e-5


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_half_views_and_options(dtype):
    q, k, v = (x.astype(DTYPES[dtype]) for x in random_inputs(51, 2, 130, 300, 4, 2, 40, layout="bhsd"))
    options = dict(causal=True, window_size=(64, 0), softcap=5.0, sinks=np.array([0.5, 1, 2, 3], np.float32))
    out = flash_attn_func(q, k, v, **options)
    check_rule(out, reference_attention(q, k, v, **options), DTYPES[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_float32_queries_against_half_keys(dtype):
    q, k, v = random_inputs(52, 2, 60, 200, 4, 2, 64)
    k, v = k.astype(DTYPES[dtype]), v.astype(DTYPES[dtype])
    out = flash_attn_func(q, k, v, causal=True)
    assert out.dtype == np.float32
    ref = reference_attention(q, k, v, causal=True)
    assert np.abs(out - ref).max() <= 1e-5  # the keys are exact in float32; only float32 arithmetic differs


@pytest.mark.parametrize("dtype", DTYPES)
def test_varlen_half(dtype):
    cu_q, cu_k = np.array([0, 5, 5, 300, 301], np.int32), np.array([0, 17, 40, 300, 900], np.int32)
    rng = np.random.default_rng(53)
    q = rng.standard_normal((301, 4, 64)).astype(DTYPES[dtype])
    k = rng.standard_normal((900, 2, 64)).astype(DTYPES[dtype])
    v = rng.standard_normal((900, 2, 64)).astype(DTYPES[dtype])
    out = flash_attn_varlen_func(q, k, v, cu_q, cu_k, causal=True)
    ref, _ = reference_varlen_attention(q, k, v, cu_q, cu_k, causal=True)
    check_rule(out, ref, DTYPES[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("q_dtype", ["same", "float32"])
@pytest.mark.parametrize("paged", [False, True])
def test_kvcache_half(dtype, q_dtype, paged):
    rng = np.random.default_rng(54)
    cache_dtype = DTYPES[dtype]
    qd = cache_dtype if q_dtype == "same" else np.float32
    batch, heads, heads_kv, d = 3, 8, 2, 128
    q = rng.standard_normal((batch, 2, heads, d)).astype(qd)
    k_new = rng.standard_normal((batch, 2, heads_kv, d)).astype(cache_dtype)
    v_new = rng.standard_normal((batch, 2, heads_kv, d)).astype(cache_dtype)
    seqlens = np.array([1000, 3, 2046], np.int32)
    if paged:
        k_cache = rng.standard_normal((3 * 128 + 1, 16, heads_kv, d)).astype(cache_dtype)
        v_cache = rng.standard_normal((3 * 128 + 1, 16, heads_kv, d)).astype(cache_dtype)
        kw = dict(block_table=rng.permutation(3 * 128 + 1)[:3 * 128].reshape(3, 128).astype(np.int32))
    else:
        k_cache = rng.standard_normal((batch, 2048, heads_kv, d)).astype(cache_dtype)
        v_cache = rng.standard_normal((batch, 2048, heads_kv, d)).astype(cache_dtype)
        kw = {}
    k0, v0 = k_cache.copy(), v_cache.copy()
    out = flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=seqlens, causal=True, **kw)
    assert out.dtype == qd
    ref, _ = reference_kvcache_attention(q, k0, v0, seqlens, k_new, v_new, causal=True, **kw)
    if qd == np.float32:
        assert np.abs(out - ref).max() <= 1e-5
    else:
        check_rule(out, ref, qd)
    # The appended rows are the new keys, bit for bit.
    if not paged:
        assert k_cache[0, 1000:1002].tobytes() == k_new[0].tobytes()


def test_rounding_is_nearest_even_and_keeps_nan():
    # One key: the output is exactly the value row, so the store's rounding shows directly (ties, the
    # largest finite half, overflow to inf, NaN).
    values = np.array([1.0, 1 + 2**-11, 1 + 3 * 2**-11, -2.5e-8, 65504, 70000, np.inf, np.nan], np.float32)
    for dtype in (np.float16, ml_dtypes.bfloat16):
        q = np.zeros((1, 1, 1, 8), dtype)
        k = np.zeros((1, 1, 1, 8), np.float32)
        out = flash_attn_func(q, k, values.reshape(1, 1, 1, 8)).ravel()
        with np.errstate(over="ignore"):
            expected = values.astype(dtype)
        assert out[:7].tobytes() == expected[:7].tobytes()
        assert np.isnan(out[7].astype(np.float32))

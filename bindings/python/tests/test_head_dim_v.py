"""Value heads of their own size (head_dim_v != head_dim, multi-head latent attention): forward and gradients of
the dense and varlen calls with every option, the KV cache (contiguous, paged, 8-bit, appends, split decoding,
MLA's absorbed decode where v is a view of k's first columns), thread invariance, the merge, and errors —
against the float64 reference."""

import ctypes

import numpy as np
import pytest

import flash_attention as fa
from conftest import assert_close, assert_gradient
from flash_attention import _capi
from flash_attention._loader import load
from flash_attention.reference import (reference_attention, reference_attention_backward,
                                       reference_kvcache_attention, reference_varlen_attention)


def qkv(seed, b, sq, sk, hq, hk, d, dv):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((b, sq, hq, d), dtype=np.float32), rng.standard_normal((b, sk, hk, d), dtype=np.float32),
            rng.standard_normal((b, sk, hk, dv), dtype=np.float32))


OPTIONS = {
    "plain": {},
    "causal": dict(causal=True),
    "window-softcap": dict(window_size=(17, 2), softcap=3.0),
    "alibi-sinks": dict(alibi_slopes=np.array([0.05, 0.1, 0.2, 0.4], np.float32),
                        sinks=np.array([0.5, -1.0, 0.0, 2.0], np.float32)),
    "mask": dict(attn_mask=np.random.default_rng(3).random((61, 75)) < 0.6),
}
# (batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, head_dim_v): MLA's prefill sizes (192/128), values
# wider and narrower than keys, sizes that are not a multiple of any vector width, head_dim_v 1.
SHAPES = [(1, 61, 75, 4, 2, 192, 128), (2, 33, 20, 4, 4, 24, 40), (1, 61, 75, 4, 1, 17, 1), (2, 1, 75, 4, 2, 64, 33)]


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}-s{}x{}-h{}/{}-d{}/{}".format(*s))
def test_forward_and_gradients_match_the_reference(options, shape):
    b, sq, sk, hq, hk, d, dv = shape
    options = dict(OPTIONS[options])
    if "attn_mask" in options:
        options["attn_mask"] = options["attn_mask"][:sq, :sk]
    q, k, v = qkv(d + dv, b, sq, sk, hq, hk, d, dv)
    out, lse, backward = fa.flash_attn_func_with_backward(q, k, v, **options)
    assert out.shape == (b, sq, hq, dv)
    ref, ref_lse = reference_attention(q, k, v, return_lse=True, **options)
    assert_close(out, lse, ref, ref_lse)
    dout = np.random.default_rng(5).standard_normal(out.shape).astype(np.float32)
    grads = backward(dout)
    assert [g.shape for g in grads[:3]] == [q.shape, k.shape, v.shape]
    for name, got, want in zip(("dq", "dk", "dv", "dsinks"), grads,
                               reference_attention_backward(dout, q, k, v, **options)):
        assert_gradient(name, got, want)


def test_half_precision_storage():
    q, k, v = qkv(7, 1, 40, 50, 2, 1, 48, 24)
    ml_dtypes = pytest.importorskip("ml_dtypes", reason="bfloat16 arrays need ml_dtypes")
    for dtype in (np.float16, ml_dtypes.bfloat16):
        q16, k16, v16 = (x.astype(dtype) for x in (q, k, v))
        out = fa.flash_attn_func(q16, k16, v16, causal=True)
        assert out.dtype == dtype and out.shape == (1, 40, 2, 24)
        ref = reference_attention(*(x.astype(np.float32) for x in (q16, k16, v16)), causal=True)
        assert np.abs(out.astype(np.float32) - ref).max() <= 1e-2


def test_varlen_forward_and_gradients():
    rng = np.random.default_rng(11)
    cu_q, cu_k = np.array([0, 5, 5, 45], np.int32), np.array([0, 9, 30, 70], np.int32)
    q = rng.standard_normal((45, 4, 40), dtype=np.float32)
    k = rng.standard_normal((70, 2, 40), dtype=np.float32)
    v = rng.standard_normal((70, 2, 72), dtype=np.float32)
    out, lse = fa.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 40, 40, causal=True, return_lse=True)
    ref, ref_lse = reference_varlen_attention(q, k, v, cu_q, cu_k, causal=True)
    assert_close(out, lse, ref, ref_lse)
    dout = rng.standard_normal(out.shape).astype(np.float32)
    dq, dk, dv = fa.flash_attn_varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, 40, 40, causal=True)
    for s in range(3):
        rows, keys = slice(cu_q[s], cu_q[s + 1]), slice(cu_k[s], cu_k[s + 1])
        want = reference_attention_backward(dout[None, rows], q[None, rows], k[None, keys], v[None, keys], causal=True)
        for name, got, w in zip(("dq", "dk", "dv"), (dq[rows], dk[keys], dv[keys]), want):
            assert_gradient(f"{name} of sequence {s}", got, w[0])


@pytest.mark.parametrize("heads_q", [16, 128, 5])
@pytest.mark.parametrize("cached", [[300, 41], [4100, 1]])
def test_mla_absorbed_decode_with_values_a_view_of_the_keys(heads_q, cached):
    """DeepSeek's absorbed decoding: one kv head of 576 = 512 latent + 64 rotary columns, the values the first 512
    columns of the same cache (a view, read in place), query heads sharing it; long caches split along the keys."""
    rng = np.random.default_rng(heads_q + cached[0])
    cache = rng.standard_normal((2, max(cached) + 7, 1, 576), dtype=np.float32)
    q = rng.standard_normal((2, 1, heads_q, 576), dtype=np.float32)
    seqlens = np.array(cached, np.int32)
    out, lse = fa.flash_attn_with_kvcache(q, cache, cache[..., :512], cache_seqlens=seqlens, return_lse=True)
    ref, ref_lse = reference_kvcache_attention(q, cache, cache[..., :512], seqlens)
    assert out.shape == (2, 1, heads_q, 512)
    assert_close(out, lse, ref, ref_lse)
    one = fa.flash_attn_with_kvcache(q, cache, cache[..., :512], cache_seqlens=seqlens, num_threads=1)
    assert np.array_equal(one, out), "thread count changed the result"


@pytest.mark.parametrize("quantized", [None, np.int8])
@pytest.mark.parametrize("page", [None, 16, 5])
def test_kvcache_appends_and_pages(quantized, page):
    rng = np.random.default_rng(21)
    d, dv, capacity = 40, 24, 48
    k_cache = rng.standard_normal((2, capacity, 2, d), dtype=np.float32)
    v_cache = rng.standard_normal((2, capacity, 2, dv), dtype=np.float32)
    k_new, v_new = rng.standard_normal((2, 3, 2, d), dtype=np.float32), rng.standard_normal((2, 3, 2, dv), dtype=np.float32)
    q = rng.standard_normal((2, 3, 6, d), dtype=np.float32)
    seqlens = np.array([17, 40], np.int32)
    table = None
    if page:
        blocks = capacity // page + (capacity % page > 0)
        order = rng.permutation(2 * blocks).astype(np.int32)
        table = order.reshape(2, blocks)
        paged = lambda c: np.stack([np.pad(c, ((0, 0), (0, blocks * page - capacity), (0, 0), (0, 0)))[b,
                                    i * page:(i + 1) * page] for b, i in sorted(
                                    ((b, i) for b in range(2) for i in range(blocks)), key=lambda x: table[x])])
        k_cache, v_cache = paged(k_cache), paged(v_cache)
    scales = {}
    if quantized:
        k_cache, k_scale = fa.quantize_kv(k_cache, quantized)
        v_cache, v_scale = fa.quantize_kv(v_cache, quantized)
        scales = dict(k_scale=k_scale, v_scale=v_scale)
        k_ref, v_ref = k_cache * k_scale[..., None], v_cache * v_scale[..., None]
    else:
        k_ref, v_ref = k_cache.copy(), v_cache.copy()
    out, lse = fa.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=seqlens, block_table=table,
                                         causal=True, return_lse=True, **scales)
    if quantized:  # the appended rows as the library quantized them
        k_ref, v_ref = k_cache * scales["k_scale"][..., None], v_cache * scales["v_scale"][..., None]
        ref, ref_lse = reference_kvcache_attention(q, k_ref, v_ref, seqlens + 3, block_table=table, causal=True)
    else:
        ref, ref_lse = reference_kvcache_attention(q, k_ref, v_ref, seqlens, k=k_new, v=v_new, block_table=table,
                                                   causal=True)
    assert out.shape == (2, 3, 6, dv)
    assert_close(out, lse, ref, ref_lse)


def test_merge_takes_the_value_head_size():
    q, k, v = qkv(31, 1, 9, 60, 2, 2, 32, 12)
    a, lse_a = fa.flash_attn_func(q, k[:, :25], v[:, :25], return_lse=True)
    b, lse_b = fa.flash_attn_func(q, k[:, 25:], v[:, 25:], return_lse=True)
    out, lse = fa.merge_attention_states(a, lse_a, b, lse_b)
    ref, ref_lse = reference_attention(q, k, v, return_lse=True)
    assert_close(out, lse, ref, ref_lse)


def test_thread_count_does_not_change_the_result():
    q, k, v = qkv(41, 2, 300, 280, 4, 2, 96, 40)
    results = [fa.flash_attn_func_with_backward(q, k, v, causal=True, num_threads=n) for n in (1, 2, 3, 0)]
    dout = np.random.default_rng(2).standard_normal(results[0][0].shape).astype(np.float32)
    first = (results[0][0], results[0][1], *results[0][2](dout))
    for out, lse, backward in results[1:]:
        for x, y in zip(first, (out, lse, *backward(dout))):
            assert np.array_equal(x, y)


def test_errors_name_the_argument():
    """Only the last axis of v may differ from k's: other mismatches are named."""
    q, k, v = qkv(51, 1, 4, 5, 2, 2, 8, 6)
    assert fa.flash_attn_func(q, k, v).shape == (1, 4, 2, 6)
    with pytest.raises(ValueError, match=r"v shape \(1, 3, 2, 6\) must equal k shape \(1, 5, 2, 8\) but in the last"):
        fa.flash_attn_func(q, k, v[:, :3])
    cache = np.zeros((1, 8, 2, 8), np.float32)
    with pytest.raises(ValueError, match=r"v_cache shape \(1, 8, 1, 6\) must equal k_cache shape \(1, 8, 2, 8\) but"):
        fa.flash_attn_with_kvcache(q, cache, np.zeros((1, 8, 1, 6), np.float32))
    # The C library: out of range, and a dout of the keys' head size.
    lib = load()
    for value, message in ((-1, "head_dim_v (-1) must be in 1...1024"), (1025, "head_dim_v (1025)")):
        params = _capi.Params()
        lib.flash_attention_params_init(ctypes.byref(params), ctypes.sizeof(params))
        params.batch, params.seqlen_q, params.seqlen_k, params.heads_q, params.heads_kv = 1, 1, 1, 1, 1
        params.head_dim, params.head_dim_v = 8, value
        assert lib.flash_attention_forward(ctypes.byref(params)) == _capi.FA_ERROR_INVALID_SHAPE
        assert message in lib.flash_attention_last_error().decode()
    out, lse = fa.flash_attn_func(q, k, v, return_lse=True)
    with pytest.raises(ValueError, match="dout"):
        fa.flash_attn_backward(np.zeros(q.shape, np.float32), q, k, v, out, lse)


def test_dropout_with_value_head_size():
    from flash_attention.reference import dropout_mask

    q, k, v = qkv(81, 2, 37, 45, 4, 2, 24, 40)
    out, lse, backward = fa.flash_attn_func_with_backward(q, k, v, causal=True, dropout_p=0.25, seed=6)
    z = dropout_mask(6, 0.25, 2, 4, 37, 45)
    assert_close(out, lse, *reference_attention(q, k, v, causal=True, dropout=z, return_lse=True))
    dout = np.random.default_rng(82).standard_normal(out.shape).astype(np.float32)
    for name, got, want in zip(("dq", "dk", "dv"), backward(dout),
                               reference_attention_backward(dout, q, k, v, causal=True, dropout=z)):
        assert_gradient(name, got, want)


def test_decode_with_values_wider_than_keys():
    """One query per sequence against a long cache, split along the keys and merged, values of 200 columns
    on keys of 64 (GQA 4)."""
    rng = np.random.default_rng(83)
    k_cache = rng.standard_normal((2, 3000, 2, 64), dtype=np.float32)
    v_cache = rng.standard_normal((2, 3000, 2, 200), dtype=np.float32)
    q = rng.standard_normal((2, 1, 8, 64), dtype=np.float32)
    seqlens = np.array([3000, 1234], np.int32)
    out, lse = fa.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens, return_lse=True)
    assert_close(out, lse, *reference_kvcache_attention(q, k_cache, v_cache, seqlens))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_gradients(dtype):
    """float16/bfloat16 storage: gradients against float64 on the stored inputs, within twice the rounding of
    the stored gradients (measured: 2e-4 and 1.7e-3)."""
    if dtype == "bfloat16":
        dtype = pytest.importorskip("ml_dtypes", reason="bfloat16 arrays need ml_dtypes").bfloat16
    q, k, v = (x.astype(dtype) for x in qkv(84, 1, 40, 52, 4, 2, 40, 72))
    out, lse, backward = fa.flash_attn_func_with_backward(q, k, v, causal=True)
    dout = np.random.default_rng(85).standard_normal(out.shape).astype(dtype)
    stored = [x.astype(np.float64) for x in (q, k, v, dout)]
    want = reference_attention_backward(stored[3], *stored[:3], causal=True, out=out.astype(np.float64))
    bound = 2 * 2.0 ** (-11 if dtype == np.float16 else -8)  # twice the storage's unit roundoff
    for name, got, w in zip(("dq", "dk", "dv"), backward(dout), want):
        error = np.linalg.norm(got.astype(np.float64) - w) / np.linalg.norm(w)
        assert error <= bound, f"{name}: relative error {error:.3g}"


def test_default_scale_is_the_query_head_size():
    q, k, v = qkv(61, 1, 7, 9, 1, 1, 64, 16)
    assert np.allclose(fa.flash_attn_func(q, k, v), fa.flash_attn_func(q, k, v, softmax_scale=1 / 8), atol=1e-6)


def test_appending_into_overlapping_caches_is_refused_on_every_route():
    """v a view of k's first columns (MLA) reads fine, but an append would write the same memory twice: the
    library refuses it, and so do the bindings' own appends (the cache_leftpad route), leaving the cache as it was."""
    rng = np.random.default_rng(71)
    cache = rng.standard_normal((1, 12, 1, 16), dtype=np.float32)
    before = cache.copy()
    q, k_new, v_new = (rng.standard_normal(s, dtype=np.float32) for s in ((1, 1, 2, 16), (1, 1, 1, 16), (1, 1, 1, 8)))
    for extra in ({}, dict(cache_leftpad=np.array([2], np.int32))):
        with pytest.raises(ValueError, match="overlap"):
            fa.flash_attn_with_kvcache(q, cache, cache[..., :8], k_new, v_new, cache_seqlens=5, **extra)
        assert np.array_equal(cache, before)
    # Caches interleaved in one array ([.., 2, ..] packed) share a buffer but no element: appends work.
    packed = np.zeros((1, 12, 2, 1, 16), np.float32)
    fa.flash_attn_with_kvcache(q, packed[:, :, 0], packed[:, :, 1], k_new, np.pad(v_new, ((0, 0),) * 3 + ((0, 8),)),
                               cache_seqlens=5, cache_leftpad=np.array([2], np.int32))
    assert np.array_equal(packed[0, 5, 0], k_new[0, 0])
    torch = pytest.importorskip("torch", reason="torch is optional; the numpy checks above cover the library")
    import flash_attention.torch as ft

    tcache = torch.from_numpy(before.copy())
    with torch.no_grad(), pytest.raises(ValueError, match="overlap"):
        ft.flash_attn_with_kvcache(torch.from_numpy(q), tcache, tcache[..., :8], torch.from_numpy(k_new),
                                   torch.from_numpy(v_new), cache_seqlens=5, cache_leftpad=torch.tensor([2], dtype=torch.int32))
    assert torch.equal(tcache, torch.from_numpy(before))

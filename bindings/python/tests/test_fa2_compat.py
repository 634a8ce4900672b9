"""FlashAttention-2's calling conventions: its positional order (dropout_p fourth), the packed variants,
return_attn_probs, cache_leftpad in the numpy KV-cache call, and clear errors for what is not implemented
(rotary embedding, a paged varlen cache); dropout has test_dropout.py. Parity against the float64 reference."""

import numpy as np
import pytest

import flash_attention as fa
from conftest import assert_close, random_inputs
from flash_attention.reference import (reference_attention, reference_kvcache_attention,
                                       reference_varlen_attention)


def test_positional_arguments_follow_flash_attention_2s_order():
    q, k, v = random_inputs(1, 2, 37, 53, 4, 2, 24)
    # FA2: (q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
    # return_attn_probs). Before this order, 0.0 here was taken as the softmax scale.
    out = fa.flash_attn_func(q, k, v, 0.0, 0.3, True, (7, 0), 20.0, None, True, False)
    ref, ref_lse = reference_attention(q, k, v, 0.3, True, (7, 0), 20.0, return_lse=True)
    _, lse = fa.flash_attn_func(q, k, v, softmax_scale=0.3, causal=True, window_size=(7, 0), softcap=20.0,
                                return_lse=True)
    assert_close(out, lse, ref, ref_lse)


def test_a_paged_varlen_call_and_rotary_raise_instead_of_being_ignored():
    q, k, v = random_inputs(2, 1, 5, 6, 2, 2, 8)
    cu = np.array([0, 5], np.int32)
    with pytest.raises(NotImplementedError, match="block_table"):
        fa.flash_attn_varlen_func(q[0], k[0, :5], v[0, :5], cu, cu, 5, 5, block_table=np.zeros((1, 1), np.int32))
    with pytest.raises(NotImplementedError, match="rotary"):
        fa.flash_attn_with_kvcache(q, k, v, rotary_cos=np.ones((6, 4), np.float32),
                                   rotary_sin=np.zeros((6, 4), np.float32))


def test_return_attn_probs_gives_out_lse_and_the_probabilities():
    q, k, v = random_inputs(3, 2, 9, 14, 4, 1, 16)
    out, lse, probs = fa.flash_attn_func(q, k, v, 0.0, None, True, return_attn_probs=True)
    ref, ref_lse = reference_attention(q, k, v, causal=True, return_lse=True)
    assert_close(out, lse, ref, ref_lse)
    assert probs.shape == (2, 4, 9, 14) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-6)
    assert probs[0, 0, 0, 6] == 0  # causal: row 0 is aligned with key 5
    np.testing.assert_allclose(np.einsum("bhqk,bkd->bqhd", probs, v[:, :, 0]), ref, atol=1e-5)
    big = np.zeros((1, 4200, 1, 1), np.float32)
    with pytest.raises(ValueError, match="return_attn_probs would materialise"):
        fa.flash_attn_func(big, big, big, return_attn_probs=True)


def test_packed_variants_equal_the_unpacked_calls():
    rng = np.random.default_rng(4)
    qkv = rng.standard_normal((2, 33, 3, 4, 16), dtype=np.float32)
    out = fa.flash_attn_qkvpacked_func(qkv, 0.0, None, True)
    ref = reference_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], causal=True)
    assert_close(out, None, ref, None)
    q = rng.standard_normal((2, 19, 4, 16), dtype=np.float32)
    kv = rng.standard_normal((2, 41, 2, 2, 16), dtype=np.float32)
    out, lse = fa.flash_attn_kvpacked_func(q, kv, softcap=5.0, return_lse=True)
    ref, ref_lse = reference_attention(q, kv[:, :, 0], kv[:, :, 1], softcap=5.0, return_lse=True)
    assert_close(out, lse, ref, ref_lse)

    cu = np.array([0, 7, 7, 30], np.int32)
    packed = rng.standard_normal((30, 3, 4, 8), dtype=np.float32)
    out = fa.flash_attn_varlen_qkvpacked_func(packed, cu, 23, 0.0, 0.5, True)
    ref, _ = reference_varlen_attention(packed[:, 0], packed[:, 1], packed[:, 2], cu, cu, softmax_scale=0.5,
                                        causal=True)
    assert_close(out, None, ref, None)
    cu_k = np.array([0, 11, 12, 40], np.int32)
    q = rng.standard_normal((30, 4, 8), dtype=np.float32)
    kv = rng.standard_normal((40, 2, 1, 8), dtype=np.float32)
    out = fa.flash_attn_varlen_kvpacked_func(q, kv, cu, cu_k, 23, 28, 0.0, None, False, (3, 2))
    ref, _ = reference_varlen_attention(q, kv[:, 0], kv[:, 1], cu, cu_k, window_size=(3, 2))
    assert_close(out, None, ref, None)
    with pytest.raises(ValueError, match="qkv must have 5 dimensions with 3 at axis 2"):
        fa.flash_attn_qkvpacked_func(qkv[:, :, :2])


def test_kvcache_positional_order_and_cache_leftpad():
    rng = np.random.default_rng(5)
    k_cache = rng.standard_normal((3, 50, 2, 16), dtype=np.float32)
    v_cache = rng.standard_normal((3, 50, 2, 16), dtype=np.float32)
    q = rng.standard_normal((3, 4, 4, 16), dtype=np.float32)
    k_new = rng.standard_normal((3, 4, 2, 16), dtype=np.float32)
    v_new = rng.standard_normal((3, 4, 2, 16), dtype=np.float32)
    seqlens = np.array([20, 46, 0], np.int32)
    expected = reference_kvcache_attention(q, k_cache, v_cache, seqlens, k_new, v_new, causal=True)
    before_k, before_v = k_cache.copy(), v_cache.copy()
    out, lse = fa.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, None, None, seqlens, None, None, None,
                                          None, True, (-1, -1), 0.0, True, None, 0, True)
    assert_close(out, lse, *expected)

    # Left padding: entry b's keys start at cache_leftpad[b]; the reference sees only that slice.
    leftpad = np.array([5, 0, 0], np.int32)
    k_cache, v_cache = before_k.copy(), before_v.copy()
    slopes = np.array([[0.1, 0.2, 0.3, 0.4], [0.0, 0.5, 0.1, 0.2], [0.3, 0.3, 0.3, 0.3]], np.float32)
    out, lse = fa.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=seqlens,
                                          cache_leftpad=leftpad, causal=True, window_size=(9, 0),
                                          alibi_slopes=slopes, return_softmax_lse=True)
    for b in range(3):
        end = seqlens[b] + 4
        np.testing.assert_array_equal(k_cache[b, seqlens[b]:end], k_new[b])
        ref, ref_lse = reference_attention(q[b:b + 1], k_cache[None, b, leftpad[b]:end],
                                           v_cache[None, b, leftpad[b]:end], causal=True, window_size=(9, 0),
                                           alibi_slopes=slopes[b], return_lse=True)
        assert_close(out[b:b + 1], lse[b:b + 1], ref, ref_lse)
    untouched = k_cache.copy()
    with pytest.raises(ValueError, match=r"cache_leftpad\[0\] is out of range"):
        fa.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=seqlens,
                                   cache_leftpad=np.array([21, 0, 0], np.int32))
    with pytest.raises(ValueError, match="must both be"):
        fa.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new[:, :3], cache_seqlens=seqlens,
                                   cache_leftpad=leftpad)
    np.testing.assert_array_equal(k_cache, untouched)  # nothing written on error


def test_torch_adapter_takes_the_same_order():
    torch = pytest.importorskip("torch", reason="torch is optional; the numpy API carries the same checks")
    import flash_attention.torch as ft

    q, k, v = (torch.from_numpy(x.copy()) for x in random_inputs(6, 2, 17, 29, 4, 2, 16))
    out = ft.flash_attn_func(q, k, v, 0.0, 0.25, True, (5, 0))
    ref = reference_attention(q.numpy(), k.numpy(), v.numpy(), 0.25, True, (5, 0))
    assert_close(out.numpy(), None, ref, None)
    kv = torch.stack([k, v], dim=2)
    torch.testing.assert_close(ft.flash_attn_kvpacked_func(q, kv, 0.0, 0.25, True, (5, 0)), out, rtol=0, atol=0)
    with pytest.raises(NotImplementedError, match="return_attn_probs"):
        ft.flash_attn_func(q, k, v, return_attn_probs=True)

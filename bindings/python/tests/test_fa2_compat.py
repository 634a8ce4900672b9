"""FlashAttention-2's calling conventions: its positional order (dropout_p fourth), the packed variants,
return_attn_probs, cache_leftpad in the numpy KV-cache call, a paged cache in the varlen call, rotary embedding in
the KV-cache call; dropout has test_dropout.py. Parity against the float64 reference."""

import ctypes

import numpy as np
import pytest

import flash_attention as fa
from flash_attention import _capi
from flash_attention._loader import load
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


def paged_varlen_inputs(seed, block_size=5):
    """Packed queries of 4 sequences and their keys scattered over the blocks of a paged cache, plus the same
    keys packed contiguously (the reference's input)."""
    rng = np.random.default_rng(seed)
    lengths_q, lengths_k = [3, 0, 17, 1], [11, 4, 23, 1]
    cu_q, cu_k = np.cumsum([0] + lengths_q).astype(np.int32), np.cumsum([0] + lengths_k).astype(np.int32)
    q = rng.standard_normal((cu_q[-1], 4, 24), dtype=np.float32)
    k, v = (rng.standard_normal((cu_k[-1], 2, 24), dtype=np.float32) for _ in range(2))
    blocks = max(-(-n // block_size) for n in lengths_k)
    table = rng.permutation(4 * blocks).reshape(4, blocks).astype(np.int32)
    k_cache, v_cache = (rng.standard_normal((4 * blocks, block_size, 2, 24), dtype=np.float32) for _ in range(2))
    for b, n in enumerate(lengths_k):
        for j in range(n):
            k_cache[table[b, j // block_size], j % block_size] = k[cu_k[b] + j]
            v_cache[table[b, j // block_size], j % block_size] = v[cu_k[b] + j]
    return q, k, v, cu_q, cu_k, k_cache, v_cache, table


@pytest.mark.parametrize("options", [dict(causal=True), dict(window_size=(6, 1), softcap=5.0), {}],
                         ids=["causal", "window-softcap", "plain"])
def test_varlen_reads_keys_from_a_paged_cache_through_block_table(options):
    q, k, v, cu_q, cu_k, k_cache, v_cache, table = paged_varlen_inputs(33)
    out, lse = fa.flash_attn_varlen_func(q, k_cache, v_cache, cu_q, cu_k, 0, 0, 0.0, None, block_table=table,
                                         return_lse=True, **options)
    ref, ref_lse = reference_varlen_attention(q, k, v, cu_q, cu_k, **options)
    assert_close(out, lse, ref, ref_lse)


def test_paged_varlen_errors_and_the_backward_refuses_it():
    q, k, v, cu_q, cu_k, k_cache, v_cache, table = paged_varlen_inputs(34)
    bad = table.copy()
    bad[2, 1] = k_cache.shape[0]
    with pytest.raises(ValueError, match=r"block_table\[2\]\[1\] .* is not in 0\.\.<cache_batch"):
        fa.flash_attn_varlen_func(q, k_cache, v_cache, cu_q, cu_k, block_table=bad)
    with pytest.raises(ValueError, match="sequence 2 has 23 keys, more than its blocks hold"):
        fa.flash_attn_varlen_func(q, k_cache, v_cache, cu_q, cu_k, block_table=np.ascontiguousarray(table[:, :3]))
    out, lse = fa.flash_attn_varlen_func(q, k_cache, v_cache, cu_q, cu_k, block_table=table, return_lse=True)
    with pytest.raises(ValueError, match="must have 3 dimensions"):  # the numpy backward takes packed keys only
        fa.flash_attn_varlen_backward(out, q, k_cache, v_cache, out, lse, cu_q, cu_k)
    # The C backward, given forward params with a block table, refuses them and writes nothing.
    lib = load()
    forward = _capi.Params()
    assert lib.flash_attention_params_init(ctypes.byref(forward), ctypes.sizeof(forward)) == 0
    forward.batch, forward.seqlen_q, forward.seqlen_k, forward.heads_q, forward.heads_kv, forward.head_dim = (
        4, q.shape[0], int(cu_k[-1]), 4, 2, 24)
    forward.q, forward.q_row_stride, forward.q_head_stride = q.ctypes.data, 96, 24
    forward.out, forward.out_row_stride, forward.out_head_stride = out.ctypes.data, 96, 24
    forward.lse, forward.lse_head_stride, forward.lse_row_stride = lse.ctypes.data, q.shape[0], 1
    for name, x in (("k", k_cache), ("v", v_cache)):
        setattr(forward, name, x.ctypes.data)
        for axis, stride in zip(("batch", "row", "head"), x.strides[:3]):
            setattr(forward, f"{name}_{axis}_stride", stride // 4)
    forward.cu_seqlens_q, forward.cu_seqlens_k = cu_q.ctypes.data, cu_k.ctypes.data
    forward.block_table, forward.block_table_batch_stride, forward.max_blocks_per_seq = table.ctypes.data, 5, 5
    forward.cache_batch, forward.cache_seqlen = k_cache.shape[0], k_cache.shape[1]
    assert lib.flash_attention_forward_varlen(ctypes.byref(forward)) == 0
    backward = _capi.BackwardParams()
    assert lib.flash_attention_backward_params_init(ctypes.byref(backward), ctypes.sizeof(backward)) == 0
    grads = [np.full_like(x, 7.0) for x in (q, q, k, v)]
    backward.forward = ctypes.pointer(forward)
    for name, x in zip(("dout", "dq", "dk", "dv"), grads):
        setattr(backward, name, x.ctypes.data)
        setattr(backward, name + "_row_stride", x.strides[0] // 4)
        setattr(backward, name + "_head_stride", x.strides[1] // 4)
    assert lib.flash_attention_backward(ctypes.byref(backward)) == _capi.FA_ERROR_UNSUPPORTED
    assert "not a paged cache" in lib.flash_attention_last_error().decode()
    assert all((g == 7.0).all() for g in grads[1:])


def test_torch_paged_varlen_matches_numpy():
    torch = pytest.importorskip("torch", reason="torch is optional; the numpy API carries the same call")
    import flash_attention.torch as ft

    q, k, v, cu_q, cu_k, k_cache, v_cache, table = paged_varlen_inputs(35, block_size=3)
    want = fa.flash_attn_varlen_func(q, k_cache, v_cache, cu_q, cu_k, causal=True, block_table=table)
    got = ft.flash_attn_varlen_func(*(torch.from_numpy(x) for x in (q, k_cache, v_cache, cu_q, cu_k)), causal=True,
                                    block_table=torch.from_numpy(table))
    np.testing.assert_array_equal(got.numpy(), want)
    with pytest.raises(NotImplementedError, match="forward only"):
        ft.flash_attn_varlen_func(torch.from_numpy(q).requires_grad_(), torch.from_numpy(k_cache),
                                  torch.from_numpy(v_cache), torch.from_numpy(cu_q), torch.from_numpy(cu_k),
                                  block_table=torch.from_numpy(table))


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


def rotate_reference(x, cos, sin, positions, interleaved):
    """Rotary embedding in float64 as complex multiplication: channel pairs (2i, 2i+1) or (i, i + half) are
    the real and imaginary parts of z, rotated to z · e^(iθ) with cos θ, sin θ at each row's position."""
    x = np.asarray(x, np.float64).copy()
    half = cos.shape[1]
    pairs = (np.s_[..., 0:2 * half:2], np.s_[..., 1:2 * half:2]) if interleaved else (np.s_[..., :half],
                                                                                     np.s_[..., half:2 * half])
    z = x[pairs[0]] + 1j * x[pairs[1]]
    angle = (np.asarray(cos, np.float64) + 1j * np.asarray(sin, np.float64))[positions][:, :, None, :]
    z = z * angle
    x[pairs[0]], x[pairs[1]] = z.real, z.imag
    return x


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("options", [dict(causal=True), dict(window_size=(5, 2)), {}], ids=["causal", "window", "none"])
@pytest.mark.parametrize("rotary_half", [4, 7])
def test_rotary_embedding_in_the_kvcache_call(interleaved, options, rotary_half):
    rng = np.random.default_rng(31)
    batch, seqlen_new, heads_q, heads_kv, d, capacity = 3, 3, 4, 2, 24, 20
    q = rng.standard_normal((batch, seqlen_new, heads_q, d), dtype=np.float32)
    k_new, v_new = (rng.standard_normal((batch, seqlen_new, heads_kv, d), dtype=np.float32) for _ in range(2))
    k_cache, v_cache = (rng.standard_normal((batch, capacity, heads_kv, d), dtype=np.float32) for _ in range(2))
    seqlens = np.array([0, 7, 17], np.int32)
    angle = rng.uniform(0, 2 * np.pi, (capacity, rotary_half))
    cos, sin = np.cos(angle).astype(np.float32), np.sin(angle).astype(np.float32)
    before = k_cache.copy()
    out = fa.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cos, sin, seqlens, None, None, None, None,
                                     rotary_interleaved=interleaved, **options)
    rows = seqlens[:, None] + np.arange(seqlen_new)
    aligned = bool(options)
    k_rotated = rotate_reference(k_new, cos, sin, rows, interleaved)
    q_rotated = rotate_reference(q, cos, sin, rows if aligned else np.repeat(seqlens[:, None], seqlen_new, 1),
                                 interleaved)
    for b in range(batch):  # the cache holds the rotated keys; nothing else changed
        np.testing.assert_allclose(k_cache[b, seqlens[b]:seqlens[b] + seqlen_new], k_rotated[b], atol=2e-6)
        np.testing.assert_array_equal(k_cache[b, :seqlens[b]], before[b, :seqlens[b]])
    ref, _ = reference_kvcache_attention(q_rotated, before, v_cache, seqlens, k=k_rotated, v=v_new, **options)
    assert_close(out, None, ref, None)


def test_rotary_errors_name_the_argument_and_write_nothing():
    q, k, v = random_inputs(2, 1, 2, 6, 2, 2, 8)
    cache = np.zeros((1, 6, 2, 8), np.float32)
    cos = np.ones((5, 2), np.float32)
    cases = [(dict(rotary_cos=cos), "rotary_cos and rotary_sin must be given together"),
             (dict(rotary_cos=cos, rotary_sin=cos[:, :1]), "must both be"),
             (dict(rotary_cos=np.ones((5, 5), np.float32), rotary_sin=np.ones((5, 5), np.float32)), "rotary_dim"),
             (dict(rotary_cos=cos, rotary_sin=cos, k=None, v=None), "pass k and v"),
             (dict(rotary_cos=cos, rotary_sin=cos, cache_seqlens=4), "rotary_cos has 5 positions")]
    for extra, message in cases:
        arguments = {**dict(k=k[:, :2], v=v[:, :2], cache_seqlens=1), **extra}
        with pytest.raises(ValueError, match=message):
            fa.flash_attn_with_kvcache(q, cache, cache.copy(), **arguments)
        assert not cache.any()


def test_torch_rotary_matches_numpy():
    torch = pytest.importorskip("torch", reason="torch is optional; the numpy API carries the same rotation")
    import flash_attention.torch as ft

    rng = np.random.default_rng(32)
    q = rng.standard_normal((2, 2, 4, 16), dtype=np.float32)
    k_new, v_new = (rng.standard_normal((2, 2, 2, 16), dtype=np.float32) for _ in range(2))
    cache = rng.standard_normal((2, 9, 2, 16), dtype=np.float32)
    angle = rng.uniform(0, 6, (9, 5))
    cos, sin = np.cos(angle).astype(np.float32), np.sin(angle).astype(np.float32)
    seqlens = np.array([3, 6], np.int32)
    for interleaved in (True, False):
        numpy_cache, torch_cache = cache.copy(), torch.from_numpy(cache.copy())
        want = fa.flash_attn_with_kvcache(q, numpy_cache, numpy_cache.copy(), k_new, v_new, cos, sin, seqlens,
                                          causal=True, rotary_interleaved=interleaved)
        got = ft.flash_attn_with_kvcache(torch.from_numpy(q), torch_cache, torch_cache.clone(),
                                         torch.from_numpy(k_new), torch.from_numpy(v_new), torch.from_numpy(cos),
                                         torch.from_numpy(sin), torch.from_numpy(seqlens), causal=True,
                                         rotary_interleaved=interleaved)
        np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-6)
        np.testing.assert_allclose(torch_cache.numpy(), numpy_cache, rtol=0, atol=1e-6)


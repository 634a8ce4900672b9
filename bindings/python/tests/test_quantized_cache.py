"""8-bit KV caches (int8, float8 E4M3FN) with per-row scales: exact attention over the dequantized cache, on
every storage (contiguous, indexed, paged), GQA ratio, head_dim, with appends (quantized as they land, bit for
bit as quantize_kv), split-KV decoding and chunked prefill; plus the quantization error against a float32
cache, and the errors."""

import numpy as np
import pytest

from conftest import random_inputs
from flash_attention import FlashAttentionError, flash_attn_with_kvcache
from flash_attention.api import quantize_kv
from flash_attention.reference import reference_kvcache_attention

ml_dtypes = pytest.importorskip("ml_dtypes", reason="float8 caches need ml_dtypes (pip install ml_dtypes)")

DTYPES = {"int8": np.int8, "float8": ml_dtypes.float8_e4m3fn}
# Exact attention over the dequantized cache: the float32-cache bounds (dequantizing is one float32 product).
BOUND = 3e-6

# (batch, seqlen_q, seqlen_new, cache_seqlens, heads_q, heads_kv, head_dim, options)
CASES = {
    "decode-mha-d40": (3, 1, 0, [700, 17, 1], 4, 4, 40, {}),
    "decode-gqa2-d64": (2, 1, 0, [3000, 513], 4, 2, 64, {}),
    "decode-gqa4-d128-append": (2, 1, 1, [2999, 0], 8, 2, 128, dict(causal=True)),
    "decode-gqa8-d256": (1, 1, 0, [1500], 8, 1, 256, {}),
    "chunk-prefill-append-causal": (2, 7, 7, [100, 1200], 4, 2, 64, dict(causal=True)),
    "prefill-window-softcap": (1, 40, 5, [900], 4, 2, 64, dict(causal=True, window_size=(300, 0), softcap=20.0)),
}


def dequantized(values, scales):
    return values.astype(np.float32) * scales[..., None]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("storage", ["contiguous", "indexed", "paged-16", "paged-7"])
@pytest.mark.parametrize("case", CASES)
def test_quantized_cache_matches_reference_over_the_dequantized_cache(dtype, storage, case):
    batch, seqlen_q, seqlen_new, seqlens, heads, heads_kv, dim, options = CASES[case]
    rng = np.random.default_rng(sum(map(ord, case + storage)))
    r = lambda *shape: rng.standard_normal(shape, dtype=np.float32)  # noqa: E731
    capacity = 3001
    if storage.startswith("paged"):
        page = int(storage.split("-")[1])
        per_seq = (capacity + page - 1) // page
        blocks = batch * per_seq + 2
        shape = (blocks, page, heads_kv, dim)
        table = rng.permutation(blocks)[:batch * per_seq].reshape(batch, per_seq).astype(np.int32)
        where = dict(block_table=table)
    else:
        shape = (batch + 2, capacity, heads_kv, dim)
        where = dict(cache_batch_idx=np.array([batch + 1, 0, 2][:batch], np.int32)) if storage == "indexed" else {}
    k_cache, k_scale = quantize_kv(r(*shape), DTYPES[dtype])
    v_cache, v_scale = quantize_kv(r(*shape) * 3, DTYPES[dtype])
    q = r(batch, seqlen_q, heads, dim)
    k_new = r(batch, seqlen_new, heads_kv, dim) if seqlen_new else None
    v_new = r(batch, seqlen_new, heads_kv, dim) if seqlen_new else None
    seqlens = np.array(seqlens, np.int32)
    before = [x.copy() for x in (k_cache, v_cache, k_scale, v_scale)]
    out, lse = flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=seqlens, k_scale=k_scale,
                                       v_scale=v_scale, return_softmax_lse=True, **where, **options)
    # Appended rows were quantized exactly as quantize_kv quantizes them, and nothing else changed.
    expected = [x.copy() for x in before]
    if seqlen_new:
        for b in range(batch):
            for j in range(seqlen_new):
                position = seqlens[b] + j
                if storage.startswith("paged"):
                    index = (table[b][position // shape[1]], position % shape[1])
                else:
                    index = (where["cache_batch_idx"][b] if where else b, position)
                for (values, scales), new in zip(((expected[0], expected[2]), (expected[1], expected[3])), (k_new, v_new)):
                    values[index], scales[index] = quantize_kv(new[b, j], DTYPES[dtype])
    for name, got, want in zip(("k_cache", "v_cache", "k_scale", "v_scale"), (k_cache, v_cache, k_scale, v_scale), expected):
        assert np.array_equal(got.view(np.uint8), want.view(np.uint8)), f"{name} differs from the expected append"
    # The reference attends over the dequantized cache as it was before the call, plus the dequantized new rows.
    k_ref, v_ref = dequantized(before[0], before[2]), dequantized(before[1], before[3])
    if seqlen_new:
        k_new, v_new = (dequantized(*quantize_kv(x, DTYPES[dtype])) for x in (k_new, v_new))
    ref_out, ref_lse = reference_kvcache_attention(q, k_ref, v_ref, seqlens, k_new, v_new, **where, **options)
    scale = np.abs(ref_out).max()
    assert np.abs(out - ref_out).max() <= BOUND * max(1.0, scale)
    finite = np.isfinite(ref_lse)
    assert np.abs(lse[finite] - ref_lse[finite]).max(initial=0) <= BOUND * max(1.0, np.abs(ref_lse[finite]).max(initial=0))


@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_kv_rounds_to_the_nearest_step(dtype):
    x = np.random.default_rng(3).standard_normal((5, 7, 64), dtype=np.float32) * 4
    x[0, 0] = 0  # a row of zeros: scale 0, values 0
    values, scales = quantize_kv(x, DTYPES[dtype])
    assert values.dtype == DTYPES[dtype] and scales.shape == (5, 7) and scales[0, 0] == 0
    largest = np.abs(x).max(axis=-1)
    np.testing.assert_array_equal(scales, (largest / np.float32(127 if dtype == "int8" else 448)).astype(np.float32))
    error = np.abs(dequantized(values, scales) - x)
    if dtype == "int8":  # half a step of max|x| / 127
        assert (error <= 0.5 * scales[..., None] * (1 + 1e-5) + 1e-12).all()
    else:  # E4M3 has 3 mantissa bits: relative error ≤ 2^-4, absolute ≤ half the subnormal step below 2^-6
        assert (error <= np.maximum(np.abs(x) * 2.0**-4, 2.0**-10 * scales[..., None]) * (1 + 1e-5) + 1e-12).all()


def test_quantized_decode_is_bitwise_identical_for_every_thread_count():
    q, k, v = random_inputs(51, 2, 1, 5000, 8, 2, 128)
    (kq, ks), (vq, vs) = quantize_kv(k, np.int8), quantize_kv(v, np.int8)
    outs = [flash_attn_with_kvcache(q, kq, vq, cache_seqlens=5000, k_scale=ks, v_scale=vs, num_threads=t)
            for t in (1, 2, 3, 0)]
    assert all(np.array_equal(o, outs[0]) for o in outs)


def test_quantization_error_against_a_float32_cache():
    # N(0, 1) data, decode (8, 32, 8, 4096, 128)-like at a smaller size; the README quotes these numbers.
    q, k, v = random_inputs(52, 2, 1, 4096, 32, 8, 128)
    exact = flash_attn_with_kvcache(q, k, v, cache_seqlens=4096)
    errors = {}
    for name, dtype in DTYPES.items():
        (kq, ks), (vq, vs) = quantize_kv(k, dtype), quantize_kv(v, dtype)
        out = flash_attn_with_kvcache(q, kq, vq, cache_seqlens=4096, k_scale=ks, v_scale=vs)
        errors[name] = (np.abs(out - exact).max(), np.abs(out - exact).mean())
    print({name: f"max {e[0]:.2e} mean {e[1]:.2e}" for name, e in errors.items()})
    assert errors["int8"][0] < 5e-3 and errors["int8"][1] < 1e-3
    assert errors["float8"][0] < 3e-2 and errors["float8"][1] < 6e-3


def test_quantized_cache_errors_write_nothing():
    q, k, v = random_inputs(53, 1, 1, 64, 4, 2, 32)
    (kq, ks), (vq, vs) = quantize_kv(k, np.int8), quantize_kv(v, np.int8)
    new = np.ones((1, 1, 2, 32), np.float32)
    with pytest.raises(ValueError, match="k_scale is required"):
        flash_attn_with_kvcache(q, kq, vq, cache_seqlens=32, v_scale=vs)
    with pytest.raises(ValueError, match="must be the cache's without head_dim"):
        flash_attn_with_kvcache(q, kq, vq, cache_seqlens=32, k_scale=ks[:, :10], v_scale=vs)
    with pytest.raises(ValueError, match="belong to 8-bit caches"):
        flash_attn_with_kvcache(q, k, v, cache_seqlens=32, k_scale=ks, v_scale=vs)
    before = [x.copy() for x in (kq, vq, ks, vs)]
    # Scales that overlap each other cannot both be written by an append: the library refuses, writing nothing.
    with pytest.raises(FlashAttentionError, match="k_scale and v_scale overlap"):
        flash_attn_with_kvcache(q, kq, vq, new, new, cache_seqlens=32, k_scale=ks, v_scale=ks)
    # 8-bit new rows cannot be appended (they carry no scale).
    with pytest.raises(TypeError, match="k must have dtype"):
        flash_attn_with_kvcache(q, kq, vq, kq[:, :1], vq[:, :1], cache_seqlens=32, k_scale=ks, v_scale=vs)
    for got, want in zip((kq, vq, ks, vs), before):
        assert np.array_equal(got.view(np.uint8), want.view(np.uint8))

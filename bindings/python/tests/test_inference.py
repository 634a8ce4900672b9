"""Inference features against the float64 oracle: sliding windows, ALiBi, softcap, sinks, varlen batches,
KV caches (contiguous, indexed, paged, with append), split-KV decoding and the public merge."""

import numpy as np
import pytest

from conftest import ABSOLUTE_BOUND, LSE_BOUND, assert_close, random_inputs
from flash_attention import (
    flash_attn_func,
    flash_attn_varlen_func,
    flash_attn_with_kvcache,
    merge_attention_states,
    reference_attention,
)
from flash_attention.reference import reference_kvcache_attention, reference_varlen_attention

# Softcap and ALiBi add float32 rounding to scores of larger magnitude; their bound is stated separately.
# An LSE far from 0 (ALiBi biases of hundreds) is compared relative to its size: float32 holds −83 only
# to within 4e-6.
ADJUSTED_BOUND = 3e-6


def assert_lse_close(lse, ref_lse):
    assert np.array_equal(np.isneginf(lse), np.isneginf(ref_lse)), "-inf LSE rows differ"
    finite = np.isfinite(ref_lse)
    error = np.abs(lse[finite] - ref_lse[finite]) - 1e-7 * np.abs(ref_lse[finite])
    assert error.max(initial=0) <= ADJUSTED_BOUND


def rng_arrays(seed):
    rng = np.random.default_rng(seed)
    return lambda *shape: rng.standard_normal(shape, dtype=np.float32)


OPTIONS = {
    "window-64-16": dict(window_size=(64, 16)),
    "window-left-only": dict(window_size=(37, -1)),
    "window-right-only": dict(window_size=(-1, 5)),
    "causal-window": dict(causal=True, window_size=(100, -1)),
    "window-0-0": dict(window_size=(0, 0)),
    "softcap": dict(softcap=4.0),
    "alibi-shared": dict(alibi_slopes=np.array([0.5, 0.25, 0.125, 0.0625], np.float32)),
    "alibi-per-batch": dict(alibi_slopes=np.linspace(0.01, 0.3, 8, dtype=np.float32).reshape(2, 4), causal=True),
    "sinks": dict(sinks=np.array([0.0, 2.0, -1.0, 5.0], np.float32)),
    "sinks-causal-empty-rows": dict(sinks=np.array([0.5, 1.0, 1.5, 2.0], np.float32), causal=True),
    "everything": dict(causal=True, window_size=(50, 0), softcap=3.0, sinks=np.array([1, 2, 3, 4], np.float32),
                       alibi_slopes=np.array([0.1, 0.2, 0.3, 0.4], np.float32)),
}


@pytest.mark.parametrize("name", OPTIONS)
@pytest.mark.parametrize("lengths", [(130, 300), (300, 130), (1, 700)], ids=lambda s: f"s{s[0]}x{s[1]}")
def test_options_match_reference(name, lengths):
    seqlen_q, seqlen_k = lengths
    q, k, v = random_inputs(11, 2, seqlen_q, seqlen_k, 4, 2, 40)
    options = OPTIONS[name]
    out, lse = flash_attn_func(q, k, v, return_lse=True, **options)
    ref_out, ref_lse = reference_attention(q, k, v, return_lse=True, **options)
    assert np.abs(out - ref_out).max() <= ADJUSTED_BOUND
    assert_lse_close(lse, ref_lse)
    ref_path = flash_attn_func(q, k, v, algorithm="reference", **options)
    assert np.abs(ref_path - ref_out).max() <= ADJUSTED_BOUND


def test_rows_outside_every_window_are_zero_or_sink():
    q, k, v = random_inputs(12, 1, 20, 10, 2, 2, 8)
    out, lse = flash_attn_func(q, k, v, window_size=(0, 0), causal=True, return_lse=True)  # only the aligned key
    ref_out, ref_lse = reference_attention(q, k, v, window_size=(0, 0), causal=True, return_lse=True)
    assert_close(out, lse, ref_out, ref_lse)
    assert np.all(out[0, :10] == 0)  # queries 0..9 align with keys -10..-1
    sinks = np.array([1.5, -2.0], np.float32)
    out, lse = flash_attn_func(q, k, v, causal=True, window_size=(0, 0), sinks=sinks, return_lse=True)
    assert np.all(out[0, :10] == 0) and np.allclose(lse[0, :, :10], sinks[:, None])


def test_window_skips_blocks_far_from_the_diagonal():
    # A band of 32 over 6000 keys: the result matches, and equals attention over just the band's keys.
    q, k, v = random_inputs(13, 1, 6000, 6000, 1, 1, 32)
    out = flash_attn_func(q, k, v, window_size=(32, 0))
    i = 4000
    ref = reference_attention(q[:, i:i + 1], k[:, i - 32:i + 1], v[:, i - 32:i + 1])
    assert np.abs(out[:, i:i + 1] - ref).max() <= ABSOLUTE_BOUND


VARLEN_CASES = {
    "mixed": ([0, 5, 5, 300, 301], [0, 17, 40, 300, 900]),
    "single": ([0, 77], [0, 77]),
    "empty-sequences": ([0, 0, 3, 3], [0, 4, 4, 4]),
}


@pytest.mark.parametrize("case", VARLEN_CASES)
@pytest.mark.parametrize("options", ["plain", "causal", "window-alibi", "softcap-sinks"])
def test_varlen_matches_reference(case, options):
    cu_q, cu_k = (np.array(c, np.int32) for c in VARLEN_CASES[case])
    batch = len(cu_q) - 1
    r = rng_arrays(14)
    q, k, v = r(int(cu_q[-1]), 4, 64), r(int(cu_k[-1]), 2, 64), r(int(cu_k[-1]), 2, 64)
    kw = {"plain": {}, "causal": dict(causal=True),
          "window-alibi": dict(window_size=(30, 0), alibi_slopes=np.abs(r(batch, 4)) * 0.1),
          "softcap-sinks": dict(softcap=5.0, sinks=r(4))}[options]
    out, lse = flash_attn_varlen_func(q, k, v, cu_q, cu_k, return_lse=True, **kw)
    ref_out, ref_lse = reference_varlen_attention(q, k, v, cu_q, cu_k, **kw)
    assert out.shape == q.shape and lse.shape == (4, q.shape[0])
    assert np.abs(out - ref_out).max(initial=0) <= ADJUSTED_BOUND
    assert_lse_close(lse, ref_lse)


def test_varlen_equals_separate_calls_bitwise_per_sequence_shape():
    cu = np.array([0, 100, 250], np.int32)
    r = rng_arrays(15)
    q, k, v = r(250, 2, 32), r(250, 2, 32), r(250, 2, 32)
    out = flash_attn_varlen_func(q, k, v, cu, cu, causal=True)
    for b in range(2):
        s = slice(cu[b], cu[b + 1])
        single = flash_attn_func(q[None, s], k[None, s], v[None, s], causal=True)[0]
        assert np.abs(out[s] - single).max() <= 1e-6


CACHE_CASES = {
    # (batch, seqlen_q, seqlen_new, cache_seqlens, options)
    "decode": (3, 1, 0, [3000, 17, 3900], {}),
    "decode-append": (3, 1, 1, [2999, 0, 3999], dict(causal=True)),
    "chunk-append-causal": (2, 7, 7, [100, 2500], dict(causal=True)),
    "window-softcap-sinks": (2, 3, 2, [1000, 4000 - 2], dict(causal=True, window_size=(300, 0), softcap=20.0,
                                                              sinks=np.arange(8, dtype=np.float32) / 4)),
    "alibi": (2, 2, 0, [700, 33], dict(alibi_slopes=np.linspace(0.01, 0.1, 8, dtype=np.float32))),
}


@pytest.mark.parametrize("case", CACHE_CASES)
@pytest.mark.parametrize("storage", ["contiguous", "indexed", "paged-16", "paged-1", "paged-100"])
def test_kvcache_matches_reference(case, storage):
    batch, seqlen_q, seqlen_new, seqlens, options = CACHE_CASES[case]
    heads, heads_kv, dim = 8, 2, 64
    r = rng_arrays(16)
    rng = np.random.default_rng(17)
    q = r(batch, seqlen_q, heads, dim)
    k_new = r(batch, seqlen_new, heads_kv, dim) if seqlen_new else None
    v_new = r(batch, seqlen_new, heads_kv, dim) if seqlen_new else None
    seqlens = np.array(seqlens, np.int32)
    kw = dict(options)
    if storage.startswith("paged"):
        page = int(storage.split("-")[1])
        per_seq = (4000 + page - 1) // page
        blocks = batch * per_seq + 3
        k_cache, v_cache = r(blocks, page, heads_kv, dim), r(blocks, page, heads_kv, dim)
        table = rng.permutation(blocks)[:batch * per_seq].reshape(batch, per_seq).astype(np.int32)
        kw_cache = dict(block_table=table)
    else:
        k_cache, v_cache = r(batch + 2, 4000, heads_kv, dim), r(batch + 2, 4000, heads_kv, dim)
        kw_cache = dict(cache_batch_idx=np.array([batch + 1, 0, 2][:batch], np.int32)) if storage == "indexed" else {}
    k0, v0 = k_cache.copy(), v_cache.copy()
    out, lse = flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=seqlens,
                                       return_softmax_lse=True, **kw_cache, **kw)
    ref_out, ref_lse = reference_kvcache_attention(q, k0, v0, seqlens, k_new, v_new, **kw_cache, **kw)
    assert np.abs(out - ref_out).max() <= ADJUSTED_BOUND
    assert_lse_close(lse, ref_lse)
    # The append wrote exactly the new rows and nothing else.
    expected_k = k0.copy()
    if seqlen_new:
        for b in range(batch):
            for j in range(seqlen_new):
                position = seqlens[b] + j
                if storage.startswith("paged"):
                    page = k_cache.shape[1]
                    expected_k[table[b][position // page], position % page] = k_new[b, j]
                else:
                    entry = kw_cache["cache_batch_idx"][b] if storage == "indexed" else b
                    expected_k[entry, position] = k_new[b, j]
    assert np.array_equal(k_cache, expected_k)


def test_decode_is_bitwise_identical_for_every_thread_count():
    r = rng_arrays(18)
    q, k_cache, v_cache = r(1, 1, 32, 128), r(1, 32768, 8, 128), r(1, 32768, 8, 128)
    single = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=32768, num_threads=1, return_lse=True)
    for threads in (2, 3, 0):
        other = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=32768, num_threads=threads, return_lse=True)
        assert other[0].tobytes() == single[0].tobytes() and other[1].tobytes() == single[1].tobytes()
    ref_out, ref_lse = reference_attention(q, k_cache, v_cache, return_lse=True)
    assert_close(single[0], single[1], ref_out, ref_lse)


def test_merge_attention_states_is_exact():
    q, k, v = random_inputs(19, 2, 50, 200, 4, 4, 32)
    out_a, lse_a = flash_attn_func(q, k[:, :80], v[:, :80], return_lse=True)
    out_b, lse_b = flash_attn_func(q, k[:, 80:], v[:, 80:], return_lse=True)
    out, lse = merge_attention_states(out_a, lse_a, out_b, lse_b)
    assert_close(out, lse, *reference_attention(q, k, v, return_lse=True))


def test_merge_with_an_empty_side_is_nan_free():
    q, k, v = random_inputs(20, 1, 6, 4, 1, 1, 8)
    out_a, lse_a = flash_attn_func(q, k, v, return_lse=True)
    empty_out, empty_lse = np.zeros_like(out_a), np.full_like(lse_a, -np.inf)
    out, lse = merge_attention_states(out_a, lse_a, empty_out, empty_lse)
    assert np.array_equal(out, out_a) and np.array_equal(lse, lse_a)
    out, lse = merge_attention_states(empty_out, empty_lse, empty_out, empty_lse)
    assert np.all(out == 0) and np.all(np.isneginf(lse))


def test_chunked_prefill_through_the_cache_equals_one_causal_call():
    r = rng_arrays(21)
    q, k, v = r(1, 96, 4, 32), r(1, 96, 2, 32), r(1, 96, 2, 32)
    k_cache, v_cache = np.zeros((1, 96, 2, 32), np.float32), np.zeros((1, 96, 2, 32), np.float32)
    pieces = []
    for start in range(0, 96, 32):
        chunk = slice(start, start + 32)
        pieces.append(flash_attn_with_kvcache(q[:, chunk], k_cache, v_cache, k[:, chunk], v[:, chunk],
                                              cache_seqlens=start, causal=True))
    full = flash_attn_func(q, k, v, causal=True)
    assert np.abs(np.concatenate(pieces, axis=1) - full).max() <= ABSOLUTE_BOUND


BAD_INDICES = {
    "cu_seqlens_q not starting at 0": (dict(cu_q=[1, 5, 9]), r"cu_seqlens_q\[0\] \(1\) must be 0"),
    "cu_seqlens_q decreasing": (dict(cu_q=[0, 9, 5]), r"cu_seqlens_q\[2\] \(5\) is less than cu_seqlens_q\[1\] \(9\)"),
    "cu_seqlens_k past the rows": (dict(cu_k=[0, 5, 99]), r"cu_seqlens_k\[2\] \(99\) exceeds seqlen_k \(12\)"),
    "max_seqlen_q too small": (dict(max_seqlen_q=3), r"more than max_seqlen_q \(3\)"),
}


@pytest.mark.parametrize("case", BAD_INDICES)
def test_varlen_bad_indices(case):
    changes, message = BAD_INDICES[case]
    r = rng_arrays(22)
    q, k, v = r(9, 2, 8), r(12, 2, 8), r(12, 2, 8)
    cu_q = np.array(changes.get("cu_q", [0, 4, 9]), np.int32)
    cu_k = np.array(changes.get("cu_k", [0, 5, 12]), np.int32)
    with pytest.raises(ValueError, match=message):
        flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_seqlen_q=changes.get("max_seqlen_q", 0))


CACHE_ERRORS = {
    "seqlen past capacity": (dict(cache_seqlens=[10, 64]), r"cache_seqlens\[1\] \(64\) \+ seqlen_new \(2\) exceeds"),
    "negative seqlen": (dict(cache_seqlens=[-1, 3]), r"cache_seqlens\[0\] \(-1\) must be >= 0"),
    "batch index out of range": (dict(cache_batch_idx=[0, 3]), r"cache_batch_idx\[1\] \(3\) is not in 0..<cache_batch \(3\)"),
    "block out of range": (dict(block_table=[[0, 1], [2, 7]]), r"block_table\[1\]\[1\] \(7\) is not in 0..<cache_batch"),
    "negative block": (dict(block_table=[[0, -2], [2, 3]]), r"block_table\[0\]\[1\] \(-2\)"),
}


@pytest.mark.parametrize("case", CACHE_ERRORS)
def test_cache_errors_leave_the_cache_unchanged(case):
    changes, message = CACHE_ERRORS[case]
    r = rng_arrays(23)
    q, k_new, v_new = r(2, 2, 4, 8), r(2, 2, 2, 8), r(2, 2, 2, 8)
    if "block_table" in changes:
        k_cache, v_cache = r(6, 32, 2, 8), r(6, 32, 2, 8)  # paged: 6 blocks of 32
        extra = dict(block_table=np.array(changes["block_table"], np.int32), cache_seqlens=[40, 40])
        if "cache_seqlens" in changes:
            extra["cache_seqlens"] = changes["cache_seqlens"]
    else:
        k_cache, v_cache = r(3, 64, 2, 8), r(3, 64, 2, 8)
        extra = {key: np.array(value, np.int32) for key, value in changes.items()}
        extra.setdefault("cache_seqlens", np.array([5, 5], np.int32))
    k0, v0 = k_cache.copy(), v_cache.copy()
    with pytest.raises(ValueError, match=message):
        flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, **extra)
    assert np.array_equal(k_cache, k0) and np.array_equal(v_cache, v0)


APPEND_CONFLICTS = {
    # Without cache_batch_idx, entry b uses cache row b: two entries need two rows.
    "batch past cache_batch": (1, {}, r"batch \(2\) exceeds cache_batch \(1\)"),
    "two entries append to one row": (3, dict(cache_batch_idx=[1, 1]),
                                      r"cache_batch_idx\[0\] and cache_batch_idx\[1\] are both 1"),
    "two entries append into one block": (6, dict(block_table=[[0, 2], [1, 2]], cache_seqlens=[40, 40]),
                                          r"entries 0 and 1 both append into block 2"),
}


@pytest.mark.parametrize("case", APPEND_CONFLICTS)
def test_appends_that_would_collide_are_rejected(case):
    rows, extra, message = APPEND_CONFLICTS[case]
    r = rng_arrays(25)
    q, k_new, v_new = r(2, 2, 4, 8), r(2, 2, 2, 8), r(2, 2, 2, 8)
    k_cache, v_cache = r(rows, 32 if "block_table" in extra else 64, 2, 8), r(rows, 32 if "block_table" in extra else 64, 2, 8)
    extra = {key: np.array(value, np.int32) for key, value in extra.items()}
    extra.setdefault("cache_seqlens", np.array([5, 5], np.int32))
    k0, v0 = k_cache.copy(), v_cache.copy()
    with pytest.raises(ValueError, match=message):
        flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, **extra)
    assert np.array_equal(k_cache, k0) and np.array_equal(v_cache, v0)
    if "cache_batch_idx" in extra or "block_table" in extra:
        # Reading one row or block from two entries (a shared prefix) is fine without an append.
        out = flash_attn_with_kvcache(q, k_cache, v_cache, **extra)
        assert np.isfinite(out).all()


def test_option_errors():
    q, k, v = random_inputs(24, 1, 4, 4, 2, 1, 8)
    with pytest.raises(ValueError, match=r"window_size\[0\] \(-2\) must be >= -1"):
        flash_attn_func(q, k, v, window_size=(-2, 0))
    with pytest.raises(ValueError, match="softcap"):
        flash_attn_func(q, k, v, softcap=-1.0)
    with pytest.raises(ValueError, match="alibi_slopes must have shape"):
        flash_attn_func(q, k, v, alibi_slopes=np.ones(3, np.float32))
    with pytest.raises(TypeError, match="alibi_slopes must have dtype float32"):
        flash_attn_func(q, k, v, alibi_slopes=np.ones(2))
    with pytest.raises(ValueError, match=r"alibi_slopes has a non-finite value \(nan\)"):
        flash_attn_func(q, k, v, alibi_slopes=np.array([0.1, np.nan], np.float32))
    with pytest.raises(ValueError, match="sinks must have shape"):
        flash_attn_func(q, k, v, sinks=np.ones(5, np.float32))

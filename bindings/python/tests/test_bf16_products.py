"""bfloat16 q, k and v on every kernel path, and the avx512bf16 path's bfloat16 products.

On the avx512bf16 path (AVX512_BF16: `vdpbf16ps`) bfloat16 inputs multiply in bfloat16 pairs accumulated in
float32, and the probabilities are rounded to bfloat16 for P·V, as FlashAttention on GPUs and PyTorch's bfloat16
SDPA on CPUs do; the other paths widen to float32. Acceptance rule (FlashAttention-2's, the issue's): the
library's error against float64 attention on the same inputs is at most 2× the error of a bfloat16 SDPA —
PyTorch's where torch is installed, and always a float64 model of one (probabilities rounded to bfloat16 before
P·V, the output rounded to bfloat16), so that the rule is checked without torch too. `make test-python` runs this
file on every path the CPU has (FLASH_ATTENTION_ISA); the path is in the run's header.
"""

import os
import pathlib

import numpy as np
import pytest

from flash_attention import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache, library_info, reference_attention
from flash_attention.reference import _softmax

from conftest import BF16_PAIR_PATHS, assert_follows_rounding, bf16_problem, max_error, needs_torch, shape_id, torch_bf16_sdpa

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = ml_dtypes.bfloat16
PATH = library_info()["kernel_isa"]
PAIRS = PATH in BF16_PAIR_PATHS


def bf16_sdpa_model(q, k, v, **options):
    """float64 attention with the two roundings of a bfloat16 SDPA: each probability e^(s − max) rounded to
    bfloat16 before P·V (the sum and the division exact), and the output rounded to bfloat16."""
    s = _softmax(q, k, options.get("softmax_scale"), options.get("causal", False), options.get("window_size", (-1, -1)),
                 options.get("softcap", 0.0), options.get("alibi_slopes"), None, options.get("attn_mask"))
    sk = k.shape[1]
    e = s["p"][..., :sk] * s["total"]
    with np.errstate(invalid="ignore", divide="ignore"):
        weights = np.where(s["total"] == 0, 0.0, e.astype(BF16).astype(np.float64) / s["total"])
    vr = np.repeat(np.asarray(v, np.float64), q.shape[2] // v.shape[2], axis=2)
    return np.einsum("bhqk,bkhd->bqhd", weights, vr).astype(BF16).astype(np.float64)


SHAPES = [  # (batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, options)
    (1, 1, 1, 1, 1, 1, {}),
    (1, 7, 13, 1, 1, 3, {"causal": True}),
    (2, 113, 203, 4, 2, 64, {"causal": True}),
    (1, 300, 300, 2, 2, 128, {}),
    (1, 130, 77, 2, 1, 33, {}),
    (3, 1, 500, 8, 2, 128, {"causal": True}),
    (1, 200, 333, 4, 4, 80, {"window_size": (50, 7)}),
    (2, 97, 97, 3, 3, 127, {"window_size": (0, 0)}),
    (1, 150, 150, 2, 2, 64, {"causal": True, "softcap": 5.0}),
    (1, 150, 190, 4, 2, 96, {"alibi_slopes": np.array([0.5, 0.25, 0.125, 0.0625], np.float32)}),
    (1, 600, 700, 2, 1, 128, {"causal": True}),
    (1, 120, 171, 2, 2, 64, {"attn_mask": np.random.default_rng(5).random((120, 171)) < 0.5}),
    (1, 99, 99, 2, 1, 48, {"causal": True, "attn_mask": np.random.default_rng(6).standard_normal((2, 99, 99)).astype(np.float32)}),
]


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_error_within_twice_a_bf16_sdpa(shape):
    b, sq, sk, hq, hk, d, options = shape
    q, k, v = bf16_problem(60 + d, b, sq, sk, hq, hk, d)
    out, lse = flash_attn_func(q, k, v, return_lse=True, **options)
    assert out.dtype == BF16
    ref, ref_lse = reference_attention(q, k, v, return_lse=True, **options)
    ours, model = max_error(out, ref), max_error(bf16_sdpa_model(q, k, v, **options), ref)
    assert ours <= 2 * model + 1e-12, f"{PATH}: error {ours:.3g} > 2 × {model:.3g} (bfloat16 SDPA model)"
    # The LSE comes from float32 scores and unrounded probabilities on every path.
    finite = np.isfinite(ref_lse)
    assert np.array_equal(np.isfinite(lse), finite)
    assert np.abs(lse[finite] - ref_lse[finite]).max(initial=0) <= 2e-5


def test_the_path_rounds_probabilities_as_it_says():
    # Where rounding P to bfloat16 moves the bfloat16 output, the pair path's outputs follow the model that
    # rounds P and the float32 paths' follow exact attention. Few keys with widely spread scores make P's
    # rounding (2^-9 relative) visible in the output.
    q, k, v = bf16_problem(70, 1, 64, 5, 1, 1, 32)
    q = (q.astype(np.float32) * 4).astype(BF16)
    out = np.asarray(flash_attn_func(q, k, v), np.float64)
    exact = reference_attention(q, k, v).astype(BF16).astype(np.float64)
    rounded = bf16_sdpa_model(q, k, v)
    assert_follows_rounding(out, exact, rounded, PAIRS, PATH)


@pytest.mark.parametrize("options", [{"causal": True}, {"window_size": (31, 3)}], ids=["causal", "window"])
def test_hidden_nan_values_reach_no_row(options):
    # Values (and keys) the mask hides are NaN: no visible row may see them, also where a row's visible keys
    # start or end inside a bfloat16 pair.
    q, k, v = bf16_problem(71, 1, 91, 91, 2, 2, 40)
    out = flash_attn_func(q, k, v, **options)
    ref = reference_attention(q, k, v, **options)
    # One value row at a time is NaN (even and odd keys, at the ends and inside): exactly the rows that see it
    # turn NaN, the others are unchanged bit for bit.
    for j in (0, 1, 2, 45, 46, 89, 90):
        v2 = v.copy()
        v2[0, j] = np.nan
        poisoned = np.asarray(flash_attn_func(q, k, v2, **options), np.float64)
        sees = _softmax(q, k, None, options.get("causal", False), options.get("window_size", (-1, -1)), 0.0, None,
                        None)["visible"][:, j]
        assert np.isnan(poisoned[0, sees]).any(axis=(-1, -2)).all(), f"key {j}: a row that sees it is not NaN"
        assert np.array_equal(poisoned[0, ~sees], np.asarray(out, np.float64)[0, ~sees]), f"key {j} leaked"
    assert max_error(out, ref) <= 2 * max_error(bf16_sdpa_model(q, k, v, **options), ref) + 1e-12


def test_varlen_and_paged_cache_sequences():
    # Each sequence of a varlen call, and a prefill into a paged cache (keys located row by row through the block
    # table), against the rule sequence by sequence.
    rng = np.random.default_rng(73)
    cu_q, cu_k = np.array([0, 1, 130, 130, 331], np.int32), np.array([0, 7, 150, 160, 500], np.int32)
    q, k, v = (rng.standard_normal((n, h, 64)).astype(BF16) for n, h in ((331, 4), (500, 2), (500, 2)))
    out = flash_attn_varlen_func(q, k, v, cu_q, cu_k, causal=True)
    for b in range(4):
        rows, keys = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        if rows.stop == rows.start:
            continue
        one = [x[None] for x in (q[rows], k[keys], v[keys])]
        ref = reference_attention(*one, causal=True)[0]
        assert max_error(out[rows], ref) <= 2 * max_error(bf16_sdpa_model(*one, causal=True)[0], ref) + 1e-12, b

    page, pages = 16, 40
    k_cache, v_cache = (rng.standard_normal((pages, page, 2, 96)).astype(BF16) for _ in range(2))
    table = rng.permutation(pages)[:2 * 20].reshape(2, 20).astype(np.int32)
    q = rng.standard_normal((2, 75, 4, 96)).astype(BF16)
    seqlens = np.array([300, 211], np.int32)
    out = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens, block_table=table, causal=True)
    for b in range(2):
        rows = [(table[b][j // page], j % page) for j in range(seqlens[b])]
        keys, values = (np.stack([c[blk, off] for blk, off in rows])[None] for c in (k_cache, v_cache))
        ref = reference_attention(q[b:b + 1], keys, values, causal=True)
        model = bf16_sdpa_model(q[b:b + 1], keys, values, causal=True)
        assert max_error(out[b:b + 1], ref) <= 2 * max_error(model, ref) + 1e-12, b


def test_results_do_not_depend_on_the_thread_count():
    q, k, v = bf16_problem(72, 2, 700, 650, 4, 2, 72)
    for options in ({}, {"causal": True}, {"window_size": (100, 0)}):
        one = flash_attn_func(q, k, v, num_threads=1, **options)
        for threads in (2, 3, 0):
            assert flash_attn_func(q, k, v, num_threads=threads, **options).tobytes() == one.tobytes(), (options, threads)


def cpu_flag(name):
    try:
        return f" {name}" in pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return None


@pytest.mark.parametrize("isa, flag", [("avx512bf16", "avx512_bf16"), ("amxbf16", "amx_bf16")])
def test_bf16_paths_are_offered_exactly_where_the_cpu_has_them(isa, flag):
    has = cpu_flag(flag)
    if has is None:
        pytest.skip("no /proc/cpuinfo to read the CPU's flags from")
    available = library_info()["available_isas"]
    if os.environ.get("FLASH_ATTENTION_AMX_EMULATED"):
        # `make test-amx-emulated`: a build of the amxbf16 and portable copies alone, whose tiles are a software
        # model, offers amxbf16 wherever the CPU has AVX512_BF16.
        assert ("amxbf16" in available) == bool(cpu_flag("avx512_bf16"))
        pytest.skip("a build with emulated AMX tiles (make test-amx-emulated)")
    if not has:
        assert isa not in available
        pytest.skip(f"this CPU has no {flag}: the {isa} path is unavailable (available: {', '.join(available)})")
    if isa == "amxbf16" and isa not in available:
        pytest.skip("the CPU has AMX but the OS did not grant this process the tile state (arch_prctl)")
    assert isa in available


@needs_torch
@pytest.mark.parametrize("shape", [(1, 300, 300, 2, 2, 128, {}), (2, 113, 203, 4, 2, 64, {"causal": True}),
                                   (1, 1, 1, 1, 1, 1, {}), (1, 130, 77, 2, 1, 33, {}),
                                   (1, 600, 700, 2, 1, 128, {"causal": True})],
                         ids=shape_id)
def test_error_within_twice_torch_bf16_sdpa(shape):
    b, sq, sk, hq, hk, d, options = shape
    causal = options.get("causal", False)
    q, k, v = bf16_problem(80 + d, b, sq, sk, hq, hk, d)
    out = flash_attn_func(q, k, v, causal=causal)
    ref = reference_attention(q, k, v, causal=causal)
    theirs = torch_bf16_sdpa(q, k, v, causal)
    ours, torch_error = max_error(out, ref), max_error(theirs, ref)
    assert ours <= 2 * torch_error + 1e-12, f"{PATH}: error {ours:.3g} > 2 × torch's {torch_error:.3g}"

"""Parity of flash_attn_func with the float64 numpy reference over shapes that hit every tail."""

import numpy as np
import pytest

from conftest import assert_close, random_inputs
from flash_attention import flash_attn_func, reference_attention

# (batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, causal, layout)
SHAPES = [
    (1, 1, 1, 1, 1, 1, False, "bshd"),
    (1, 7, 7, 1, 1, 3, True, "bshd"),
    (2, 64, 64, 2, 1, 40, False, "bshd"),
    (1, 113, 203, 4, 2, 59, True, "bshd"),
    (1, 203, 113, 4, 1, 64, True, "bshd"),
    (2, 203, 113, 8, 8, 111, False, "bhsd"),
    (1, 1000, 1000, 2, 2, 128, True, "bshd"),
    (1, 333, 1000, 4, 2, 64, True, "bhsd"),
    (1, 97, 150, 2, 2, 256, False, "bshd"),
    (2, 113, 203, 8, 4, 64, False, "bshd"),
    (2, 113, 203, 8, 2, 40, True, "bhsd"),
    (2, 113, 203, 8, 1, 111, True, "bshd"),
    (3, 1, 1000, 8, 2, 128, True, "bshd"),
    (1, 300, 1, 1, 1, 16, True, "bshd"),
    (1, 1, 300, 1, 1, 16, True, "bshd"),
]


def shape_id(shape):
    b, sq, sk, hq, hk, d, causal, layout = shape
    return f"b{b}-h{hq}/{hk}-s{sq}x{sk}-d{d}" + ("-causal" if causal else "") + ("" if layout == "bshd" else f"-{layout}")


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_matches_reference(shape):
    b, sq, sk, hq, hk, d, causal, layout = shape
    q, k, v = random_inputs(sum(shape[:6]), b, sq, sk, hq, hk, d, layout)
    out, lse = flash_attn_func(q, k, v, causal=causal, return_lse=True)
    ref_out, ref_lse = reference_attention(q, k, v, causal=causal, return_lse=True)
    assert out.shape == q.shape and out.dtype == np.float32
    assert lse.shape == (b, hq, sq) and lse.dtype == np.float32
    assert_close(out, lse, ref_out, ref_lse)


@pytest.mark.parametrize("scale", [0.5, -0.3, 2.0])
def test_explicit_softmax_scale(scale):
    q, k, v = random_inputs(3, 1, 64, 97, 2, 2, 32)
    out, lse = flash_attn_func(q, k, v, softmax_scale=scale, causal=True, return_lse=True)
    assert_close(out, lse, *reference_attention(q, k, v, softmax_scale=scale, causal=True, return_lse=True))


def test_reference_algorithm_matches():
    q, k, v = random_inputs(4, 2, 113, 203, 4, 2, 59)
    out, lse = flash_attn_func(q, k, v, causal=True, return_lse=True, algorithm="reference")
    assert_close(out, lse, *reference_attention(q, k, v, causal=True, return_lse=True))


def test_rows_that_see_no_key_are_zero_with_negative_infinite_lse():
    q, k, v = random_inputs(5, 1, 5, 2, 1, 1, 4)
    out, lse = flash_attn_func(q, k, v, causal=True, return_lse=True)
    assert np.all(out[0, :3] == 0) and np.all(np.isneginf(lse[0, 0, :3]))
    np.testing.assert_allclose(out[0, 3, 0], v[0, 0, 0], atol=1e-6)
    assert np.all(np.isfinite(lse[0, 0, 3:]))


def test_empty_key_sequence():
    q, k, v = random_inputs(6, 2, 9, 0, 2, 1, 5)
    out, lse = flash_attn_func(q, k, v, return_lse=True)
    assert np.all(out == 0) and np.all(np.isneginf(lse))


@pytest.mark.parametrize("dims", [(0, 5, 5), (2, 0, 5), (2, 5, 0)])
def test_zero_sized_work(dims):
    b, sq, sk = dims
    q, k, v = random_inputs(7, b, sq, sk, 2, 1, 8)
    out, lse = flash_attn_func(q, k, v, return_lse=True)
    assert out.shape == q.shape and lse.shape == (b, 2, sq)


def test_thread_count_does_not_change_a_bit():
    q, k, v = random_inputs(8, 2, 700, 650, 4, 2, 64)
    single, single_lse = flash_attn_func(q, k, v, causal=True, return_lse=True, num_threads=1)
    for threads in (2, 3, 0):
        out, lse = flash_attn_func(q, k, v, causal=True, return_lse=True, num_threads=threads)
        assert out.tobytes() == single.tobytes() and lse.tobytes() == single_lse.tobytes()


def test_strided_views_are_not_copied_and_give_the_same_answer():
    q, k, v = random_inputs(9, 2, 113, 150, 4, 2, 64, layout="bhsd")
    assert not q.flags.c_contiguous
    contiguous = flash_attn_func(np.ascontiguousarray(q), np.ascontiguousarray(k), np.ascontiguousarray(v))
    assert flash_attn_func(q, k, v).tobytes() == contiguous.tobytes()
    # Every other row of a longer sequence, and a view strided along head_dim (the one case that is copied).
    rng = np.random.default_rng(10)
    big = rng.standard_normal((1, 40, 2, 128), dtype=np.float32)
    q2, k2, v2 = big[:, ::2], big[:, 1::2], big[:, ::4]
    out = flash_attn_func(q2, k2[:, :10], v2)
    np.testing.assert_allclose(out, reference_attention(q2, k2[:, :10], v2), atol=1e-5)
    half = big[..., ::2]
    np.testing.assert_allclose(flash_attn_func(half, half, half), reference_attention(half, half, half), atol=1e-5)

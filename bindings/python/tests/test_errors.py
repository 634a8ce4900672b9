"""Bad input raises TypeError/ValueError with a message naming the argument."""

import numpy as np
import pytest

from conftest import random_inputs
from flash_attention import flash_attn_func


@pytest.fixture
def qkv():
    return random_inputs(1, 1, 8, 8, 4, 2, 16)


def test_wrong_dtype_is_a_type_error(qkv):
    q, k, v = qkv
    with pytest.raises(TypeError, match="q must have dtype float32, float16.* got float64"):
        flash_attn_func(q.astype(np.float64), k, v)
    with pytest.raises(TypeError, match="v must be a numpy.ndarray, got list"):
        flash_attn_func(q, k, v.tolist())


def test_wrong_rank_and_mismatched_shapes(qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match="k must have 4 dimensions"):
        flash_attn_func(q, k[0], v)
    with pytest.raises(ValueError, match="v shape .* must equal k shape"):
        flash_attn_func(q, k, v[:, :5])
    with pytest.raises(ValueError, match="does not match q shape"):
        flash_attn_func(q, k[..., :8], v[..., :8])


def test_library_messages_reach_python(qkv):
    q, k, v = qkv
    k3, v3 = random_inputs(2, 1, 8, 8, 3, 3, 16)[1:]
    with pytest.raises(ValueError, match=r"heads_q \(4\) is not a multiple of heads_kv \(3\)"):
        flash_attn_func(q, k3, v3)
    big = np.zeros((1, 2, 1, 1025), np.float32)
    with pytest.raises(ValueError, match=r"head_dim \(1025\) must be in 1...1024"):
        flash_attn_func(big, big, big)


def test_bad_options(qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match=r"num_threads \(-1\) must be >= 0"):
        flash_attn_func(q, k, v, num_threads=-1)
    with pytest.raises(TypeError, match="num_threads must be an int"):
        flash_attn_func(q, k, v, num_threads=1.5)
    with pytest.raises(ValueError, match="softmax_scale .* must be finite and nonzero"):
        flash_attn_func(q, k, v, softmax_scale=float("nan"))
    with pytest.raises(ValueError, match="softmax_scale .* must be finite and nonzero"):
        flash_attn_func(q, k, v, softmax_scale=0.0)
    with pytest.raises(ValueError, match="algorithm"):
        flash_attn_func(q, k, v, algorithm="fast")


def test_library_errors_carry_their_status_code(qkv):
    from flash_attention import FlashAttentionError, FlashAttentionValueError, _capi

    q, k, v = qkv
    k3, v3 = random_inputs(2, 1, 8, 8, 3, 3, 16)[1:]
    with pytest.raises(FlashAttentionError) as caught:
        flash_attn_func(q, k3, v3)
    error = caught.value
    assert isinstance(error, FlashAttentionValueError) and isinstance(error, ValueError)
    assert error.status == _capi.FA_ERROR_INVALID_SHAPE
    assert "heads_q (4) is not a multiple of heads_kv (3)" in error.message
    with pytest.raises(FlashAttentionError) as caught:
        flash_attn_func(q, k, v, sinks=np.array([np.inf, 0, 0, 0], np.float32))
    assert caught.value.status == _capi.FA_ERROR_INVALID_ARGUMENT and "sinks" in caught.value.message

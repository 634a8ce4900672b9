"""Property tests: random shapes, GQA ratios, causal flags and strided layouts against the reference."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import assert_close
from flash_attention import flash_attn_func, reference_attention


@st.composite
def problems(draw):
    batch = draw(st.integers(1, 2))
    heads_kv = draw(st.integers(1, 3))
    heads_q = heads_kv * draw(st.sampled_from([1, 2, 4]))
    seqlen_q = draw(st.integers(1, 150))
    seqlen_k = draw(st.integers(0, 150))
    head_dim = draw(st.integers(1, 80))
    causal = draw(st.booleans())
    # Each tensor gets its own axis order in memory, viewed back as [b, s, h, d].
    orders = [draw(st.permutations([0, 1, 2])) for _ in range(3)]
    seed = draw(st.integers(0, 2**31))
    return batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, causal, orders, seed


def strided(rng, shape, order):
    """A [b, s, h, d] view of an array stored with its first three axes permuted by `order`."""
    stored = rng.standard_normal(tuple(shape[i] for i in order) + (shape[3],), dtype=np.float32)
    inverse = np.argsort(order)
    return stored.transpose(tuple(inverse) + (3,))


@settings(max_examples=60, deadline=None)
@given(problems())
def test_random_problems_match_reference(problem):
    batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, causal, orders, seed = problem
    rng = np.random.default_rng(seed)
    q = strided(rng, (batch, seqlen_q, heads_q, head_dim), orders[0])
    k = strided(rng, (batch, seqlen_k, heads_kv, head_dim), orders[1])
    v = strided(rng, (batch, seqlen_k, heads_kv, head_dim), orders[2])
    out, lse = flash_attn_func(q, k, v, causal=causal, return_lse=True)
    assert_close(out, lse, *reference_attention(q, k, v, causal=causal, return_lse=True))

"""Forward accuracy on long N(0, 1) rows: a bound tighter than the parity tests', which a P·V summed onto the
running output key after key exceeded.

The output tiles sum each key block's P·V from zero and add the rescaled output once per block, so the
float32 rounding error grows with the square root of the block's keys, not of seqlen_k. On these cases every
kernel path reaches 3.5–5.5e-7 (‖out − ref‖_F / ‖ref‖_F); summing key after key gave 0.88–1.2e-6 on the
non-causal ones, and PyTorch's SDPA gives 4–5e-7 on like shapes (bench/accuracy.py, bench/RESULTS.md).
"""

import numpy as np
import pytest

from conftest import random_inputs
from flash_attention import flash_attn_func, reference_attention

# Relative Frobenius error allowed here: every path's figure plus ~10%, below the old code's on every non-causal case.
FORWARD_BOUND = 6e-7

# (batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, causal)
CASES = [
    (1, 4096, 4096, 1, 1, 64, False),
    (1, 2048, 2048, 2, 2, 64, False),
    (1, 1024, 3000, 2, 1, 96, False),
    (1, 2048, 2048, 2, 2, 128, True),
]


def case_id(case):
    b, sq, sk, hq, hk, d, causal = case
    return f"b{b}-h{hq}/{hk}-s{sq}x{sk}-d{d}" + ("-causal" if causal else "")


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_forward_relative_error(case):
    *shape, causal = case
    q, k, v = random_inputs(sum(shape), *shape)
    out = flash_attn_func(q, k, v, causal=causal)
    ref = reference_attention(q, k, v, causal=causal)
    error = np.linalg.norm((out - ref).ravel()) / np.linalg.norm(ref.ravel())
    assert error <= FORWARD_BOUND, f"relative error {error:.3g} > {FORWARD_BOUND:.3g}"

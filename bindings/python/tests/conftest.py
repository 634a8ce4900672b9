import os
import pathlib
import sys

import numpy as np
import pytest

# Tests run against the source tree without installing the package.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))


def pytest_report_header(config):
    """Says which kernel path this run exercises (`make test-python` runs the suite once per path)."""
    from flash_attention import library_info

    info = library_info()
    return (f"flash_attention kernel path: {info['kernel_isa']} (available: {', '.join(info['available_isas'])};"
            f" FLASH_ATTENTION_ISA={os.environ.get('FLASH_ATTENTION_ISA', '')!r})")

# Accuracy policy for float32 on N(0, 1) inputs, written once (same bars as the Swift tests).
RELATIVE_BOUND = 2e-6
ABSOLUTE_BOUND = 1e-5
LSE_BOUND = 1e-5


def random_inputs(seed, batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, layout="bshd"):
    """q, k, v as float32 N(0, 1); layout "bhsd" returns [b, s, h, d] views of [b, h, s, d] arrays."""
    rng = np.random.default_rng(seed)

    def make(seq, heads):
        if layout == "bhsd":
            return rng.standard_normal((batch, heads, seq, head_dim), dtype=np.float32).transpose(0, 2, 1, 3)
        return rng.standard_normal((batch, seq, heads, head_dim), dtype=np.float32)

    return make(seqlen_q, heads_q), make(seqlen_k, heads_kv), make(seqlen_k, heads_kv)


def assert_close(out, lse, ref_out, ref_lse):
    """Asserts the accuracy policy; -inf LSE must match exactly."""
    diff = np.linalg.norm((out - ref_out).ravel())
    scale = np.linalg.norm(ref_out.ravel())
    relative = diff / scale if scale > 0 else diff
    assert relative <= RELATIVE_BOUND, f"relative error {relative:.3g}"
    assert np.abs(out - ref_out).max(initial=0) <= ABSOLUTE_BOUND, f"max error {np.abs(out - ref_out).max():.3g}"
    if lse is not None:
        infinite = np.isneginf(ref_lse)
        assert np.array_equal(np.isneginf(lse), infinite), "-inf LSE rows differ"
        finite = ~infinite
        assert np.abs(lse[finite] - ref_lse[finite]).max(initial=0) <= LSE_BOUND


@pytest.fixture
def inputs():
    return random_inputs


GRADIENT_BOUND = 1e-5  # relative (norm) error of each float32 gradient, as test_backward's


def assert_gradient(name, got, want):
    """The relative bound, or (where the exact gradient cancels to ~0, e.g. a row that sees one key) ~0."""
    norm = np.linalg.norm(np.ravel(want))
    if norm > 1e-6:
        error = np.linalg.norm((got - want).ravel()) / norm
        assert error <= GRADIENT_BOUND, f"{name}: relative error {error:.3g}"
    else:
        assert np.abs(got).max(initial=0) <= 1e-6, name



# The paths whose products take bfloat16 pairs (vdpbf16ps, AMX tiles) and round P (and dS) to bfloat16.
BF16_PAIR_PATHS = ("avx512bf16", "amxbf16")


def bf16_problem(seed, b, sq, sk, hq, hk, d, dout=False):
    """q, k, v (and with `dout` a dout of q's shape) as bfloat16 N(0, 1) arrays, [b, s, h, d]."""
    import ml_dtypes

    rng = np.random.default_rng(seed)
    shapes = ((b, sq, hq, d), (b, sk, hk, d), (b, sk, hk, d)) + (((b, sq, hq, d),) if dout else ())
    return tuple(rng.standard_normal(shape).astype(ml_dtypes.bfloat16) for shape in shapes)


def shape_id(shape):
    """A test id for (batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, options)."""
    b, sq, sk, hq, hk, d, options = shape
    return f"b{b}-s{sq}x{sk}-h{hq}/{hk}-d{d}" + "".join(f"-{name}" for name in options)


def assert_follows_rounding(got, exact, rounded, pairs, path):
    """Where the exact result and the rounded-probability model differ (at least 50 places), a path that rounds P
    to bfloat16 (`pairs`) must give the model's value at ≥ 90% of them, any other path at ≤ 10%."""
    differ = exact != rounded
    assert differ.sum() >= 50, "the inputs should separate the two models"
    follows_rounded = np.mean(got[differ] == rounded[differ])
    if pairs:
        assert follows_rounded >= 0.9, f"{path}: only {follows_rounded:.0%} follow rounded probabilities"
    else:
        assert follows_rounded <= 0.1, f"{path}: {follows_rounded:.0%} follow rounded probabilities"


def max_error(got, want):
    """The largest absolute difference, in float64."""
    return np.abs(np.asarray(got, np.float64) - want).max(initial=0)


torch = None
if os.environ.get("FLASH_ATTENTION_SKIP_TORCH") != "1":
    try:
        import torch
    except ImportError:
        torch = None
needs_torch = pytest.mark.skipif(torch is None, reason="PyTorch is not installed (pip install torch==2.13.0)")


def torch_bf16_sdpa(q, k, v, causal, dout=None):
    """PyTorch's bfloat16 SDPA on [b, s, h, d] inputs, as float64 [b, s, h, d]: the output, or with `dout` the
    gradients (dq, dk, dv). The causal mask is aligned bottom-right, as the library (and FlashAttention-2) does;
    torch's own `is_causal` aligns it top-left, so it only serves square problems."""
    import torch.nn.functional as F

    def tensor(x):
        return torch.from_numpy(np.ascontiguousarray(np.asarray(x, np.float32).transpose(0, 2, 1, 3))).to(torch.bfloat16)

    def array(t):
        return t.float().numpy().transpose(0, 2, 1, 3).astype(np.float64)

    tq, tk, tv = (tensor(x) for x in (q, k, v))
    sq, sk = q.shape[1], k.shape[1]
    kw = {"is_causal": causal and sq == sk, "enable_gqa": q.shape[2] != k.shape[2]}
    if causal and sq != sk:
        i, j = np.arange(sq)[:, None], np.arange(sk)[None, :]
        kw["attn_mask"] = torch.from_numpy(j <= i + sk - sq)
    if dout is None:
        return array(F.scaled_dot_product_attention(tq, tk, tv, **kw))
    for t in (tq, tk, tv):
        t.requires_grad_(True)
    F.scaled_dot_product_attention(tq, tk, tv, **kw).backward(tensor(dout))
    return tuple(array(t.grad) for t in (tq, tk, tv))

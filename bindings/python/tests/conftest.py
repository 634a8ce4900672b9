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


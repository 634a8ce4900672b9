"""Ring attention (flash_attention.distributed): MPI runs of mpi_ring_check.py, plus checks that need no MPI."""

import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from flash_attention import flash_attn_func
from flash_attention.distributed import ring_attention, shard, unshard

CHECK = pathlib.Path(__file__).resolve().parent / "mpi_ring_check.py"


def _mpi_missing():
    """Why the MPI runs cannot happen here, or None (MPI is an optional dependency: make deps-mpi)."""
    if shutil.which("mpirun") is None:
        return "mpirun not found (install with Tests/mpi/install_mpi.sh)"
    if importlib.util.find_spec("mpi4py") is None:
        return "mpi4py not importable (install with Tests/mpi/install_mpi.sh)"
    return None


@pytest.mark.parametrize("ranks", [2, 4], ids=lambda n: f"n{n}")
def test_ring_attention_matches_single_process(ranks):
    reason = _mpi_missing()
    if reason:
        pytest.skip(reason)
    # Inherits FLASH_ATTENTION_LIBRARY etc.; OpenMPI refuses to run as root without the first two, and its
    # shared-memory transport's single-copy mode (CMA) needs ptrace rights that containers often withhold.
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMPI_MCA_btl_vader_single_copy_mechanism="none")
    command = ["mpirun", "-n", str(ranks), "--oversubscribe", sys.executable, str(CHECK)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}"
    assert f"cases passed on {ranks} ranks" in result.stdout


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("size", [1, 3, 4])
def test_shard_unshard_round_trip(layout, size):
    x = np.arange(2 * 24 * 3).reshape(2, 24, 3)
    parts = [shard(x, rank, size, layout) for rank in range(size)]
    assert all(p.shape == (2, 24 // size, 3) for p in parts)
    np.testing.assert_array_equal(unshard(parts, layout), x)


def test_zigzag_holds_chunks_r_and_2n_minus_1_minus_r():
    x = np.arange(8)[None]
    assert shard(x, 1, 2, "zigzag").tolist() == [[2, 3, 4, 5]]
    assert shard(x, 0, 2, "zigzag").tolist() == [[0, 1, 6, 7]]


def test_shard_rejects_indivisible_seqlen():
    with pytest.raises(ValueError, match="divisible by 4"):
        shard(np.zeros((1, 6, 1, 1)), 0, 2, "zigzag")


class _SelfComm:
    """The one-rank communicator ring_attention needs (allgather, rank, size): runs without MPI."""

    def Get_rank(self):
        return 0

    def Get_size(self):
        return 1

    def allgather(self, value):
        return [value]


@pytest.mark.parametrize("window", [(-1, -1), (5, -1), (20, 3), (-1, 0)], ids=lambda w: f"w{w[0]}/{w[1]}")
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_one_rank_equals_flash_attn_func(inputs, causal, layout, window):
    q, k, v = inputs(7, 1, 32, 32, 4, 2, 40)
    out, lse = ring_attention(q, k, v, _SelfComm(), causal=causal, window_size=window, layout=layout,
                              return_lse=True)
    expected, expected_lse = flash_attn_func(q, k, v, causal=causal, window_size=window, return_lse=True)
    if layout == "zigzag":  # the one rank's two chunks are merged block by block: the same rows, other sums
        np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5)
        np.testing.assert_allclose(lse, expected_lse, rtol=0, atol=1e-5)
    else:
        np.testing.assert_array_equal(out, expected)
        np.testing.assert_array_equal(lse, expected_lse)


def test_alibi_is_not_implemented(inputs):
    q, k, v = inputs(0, 1, 8, 8, 2, 2, 8)
    with pytest.raises(NotImplementedError, match="alibi_slopes"):
        ring_attention(q, k, v, _SelfComm(), alibi_slopes=np.ones(2, np.float32))


def test_rejects_q_and_k_of_different_rows(inputs):
    q, k, v = inputs(0, 1, 8, 16, 2, 2, 8)
    with pytest.raises(ValueError, match="seqlen_local"):
        ring_attention(q, k, v, _SelfComm())


def test_rejects_a_window_below_minus_one(inputs):
    q, k, v = inputs(0, 1, 8, 8, 2, 2, 8)
    with pytest.raises(ValueError, match=r"window_size \(\(-2, 0\)\) must be two integers >= -1"):
        ring_attention(q, k, v, _SelfComm(), window_size=(-2, 0))


def test_half_precision_shards_are_computed_in_float32(inputs):
    # Every block's partial result is merged in float32, so float16 inputs give float16 inputs' exact
    # float32 attention (no rounding per block).
    q, k, v = (x.astype(np.float16) for x in inputs(3, 1, 32, 32, 4, 2, 40))
    out = ring_attention(q, k, v, _SelfComm(), causal=True, layout="zigzag")
    expected = flash_attn_func(*(x.astype(np.float32) for x in (q, k, v)), causal=True)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5)

"""Checks ring attention against one process: run as `mpirun -n N python3 mpi_ring_check.py`.

Every rank builds the full q, k, v from one seed and keeps its shard; rank 0 gathers the results, compares
them with flash_attn_func / flash_attn_backward on the full arrays and with the float64 reference, prints
one line per case, and every rank exits non-zero if any case failed.
"""

import pathlib
import sys

import numpy as np
from mpi4py import MPI

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from flash_attention import flash_attn_backward, flash_attn_func, reference_attention  # noqa: E402
from flash_attention.distributed import ring_attention, ring_attention_backward, shard, unshard  # noqa: E402

# Float32 bar of the issue: relative error (norm of the difference over norm of the expected) of out, lse
# and the gradients. Merging per block reorders the sums, so bitwise equality is not expected.
BOUND = 1e-5

# (batch, heads_q, heads_kv, seqlen, head_dim, causal, layout, options); seqlen is divisible by 8 = 2N for
# N = 1, 2, 4, and 120 gives an odd zig-zag chunk (15 rows) at N = 4.
CASES = [
    (1, 4, 4, 96, 64, False, "contiguous", {}),
    (1, 4, 4, 96, 64, True, "contiguous", {}),
    (1, 4, 2, 96, 40, True, "zigzag", {}),
    (2, 4, 2, 120, 40, True, "contiguous", {}),
    (1, 4, 2, 120, 40, True, "zigzag", {"softcap": 30.0, "softmax_scale": 0.5}),
    (1, 4, 2, 96, 64, False, "zigzag", {"softcap": 5.0}),
    # Windows on global positions, narrower and wider than a chunk (12 to 48 rows here).
    (1, 4, 2, 96, 40, True, "contiguous", {"window_size": (30, -1)}),
    (1, 4, 2, 96, 40, True, "zigzag", {"window_size": (7, 0)}),
    (1, 2, 1, 96, 40, False, "zigzag", {"window_size": (17, 29)}),
    (1, 2, 2, 120, 64, False, "contiguous", {"window_size": (-1, 3), "softcap": 10.0}),
]


def relative(actual, expected):
    """Norm-relative error; rows with -inf LSE must match exactly and are left out of the norm."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    infinite = np.isneginf(expected)
    if not np.array_equal(np.isneginf(actual), infinite):
        return np.inf
    diff = np.linalg.norm((actual - expected)[~infinite])
    scale = np.linalg.norm(expected[~infinite])
    return diff / scale if scale > 0 else diff


def run_case(comm, index, case):
    """Runs one case on every rank; on rank 0 returns (name, errors), elsewhere None."""
    batch, heads_q, heads_kv, seqlen, head_dim, causal, layout, options = case
    rank, size = comm.Get_rank(), comm.Get_size()
    rng = np.random.default_rng(1234 + index)
    q = rng.standard_normal((batch, seqlen, heads_q, head_dim), dtype=np.float32)
    k, v, dout = (rng.standard_normal(shape, dtype=np.float32)
                  for shape in [(batch, seqlen, heads_kv, head_dim)] * 2 + [q.shape])
    local = [shard(x, rank, size, layout) for x in (q, k, v, dout)]
    out, lse = ring_attention(*local[:3], comm, causal=causal, layout=layout, return_lse=True, num_threads=1,
                              **options)
    grads = ring_attention_backward(local[3], *local[:3], out, lse, comm, causal=causal, layout=layout,
                                    num_threads=1, **options)
    gathered = comm.gather((out, lse) + grads, root=0)
    if rank != 0:
        return None
    out, lse, dq, dk, dv = (unshard([g[i] for g in gathered], layout, axis=2 if i == 1 else 1) for i in range(5))
    single_out, single_lse = flash_attn_func(q, k, v, causal=causal, return_lse=True, num_threads=1, **options)
    ref_out, ref_lse = reference_attention(q, k, v, causal=causal, return_lse=True, **options)
    single_grads = flash_attn_backward(dout, q, k, v, single_out, single_lse, causal=causal, num_threads=1, **options)
    errors = {
        "out": relative(out, single_out), "lse": relative(lse, single_lse),
        "out_ref": relative(out, ref_out), "lse_ref": relative(lse, ref_lse),
        **{name: relative(a, b) for name, a, b in zip(("dq", "dk", "dv"), (dq, dk, dv), single_grads)},
    }
    extras = "".join(f"-{key}{value}" for key, value in options.items()).replace(" ", "")
    name = f"b{batch}-h{heads_q}/{heads_kv}-s{seqlen}-d{head_dim}-{'causal' if causal else 'full'}-{layout}{extras}"
    return name, errors


def main():
    comm = MPI.COMM_WORLD
    failures = 0
    for index, case in enumerate(CASES):
        result = run_case(comm, index, case)
        if result is not None:
            name, errors = result
            ok = all(e <= BOUND for e in errors.values())
            failures += not ok
            detail = " ".join(f"{key}={value:.2e}" for key, value in errors.items())
            print(f"{'ok  ' if ok else 'FAIL'} n={comm.Get_size()} {name}: {detail}", flush=True)
    failures = comm.bcast(failures, root=0)
    if comm.Get_rank() == 0:
        print(f"{len(CASES) - failures}/{len(CASES)} cases passed on {comm.Get_size()} ranks", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

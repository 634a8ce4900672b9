#!/usr/bin/env python3
"""Ring attention benchmark: `mpirun -n N python3 bench/ring_bench.py [--seqlen S] [--heads H] [--threads T]`.

One long causal sequence [1, S, H, 64] (zig-zag and contiguous layouts) split over N ranks. Per layout,
rank 0 prints: time per call (median of 3 after a warm-up; a call's time is the slowest rank's),
bytes sent per rank, and overlap = compute time / wall time of the ring loop (1.0 means every transfer
was hidden behind compute; the slowest rank's value). Compute is the local attention and merges;
wall - compute is time spent waiting for a block. Each rank uses --threads threads (default 1), so
N ranks need N free cores for times that mean anything.
"""

import argparse
import pathlib
import statistics
import sys
import time

import numpy as np
from mpi4py import MPI

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "bindings" / "python"))

from flash_attention.distributed import ring_attention, shard  # noqa: E402

REPEATS = 3


def measure(comm, q, k, v, layout, threads):
    """(median seconds, bytes sent, overlap) of ring_attention, each the slowest rank's."""
    times, overlaps, stats = [], [], {}
    for repeat in range(REPEATS + 1):  # the first call warms up
        comm.Barrier()
        begin = time.perf_counter()
        ring_attention(q, k, v, comm, causal=True, layout=layout, num_threads=threads, stats=stats)
        elapsed = comm.allreduce(time.perf_counter() - begin, op=MPI.MAX)
        if repeat:
            times.append(elapsed)
            overlaps.append(comm.allreduce(stats["compute_s"] / stats["wall_s"], op=MPI.MIN))
    return statistics.median(times), comm.allreduce(stats["bytes_sent"], op=MPI.MAX), statistics.median(overlaps)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqlen", type=int, default=8192)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="threads per rank")
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    rng = np.random.default_rng(0)
    full = [rng.standard_normal((1, args.seqlen, args.heads, args.head_dim), dtype=np.float32) for _ in range(3)]
    if rank == 0:
        print(f"causal 1x{args.heads}x{args.seqlen}x{args.head_dim} float32, {size} rank(s) x {args.threads} thread(s)")
        print(f"{'ranks':>5} {'layout':>10} {'time ms':>9} {'MB sent/rank':>12} {'overlap':>7}")
    for layout in ("contiguous", "zigzag"):
        q, k, v = (shard(x, rank, size, layout) for x in full)
        seconds, sent, overlap = measure(comm, q, k, v, layout, args.threads)
        if rank == 0:
            print(f"{size:>5} {layout:>10} {seconds * 1e3:>9.1f} {sent / 1e6:>12.2f} {overlap:>7.2f}", flush=True)


if __name__ == "__main__":
    main()

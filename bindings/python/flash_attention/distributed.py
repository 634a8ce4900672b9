"""Ring attention: exact attention over one long sequence split across MPI processes.

Each rank holds a shard of q, k and v. The K/V shards travel once around the ring (rank r sends to r + 1
and receives from r - 1) with non-blocking send/receive, so the next block is in flight while the local
queries attend to the block in hand; partial results are combined exactly with the LSE merge.

Layouts (S = global seqlen, N = ranks):
- "contiguous": rank r holds rows [r·S/N, (r+1)·S/N).
- "zigzag": the sequence is cut into 2N chunks and rank r holds chunks r and 2N-1-r, concatenated. Under a
  causal mask every rank then does the same work (an early chunk sees little, its late partner a lot).

`comm` is any mpi4py communicator; this module does not import mpi4py, so it loads without MPI.
"""

import time

import numpy as np

from .api import flash_attn_backward, flash_attn_func, merge_attention_states

LAYOUTS = ("contiguous", "zigzag")


def _chunk_indices(rank, size, layout):
    """The global chunk indices a rank holds, in local order, and the number of chunks in the sequence."""
    if layout == "contiguous":
        return (rank,), size
    if layout == "zigzag":
        return (rank, 2 * size - 1 - rank), 2 * size
    raise ValueError(f"layout ({layout!r}) must be one of {LAYOUTS}")


def shard(x, rank, size, layout="contiguous", axis=1):
    """The part of a full array `x` (sequence along `axis`) that `rank` of `size` holds under `layout`."""
    chunks, count = _chunk_indices(rank, size, layout)
    if x.shape[axis] % count:
        raise ValueError(f"x has seqlen {x.shape[axis]} along axis {axis}, which must be divisible by {count} "
                         f"({layout} layout over {size} ranks)")
    parts = np.split(x, count, axis=axis)
    return np.concatenate([parts[c] for c in chunks], axis=axis)


def unshard(parts, layout="contiguous", axis=1):
    """The full array from every rank's shard (`parts` in rank order): the inverse of `shard`."""
    size = len(parts)
    pieces = {}
    for rank, part in enumerate(parts):
        chunks, _ = _chunk_indices(rank, size, layout)
        for c, piece in zip(chunks, np.split(part, len(chunks), axis=axis)):
            pieces[c] = piece
    return np.concatenate([pieces[c] for c in sorted(pieces)], axis=axis)


def _block_pairs(q_chunks, kv_chunks, length, causal, window_size):
    """(q rows, kv rows, causal, window) of every attention call between a local q shard and a kv block.

    Chunks are `length` rows at global offset chunk·length; the mask is on global positions. A chunk pair
    on the diagonal takes the options as given. Off the diagonal the block is cut to the rows (past keys)
    or keys (future keys) that see anything, so that the library's bottom-right alignment of the cut block
    puts the window edge where the global one is: its window becomes (left - delta + cut, -1) or
    (-1, right + delta + cut) for delta = global q offset - global k offset. Causal skips future keys.
    Without a mask the whole shard attends to the whole block in one call.
    """
    left, right = window_size
    if not causal and window_size == (-1, -1):
        yield slice(None), slice(None), False, window_size
        return
    for i, qc in enumerate(q_chunks):
        for j, kc in enumerate(kv_chunks):
            delta, q0, k0 = (qc - kc) * length, i * length, j * length
            if delta == 0:
                yield slice(q0, q0 + length), slice(k0, k0 + length), causal, window_size
            elif delta > 0:  # every key is before every query: only the left edge cuts
                rows = length if left < 0 else min(length, length - delta + left)
                if rows > 0:
                    window = (-1 if left < 0 else left - delta + length - rows, -1)
                    yield slice(q0, q0 + rows), slice(k0, k0 + length), False, window
            elif not causal:  # every key is after every query: only the right edge cuts
                keys = length if right < 0 else min(length, length + delta + right)
                if keys > 0:
                    window = (-1, -1 if right < 0 else right + delta + length - keys)
                    yield slice(q0, q0 + length), slice(k0, k0 + keys), False, window


def _validate(q, k, v, comm, layout, options):
    """Checks that every rank holds shards of one shape and dtype and was called with the same `options` (the
    ring assumes it: a rank that raised alone would leave the others waiting); returns (chunk length, chunks,
    count)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, np.ndarray) or x.ndim != 4:
            raise ValueError(f"{name} must be a 4-D numpy array [batch, seqlen_local, heads, head_dim]")
    if k.shape != v.shape or k.dtype != v.dtype:
        raise ValueError(f"v {v.shape} {v.dtype} must have k's shape and dtype {k.shape} {k.dtype}")
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"q and k must hold the same rows of the sequence: seqlen_local {q.shape[1]} != {k.shape[1]}")
    window = options.get("window_size", (-1, -1))
    if len(window) != 2 or not all(isinstance(w, (int, np.integer)) and w >= -1 for w in window):
        raise ValueError(f"window_size ({window}) must be two integers >= -1 (-1 = unbounded)")
    calls = comm.allgather((q.shape, k.shape, str(q.dtype), str(k.dtype), layout, sorted(options.items())))
    for name, index in (("q", 0), ("k", 1)):
        if len({c[index] for c in calls}) != 1:
            raise ValueError(f"{name} shards must have one shape on every rank, got {[c[index] for c in calls]}")
    if len({repr(c[2:]) for c in calls}) != 1:
        raise ValueError(f"every rank must pass the same dtypes, layout and options, got {[c[2:] for c in calls]}")
    chunks, count = _chunk_indices(comm.Get_rank(), comm.Get_size(), layout)
    if q.shape[1] % len(chunks):
        raise ValueError(f"q has seqlen_local {q.shape[1]}, which must be even for the zigzag layout")
    return q.shape[1] // len(chunks), chunks, count


def _no_alibi(alibi_slopes):
    """ALiBi's bias |global i - global j| cannot be expressed per block: a block's alignment is not its offset."""
    if alibi_slopes is not None:
        raise NotImplementedError("ring_attention does not support alibi_slopes yet: the bias is defined on global "
                                  "positions, which flash_attn_func's per-block alignment cannot express")


class _Ring:
    """A double-buffered block (K/V, or a dK/dV accumulator) travelling from rank r - 1 to rank r + 1."""

    def __init__(self, comm, buffer, tag):
        # Each ring has its own tag, so that the K/V and dK/dV rings of the backward can never match each other.
        self.comm, self.rank, self.size, self.tag = comm, comm.Get_rank(), comm.Get_size(), tag
        self.current, self.next = buffer, np.empty_like(buffer)
        self.requests = []
        self.bytes_sent = 0

    def source(self, step):
        """The rank whose block is in hand at `step`."""
        return (self.rank - step) % self.size

    def start(self):
        """Posts the send of the block in hand and the receive of the next one."""
        # As bytes: MPI has no datatype for float16 or bfloat16, and the receiver knows the layout.
        self.requests = [
            self.comm.Isend(self.current.reshape(-1).view(np.uint8), dest=(self.rank + 1) % self.size, tag=self.tag),
            self.comm.Irecv(self.next.reshape(-1).view(np.uint8), source=(self.rank - 1) % self.size, tag=self.tag)]
        self.bytes_sent += self.current.nbytes

    def finish(self):
        """Waits for both transfers; the received block becomes the one in hand."""
        for request in self.requests:
            request.Wait()
        self.requests = []
        self.current, self.next = self.next, self.current


def _run_ring(ring, compute, stats):
    """Calls compute(step) on each block while the next one travels; fills `stats` if given."""
    compute_s = 0.0
    wall = time.perf_counter()
    for step in range(ring.size):
        if step < ring.size - 1:
            ring.start()
        begin = time.perf_counter()
        compute(step)
        compute_s += time.perf_counter() - begin
        if step < ring.size - 1:
            ring.finish()
    if stats is not None:
        stats.update(steps=ring.size, bytes_sent=ring.bytes_sent, compute_s=compute_s,
                     wall_s=time.perf_counter() - wall)


def ring_attention(q, k, v, comm, softmax_scale=None, causal=False, *, window_size=(-1, -1), softcap=0.0,
                   alibi_slopes=None, layout="contiguous", return_lse=False, num_threads=0, stats=None):
    """Exact attention of this rank's queries over the keys of every rank (same result as one process).

    Args:
        q: [batch, seqlen_local, heads_q, head_dim]; k, v: [batch, seqlen_local, heads_kv, head_dim]: this
            rank's shard under `layout` (see `shard`); every rank's shards must have one shape.
        comm: an mpi4py communicator; every rank of it must call with the same options.
        causal: causal mask on global positions (query p sees key p' iff p' <= p).
        window_size: (left, right) sliding window on global positions (query p sees key p' iff
            p - left <= p' <= p + right; -1 = unbounded), combined with causal as in flash_attn_func.
        softmax_scale, softcap: as in flash_attn_func. alibi_slopes raises NotImplementedError.
        layout: "contiguous" or "zigzag" (balances causal work across ranks).
        return_lse: also return the LSE, float32 [batch, heads_q, seqlen_local].
        num_threads: threads of each local call; 0 means every core, so with several ranks per host pass
            cores / ranks per host.
        stats: optional dict, filled with steps, bytes_sent (by this rank), compute_s and wall_s.

    Returns out (q's shape, float32, local order), or (out, lse).
    """
    _no_alibi(alibi_slopes)
    window_size = tuple(window_size)
    options = dict(softmax_scale=softmax_scale, causal=causal, window_size=window_size, softcap=softcap)
    length, chunks, _ = _validate(q, k, v, comm, layout, options)
    # float32 throughout: each block's result is merged, so half-precision blocks would round once per rank.
    q, k, v = (np.asarray(x, np.float32) for x in (q, k, v))
    ring = _Ring(comm, np.stack([k, v]), tag=0)  # one packed buffer: one message per step
    batch, seqlen, heads, head_dim = q.shape
    out = np.zeros((batch, seqlen, heads, head_dim), np.float32)
    lse = np.full((batch, heads, seqlen), -np.inf, np.float32)

    def compute(step):
        kv_chunks, _ = _chunk_indices(ring.source(step), ring.size, layout)
        block = ring.current
        for rows, cols, block_causal, window in _block_pairs(chunks, kv_chunks, length, causal, window_size):
            part, part_lse = flash_attn_func(q[:, rows], block[0][:, cols], block[1][:, cols],
                                             softmax_scale=softmax_scale, causal=block_causal, window_size=window, softcap=softcap, return_lse=True,
                                             num_threads=num_threads)
            out[:, rows], lse[:, :, rows] = merge_attention_states(out[:, rows], lse[:, :, rows],
                                                                   part.astype(np.float32, copy=False), part_lse)

    _run_ring(ring, compute, stats)
    return (out, lse) if return_lse else out


def ring_attention_backward(dout, q, k, v, out, lse, comm, softmax_scale=None, causal=False, *,
                            window_size=(-1, -1), softcap=0.0, layout="contiguous", num_threads=0, stats=None):
    """Gradients (dq, dk, dv) of ring_attention for this rank's shards (float32, q/k/v shapes).

    out and lse are what ring_attention returned on this rank: flash_attn_backward with the global out and
    lse gives exactly one block's part of the gradients. K/V go around the ring as in the forward; behind
    them goes a dK/dV accumulator, which a rank can only pass on once it has added its part, so each step
    computes its part into a scratch block while the accumulator from rank - 1 is still in flight. After
    N steps the N-th send has taken every accumulator home.
    """
    window_size = tuple(window_size)
    options = dict(softmax_scale=softmax_scale, causal=causal, window_size=window_size, softcap=softcap)
    length, chunks, _ = _validate(q, k, v, comm, layout, options)
    dout, q, k, v, out = (np.asarray(x, np.float32) for x in (dout, q, k, v, out))  # as in ring_attention
    kv = _Ring(comm, np.stack([k, v]), tag=0)
    grads = _Ring(comm, np.zeros((2,) + k.shape, np.float32), tag=1)  # [dk/dv, batch, seqlen_local, heads_kv, head_dim]
    dq = np.zeros(q.shape, np.float32)

    def compute(step):
        kv_chunks, _ = _chunk_indices(kv.source(step), kv.size, layout)
        block_k, block_v = kv.current
        part = np.zeros_like(grads.current)
        for rows, cols, block_causal, window in _block_pairs(chunks, kv_chunks, length, causal, window_size):
            part_dq, part_dk, part_dv = flash_attn_backward(
                dout[:, rows], q[:, rows], block_k[:, cols], block_v[:, cols], out[:, rows], lse[:, :, rows],
                softmax_scale, block_causal, window_size=window, softcap=softcap, num_threads=num_threads)
            dq[:, rows] += part_dq
            part[0][:, cols] += part_dk
            part[1][:, cols] += part_dv
        if step > 0:
            grads.finish()  # the accumulator of this block, from rank - 1
        grads.current += part
        grads.start()

    _run_ring(kv, compute, stats)
    grads.finish()
    if stats is not None:
        stats["bytes_sent"] += grads.bytes_sent
    dk, dv = grads.current
    return dq, dk, dv

"""Fuzz driver for the C ABI: random, mostly invalid params for every entry point, over buffers that sit
directly against PROT_NONE guard pages, so any read or write outside them crashes this process.

Run by tests/test_reliability.py in a subprocess (a crash is then a failed test, not a dead test run):

    python fuzz_abi.py CASES SEED

Each case builds params for one entry point, fills every output with a sentinel, calls the library, and
checks: the call returned (no crash), a rejected call wrote nothing, an accepted call wrote nothing outside
the output elements its strides address, and no input changed (except a KV cache's appended rows). Prints
one summary line of counts per entry point; exits 1 on any violation.
"""

import ctypes
import mmap
import pathlib
import random
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from flash_attention import _capi  # noqa: E402

try:
    import ml_dtypes

    BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # bfloat16 cases are then skipped
    BF16 = None
DTYPES = [(np.dtype(np.float32), 0), (np.dtype(np.float16), 1)] + ([(BF16, 2)] if BF16 is not None else [])
SENTINEL = 12288.0  # exact in float32, float16 and bfloat16
from flash_attention._loader import load  # noqa: E402

PAGE = mmap.PAGESIZE
VERBOSE = bool(__import__("os").environ.get("FUZZ_VERBOSE"))
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
PROT_NONE = 0


class GuardedBuffer:
    """`count` elements of `dtype` placed so that they end (or start) exactly at a PROT_NONE page."""

    def __init__(self, count, dtype, rng, at_end=None):
        self.dtype = np.dtype(dtype)
        nbytes = max(1, count) * self.dtype.itemsize
        pages = (nbytes + PAGE - 1) // PAGE
        self.map = mmap.mmap(-1, (pages + 2) * PAGE)
        base = ctypes.addressof(ctypes.c_char.from_buffer(self.map))
        for guard in (base, base + (pages + 1) * PAGE):
            if _libc.mprotect(guard, PAGE, PROT_NONE) != 0:
                raise OSError(ctypes.get_errno(), "mprotect failed")
        at_end = rng.random() < 0.5 if at_end is None else at_end
        # Against the trailing guard page catches overruns; against the leading one, underruns.
        offset = PAGE + (pages * PAGE - nbytes if at_end else 0)
        offset -= offset % self.dtype.itemsize
        self.array = np.frombuffer(self.map, dtype=self.dtype, count=max(1, count), offset=offset)
        self.address = base + offset
        self.count = count


def strided_offsets(sizes, strides):
    """Element offsets addressed by a view (sizes/strides per axis), as a flat int64 array."""
    offsets = np.zeros(1, np.int64)
    for size, stride in zip(sizes, strides):
        offsets = (offsets[:, None] + np.arange(size, dtype=np.int64)[None, :] * stride).ravel()
    return offsets


def dense_strides(sizes, order, pad, rng):
    """Strides for sizes [b, s, h, d] with the first three axes nested in `order`, plus random padding."""
    strides = [0, 0, 0, 1]
    step = sizes[3] + (rng.randrange(3) if pad else 0)
    for axis in reversed(order):
        strides[axis] = step
        step *= sizes[axis]
        if pad:
            step += rng.randrange(4)
    return strides, step


class Case:
    """One fuzz case: params plus the guarded buffers behind them."""

    def __init__(self, rng, entry):
        self.rng, self.entry = rng, entry
        self.params = _capi.Params()
        lib = load()
        lib.flash_attention_params_init(ctypes.byref(self.params), ctypes.sizeof(self.params))
        self.inputs, self.outputs, self.keep = [], [], []

    def tensor(self, name, sizes, output, fill=None, dtype=np.float32):
        """A guarded [b, s, h, d] tensor with a random layout: axis order, padding, and (inputs) reversed
        axes, whose pointer then sits at the far end so that the view stays inside the buffer."""
        rng = self.rng
        order = rng.sample([0, 1, 2], 3)
        strides, _ = dense_strides(sizes, order, rng.random() < 0.3, rng)
        empty = 0 in sizes
        count = 0 if empty else int(np.dot(np.array(sizes) - 1, strides)) + 1
        buffer = GuardedBuffer(count, dtype, rng)
        values = fill if fill is not None else rng.choice(VALUE_KINDS)
        with np.errstate(over="ignore"):
            buffer.array[:] = values(rng, buffer.array.size).astype(dtype)
        start = 0
        if not output and not empty:
            for axis in range(3):
                if rng.random() < 0.2:  # reversed axis: negative stride from the last index
                    start += (sizes[axis] - 1) * strides[axis]
                    strides[axis] = -strides[axis]
        p = self.params
        setattr(p, name, buffer.address + buffer.dtype.itemsize * start if count or rng.random() < 0.5 else None)
        for field, stride in zip(("batch", "row", "head", "dim"), strides):
            setattr(p, f"{name}_{field}_stride", stride)
        record = (name, buffer, sizes, strides)
        (self.outputs if output else self.inputs).append(record)
        return buffer

    def index_array(self, name, values):
        buffer = GuardedBuffer(len(values), np.int32, self.rng, at_end=True)
        buffer.array[: len(values)] = values
        setattr(self.params, name, buffer.address if len(values) else None)
        self.inputs.append((name, buffer, None, None))
        return buffer


def normal(rng, n):
    return np.random.default_rng(rng.randrange(2**32)).standard_normal(n).astype(np.float32)


def extreme(rng, n):
    choices = np.array([0, 1, -1, 1e30, -1e30, np.inf, -np.inf, np.nan, 1e-40, 3e38], np.float32)
    return np.random.default_rng(rng.randrange(2**32)).choice(choices, n)


VALUE_KINDS = [normal, normal, normal, extreme]


def invalid_mutation(rng, case):
    """One change the library must detect and reject: the params then no longer describe their buffers
    honestly, but in a way validation can see (negative or overflowing sizes and strides, NULLs,
    misalignment, aliasing, bad options, unknown struct sizes)."""
    p = case.params
    kind = rng.randrange(13)
    case.mutation = kind
    if kind == 0:
        setattr(p, rng.choice(["batch", "seqlen_q", "seqlen_k", "heads_q", "heads_kv", "head_dim"]),
                rng.choice([-1, -(2**40), -(2**63)]))
    elif kind == 1:  # a size so large that size × stride overflows int64 (or the address space)
        setattr(p, rng.choice(["seqlen_q", "seqlen_k", "head_dim"]), rng.choice([2**62, 2**63 - 1]))
    elif kind == 2:
        name = rng.choice(["q", "k", "v", "out"])
        setattr(p, f"{name}_{rng.choice(['batch', 'row', 'head'])}_stride", rng.choice([2**62, -(2**62), 2**63 - 1]))
    elif kind == 3:
        setattr(p, f"{rng.choice(['q', 'k', 'v', 'out'])}_dim_stride", rng.choice([0, 2, -1]))
    elif kind == 4:
        p.heads_q = p.heads_kv * 2 + 1 if p.heads_kv > 1 else 0
        p.heads_kv = max(2, p.heads_kv)
    elif kind == 5:
        p.head_dim = rng.choice([0, 1025])
    elif kind == 6:  # NULL where data is needed, or a misaligned (odd) pointer
        name = rng.choice(["q", "k", "v", "out"])
        setattr(p, name, None if rng.random() < 0.5 else (getattr(p, name) or 4096) + 1)
    elif kind == 7:  # an output over an input whose buffer could hold it (else it would be a lie, not a test)
        out_count = next(b.count for name, b, _, _ in case.outputs if name == "out")
        roomy = [b for name, b, _, _ in case.inputs if name in ("q", "k", "v") and b.count >= out_count + 1]
        if roomy:
            p.out = rng.choice(roomy).address + 4 * rng.choice([0, 1])  # 4 bytes: aligned for every dtype
    elif kind == 8:
        p.struct_size = rng.choice([0, 8, 263, 265, 10**6])
    elif kind == 9:
        p.num_threads = rng.choice([-1, -(2**31)])
    elif kind == 10:
        p.softmax_scale = rng.choice([float("nan"), float("inf"), float("-inf")])
    elif kind == 11:
        p.softcap = rng.choice([-1.0, float("nan"), float("inf")])
    else:
        setattr(p, rng.choice(["dtype", "kv_dtype"]), rng.choice([-1, 3, 99]))


def build_forward(rng, entry):
    case = Case(rng, entry)
    p = case.params
    (q_dtype, p.dtype), (kv_dtype, p.kv_dtype) = rng.choice(DTYPES), rng.choice(DTYPES)
    plain_tensor = case.tensor
    case.tensor = lambda name, sizes, output, fill=None: plain_tensor(
        name, sizes, output, fill, q_dtype if name in ("q", "out") else kv_dtype)
    batch = rng.choice([0, 1, 1, 2, 3])
    heads_kv = rng.choice([1, 1, 2, 3])
    heads_q = heads_kv * rng.choice([1, 2, 4])
    head_dim = rng.choice([1, 3, 8, 16, 40, 64, 130])
    seqlen_q = rng.choice([0, 1, 2, 7, 33, 100, 300])
    seqlen_k = rng.choice([0, 1, 5, 16, 97, 300])
    if entry == "varlen":
        lengths_q = [rng.randrange(0, 40) for _ in range(batch)]
        lengths_k = [rng.randrange(0, 60) for _ in range(batch)]
        total_q, total_k = sum(lengths_q), sum(lengths_k)
        case.tensor("q", [1, total_q, heads_q, head_dim], False)
        case.tensor("k", [1, total_k, heads_kv, head_dim], False)
        case.tensor("v", [1, total_k, heads_kv, head_dim], False)
        case.tensor("out", [1, total_q, heads_q, head_dim], True, fill=sentinel)
        cu_q = np.concatenate([[0], np.cumsum(lengths_q)]).astype(np.int64)
        cu_k = np.concatenate([[0], np.cumsum(lengths_k)]).astype(np.int64)
        if rng.random() < 0.3:  # corrupt an index: out of range, out of order, or not starting at 0
            target = rng.choice([cu_q, cu_k])
            target[rng.randrange(len(target))] = rng.choice([-1, 10**6, 2**31 - 1, -(2**31)])
        case.index_array("cu_seqlens_q", cu_q)
        case.index_array("cu_seqlens_k", cu_k)
        seqlen_q, seqlen_k = total_q, total_k
        p.max_seqlen_q = rng.choice([0, 0, max(lengths_q, default=0), 1])
    elif entry == "kvcache":
        cache_batch = batch + rng.choice([0, 1, 2])
        paged = rng.random() < 0.5
        page = rng.choice([1, 3, 16])
        capacity = rng.choice([0, 5, 40])
        append = rng.choice([0, 0, 1, 3])
        seqlens = [rng.randrange(0, max(1, capacity - append + 1)) for _ in range(batch)]
        if paged:
            blocks_per_seq = max(1, (capacity + page - 1) // page)
            blocks = batch * blocks_per_seq + rng.choice([0, 2])
            case.tensor("k", [blocks, page, heads_kv, head_dim], False)
            case.tensor("v", [blocks, page, heads_kv, head_dim], False)
            table = np.array([rng.randrange(0, max(1, blocks)) for _ in range(batch * blocks_per_seq)])
            if rng.random() < 0.3 and table.size:
                table[rng.randrange(table.size)] = rng.choice([-1, blocks, 2**31 - 1])
            case.index_array("block_table", table)
            p.block_table_batch_stride = blocks_per_seq
            p.max_blocks_per_seq = blocks_per_seq
            p.cache_batch, p.cache_seqlen = blocks, page
        else:
            case.tensor("k", [cache_batch, capacity, heads_kv, head_dim], False)
            case.tensor("v", [cache_batch, capacity, heads_kv, head_dim], False)
            p.cache_batch, p.cache_seqlen = cache_batch, capacity
            if rng.random() < 0.4:
                index = [rng.randrange(0, max(1, cache_batch)) for _ in range(batch)]
                if rng.random() < 0.3 and index:
                    index[rng.randrange(len(index))] = rng.choice([-1, cache_batch, 2**31 - 1])
                case.index_array("cache_batch_idx", index)
        if rng.random() < 0.3 and seqlens:
            seqlens[rng.randrange(len(seqlens))] = rng.choice([-5, 10**6, 2**31 - 1])
        case.index_array("cache_seqlens", seqlens)
        if append:
            case.tensor("k_new", [batch, append, heads_kv, head_dim], False)
            case.tensor("v_new", [batch, append, heads_kv, head_dim], False)
            p.seqlen_new = append
        case.tensor("q", [batch, seqlen_q, heads_q, head_dim], False)
        case.tensor("out", [batch, seqlen_q, heads_q, head_dim], True, fill=sentinel)
    else:
        case.tensor("q", [batch, seqlen_q, heads_q, head_dim], False)
        case.tensor("k", [batch, seqlen_k, heads_kv, head_dim], False)
        case.tensor("v", [batch, seqlen_k, heads_kv, head_dim], False)
        case.tensor("out", [batch, seqlen_q, heads_q, head_dim], True, fill=sentinel)
    if rng.random() < 0.5:
        lse = GuardedBuffer(batch * heads_q * seqlen_q, np.float32, rng)
        lse.array[:] = np.float32(SENTINEL)
        p.lse = lse.address
        if entry == "varlen":
            p.lse_head_stride, p.lse_row_stride = seqlen_q, 1
            sizes, strides = [heads_q, seqlen_q], [seqlen_q, 1]
        else:
            p.lse_batch_stride, p.lse_head_stride, p.lse_row_stride = heads_q * seqlen_q, seqlen_q, 1
            sizes, strides = [batch, heads_q, seqlen_q], [heads_q * seqlen_q, seqlen_q, 1]
        case.outputs.append(("lse", lse, sizes, strides))
    p.batch, p.seqlen_q, p.seqlen_k = batch, seqlen_q, seqlen_k
    p.heads_q, p.heads_kv, p.head_dim = heads_q, heads_kv, head_dim
    if rng.random() < 0.35:
        invalid_mutation(rng, case)
    p.causal = rng.random() < 0.5
    p.num_threads = rng.choice([0, 1, 2, 3, 64, 2**31 - 1])
    p.softmax_scale = rng.choice([0.0, 0.0, 0.3, -1.0, 1e30])
    p.window_left = rng.choice([-1, -1, 0, 5, 2**40, -2])
    p.window_right = rng.choice([-1, -1, 0, 3, -7])
    p.softcap = rng.choice([0.0, 0.0, 5.0])
    p.algorithm = rng.choice([0, 0, 0, 1, 2, 7])
    if rng.random() < 0.2:
        slopes = GuardedBuffer(heads_q * max(1, batch), np.float32, rng)
        slopes.array[:] = rng.choice([0.1, 0.5, float("nan")])
        p.alibi_slopes, p.alibi_batch_stride = slopes.address, rng.choice([0, heads_q])
        case.keep.append(slopes)
    if rng.random() < 0.2:
        sinks = GuardedBuffer(heads_q, np.float32, rng)
        sinks.array[:] = rng.choice([0.0, 2.0, float("inf")])
        p.sinks = sinks.address
        case.keep.append(sinks)
    return case


def sentinel(rng, n):
    return np.full(n, np.float32(SENTINEL))


def output_view(case, name):
    """Sizes and strides of output `name` as the (accepted) params describe it."""
    p = case.params
    if name == "lse":
        if case.entry == "varlen":
            return [p.heads_q, p.seqlen_q], [p.lse_head_stride, p.lse_row_stride]
        return [p.batch, p.heads_q, p.seqlen_q], [p.lse_batch_stride, p.lse_head_stride, p.lse_row_stride]
    batch = 1 if case.entry == "varlen" else p.batch
    return [batch, p.seqlen_q, p.heads_q, p.head_dim], [p.out_batch_stride, p.out_row_stride, p.out_head_stride, 1]


def check(case, status):
    """Returns a violation message, or None."""
    for name, buffer, _, _ in case.outputs:
        changed = buffer.array.astype(np.float32) != np.float32(SENTINEL)
        if status != _capi.FA_OK:
            if changed.any():
                return f"rejected call (status {status}) wrote {name}"
            continue
        if getattr(case.params, name) != buffer.address:  # the output was redirected (aliasing case)
            continue
        allowed = np.zeros(buffer.array.size, bool)
        if buffer.count:
            offsets = strided_offsets(*output_view(case, name))
            offsets = offsets[(offsets >= 0) & (offsets < buffer.array.size)]
            allowed[offsets] = True
        if (changed & ~allowed).any():
            return f"accepted call wrote {name} outside its elements"
    return None


def fuzz_merge(rng, lib):
    """One flash_attention_merge case over guarded buffers; returns (accepted, violation or None)."""
    rows = rng.choice([0, 1, 3, 17, -1, 2**40])
    head_dim = rng.choice([1, 8, 33, 0, -2])
    n, d = max(rows, 0) if rows < 2**20 else 0, max(head_dim, 1)
    buffers = [GuardedBuffer(n * d, np.float32, rng), GuardedBuffer(n, np.float32, rng),
               GuardedBuffer(n * d, np.float32, rng), GuardedBuffer(n, np.float32, rng)]
    for buffer in buffers:
        buffer.array[:] = extreme(rng, buffer.array.size) if rng.random() < 0.3 else normal(rng, buffer.array.size)
    out, lse = GuardedBuffer(n * d, np.float32, rng), GuardedBuffer(n, np.float32, rng)
    out.array[:] = np.float32(12345.0)
    lse.array[:] = np.float32(12345.0)
    pointers = [b.address if rng.random() > 0.05 else None for b in buffers + [out, lse]]
    strides = [d, 1, d, 1, d, 1]
    # Invalid (overflowing) or broadcast (0: rejected for outputs) strides; never a dishonest one.
    strides = [s if rng.random() > 0.05 else rng.choice([0, 2**62, -(2**62)]) for s in strides]
    before = [b.array.copy() for b in buffers]
    args = []
    for pointer, stride in zip(pointers, strides):
        args += [pointer, stride]
    status = lib.flash_attention_merge(rows, head_dim, *args)
    for snapshot, buffer in zip(before, buffers):
        if not np.array_equal(snapshot, buffer.array, equal_nan=True):
            return status == 0, "merge changed an input"
    if status != 0 and ((out.array != 12345.0).any() or (lse.array != 12345.0).any()):
        return False, "rejected merge wrote its outputs"
    return status == 0, None


def main():
    cases, seed = int(sys.argv[1]), int(sys.argv[2])
    rng = random.Random(seed)
    lib = load()
    entries = {"forward": lib.flash_attention_forward, "varlen": lib.flash_attention_forward_varlen,
               "kvcache": lib.flash_attention_forward_kvcache}
    counts = {name: [0, 0] for name in entries}  # [tried, accepted]
    for _ in range(cases):
        entry = rng.choice(list(entries))
        case = build_forward(rng, entry)
        before = [(name, buffer.array.copy()) for name, buffer, _, _ in case.inputs]
        if VERBOSE:
            p = case.params
            print(entry, getattr(case, "mutation", None), [(n, b.address, b.count) for n, b, _, _ in case.inputs + case.outputs],
                  {name: getattr(p, name) for name, _ in p._fields_}, flush=True)
        status = entries[entry](ctypes.byref(case.params))
        counts[entry][0] += 1
        counts[entry][1] += status == _capi.FA_OK
        problem = check(case, status)
        in_place = status == _capi.FA_OK and case.params.out == case.params.q
        for (name, snapshot), (_, buffer, _, _) in zip(before, case.inputs):
            unchanged = np.array_equal(snapshot, buffer.array, equal_nan=True)
            # An accepted append writes new rows into the cache (k, v), an accepted in-place call writes
            # q; everything else is read-only.
            allowed = status == _capi.FA_OK and ((entry == "kvcache" and name in ("k", "v")) or (in_place and name == "q"))
            if not unchanged and not allowed:
                problem = problem or f"input {name} changed"
        if problem:
            print(f"VIOLATION ({entry}): {problem}")
            sys.exit(1)
    counts["merge"] = [0, 0]
    for _ in range(cases // 4):
        accepted, problem = fuzz_merge(rng, lib)
        counts["merge"][0] += 1
        counts["merge"][1] += accepted
        if problem:
            print(f"VIOLATION (merge): {problem}")
            sys.exit(1)
    summary = ", ".join(f"{name}: {tried} cases ({ok} accepted)" for name, (tried, ok) in counts.items())
    print(f"fuzzed {cases} cases, none crashed or wrote outside its outputs: {summary}")


if __name__ == "__main__":
    main()

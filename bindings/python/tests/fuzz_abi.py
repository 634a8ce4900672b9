"""Fuzz driver for the C ABI: random, mostly invalid params for every entry point, over buffers that sit
directly against PROT_NONE guard pages, so any read or write outside them crashes this process.

Run by tests/test_reliability.py in a subprocess (a crash is then a failed test, not a dead test run):

    python fuzz_abi.py CASES SEED

Each case builds params for one entry point, fills every output with a sentinel, calls the library, and
checks: the call returned (no crash), a rejected call wrote nothing, an accepted call wrote nothing outside
the output elements its strides address, and no input changed (except a KV cache's appended rows and their
scales). Prints one summary line of counts per entry point; exits 1 on any violation.

KV-cache cases are also 8-bit caches (int8, float8 E4M3) with float32 row scales in random layouts, appending
float rows, and may get one scale mutation (NULL, misaligned, overflowing or zero strides, k_scale aliasing
v_scale; or scales given with a float cache): those the library must reject are checked to be rejected.

Backward cases (flash_attention_backward) run a valid forward (dense or varlen) over guarded q, k, v, out
and lse, then build dout, dq, dk, dv and dsinks, likewise guarded, and either call as is (the call must
succeed; the gradients must be finite for finite inputs, match reference_attention_backward for small
problems, and be bitwise the same for another num_threads) or after one honest mutation (most must be
rejected). Every status must be a documented code with a last-error message exactly when it is an error,
a rejected call must leave every gradient at its sentinel, and no call may touch its inputs, its params
structs, or the bytes of a buffer's pages outside its elements (canaries).
"""

import ctypes
import mmap
import pathlib
import random
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from flash_attention import _capi  # noqa: E402
from flash_attention.reference import reference_attention_backward  # noqa: E402

try:
    import ml_dtypes

    BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # bfloat16 cases are then skipped
    BF16 = None
DTYPES = [(np.dtype(np.float32), 0), (np.dtype(np.float16), 1)] + ([(BF16, 2)] if BF16 is not None else [])
# 8-bit cache types; float8 E4M3 as its bit patterns (no numpy type needed: the values are random bytes).
QUANTIZED = [(np.dtype(np.int8), _capi.FA_DTYPE_INT8), (np.dtype(np.uint8), _capi.FA_DTYPE_FLOAT8_E4M3)]
SCALE_FIELDS = ("batch", "row", "head")
SENTINEL = 12288.0  # exact in float32, float16 and bfloat16
from flash_attention._loader import load  # noqa: E402

PAGE = mmap.PAGESIZE
VERBOSE = bool(__import__("os").environ.get("FUZZ_VERBOSE"))
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
PROT_NONE = 0
CANARY = 0xA5  # fills the bytes of a buffer's pages outside its elements


class GuardedBuffer:
    """`count` elements of `dtype` placed so that they end (or start) exactly at a PROT_NONE page; the rest
    of the pages between the guards is a canary (see canary_intact)."""

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
        self.pages = np.frombuffer(self.map, dtype=np.uint8, count=pages * PAGE, offset=PAGE)
        self.pages[:] = CANARY
        self.elements = (offset - PAGE, offset - PAGE + nbytes)  # byte range of `array` within `pages`
        self.array = np.frombuffer(self.map, dtype=self.dtype, count=max(1, count), offset=offset)
        self.address = base + offset
        self.count = count

    def canary_intact(self):
        """Whether the bytes between the guard pages but outside the elements are still the canary: a write
        just outside an array that does not reach the guard page (the unguarded side) shows here."""
        low, high = self.elements
        return bool((self.pages[:low] == CANARY).all() and (self.pages[high:] == CANARY).all())


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


class View:
    """Where a tensor's elements are: its buffer, sizes and strides as built, and the element offset of its
    pointer within the buffer (nonzero where axes are reversed)."""

    def __init__(self, buffer, sizes, strides, start):
        self.buffer, self.sizes, self.strides, self.start = buffer, sizes, strides, start

    def elements(self):
        return int(np.prod(self.sizes, dtype=object))

    def gather(self):
        """The elements as float64, shaped like `sizes`."""
        if self.elements() == 0:
            return np.zeros(self.sizes, np.float64)
        offsets = self.start + strided_offsets(self.sizes, self.strides)
        return self.buffer.array[offsets].astype(np.float64).reshape(self.sizes)


class Case:
    """One fuzz case: params plus the guarded buffers behind them."""

    def __init__(self, rng, entry):
        self.rng, self.entry = rng, entry
        self.params = _capi.Params()
        lib = load()
        lib.flash_attention_params_init(ctypes.byref(self.params), ctypes.sizeof(self.params))
        self.inputs, self.outputs, self.keep = [], [], []
        self.views = {}  # name -> View, for the backward checks
        self.must_reject = False  # set by mutations the library is sure to see
        self.quantized = False  # an 8-bit KV cache

    def tensor(self, name, sizes, output, fill=None, dtype=np.float32, target=None, reversible=None,
               fields=("batch", "row", "head", "dim")):
        """A guarded [b, s, h, d] tensor with a random layout: axis order, padding, and (inputs, or where
        `reversible` says so) reversed axes, whose pointer then sits at the far end so that the view stays
        inside the buffer. Its pointer and the strides named by `fields` are set on `target` (default: the
        forward params); row scales [b, s, h] are such a tensor with d = 1 and no dim stride."""
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
        if (not output if reversible is None else reversible) and not empty:
            for axis in range(3):
                if rng.random() < 0.2:  # reversed axis: negative stride from the last index
                    start += (sizes[axis] - 1) * strides[axis]
                    strides[axis] = -strides[axis]
        p = self.params if target is None else target
        setattr(p, name, buffer.address + buffer.dtype.itemsize * start if count or rng.random() < 0.5 else None)
        for field, stride in zip(fields, strides):
            setattr(p, f"{name}_{field}_stride", stride)
        record = (name, buffer, sizes, strides)
        (self.outputs if output else self.inputs).append(record)
        self.views[name] = View(buffer, list(sizes), list(strides), start)
        return buffer

    def index_array(self, name, values):
        buffer = GuardedBuffer(len(values), np.int32, self.rng, at_end=True)
        buffer.array[: len(values)] = values
        setattr(self.params, name, buffer.address if len(values) else None)
        self.inputs.append((name, buffer, None, None))
        return buffer


def random_bytes(rng, n):
    """Any byte is an 8-bit cache value (E4M3 NaNs included)."""
    return np.random.default_rng(rng.randrange(2**32)).integers(-128, 128, n)


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
    kind = rng.randrange(14)
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
        if rng.random() < 0.5:
            p.head_dim = rng.choice([0, 1025])
        else:
            p.head_dim_v = rng.choice([-1, 1025, -(2**63)])
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
    elif kind == 12:  # an unknown type, or int8 where only float types are allowed (a cache may be int8)
        name = rng.choice(["dtype", "kv_dtype"])
        setattr(p, name, rng.choice([-1, 99] + ([] if name == "kv_dtype" and case.entry == "kvcache" else [3])))
    elif case.entry == "kvcache" and rng.random() < 0.5:  # dropout is refused by the KV-cache call
        p.dropout_p, p.dropout_seed = rng.choice([0.1, 0.5, 0.999]), rng.randrange(2**64)
    else:  # dropout_p outside [0, 1), or a nonzero reserved2 beside it
        if rng.random() < 0.7:
            p.dropout_p = rng.choice([-0.1, 1.0, 2.0, float("nan"), float("inf"), float("-inf")])
        else:
            p.reserved2 = rng.choice([1, -1, 2**31 - 1])


def scale_mutation(rng, case):
    """One change to an 8-bit cache's row scales: NULL, misaligned and overflowing strides must be rejected
    when the scales have elements (or that axis two of them); a zero stride (a broadcast: honest, read within
    the buffer) and k_scale aliasing v_scale (same view) are rejected only when an append would write them."""
    p = case.params
    name = rng.choice(["k_scale", "v_scale"])
    sizes = [p.cache_batch, p.cache_seqlen, p.heads_kv]
    kind = rng.randrange(5)
    case.mutation = f"scale {kind}"
    if kind == 0:
        setattr(p, name, None)
        case.must_reject = 0 not in sizes
    elif kind == 1:
        setattr(p, name, (getattr(p, name) or 4096) + rng.choice([1, 2, 3]))
        case.must_reject = 0 not in sizes
    elif kind in (2, 3):
        axis = rng.randrange(3)
        setattr(p, f"{name}_{SCALE_FIELDS[axis]}_stride", rng.choice([2**62, -(2**62), 2**63 - 1]) if kind == 2 else 0)
        case.must_reject = kind == 2 and 0 not in sizes and sizes[axis] >= 2
    else:
        p.v_scale = p.k_scale
        for field in SCALE_FIELDS:
            setattr(p, f"v_scale_{field}_stride", getattr(p, f"k_scale_{field}_stride"))


def attn_mask(rng, case, sizes):
    """A guarded attention mask [batch, heads_q, queries, keys] (uint8 or float32, sometimes broadcast along
    batch or heads with stride 0); sometimes a mutation the library must reject: an unknown type, a nonzero
    reserved3, an overflowing stride, a misaligned float32 pointer."""
    p = case.params
    dtype, code = rng.choice([(np.uint8, _capi.FA_DTYPE_BOOL), (np.float32, _capi.FA_DTYPE_FLOAT32)])
    fill = random_bytes if dtype == np.uint8 else None
    Case.tensor(case, "attn_mask", sizes, False, fill=fill, dtype=dtype, fields=("batch", "head", "row", "col"))
    p.attn_mask_dtype = code
    if rng.random() < 0.3:
        setattr(p, rng.choice(["attn_mask_batch_stride", "attn_mask_head_stride"]), 0)
    if rng.random() < 0.3 and p.attn_mask is not None:
        kind = rng.randrange(4)
        case.mutation = f"attn_mask {kind}"
        if kind == 0:
            p.attn_mask_dtype = rng.choice([1, 2, 3, 4, 6, -1])
        elif kind == 1:
            p.reserved3 = 1
        elif kind == 2 and sizes[3] >= 2 and 0 not in sizes:
            p.attn_mask_col_stride = rng.choice([2**62, -(2**62)])
        elif kind == 3 and dtype == np.float32 and 0 not in sizes:
            p.attn_mask += 2
        else:
            return
        case.must_reject = True


def paged_cache(rng, case, batch, blocks_per_seq, page, heads_kv, head_dim, head_dim_v):
    """k and v as a paged cache of `page`-row blocks (sometimes two spare) with a random block table of
    `blocks_per_seq` entries per sequence, one of them sometimes out of range."""
    p = case.params
    blocks = batch * blocks_per_seq + rng.choice([0, 2])
    case.tensor("k", [blocks, page, heads_kv, head_dim], False)
    case.tensor("v", [blocks, page, heads_kv, head_dim_v], False)
    table = np.array([rng.randrange(0, max(1, blocks)) for _ in range(batch * blocks_per_seq)])
    if rng.random() < 0.3 and table.size:
        table[rng.randrange(table.size)] = rng.choice([-1, blocks, 2**31 - 1])
    case.index_array("block_table", table)
    p.block_table_batch_stride = p.max_blocks_per_seq = blocks_per_seq
    p.cache_batch, p.cache_seqlen = blocks, page


def build_forward(rng, entry):
    case = Case(rng, entry)
    p = case.params
    (q_dtype, p.dtype), (kv_dtype, p.kv_dtype) = rng.choice(DTYPES), rng.choice(DTYPES)
    dtypes = {"q": q_dtype, "out": q_dtype}  # the others kv_dtype, but an 8-bit cache's k and v
    plain_tensor = case.tensor

    def tensor(name, sizes, output, fill=None):
        dtype = dtypes.get(name, kv_dtype)
        return plain_tensor(name, sizes, output, fill or (random_bytes if dtype.itemsize == 1 else None), dtype)

    case.tensor = tensor
    batch = rng.choice([0, 1, 1, 2, 3])
    heads_kv = rng.choice([1, 1, 2, 3])
    heads_q = heads_kv * rng.choice([1, 2, 4])
    head_dim = rng.choice([1, 3, 8, 16, 40, 64, 130])
    head_dim_v = head_dim if rng.random() < 0.6 else rng.choice([1, 5, 48, 130])  # v, v_new and out
    seqlen_q = rng.choice([0, 1, 2, 7, 33, 100, 300])
    seqlen_k = rng.choice([0, 1, 5, 16, 97, 300])
    if entry == "varlen":
        lengths_q = [rng.randrange(0, 40) for _ in range(batch)]
        lengths_k = [rng.randrange(0, 60) for _ in range(batch)]
        total_q, total_k = sum(lengths_q), sum(lengths_k)
        case.tensor("q", [1, total_q, heads_q, head_dim], False)
        if rng.random() < 0.3:  # the keys in a paged cache, through a block table (sometimes too short or corrupt)
            page = rng.choice([1, 4, 16])
            blocks_per_seq = max(1, (max(lengths_k, default=0) + page - 1) // page + rng.choice([-1, 0, 0, 1]))
            paged_cache(rng, case, batch, blocks_per_seq, page, heads_kv, head_dim, head_dim_v)
        else:
            case.tensor("k", [1, total_k, heads_kv, head_dim], False)
            case.tensor("v", [1, total_k, heads_kv, head_dim_v], False)
        case.tensor("out", [1, total_q, heads_q, head_dim_v], True, fill=sentinel)
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
        if rng.random() < 0.35:  # an 8-bit cache; new rows of the float kv_dtype (kv_new_dtype unset: rejected)
            p.kv_new_dtype = p.kv_dtype if rng.random() < 0.9 else -1
            dtypes["k"], p.kv_dtype = rng.choice(QUANTIZED)
            dtypes["v"] = dtypes["k"]
        cache_batch = max(0, batch + rng.choice([-1, 0, 1, 2]))  # below batch: valid only with an index
        paged = rng.random() < 0.5
        page = rng.choice([1, 3, 16])
        capacity = rng.choice([0, 5, 40])
        append = rng.choice([0, 0, 1, 3])
        seqlens = [rng.randrange(0, max(1, capacity - append + 1)) for _ in range(batch)]
        if paged:
            paged_cache(rng, case, batch, max(1, (capacity + page - 1) // page), page, heads_kv, head_dim, head_dim_v)
        else:
            case.tensor("k", [cache_batch, capacity, heads_kv, head_dim], False)
            case.tensor("v", [cache_batch, capacity, heads_kv, head_dim_v], False)
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
            case.tensor("v_new", [batch, append, heads_kv, head_dim_v], False)
            p.seqlen_new = append
        case.tensor("q", [batch, seqlen_q, heads_q, head_dim], False)
        case.tensor("out", [batch, seqlen_q, heads_q, head_dim_v], True, fill=sentinel)
        case.quantized = quantized = p.kv_dtype in (code for _, code in QUANTIZED)
        if quantized or rng.random() < 0.05:  # scales with a float cache: rejected
            for name in ("k_scale", "v_scale"):
                plain_tensor(name, [p.cache_batch, p.cache_seqlen, heads_kv, 1], False, fields=SCALE_FIELDS)
            # (An empty one may have NULL scales: then none are given.)
            case.must_reject = not quantized and (p.k_scale is not None or p.v_scale is not None)
            case.mutation = "scales with a float cache"
        if quantized and rng.random() < 0.3:
            scale_mutation(rng, case)
    else:
        case.tensor("q", [batch, seqlen_q, heads_q, head_dim], False)
        case.tensor("k", [batch, seqlen_k, heads_kv, head_dim], False)
        case.tensor("v", [batch, seqlen_k, heads_kv, head_dim_v], False)
        case.tensor("out", [batch, seqlen_q, heads_q, head_dim_v], True, fill=sentinel)
    if rng.random() < 0.25:
        if entry == "varlen":
            rows, cols = max(lengths_q, default=0), max(lengths_k, default=0)
        elif entry == "kvcache":
            rows, cols = seqlen_q, max([s + append for s in seqlens if 0 <= s <= capacity], default=0)
        else:
            rows, cols = seqlen_q, seqlen_k
        attn_mask(rng, case, [batch, heads_q, rows, cols])
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
    p.head_dim_v = 0 if head_dim_v == head_dim and rng.random() < 0.5 else head_dim_v  # 0 means head_dim
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
    return ([batch, p.seqlen_q, p.heads_q, p.head_dim_v or p.head_dim],
            [p.out_batch_stride, p.out_row_stride, p.out_head_stride, 1])


def wrote_outside(name, buffer, status, offsets):
    """A rejected call must leave an output at the sentinel; an accepted one may change only the elements at
    `offsets` (None: not checked, the output was redirected onto another buffer)."""
    changed = buffer.array.astype(np.float32) != np.float32(SENTINEL)
    if status != _capi.FA_OK:
        return f"rejected call (status {status}) wrote {name}" if changed.any() else None
    if offsets is None:
        return None
    allowed = np.zeros(buffer.array.size, bool)
    allowed[offsets[(offsets >= 0) & (offsets < buffer.array.size)]] = True
    return f"accepted call wrote {name} outside its elements" if (changed & ~allowed).any() else None


def check(case, status):
    """Returns a violation message, or None."""
    for name, buffer, _, _ in case.outputs:
        offsets = None
        if status == _capi.FA_OK and getattr(case.params, name) == buffer.address:  # not redirected (aliasing)
            offsets = strided_offsets(*output_view(case, name)) if buffer.count else np.zeros(0, np.int64)
        problem = wrote_outside(name, buffer, status, offsets)
        if problem:
            return problem
    return None


# ---- Backward ------------------------------------------------------------------------------------------

GRADIENTS = ("dq", "dk", "dv")
STATUSES = range(_capi.FA_OK, _capi.FA_ERROR_INVALID_INDEX + 1)  # the documented codes
# Relative (norm) error of a gradient against the float64 reference, by the dtype it is stored in: float32
# accumulates in float32; half types also round q, k, v, out (hence the D = rowsum(dO ∘ O) term) and the
# gradients themselves.
GRADIENT_TOLERANCE = {np.dtype(np.float32): 2e-4, np.dtype(np.float16): 1e-2}
if BF16 is not None:
    GRADIENT_TOLERANCE[BF16] = 6e-2
REFERENCE_WORK = 400_000  # compare with the reference when batch · heads_q · seqlen_q · seqlen_k · head_dim is at most this


def bounded(rng, n):
    """N(0, 1) values: gradients of these stay far from overflow in every dtype."""
    return normal(rng, n)


def struct_bytes(struct):
    return bytes(memoryview(struct).cast("B"))


def build_backward(rng, lib):
    """A valid backward problem over guarded buffers, its forward already run (so out and lse are the real
    ones); sometimes followed by one honest mutation (`case.mutation`, with `case.must_fail` where the
    mutation is invalid whatever the sizes). Returns (case, violation or None)."""
    case = Case(rng, "backward")
    p = case.params
    case.varlen = rng.random() < 0.4
    (case.q_dtype, p.dtype), (case.kv_dtype, p.kv_dtype) = rng.choice(DTYPES), rng.choice(DTYPES)
    case.finite = rng.random() < 0.9  # else inputs have inf, NaN, huge and denormal values: no value checks
    values = bounded if case.finite else extreme
    batch = rng.choice([0, 1, 1, 2, 3])
    heads_kv = rng.choice([1, 1, 2, 3])
    heads_q = heads_kv * rng.choice([1, 1, 2, 4])
    head_dim = rng.choice([1, 1, 2, 3, 8, 16, 33, 64, 130])
    head_dim_v = head_dim if rng.random() < 0.6 else rng.choice([1, 7, 48])  # v, out, dout and dv
    if case.varlen:
        lengths_q = [rng.choice([0, 1, rng.randrange(0, 40)]) for _ in range(batch)]
        lengths_k = [rng.choice([0, 1, rng.randrange(0, 50)]) for _ in range(batch)]
        # Rows past the last sequence are allowed (cu_seqlens[batch] <= total) and belong to no sequence.
        seqlen_q = sum(lengths_q) + rng.choice([0, 0, 0, 3])
        seqlen_k = sum(lengths_k) + rng.choice([0, 0, 0, 2])
        case.cu_q = np.concatenate([[0], np.cumsum(lengths_q)]).astype(np.int64)
        case.cu_k = np.concatenate([[0], np.cumsum(lengths_k)]).astype(np.int64)
        case.index_array("cu_seqlens_q", case.cu_q)
        case.index_array("cu_seqlens_k", case.cu_k)
        p.max_seqlen_q = rng.choice([0, max(lengths_q, default=0), 1000])
        p.max_seqlen_k = rng.choice([0, max(lengths_k, default=0), 1000])
        tensor_batch = 1
    else:
        seqlen_q = rng.choice([0, 1, 1, 2, 7, 33, 80])
        seqlen_k = rng.choice([0, 1, 1, 5, 16, 70])
        tensor_batch = batch
    p.batch, p.seqlen_q, p.seqlen_k = batch, seqlen_q, seqlen_k
    p.heads_q, p.heads_kv, p.head_dim, p.head_dim_v = heads_q, heads_kv, head_dim, head_dim_v
    q_shape, kv_shape = [tensor_batch, seqlen_q, heads_q, head_dim], [tensor_batch, seqlen_k, heads_kv, head_dim]
    out_shape, v_shape = q_shape[:3] + [head_dim_v], kv_shape[:3] + [head_dim_v]
    case.tensor("q", q_shape, False, values, case.q_dtype)
    case.tensor("k", kv_shape, False, values, case.kv_dtype)
    case.tensor("v", v_shape, False, values, case.kv_dtype)
    # out is written by the forward run below and then read by the backward: an input of the backward.
    case.tensor("out", out_shape, False, sentinel, case.q_dtype, reversible=rng.random() < 0.3)
    case.outputs.clear()
    # lse [batch, heads_q, seqlen_q] (varlen: [heads_q, total_q]) in a random axis order, maybe padded.
    lse_sizes = [heads_q, seqlen_q] if case.varlen else [batch, heads_q, seqlen_q]
    lse_fields = ["head", "row"] if case.varlen else ["batch", "head", "row"]
    lse_strides, step = [0] * len(lse_sizes), 1
    pad = rng.random() < 0.3
    for axis in reversed(rng.sample(range(len(lse_sizes)), len(lse_sizes))):
        lse_strides[axis] = step
        step = step * lse_sizes[axis] + (rng.randrange(3) if pad else 0)
    lse_count = 0 if 0 in lse_sizes else int(np.dot(np.array(lse_sizes) - 1, lse_strides)) + 1
    lse = GuardedBuffer(lse_count, np.float32, rng)
    lse.array[:] = np.float32(SENTINEL)
    p.lse = lse.address if lse_count or rng.random() < 0.5 else None
    for field, stride in zip(lse_fields, lse_strides):
        setattr(p, f"lse_{field}_stride", stride)
    if case.varlen and rng.random() < 0.3:
        p.lse_batch_stride = rng.choice([2**62, -1])  # ignored for varlen
    case.inputs.append(("lse", lse, None, None))
    case.views["lse"] = View(lse, lse_sizes, lse_strides, 0)
    # Options (all valid here).
    p.causal = rng.random() < 0.4
    p.num_threads = rng.choice([0, 1, 2, 3, 64, 2**31 - 1])
    p.softmax_scale = rng.choice([0.0, 0.0, 0.3, -1.0, 0.05])
    p.window_left = rng.choice([-1, -1, -1, 0, 5, 2**40])
    p.window_right = rng.choice([-1, -1, -1, 0, 3])
    p.softcap = rng.choice([0.0, 0.0, 0.0, 5.0, 0.5])
    p.algorithm = rng.choice([0, 0, 1, 2])
    case.slopes = case.sinks = None
    if rng.random() < 0.25:
        slopes = GuardedBuffer(heads_q * max(1, batch), np.float32, rng)
        slopes.array[:] = np.abs(normal(rng, slopes.array.size)) * 0.2
        p.alibi_slopes, p.alibi_batch_stride = slopes.address, rng.choice([0, heads_q])
        case.inputs.append(("alibi_slopes", slopes, None, None))
        case.slopes = slopes
    if rng.random() < 0.3:
        sinks = GuardedBuffer(heads_q, np.float32, rng)
        sinks.array[:] = normal(rng, heads_q) * 2
        p.sinks = sinks.address
        case.inputs.append(("sinks", sinks, None, None))
        case.sinks = sinks
    # An older forward struct is as valid, where the buffers mean the same under it: 0.2 ends before the
    # dtypes (float32 only), 0.1 also before every inference option (dense only).
    case.forward_size = ctypes.sizeof(p)
    if p.dtype == 0 and p.kv_dtype == 0 and head_dim_v == head_dim and rng.random() < 0.15:
        case.forward_size = rng.choice([_capi.FA_PARAMS_SIZE_V2] + ([] if case.varlen else [_capi.FA_PARAMS_SIZE_V1]))
        p.struct_size = case.forward_size
    forward = lib.flash_attention_forward_varlen if case.varlen else lib.flash_attention_forward
    status = forward(ctypes.byref(p))
    if status != _capi.FA_OK:
        return case, f"the forward of a valid backward case failed ({status}): {lib.flash_attention_last_error().decode()}"

    b = case.backward = _capi.BackwardParams()
    if lib.flash_attention_backward_params_init(ctypes.byref(b), ctypes.sizeof(b)) != _capi.FA_OK:
        return case, "flash_attention_backward_params_init failed"
    b.forward = ctypes.pointer(p)
    case.tensor("dout", out_shape, False, values, case.q_dtype, target=b)
    case.tensor("dq", q_shape, True, sentinel, case.q_dtype, target=b, reversible=rng.random() < 0.3)
    case.tensor("dk", kv_shape, True, sentinel, case.kv_dtype, target=b, reversible=rng.random() < 0.3)
    case.tensor("dv", v_shape, True, sentinel, case.kv_dtype, target=b, reversible=rng.random() < 0.3)
    if case.varlen and rng.random() < 0.3:  # batch strides are ignored for varlen
        for name in ("dout", "dq", "dk", "dv"):
            setattr(b, f"{name}_batch_stride", rng.choice([2**62, -(2**63), 7]))
    # dsinks: usually with sinks; sometimes without (then ignored), sometimes NULL with sinks (optional).
    case.dsinks = None
    if rng.random() < (0.85 if case.sinks is not None else 0.15):
        dsinks = GuardedBuffer(heads_q, np.float32, rng)
        dsinks.array[:] = np.float32(SENTINEL)
        b.dsinks = dsinks.address
        case.outputs.append(("dsinks", dsinks, [heads_q], [1]))
        case.views["dsinks"] = View(dsinks, [heads_q], [1], 0)
        case.dsinks = dsinks
    case.mutation, case.must_fail = None, False
    if rng.random() < 0.45:
        backward_mutation(rng, case)
    return case, None


def view_span(sizes, strides):
    """(lowest, highest) element offset a non-empty view addresses from its pointer."""
    low = sum(min(0, (n - 1) * s) for n, s in zip(sizes, strides))
    high = sum(max(0, (n - 1) * s) for n, s in zip(sizes, strides))
    return low, high


def backward_mutation(rng, case):
    """One honest change to a valid backward case: the params still describe memory inside the buffers (or
    values validation can see), so a library that accepted it wrongly would be caught by the checks rather
    than by a crash of this process. Sets case.mutation and, where the change is invalid whatever the
    sizes, case.must_fail."""
    p, b = case.params, case.backward
    tensors = ["q", "k", "v", "out", "dout", "dq", "dk", "dv"]
    target = lambda name: b if name in ("dout", "dq", "dk", "dv") else p  # noqa: E731
    nonempty = lambda name: case.views[name].elements() > 0  # noqa: E731
    kind = rng.randrange(16)
    fail = False
    if kind == 0:  # a negative size
        setattr(p, rng.choice(["batch", "seqlen_q", "seqlen_k", "heads_q", "heads_kv", "head_dim"]),
                rng.choice([-1, -(2**40), -(2**63)]))
        fail = True
    elif kind == 1:  # a size so large that counting elements or size × stride overflows
        field = rng.choice(["batch", "seqlen_q", "seqlen_k", "head_dim", "heads_q"])
        setattr(p, field, rng.choice([2**62, 2**63 - 1]))
        fail = field == "head_dim" or (field == "heads_q" and p.heads_q % p.heads_kv != 0)
    elif kind == 2:  # a stride whose range overflows int64 or the address space
        name = rng.choice(tensors)
        axis = rng.randrange(3)
        setattr(target(name), f"{name}_{('batch', 'row', 'head')[axis]}_stride",
                rng.choice([2**62, -(2**62), 2**63 - 1, -(2**63)]))
        view = case.views[name]
        fail = nonempty(name) and view.sizes[axis] > 1 and not (case.varlen and axis == 0)
    elif kind == 3:  # the head-dim stride must be 1
        name = rng.choice(tensors)
        setattr(target(name), f"{name}_dim_stride", rng.choice([0, 2, -1, 2**62]))
        fail = True
    elif kind == 4:  # NULL, or a pointer misaligned for its element type
        name = rng.choice(tensors + ["lse"])
        holder = target(name)
        if rng.random() < 0.5:
            setattr(holder, name, None)
        else:
            setattr(holder, name, (getattr(holder, name) or 4096) + 1)
        if name == "lse":
            fail = p.batch * p.seqlen_q * p.heads_q > 0  # needed whenever there are queries
        else:
            fail = nonempty(name)
    elif kind == 5:  # no forward params at all
        b.forward = None
        fail = True
    elif kind == 6:  # unknown struct sizes, of either struct
        if rng.random() < 0.5:
            b.struct_size = rng.choice([0, 8, ctypes.sizeof(b) - 8, ctypes.sizeof(b) + 8, 2**64 - 1])
        else:
            p.struct_size = rng.choice([0, 8, _capi.FA_PARAMS_SIZE_V1 - 1, _capi.FA_PARAMS_SIZE_V1 + 8,
                                        _capi.FA_PARAMS_SIZE_V2 + 4, ctypes.sizeof(p) + 8, 10**6])
        fail = True
    elif kind == 7:  # a gradient over an input or another gradient whose buffer could hold it
        names = [n for n in GRADIENTS + ("dsinks",) if n in case.views]
        name = rng.choice(names)
        view = case.views[name]
        if name == "dsinks":
            itemsize, low, high = 4, 0, p.heads_q - 1
        else:
            itemsize = view.buffer.dtype.itemsize
            low, high = view_span(view.sizes, view.strides) if view.elements() else (0, 0)
        span = (high - low + 1) * itemsize
        others = [(other, v.buffer) for other, v in case.views.items() if other != name]
        others += [(other, buffer) for other, buffer, _, _ in case.inputs if other not in case.views]
        roomy = []
        for other, buffer in others:
            align = (-buffer.address) % 4  # 4-byte aligned: right for every element type
            if buffer.array.nbytes >= align + span:
                roomy += [(other, buffer, align)] + ([(other, buffer, align + 4)] if buffer.array.nbytes >= align + 4 + span else [])
        if roomy:
            other, buffer, shift = rng.choice(roomy)
            pointer = buffer.address + shift - low * itemsize
            setattr(b, name, pointer)
            target_nonempty = case.views[other].elements() > 0 if other in case.views else True
            if other == "lse":
                target_nonempty = case.views["lse"].elements() > 0
            if other == "alibi_slopes":
                target_nonempty = p.batch > 0  # [batch, heads_q] through its strides: nothing when batch is 0
            fail = (name == "dsinks" or view.elements() > 0) and target_nonempty
            if not target_nonempty:
                case.written_input = other  # holds no elements of its tensor: the gradient may land there
            kind = f"7:{name}->{other}"
    elif kind == 8:  # a gradient stride that makes distinct elements share memory
        name = rng.choice(GRADIENTS)
        view = case.views[name]
        axis = rng.randrange(1, 3) if case.varlen else rng.randrange(3)
        setattr(b, f"{name}_{('batch', 'row', 'head')[axis]}_stride", 0)
        fail = view.elements() > 0 and view.sizes[axis] > 1
    elif kind == 9:
        p.num_threads = rng.choice([-1, -(2**31)])
        fail = True
    elif kind == 10:
        setattr(p, rng.choice(["dtype", "kv_dtype"]), rng.choice([-1, 3, 99, 2**31 - 1]))
        fail = case.forward_size == ctypes.sizeof(p)  # older structs have no dtype fields
    elif kind == 11:  # an option out of range
        option = rng.choice(["softmax_scale", "softcap", "window_left", "window_right", "reserved0", "algorithm",
                             "dropout_p", "reserved2"])
        setattr(p, option, {"softmax_scale": rng.choice([float("nan"), float("inf"), float("-inf")]),
                            "softcap": rng.choice([-1.0, float("nan"), float("inf")]),
                            "window_left": rng.choice([-2, -(2**63)]), "window_right": rng.choice([-2, -(2**63)]),
                            "reserved0": 1, "algorithm": rng.choice([-1, 3, 7]),
                            "dropout_p": rng.choice([-0.5, 1.0, float("nan")]), "reserved2": 1}[option])
        if option in ("dropout_p", "reserved2"):
            fail = case.forward_size == ctypes.sizeof(p)  # fields of the 0.6 struct only
        else:
            fail = option in ("softmax_scale", "algorithm") or case.forward_size != _capi.FA_PARAMS_SIZE_V1
    elif kind == 12 and case.varlen:  # a corrupt cu_seqlens entry: out of range or out of order
        name = rng.choice(["cu_seqlens_q", "cu_seqlens_k"])
        buffer = next(buf for n, buf, _, _ in case.inputs if n == name)
        buffer.array[rng.randrange(p.batch + 1)] = rng.choice([-1, 10**6, 2**31 - 1, -(2**31)])
        fail = True
    elif kind == 12:  # a non-finite sink or ALiBi slope (validated before use)
        if case.sinks is not None and (case.slopes is None or rng.random() < 0.5):
            case.sinks.array[rng.randrange(p.heads_q)] = rng.choice([np.nan, np.inf, -np.inf])
            fail = case.forward_size != _capi.FA_PARAMS_SIZE_V1
        elif case.slopes is not None:
            case.slopes.array[rng.randrange(p.heads_q)] = rng.choice([np.nan, np.inf])
            fail = p.batch > 0 and case.forward_size != _capi.FA_PARAMS_SIZE_V1
        else:
            kind = None
    elif kind == 13 and case.varlen:  # a sequence longer than the bound it claims
        lengths = np.diff(case.cu_q if rng.random() < 0.5 else case.cu_k)
        field = "max_seqlen_q" if lengths is None else rng.choice(["max_seqlen_q", "max_seqlen_k"])
        longest = int(np.diff(case.cu_q if field == "max_seqlen_q" else case.cu_k).max(initial=0))
        if longest > 1:
            setattr(p, field, longest - 1)
            fail = True
        else:
            kind = None
    elif kind == 13:  # cu_seqlens_k without cu_seqlens_q: the dense entry ignores it (valid)
        kind = None
    elif kind == 14:  # varlen without cu_seqlens_k
        if case.varlen:
            p.cu_seqlens_k = None
            fail = True
        else:
            kind = None
    else:  # dsinks misaligned
        if case.dsinks is not None:
            b.dsinks = case.dsinks.address + rng.choice([1, 2, 3])
            fail = True
        else:
            kind = None
    case.mutation, case.must_fail = kind, fail


def reference_gradients(case):
    """float64 reference gradients of an unmutated case, as {name: (expected, mask of covered rows)}; the
    mask is None where every element is covered (dense)."""
    p = case.params
    options = dict(softmax_scale=None if p.softmax_scale == 0 else float(p.softmax_scale), causal=bool(p.causal))
    sinks = None
    if case.forward_size != _capi.FA_PARAMS_SIZE_V1:
        options.update(window_size=(p.window_left, p.window_right), softcap=float(p.softcap))
        sinks = None if case.sinks is None else case.sinks.array.astype(np.float64)
    slopes = None
    if case.slopes is not None and case.forward_size != _capi.FA_PARAMS_SIZE_V1:
        stride = p.alibi_batch_stride
        slopes = np.array([case.slopes.array[i * stride: i * stride + p.heads_q] for i in range(max(1, p.batch))], np.float64)
    # D = rowsum(dout ∘ out) comes from the stored out, rounded to q's dtype, as in the library.
    q, k, v, dout, out = (case.views[n].gather() for n in ("q", "k", "v", "dout", "out"))
    if not case.varlen:
        grads = reference_attention_backward(dout, q, k, v, alibi_slopes=slopes, sinks=sinks, out=out, **options)
        result = {name: (g, None) for name, g in zip(GRADIENTS, grads[:3])}
        if sinks is not None:
            result["dsinks"] = (grads[3], None)
        return result
    dq, dk, dv = np.zeros(q.shape), np.zeros(k.shape), np.zeros(v.shape)
    q_rows, k_rows, v_rows = np.zeros(q.shape, bool), np.zeros(k.shape, bool), np.zeros(v.shape, bool)
    dsinks = np.zeros(p.heads_q)
    for i in range(p.batch):
        qs, ks = slice(case.cu_q[i], case.cu_q[i + 1]), slice(case.cu_k[i], case.cu_k[i + 1])
        grads = reference_attention_backward(dout[:, qs], q[:, qs], k[:, ks], v[:, ks], sinks=sinks, out=out[:, qs],
                                             alibi_slopes=None if slopes is None else slopes[i], **options)
        dq[:, qs], dk[:, ks], dv[:, ks] = grads[:3]
        q_rows[:, qs], k_rows[:, ks], v_rows[:, ks] = True, True, True
        if sinks is not None:
            dsinks += grads[3]
    result = {"dq": (dq, q_rows), "dk": (dk, k_rows), "dv": (dv, v_rows)}
    if sinks is not None:
        result["dsinks"] = (dsinks, None)
    return result


def gradient_values(case):
    """{name: values as float64, shaped like the gradient} for dq, dk, dv (and dsinks when given)."""
    values = {name: case.views[name].gather() for name in GRADIENTS}
    if case.dsinks is not None:
        values["dsinks"] = case.dsinks.array.astype(np.float64)
    return values


def covered_rows(case):
    """Masks (None: all) of the gradient elements the call must write: varlen rows inside a sequence."""
    if not case.varlen:
        return {name: None for name in GRADIENTS}
    masks = {}
    for name, cu in (("dq", case.cu_q), ("dk", case.cu_k), ("dv", case.cu_k)):
        mask = np.zeros(case.views[name].sizes, bool)
        mask[:, : int(cu[-1])] = True
        masks[name] = mask
    return masks


def check_backward(case, status, lib, before):
    """Returns a violation message, or None. `before`: snapshots taken just before the call."""
    p, b = case.params, case.backward
    message = lib.flash_attention_last_error().decode()
    if status not in STATUSES:
        return f"status {status} is not a documented code"
    if status != _capi.FA_OK and not message:
        return f"status {status} with an empty last error"
    if status == _capi.FA_OK and message:
        return f"success with a last error left over: {message!r}"
    if case.must_fail and status == _capi.FA_OK:
        return f"accepted invalid mutation {case.mutation}"
    if case.mutation is None and status != _capi.FA_OK:
        return f"rejected a valid case ({status}): {message}"
    inputs, structs = before
    for (name, snapshot), (_, buffer, _, _) in zip(inputs, case.inputs):
        if name != getattr(case, "written_input", None) and not np.array_equal(snapshot, buffer.array, equal_nan=True):
            return f"input {name} changed"
    if structs != (struct_bytes(p), struct_bytes(b)):
        return "the params structs changed"
    for name, buffer, _, _ in case.inputs + case.outputs:
        if not buffer.canary_intact():
            return f"bytes next to {name}'s elements changed"
    for name, buffer, _, _ in case.outputs:
        view = case.views[name]
        offsets = None
        # A redirected gradient (aliasing) must have been rejected, or the inputs show the damage.
        if status == _capi.FA_OK and getattr(b, name) == buffer.address + view.start * buffer.dtype.itemsize:
            if name == "dsinks":
                offsets = np.arange(p.heads_q)
            else:
                batch = 1 if case.varlen else p.batch
                sizes = [batch, p.seqlen_q if name == "dq" else p.seqlen_k, p.heads_q if name == "dq" else p.heads_kv,
                         (p.head_dim_v or p.head_dim) if name == "dv" else p.head_dim]
                strides = [getattr(b, f"{name}_{axis}_stride") for axis in ("batch", "row", "head", "dim")]
                if case.varlen:
                    strides[0] = 0
                if 0 in sizes:
                    offsets = np.zeros(0, np.int64)
                elif np.prod(sizes, dtype=object) > 4 * buffer.array.size + 64:
                    return f"accepted {name} with {sizes} elements in a buffer of {buffer.array.size}"
                else:
                    offsets = view.start + strided_offsets(sizes, strides)
        problem = wrote_outside(name, buffer, status, offsets)
        if problem:
            return problem
    return None


def relative_error(got, want, term=1e-1):
    """‖got − want‖ / ‖want‖, with ‖want‖ floored at 1% of `term` per element: a gradient is a sum of terms
    like scale · dout·v · k, and where they cancel (one key: dS = P (dP − D) = 0) the float32 rounding of
    those terms is what remains."""
    if want.size == 0:
        return 0.0
    floor = max(1e-2 * term, 1e-3) * np.sqrt(want.size)
    return float(np.linalg.norm((got - want).ravel()) / max(np.linalg.norm(want.ravel()), floor))


def gradient_term(case):
    """The typical size of one term of a gradient: |scale| · rms(dout) · rms(v) · sqrt(head_dim_v) · rms(q, k)
    (dP = dout · vᵀ sums head_dim_v products)."""
    p = case.params
    scale = 1 / np.sqrt(p.head_dim) if p.softmax_scale == 0 else abs(float(p.softmax_scale))
    rms = {n: float(np.sqrt(np.mean(case.views[n].gather() ** 2))) if case.views[n].elements() else 0.0
           for n in ("q", "k", "v", "dout")}
    return scale * rms["dout"] * rms["v"] * np.sqrt(p.head_dim_v or p.head_dim) * max(rms["q"], rms["k"], 1.0)


def check_backward_values(case, lib, stats):
    """For an accepted unmutated case: every covered gradient element written and finite (finite inputs),
    the reference matched (small problems), and another num_threads gives the same bits (a sample)."""
    p, b = case.params, case.backward
    got = gradient_values(case)
    masks = covered_rows(case)
    sinks_active = case.sinks is not None and case.forward_size != _capi.FA_PARAMS_SIZE_V1
    if case.dsinks is not None and not sinks_active:
        got.pop("dsinks")  # ignored without sinks; check() already kept it within its elements
    if case.finite:
        for name, values in got.items():
            covered = values if masks.get(name) is None else values[masks[name]]
            if (covered == SENTINEL).any():
                return f"accepted call left elements of {name} unwritten"
            if not np.isfinite(covered).all():
                return f"{name} is not finite for finite inputs"
        work = max(1, p.batch) * p.heads_q * p.seqlen_q * p.seqlen_k * p.head_dim
        if work <= REFERENCE_WORK:
            stats["reference"] += 1
            term = gradient_term(case)
            for name, (want, mask) in reference_gradients(case).items():
                have = got[name] if name in got else None
                if have is None:
                    continue
                if mask is not None:
                    have, want = have[mask], want[mask]
                tolerance = GRADIENT_TOLERANCE[case.q_dtype if name == "dq" else np.dtype(np.float32) if name == "dsinks" else case.kv_dtype]
                if name == "dsinks" or name == "dq":  # dq (and dsinks) also see k, v rounded to kv_dtype
                    tolerance = max(tolerance, GRADIENT_TOLERANCE[case.kv_dtype], GRADIENT_TOLERANCE[case.q_dtype])
                else:
                    tolerance = max(tolerance, GRADIENT_TOLERANCE[case.q_dtype])
                error = relative_error(have, want, term)
                stats["worst"][name] = max(stats["worst"].get(name, 0.0), error / tolerance)
                if error > tolerance:
                    return f"{name} differs from the reference: relative error {error:.3g} > {tolerance:g}"
    if case.rng.random() < 0.15:  # bitwise the same for another thread count
        stats["threads"] += 1
        first = {name: case.views[name].buffer.array.copy() for name in GRADIENTS}
        if case.dsinks is not None:
            first["dsinks"] = case.dsinks.array.copy()
        for name, array in first.items():
            case.views[name].buffer.array[:] = np.float32(SENTINEL)
        p.num_threads = 1 if p.num_threads != 1 else 0
        status = lib.flash_attention_backward(ctypes.byref(b))
        if status != _capi.FA_OK:
            return f"the same call with num_threads {p.num_threads} failed ({status})"
        for name, array in first.items():
            if case.views[name].buffer.array.tobytes() != array.tobytes():
                return f"{name} differs bitwise with num_threads {p.num_threads}"
    return None


def fuzz_backward(rng, lib, stats):
    """One flash_attention_backward case; returns (accepted, violation or None)."""
    case, problem = build_backward(rng, lib)
    if problem:
        return False, problem
    before = ([(name, buffer.array.copy()) for name, buffer, _, _ in case.inputs],
              (struct_bytes(case.params), struct_bytes(case.backward)))
    if VERBOSE:
        print("backward", case.mutation, case.varlen, {name: getattr(case.params, name) for name, _ in case.params._fields_},
              {name: getattr(case.backward, name) for name, _ in case.backward._fields_}, flush=True)
    status = lib.flash_attention_backward(ctypes.byref(case.backward))
    problem = check_backward(case, status, lib, before)
    if problem is None and status == _capi.FA_OK and case.mutation is None:
        problem = check_backward_values(case, lib, stats)
    if problem:
        problem += f" (mutation {case.mutation}, varlen {case.varlen}, dtypes {case.q_dtype}/{case.kv_dtype})"
    stats["mutated"] += case.mutation is not None
    return status == _capi.FA_OK, problem


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
    counts = {name: [0, 0] for name in [*entries, "kvcache 8-bit"]}  # [tried, accepted]
    for _ in range(cases):
        entry = rng.choice(list(entries))
        case = build_forward(rng, entry)
        before = [(name, buffer.array.copy()) for name, buffer, _, _ in case.inputs]
        if VERBOSE:
            p = case.params
            print(entry, getattr(case, "mutation", None), [(n, b.address, b.count) for n, b, _, _ in case.inputs + case.outputs],
                  {name: getattr(p, name) for name, _ in p._fields_}, flush=True)
        status = entries[entry](ctypes.byref(case.params))
        for counted in [entry, "kvcache 8-bit"] if case.quantized else [entry]:
            counts[counted][0] += 1
            counts[counted][1] += status == _capi.FA_OK
        problem = check(case, status)
        if case.must_reject and status == _capi.FA_OK:
            problem = f"mutation {case.mutation!r} was accepted"
        in_place = status == _capi.FA_OK and case.params.out == case.params.q
        for (name, snapshot), (_, buffer, _, _) in zip(before, case.inputs):
            unchanged = np.array_equal(snapshot, buffer.array, equal_nan=True)
            # An accepted append writes new rows into the cache (k, v) and their scales, an accepted in-place
            # call writes q; everything else is read-only.
            written = ("k", "v", "k_scale", "v_scale") if entry == "kvcache" else ()
            allowed = status == _capi.FA_OK and (name in written or (in_place and name == "q"))
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
    counts["backward"] = [0, 0]
    stats = {"reference": 0, "threads": 0, "mutated": 0, "worst": {}}
    for _ in range(cases // 4):
        accepted, problem = fuzz_backward(rng, lib, stats)
        counts["backward"][0] += 1
        counts["backward"][1] += accepted
        if problem:
            print(f"VIOLATION (backward, case {counts['backward'][0] - 1}): {problem}")
            sys.exit(1)
    summary = ", ".join(f"{name}: {tried} cases ({ok} accepted)" for name, (tried, ok) in counts.items())
    print(f"fuzzed {cases} cases, none crashed or wrote outside its outputs: {summary}")
    worst = ", ".join(f"{name} {ratio:.2g}" for name, ratio in sorted(stats["worst"].items()))
    print(f"backward: {stats['mutated']} mutated, {stats['reference']} compared with the reference"
          f" (worst error / tolerance: {worst or 'none'}), {stats['threads']} rerun with another num_threads")


if __name__ == "__main__":
    main()

"""Attention under a mask, on torch tensors: which form of the library's calls computes it fastest, and how.

The masks models use are mostly structured — a key range per batch entry (padding, or a KV cache's filled
part), a band around the diagonal (causal, sliding window), packed sequences (varlen) — and the library runs
those without reading a mask at all, if each is recognised. This module turns a mask description into a
*plan*, checks that the plan reproduces the mask exactly, and runs the plan's forward and backward through
flash_attention._torch_raw. Any other mask (tree or document masks, per-head masks, additive biases) is given
to the library as its attn_mask tensor (MASK below).

Inputs (all torch tensors on the CPU):
    q [batch, seqlen_q, heads_q, head_dim]; k, v [batch, seqlen_k, heads_kv, head_dim] (any strides).
    mask:    broadcastable to [batch, heads_q, seqlen_q, seqlen_k]; bool (True = visible) or float (added to
             the scores; exactly-{0, -inf} float masks are read as bool, others are additive biases).
    padding: [batch, seqlen_k], nonzero = a real key; queries are aligned with the *last* keys (query i sits
             at key position i + seqlen_k - seqlen_q), as in transformers' caches.
    seq_ids: [batch or 1, seqlen_q] integers, seqlen_q == seqlen_k: query i sees key j only within the same
             run of equal ids (packed sequences).
    causal / window (left, right): a band aligned bottom-right (query i's diagonal is key i + seqlen_k -
             seqlen_q; for seq_ids, each run's own diagonal), as everywhere in this library.
Every given constraint applies (they are intersected). A query row that sees no key outputs 0 (as torch's
scaled_dot_product_attention does for a fully masked row).

Plans:
    DENSE     one key range [start, end) for every batch entry and one band: one library call on k[:, start:end].
    RANGES    a key range per batch entry, one band: one flash_attention_forward_kvcache call whose cache
              "rows" start at each entry's first key (cache_batch_idx counts key rows, not entries), so
              nothing is copied; the backward runs per entry.
    PER_BATCH a key range and band per entry (right padding shifts each entry's diagonal): one call per entry.
    PACKED    runs of seq_ids: one varlen call over the [batch * seqlen] rows (a view when the layout allows,
              else a copy of q, k, v).
    MASK      one library call with the mask as its attn_mask (broadcast axes read with stride 0; blocks the
              mask hides are skipped), forward and backward.
"""

import math
import weakref

import torch

from . import _torch_raw as raw

DENSE, RANGES, PER_BATCH, PACKED, MASK = "dense", "ranges", "per_batch", "packed", "mask"

# torch's own function, looked up once: a program may replace F.scaled_dot_product_attention with ours.
torch_sdpa = torch._C._nn.scaled_dot_product_attention


class Plan:
    """How one masked attention runs. starts/ends/lefts/rights are per batch entry (Python ints; for DENSE
    and RANGES the band is entry 0's); rows, for PER_BATCH only, is None (every query row) or each entry's
    (first, end) query rows, the others being zero; cu/max_len describe PACKED runs; mask is MASK's (4-D, bool
    or float32)."""

    __slots__ = ("kind", "starts", "ends", "lefts", "rights", "rows", "cu", "max_len", "mask", "reason", "memo")

    def __init__(self, kind, starts=None, ends=None, lefts=None, rights=None, rows=None, cu=None, max_len=0,
                 mask=None, reason=""):
        self.kind, self.starts, self.ends, self.lefts, self.rights = kind, starts, ends, lefts, rights
        self.rows, self.cu, self.max_len, self.mask, self.reason = rows, cu, max_len, mask, reason
        self.memo = {}  # RANGES: the KV-cache call's index tensors, per key layout (built once per plan)


# ---- deriving a plan ---------------------------------------------------------------------------------------


def _band(left, right, causal):
    return left, (0 if causal else right)


def _first_true(x):
    """Index of the first True along the last axis (0 where there is none)."""
    return x.to(torch.uint8).argmax(-1)


def _last_true(x):
    """Index of the last True along the last axis (size - 1 where there is none)."""
    return x.shape[-1] - 1 - x.flip(-1).to(torch.uint8).argmax(-1)


def _band_mask(seqlen_q, seqlen_k, left, right):
    """[seqlen_q, seqlen_k] bool: the bottom-right aligned band (-1 = unbounded)."""
    i = torch.arange(seqlen_q)[:, None] + (seqlen_k - seqlen_q)
    j = torch.arange(seqlen_k)[None, :]
    visible = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool)
    if left >= 0:
        visible &= j >= i - left
    if right >= 0:
        visible &= j <= i + right
    return visible


def _ranges_plan(m, trim_rows=False):
    """Step A: is m [entries, seqlen_q, seqlen_k] (bool) exactly a key range [start, end) per entry with a
    band (left, right) aligned to that range's last key? Returns (starts, ends, lefts, rights, rows) lists, or
    None. rows is None, or with trim_rows each entry's (first, last + 1) rows that see a key: the call then
    covers those rows only (its last row aligned with the last key; the other rows are zero), which expresses
    bands that a full-height call cannot (right padding longer than a sliding window leaves rows that see
    nothing below rows that do).

    Candidates come from each entry's first and last visible rows (the rows a band cuts first on the right
    and on the left); the full mask rebuilt from them is then compared with m, so a wrong guess can only
    mean "not this plan", never a wrong result."""
    entries, seqlen_q, seqlen_k = m.shape
    if seqlen_q == 0 or seqlen_k == 0:
        return None
    columns, rows = m.any(1), m.any(2)
    has = columns.any(1)
    start = torch.where(has, _first_true(columns), 0)
    end = torch.where(has, _last_true(columns) + 1, 0)
    first, last = _first_true(rows), _last_true(rows)
    entry = torch.arange(entries)
    hi_first = _last_true(m[entry, first])
    lo_last = _first_true(m[entry, last])
    d = end - (last + 1 if trim_rows else seqlen_q)   # query i's diagonal is key i + d
    right = hi_first - first - d
    left = last + d - lo_last
    right = torch.where(first + d + right >= end - 1, -1, right)     # never cuts a row: unbounded
    left = torch.where(last + d - left <= start, -1, left)
    left = torch.where(has, left, -1)
    right = torch.where(has, right, -1)
    if bool((left < -1).any()) or bool((right < -1).any()):
        return None
    i = torch.arange(seqlen_q)[None, :, None]
    j = torch.arange(seqlen_k)[None, None, :]
    s, e, dd, lo, hi = (x[:, None, None] for x in (start, end, d, left, right))
    rebuilt = (j >= s) & (j < e) & ((lo < 0) | (j >= i + dd - lo)) & ((hi < 0) | (j <= i + dd + hi))
    if trim_rows:
        rebuilt &= (i >= first[:, None, None]) & (i <= last[:, None, None])
    if not torch.equal(rebuilt, m):
        return None
    row_ranges = None
    if trim_rows:
        row_ranges = [(f, g + 1) if h else (0, 0) for f, g, h in zip(first.tolist(), last.tolist(), has.tolist())]
    return start.tolist(), end.tolist(), left.tolist(), right.tolist(), row_ranges


def _key_runs(visible):
    """A mask that is the same for every query row, visible [entries, seqlen_k] (bool): one contiguous run of
    keys per entry (checked) is a key range with no band. Read with numpy: a decoding step plans once per
    forward pass, and a handful of numpy calls cost a few microseconds where torch's cost tens."""
    v = visible.numpy()
    seqlen_k = v.shape[1]
    count = v.sum(1)
    start = v.argmax(1)
    end = seqlen_k - v[:, ::-1].argmax(1)
    has = count > 0
    if not ((end - start == count) | ~has).all():
        return None
    starts = [int(s) if h else 0 for s, h in zip(start, has)]
    ends = [int(e) if h else 0 for e, h in zip(end, has)]
    return starts, ends, [-1] * len(starts), [-1] * len(starts), None


def _runs(seq_ids):
    """Run index per position: 0, 0, 1, 1, 1, 2 ... (a new run wherever the id changes)."""
    change = torch.zeros_like(seq_ids, dtype=torch.int64)
    change[:, 1:] = (seq_ids[:, 1:] != seq_ids[:, :-1]).to(torch.int64)
    return change.cumsum(1)


def _packed_plan(m, runs):
    """Step B: is m [batch, seqlen, seqlen] exactly "same run and a band" for runs [batch, seqlen]? The band
    is read from the rows (as in step A, per run) and the rebuilt mask compared. Returns (left, right)."""
    batch, seqlen, _ = m.shape
    same = runs[:, :, None] == runs[:, None, :]
    if bool((m & ~same).any()):
        return None
    rows = m.any(2)
    i = torch.arange(seqlen)[None, :]
    hi = torch.where(rows, _last_true(m), -1)
    lo = torch.where(rows, _first_true(m), seqlen)
    # A run's last position: the last index with the same run number.
    run_end = torch.searchsorted(runs.contiguous(), runs.contiguous(), right=True) - 1
    run_start = torch.searchsorted(runs.contiguous(), runs.contiguous(), right=False)
    cut_right = rows & (hi < run_end)
    cut_left = rows & (lo > run_start)
    right = int((hi - i)[cut_right].max()) if bool(cut_right.any()) else -1
    left = int((i - lo)[cut_left].max()) if bool(cut_left.any()) else -1
    if right < -1 or left < -1:
        return None
    jj = torch.arange(seqlen)[None, None, :]
    ii = torch.arange(seqlen)[None, :, None]
    rebuilt = same.clone()
    if left >= 0:
        rebuilt &= jj >= ii - left
    if right >= 0:
        rebuilt &= jj <= ii + right
    if not torch.equal(rebuilt, m):
        return None
    return left, right


def _packed(runs, seqlen, left, right):
    """PACKED plan from run numbers [batch, seqlen]: cu_seqlens over the flattened batch * seqlen rows."""
    batch = runs.shape[0]
    first = torch.ones(batch, seqlen, dtype=torch.bool)
    first[:, 1:] = runs[:, 1:] != runs[:, :-1]
    starts = first.flatten().nonzero().flatten()
    cu = torch.cat([starts, torch.tensor([batch * seqlen])]).to(torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0
    return Plan(PACKED, lefts=[left], rights=[right], cu=cu, max_len=max_len)


def _from_ranges(ranges, batch):
    starts, ends, lefts, rights, rows = ranges
    if len(starts) == 1 and batch > 1:
        starts, ends, lefts, rights = starts * batch, ends * batch, lefts * batch, rights * batch
        rows = None if rows is None else rows * batch
    if rows is not None or len(set(zip(lefts, rights))) > 1:
        return Plan(PER_BATCH, starts, ends, lefts, rights, rows)
    kind = DENSE if len(set(zip(starts, ends))) == 1 else RANGES
    return Plan(kind, starts, ends, lefts, rights)


def _padding_plan(padding, seqlen_q, left, right):
    """Key-padding [batch, seqlen_k] with queries aligned to the last key: a contiguous run of real keys per
    entry (checked) turns into ranges; the band is shifted by the padding after the run (right padding moves
    each entry's diagonal). None when a run has holes or a shifted band cannot be expressed."""
    valid = padding != 0
    batch, seqlen_k = valid.shape
    count = valid.sum(1)
    has = count > 0
    start = torch.where(has, _first_true(valid), 0)
    end = torch.where(has, _last_true(valid) + 1, 0)
    if not torch.equal(end - start, count):
        return None
    starts, ends = start.tolist(), end.tolist()
    lefts, rights = [], []
    for s, e in zip(starts, ends):
        shift = seqlen_k - e if e else 0
        lo = -1 if left < 0 else left - shift
        hi = -1 if right < 0 else right + shift
        if left >= 0 and lo < 0:
            return None
        lefts.append(lo)
        rights.append(hi)
    return _from_ranges((starts, ends, lefts, rights, None), batch)


def broadcasts_to(shape, target):
    """Whether a tensor of `shape` broadcasts to exactly `target` (torch.broadcast_shapes costs ~20 µs)."""
    if len(shape) > len(target):
        return False
    return all(n == 1 or n == t for n, t in zip(reversed(shape), reversed(target)))


def normalise_mask(mask, batch, heads_q, seqlen_q, seqlen_k):
    """mask as 4-D [batch or 1, heads or 1, seqlen_q, seqlen_k] (expanded views along broadcast axes)."""
    shape = (batch, heads_q, seqlen_q, seqlen_k)
    if not broadcasts_to(mask.shape, shape):
        raise ValueError(f"attn_mask of shape {tuple(mask.shape)} does not broadcast to {shape} "
                         "[batch, heads, seqlen_q, seqlen_k]")
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    return mask.expand(mask.shape[0], mask.shape[1], seqlen_q, seqlen_k)


def _bool_mask(mask):
    """A bool mask, or None for a float mask with values other than 0 and -inf (an additive bias)."""
    if mask.dtype == torch.bool:
        return mask
    visible = mask == 0
    if not bool((visible | torch.isneginf(mask)).all()):
        return None
    return visible


def plan(q, k, mask=None, padding=None, seq_ids=None, causal=False, window_left=-1, window_right=-1, hint=None):
    """The plan for these inputs (see the module docstring). `hint` ([batch or 1, seqlen_q] integers, like
    seq_ids) is not a constraint: it proposes packed sequences, tried only if it reproduces the mask exactly
    (transformers builds a packed mask from position_ids, which the caller can turn into a hint)."""
    batch, seqlen_q, heads_q, _ = q.shape
    seqlen_k = k.shape[1]
    left, right = _band(window_left, window_right, causal)
    given = sum(x is not None for x in (mask, padding, seq_ids))
    if padding is not None and tuple(padding.shape) != (batch, seqlen_k):
        raise ValueError(f"padding must have shape ({batch}, {seqlen_k}) [batch, seqlen_k], got {tuple(padding.shape)}")
    if seq_ids is not None and (seq_ids.dim() != 2 or seq_ids.shape[0] not in (1, batch)
                                or seq_ids.shape[1] != seqlen_q):
        raise ValueError(f"seq_ids must have shape ({batch} or 1, {seqlen_q}), got {tuple(seq_ids.shape)}")
    if given == 0 or batch == 0 or seqlen_q == 0:
        return Plan(DENSE, [0] * batch, [seqlen_k] * batch, [left] * batch, [right] * batch)
    if seq_ids is not None and seqlen_q != seqlen_k:
        raise ValueError(f"seq_ids (packed sequences) need seqlen_q == seqlen_k, got {seqlen_q} and {seqlen_k}")
    if given == 1 and padding is not None:
        found = _padding_plan(padding, seqlen_q, left, right)
        if found is not None:
            return found
    runs = None
    if seq_ids is not None:
        runs = _runs(seq_ids.expand(batch, seqlen_q))
        if given == 1:
            return _packed(runs, seqlen_q, left, right)
    if hint is not None and (hint.dim() != 2 or hint.shape[0] not in (1, batch) or hint.shape[1] != seqlen_q
                             or seqlen_q != seqlen_k):
        hint = None
    # The general case: one explicit bool mask [entries, heads, seqlen_q, seqlen_k] with every constraint.
    if mask is not None:
        if mask.dtype not in (torch.bool, torch.float32):
            mask = mask.float()  # the library adds float32 masks (converted before broadcasting: no copies)
        mask = normalise_mask(mask, batch, heads_q, seqlen_q, seqlen_k)
        as_bool = _bool_mask(mask)
        if as_bool is None:
            return Plan(MASK, mask=_constrained(mask, padding, runs, left, right, seqlen_q, seqlen_k),
                        reason="an additive float mask (values other than 0 and -inf)")
        mask = as_bool
    else:
        mask = torch.ones(1, 1, seqlen_q, seqlen_k, dtype=torch.bool)
    mask = _constrained(mask, padding, runs, left, right, seqlen_q, seqlen_k)
    if mask.shape[1] > 1 and not bool((mask == mask[:, :1]).all()):
        return Plan(MASK, mask=mask, reason="a mask that differs between heads")
    m = mask[:, 0]
    if seqlen_q == 1 or m.stride(1) == 0:
        ranges = _key_runs(m[:, 0])  # one visible set for every query row: decoding, key-padding masks
        if ranges is not None:
            return _from_ranges(ranges, batch)
    ranges = _ranges_plan(m)
    if ranges is None:
        ranges = _ranges_plan(m, trim_rows=True)
    if ranges is not None:
        return _from_ranges(ranges, batch)
    for candidate in (runs, None if hint is None else _runs(hint.expand(batch, seqlen_q))):
        if candidate is not None:
            band = _packed_plan(m.expand(batch, seqlen_q, seqlen_k), candidate)
            if band is not None:
                return _packed(candidate, seqlen_q, *band)
    return Plan(MASK, mask=mask, reason="a mask that is not a key range with a band, nor packed sequences")


def _constrained(mask, padding, runs, left, right, seqlen_q, seqlen_k):
    """mask (bool, or additive float32) with padding, packed runs and the band applied to it as well."""
    hide = None
    if padding is not None:
        hide = (padding == 0)[:, None, None, :]
    if runs is not None:
        other = (runs[:, :, None] != runs[:, None, :])[:, None]
        hide = other if hide is None else hide | other
    if left >= 0 or right >= 0:
        outside = ~_band_mask(seqlen_q, seqlen_k, left, right)
        hide = outside if hide is None else hide | outside
    if hide is None:
        return mask
    return mask & ~hide if mask.dtype == torch.bool else mask.masked_fill(hide, -math.inf)


# ---- running a plan -----------------------------------------------------------------------------------------

def _key_rows(x):
    """Key rows per batch entry when a [batch, seqlen, heads, dim] tensor's batch stride is a whole number of
    its row strides (then row r of the flat tensor is entry r // rows, position r % rows), else None."""
    s0, s1 = x.stride(0), x.stride(1)
    if s1 <= 0 or s0 % s1:
        return None
    return s0 // s1


def _extent(x, sizes, strides):
    """[first byte, last byte + 1) addressed by a view with these sizes and element strides."""
    last = sum((n - 1) * s for n, s in zip(sizes, strides) if n > 0)
    return x.data_ptr(), x.data_ptr() + (last + 1) * x.element_size()


def _overlaps(a, b):
    return a[0] < b[1] and b[0] < a[1]


def ranges_forward(q, k, v, out, lse, starts, ends, options, rows=None, memo=None):
    """RANGES through one KV-cache call: entry b's cache row begins at key row rows[b] * pitch + starts[b] of k
    and v (rows[b] = b by default), pitch = batch stride / row stride, and holds ends[b] - starts[b] keys.
    `options` are _torch_raw's keyword arguments. Returns False (having written nothing) when the strides
    do not allow this, so that the caller runs one call per entry instead."""
    pitch_k, pitch_v = _key_rows(k), _key_rows(v)
    if pitch_k is None or pitch_k != pitch_v or not starts:
        return False
    key = (pitch_k, k.stride(1), v.stride(1), k.stride(2), v.stride(2), k.shape[2], k.shape[3], v.shape[3])
    found = None if memo is None else memo.get(key)
    if found is None:
        rows = range(len(starts)) if rows is None else rows
        index = [r * pitch_k + s for r, s in zip(rows, starts)]
        lengths = [e - s for s, e in zip(starts, ends)]
        cache_batch, cache_seqlen = max(index) + 1, max(lengths)
        # The library checks that out and lse do not overlap the cache as it is described, and this
        # description reaches up to max(lengths) rows past the last entry's keys: out must not sit right after
        # k or v (checked below against these byte ranges, relative to k's and v's data pointers).
        spans = [_extent(x, (cache_batch, cache_seqlen, x.shape[2], x.shape[3]),
                         (x.stride(1), x.stride(1), x.stride(2), 1)) for x in (k, v)]
        spans = [(a - x.data_ptr(), b - x.data_ptr()) for (a, b), x in zip(spans, (k, v))]
        found = ((cache_batch, cache_seqlen, k.stride(1), v.stride(1)), torch.tensor(lengths, dtype=torch.int32),
                 torch.tensor(index, dtype=torch.int32), spans)
        if memo is not None:
            memo[key] = found
    geometry, lengths, index, spans = found
    extents = [(x.data_ptr() + a, x.data_ptr() + b) for (a, b), x in zip(spans, (k, v))]
    for x in (out, lse):
        if x is not None and any(_overlaps(_extent(x, x.shape, x.stride()), e) for e in extents):
            return False
    raw.kvcache_forward(q, k, v, out, lse, lengths, index, rows=geometry, **options)
    return True


def _flat(x, rows):
    """[batch, seqlen, heads, dim] as [batch * seqlen, heads, dim]: a view when the strides allow, else a copy."""
    return x.reshape(x.shape[0] * rows, x.shape[2], x.shape[3])


def forward(p, q, k, v, scale=None, softcap=0.0, sinks=None, num_threads=0, want_lse=True):
    """Runs plan p. Returns out (contiguous [batch, seqlen_q, heads_q, head_dim], q's dtype) and lse (float32
    contiguous [batch, heads_q, seqlen_q]; None if not
    want_lse and nothing needed it)."""
    batch, seqlen_q, heads_q, _ = q.shape
    head_dim = v.shape[3]  # out has v's head size (head_dim_v)
    if p.kind == MASK:
        out = torch.empty(batch, seqlen_q, heads_q, head_dim, dtype=q.dtype)
        lse = torch.empty(batch, heads_q, seqlen_q, dtype=torch.float32)
        raw.forward(q, k, v, out, lse, scale=scale, softcap=softcap, sinks=sinks, num_threads=num_threads,
                    attn_mask=p.mask)
        return out, lse

    def options(b):
        return dict(scale=scale, softcap=softcap, sinks=sinks, num_threads=num_threads, window_left=p.lefts[b],
                    window_right=p.rights[b])

    out = torch.empty(batch, seqlen_q, heads_q, head_dim, dtype=q.dtype)
    lse = torch.empty(batch, heads_q, seqlen_q, dtype=torch.float32) if want_lse or p.kind == PACKED else None
    if p.kind == DENSE:
        s, e = p.starts[0], p.ends[0]
        ks, vs = (k, v) if (s, e) == (0, k.shape[1]) else (k[:, s:e], v[:, s:e])
        raw.forward(q, ks, vs, out, lse, **options(0))
    elif p.kind == RANGES and ranges_forward(q, k, v, out, lse, p.starts, p.ends, options(0), memo=p.memo):
        pass
    elif p.kind in (RANGES, PER_BATCH):
        for b in range(batch):
            s, e = p.starts[b], p.ends[b]
            r0, r1 = (0, seqlen_q) if p.rows is None else p.rows[b]
            if (r0, r1) != (0, seqlen_q):  # rows outside the call see no key
                out[b, :r0] = 0
                out[b, r1:] = 0
                if lse is not None:
                    lse[b, :, :r0] = -math.inf
                    lse[b, :, r1:] = -math.inf
            raw.forward(q[b:b + 1, r0:r1], k[b:b + 1, s:e], v[b:b + 1, s:e], out[b:b + 1, r0:r1],
                        None if lse is None else lse[b:b + 1, :, r0:r1], **options(b))
    else:  # PACKED
        flat_lse = torch.empty(heads_q, batch * seqlen_q, dtype=torch.float32)
        raw.varlen_forward(_flat(q, seqlen_q), _flat(k, k.shape[1]), _flat(v, v.shape[1]),
                           out.view(batch * seqlen_q, heads_q, head_dim), flat_lse, p.cu, p.cu, p.max_len, p.max_len,
                           **options(0))
        lse.copy_(flat_lse.view(heads_q, batch, seqlen_q).transpose(0, 1))
    return out, lse


def backward(p, dout, q, k, v, out, lse, scale=None, softcap=0.0, sinks=None, num_threads=0):
    """Gradients (dq, dk, dv, dsinks or None) of forward(p, ...) for the upstream gradient dout."""
    batch, seqlen_q, heads_q, head_dim = q.shape
    if p.kind == MASK:
        dq, dk, dv = (torch.empty(x.shape, dtype=x.dtype) for x in (q, k, v))
        dsinks = torch.zeros(heads_q, dtype=torch.float32) if sinks is not None else None
        raw.backward(dout, q, k, v, out, lse, dq, dk, dv, dsinks, scale=scale, softcap=softcap, sinks=sinks,
                     num_threads=num_threads, attn_mask=p.mask)
        return dq, dk, dv, dsinks

    def options(b):
        return dict(scale=scale, softcap=softcap, sinks=sinks, num_threads=num_threads, window_left=p.lefts[b],
                    window_right=p.rights[b])

    dq = torch.empty(q.shape, dtype=q.dtype)
    if p.kind == PACKED:
        dsinks = torch.zeros(heads_q, dtype=torch.float32) if sinks is not None else None
        rows_k = k.shape[1]
        dk = torch.empty(batch * rows_k, k.shape[2], head_dim, dtype=k.dtype)
        dv = torch.empty(batch * rows_k, v.shape[2], v.shape[3], dtype=v.dtype)
        flat_lse = lse.transpose(0, 1).reshape(heads_q, batch * seqlen_q)
        raw.backward(_flat(dout, seqlen_q), _flat(q, seqlen_q), _flat(k, rows_k), _flat(v, rows_k),
                     _flat(out, seqlen_q), flat_lse, dq.view(batch * seqlen_q, heads_q, head_dim), dk, dv, dsinks,
                     varlen=(p.cu, p.cu, p.max_len, p.max_len), **options(0))
        return dq, dk.view(k.shape), dv.view(v.shape), dsinks
    full = all(s == 0 and e == k.shape[1] for s, e in zip(p.starts, p.ends))
    dk = (torch.empty if full else torch.zeros)(k.shape, dtype=k.dtype)
    dv = (torch.empty if full else torch.zeros)(v.shape, dtype=v.dtype)
    if p.kind == DENSE:
        dsinks = torch.zeros(heads_q, dtype=torch.float32) if sinks is not None else None
        s, e = p.starts[0], p.ends[0]
        raw.backward(dout, q, k[:, s:e], v[:, s:e], out, lse, dq, dk[:, s:e], dv[:, s:e], dsinks, **options(0))
        return dq, dk, dv, dsinks
    dsinks = torch.zeros(heads_q, dtype=torch.float32) if sinks is not None else None
    for b in range(batch):
        part = torch.zeros(heads_q, dtype=torch.float32) if sinks is not None else None
        s, e = p.starts[b], p.ends[b]
        r0, r1 = (0, seqlen_q) if p.rows is None else p.rows[b]
        if (r0, r1) != (0, seqlen_q):
            dq[b, :r0] = 0
            dq[b, r1:] = 0
        sl, rs = slice(b, b + 1), slice(r0, r1)
        raw.backward(dout[sl, rs], q[sl, rs], k[sl, s:e], v[sl, s:e], out[sl, rs], lse[sl, :, rs], dq[sl, rs],
                     dk[sl, s:e], dv[sl, s:e], part, **options(b))
        if part is not None:
            dsinks += part
    return dq, dk, dv, dsinks


# ---- plans cached per mask tensor ----------------------------------------------------------------------------

_CACHE_SIZE = 16
_cache = {}


class _Uncacheable(Exception):
    pass


def _identity(x):
    if x is None:
        return None
    if x.is_inference():  # no version counter: an in-place change could not be seen, so plan every call
        raise _Uncacheable
    return id(x), x._version, x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.dtype


def cached_plan(q, k, mask=None, padding=None, seq_ids=None, causal=False, window_left=-1, window_right=-1,
                hint=None):
    """plan(...), remembered for the same mask / padding / seq_ids tensor objects (unchanged: same version
    counter, data pointer, shape and strides) and options. A model passes one mask tensor to all its layers,
    and the backward re-plans what its forward planned; so the mask is examined once per forward pass.
    Tensors made under torch.inference_mode() have no version counter and are planned on every call."""
    if mask is None and padding is None and seq_ids is None:
        return plan(q, k, None, None, None, causal, window_left, window_right)
    try:
        key = (_identity(mask), _identity(padding), _identity(seq_ids), _identity(hint), tuple(q.shape),
               tuple(k.shape), bool(causal), window_left, window_right)
    except _Uncacheable:
        return plan(q, k, mask, padding, seq_ids, causal, window_left, window_right, hint)
    entry = _cache.get(key)
    objects = (mask, padding, seq_ids, hint)
    if entry is not None and all(r is None and x is None or r is not None and r() is x
                                 for r, x in zip(entry[0], objects)):
        return entry[1]
    found = plan(q, k, mask, padding, seq_ids, causal, window_left, window_right, hint)
    if len(_cache) >= _CACHE_SIZE:
        _cache.pop(next(iter(_cache)))
    _cache[key] = (tuple(None if x is None else weakref.ref(x) for x in objects), found)
    return found

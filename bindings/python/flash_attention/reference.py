"""Reference attention in numpy float64 with exactly the library's semantics: the oracle of the tests.

These functions materialise every score; they are written for clarity, not speed.
"""

import numpy as np


def _softmax(q, k, softmax_scale, causal, window_size, softcap, alibi_slopes, sinks, attn_mask=None):
    """The library's probabilities, shared by the forward and backward references: scores scaled, softcapped,
    ALiBi added, the caller's attn_mask applied (boolean: False hides; float: added), masked around the
    bottom-right diagonal, with the sink logit joining the softmax. Returns a
    dict: raw (scaled scores before softcap), k repeated per query head, visible [seqlen_q, seqlen_k], p
    [batch, heads_q, seqlen_q, seqlen_k + 1] (last column: the sink), and the row's safe_max and total."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    batch, seqlen_q, heads_q, head_dim = q.shape
    seqlen_k, heads_kv = k.shape[1], k.shape[2]
    scale = 1.0 / np.sqrt(head_dim) if softmax_scale is None else float(softmax_scale)
    kr = np.repeat(k, heads_q // heads_kv, axis=2)
    raw = np.einsum("bqhd,bkhd->bhqk", q, kr) * scale
    scores = softcap * np.tanh(raw / softcap) if softcap > 0 else raw
    i = np.arange(seqlen_q)[:, None]
    j = np.arange(seqlen_k)[None, :]
    aligned = i + seqlen_k - seqlen_q  # the key each query is aligned with (bottom-right)
    if alibi_slopes is not None:
        slopes = np.broadcast_to(np.asarray(alibi_slopes, np.float64), (batch, heads_q))
        scores = scores - slopes[:, :, None, None] * np.abs(aligned - j)[None, None]
    if attn_mask is not None:
        m = np.asarray(attn_mask)
        m = m.reshape((1,) * (4 - m.ndim) + m.shape)[..., :seqlen_q, :seqlen_k] if m.ndim else m
        with np.errstate(invalid="ignore"):
            scores = np.where(m, scores, -np.inf) if m.dtype.kind in "bu" else scores + m.astype(np.float64)
    left, right = window_size
    if causal:
        right = 0
    visible = np.ones((seqlen_q, seqlen_k), bool)
    if left >= 0:
        visible &= j >= aligned - left
    if right >= 0:
        visible &= j <= aligned + right
    scores = np.where(visible, scores, -np.inf)
    sink = np.full(heads_q, -np.inf) if sinks is None else np.asarray(sinks, np.float64)
    sink = np.broadcast_to(sink[None, :, None, None], (batch, heads_q, seqlen_q, 1))
    with_sink = np.concatenate([scores, sink], axis=-1)
    row_max = with_sink.max(axis=-1, keepdims=True)
    safe_max = np.where(np.isneginf(row_max), 0.0, row_max)
    e = np.exp(with_sink - safe_max)
    total = e.sum(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        # Only an empty row (total exactly 0) gives 0; a NaN total stays NaN.
        p = np.where(total == 0, 0.0, e / total)
    return dict(raw=raw, kr=kr, visible=visible, p=p, safe_max=safe_max, total=total)


_MASK64 = (1 << 64) - 1


def _mix64(z):
    """SplitMix64's finaliser of z + the golden-ratio increment, on uint64 arrays (wrapping)."""
    z = (z + np.uint64(0x9E3779B97F4A7C15)) & np.uint64(_MASK64)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def dropout_mask(seed, dropout_p, batch, heads_q, seqlen_q, seqlen_k, first_batch=0):
    """The library's dropout factors, float64 [batch, heads_q, seqlen_q, seqlen_k]: 1/(1 - p) where element
    (b, h, i, j) is kept, 0 where dropped; batch index b counts from first_batch (a varlen sequence's index).

    Written from the definition in the C header and Dropout.swift, independently of the kernels: a row state
    r = splitmix64 chained over (seed, b, h, i); word x = lowbias32(low32(r) ^ (j * 0x9E3779B9 + high32(r)));
    kept iff x >> 8 < round((1 - p) * 2**24)."""
    with np.errstate(over="ignore"):
        b = np.arange(first_batch, first_batch + batch, dtype=np.uint64)[:, None, None]
        h = np.arange(heads_q, dtype=np.uint64)[None, :, None]
        i = np.arange(seqlen_q, dtype=np.uint64)[None, None, :]
        r = _mix64(np.full(1, int(seed) & _MASK64, dtype=np.uint64))
        r = _mix64(_mix64(_mix64(r ^ b) ^ h) ^ i)[..., None]
        low, high = r & np.uint64(0xFFFFFFFF), r >> np.uint64(32)
        j = np.arange(seqlen_k, dtype=np.uint64)
        x = (low ^ ((j * np.uint64(0x9E3779B9) + high) & np.uint64(0xFFFFFFFF))).astype(np.uint32)
        x ^= x >> np.uint32(16)
        x *= np.uint32(0x7FEB352D)
        x ^= x >> np.uint32(15)
        x *= np.uint32(0x846CA68B)
        x ^= x >> np.uint32(16)
    threshold = round((1.0 - float(np.float32(dropout_p))) * (1 << 24))
    return np.where((x >> np.uint32(8)) < threshold, 1.0 / (1.0 - float(np.float32(dropout_p))), 0.0)


def reference_attention(q, k, v, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                        alibi_slopes=None, sinks=None, return_lse=False, dropout=None, attn_mask=None):
    """softmax(q kᵀ · scale) v computed in float64, materialising the full score matrix.

    Same layouts and semantics as flash_attn_func: q [batch, seqlen_q, heads_q, head_dim], k and v
    [batch, seqlen_k, heads_kv, head_dim] (v's head size may differ), grouped-query heads, bottom-right aligned causal mask and
    sliding window, softcap on the scaled score, ALiBi bias, sink logits in the denominator; rows that
    see no key give 0 and LSE -inf (or the sink). With `dropout` (factors from dropout_mask) each probability
    is multiplied by its factor in P·V only; the LSE is the undropped one. Returns float64 out (and lse
    [batch, heads_q, seqlen_q]).
    """
    q = np.asarray(q, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    seqlen_k = k.shape[1]
    v = np.repeat(v, q.shape[2] // v.shape[2], axis=2)
    s = _softmax(q, k, softmax_scale, causal, window_size, softcap, alibi_slopes, sinks, attn_mask)
    visible, safe_max, total = s["visible"], s["safe_max"], s["total"]
    with np.errstate(invalid="ignore", divide="ignore"):
        weights = s["p"][..., :seqlen_k] * (1.0 if dropout is None else dropout)
        # Hidden keys are excluded, not weighted by 0: a NaN or inf value reaches only the rows that see
        # its key (a matrix product would spread 0 · NaN to every row).
        out = np.einsum("bhqk,bkhd->bqhd", weights, np.where(np.isfinite(v), v, 0.0))
        for b, j, h, c in zip(*np.nonzero(~np.isfinite(v))):
            rows = visible[:, j]
            out[b, rows, h, c] += weights[b, h, rows, j] * v[b, j, h, c]
        lse = np.where(total[..., 0] == 0, -np.inf, (safe_max + np.log(total))[..., 0])
    return (out, lse) if return_lse else out


def reference_varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes=None, dropout_p=0.0, seed=0,
                               attn_mask=None, **options):
    """Varlen attention as a loop of reference_attention over the packed sequences: out [total_q, heads_q,
    head_dim] and lse [heads_q, total_q]. Dropout masks are drawn with each sequence's index as its batch."""
    out = np.zeros(q.shape[:-1] + v.shape[-1:], np.float64)
    lse = np.full((q.shape[1], q.shape[0]), -np.inf)
    for b in range(len(cu_seqlens_q) - 1):
        qs = slice(cu_seqlens_q[b], cu_seqlens_q[b + 1])
        ks = slice(cu_seqlens_k[b], cu_seqlens_k[b + 1])
        slopes = None if alibi_slopes is None else np.asarray(alibi_slopes)[b] if np.ndim(alibi_slopes) == 2 else alibi_slopes
        z = None if dropout_p == 0 else dropout_mask(seed, dropout_p, 1, q.shape[1], qs.stop - qs.start,
                                                     ks.stop - ks.start, first_batch=b)
        mask = None
        if attn_mask is not None:  # [batch | 1, heads | 1, max queries, max keys], positions within the sequence
            m = np.asarray(attn_mask)
            m = m.reshape((1,) * (4 - m.ndim) + m.shape)
            mask = m[min(b, m.shape[0] - 1)][None]
        o, l = reference_attention(q[None, qs], k[None, ks], v[None, ks], alibi_slopes=slopes, return_lse=True,
                                   dropout=z, attn_mask=mask, **options)
        out[qs], lse[:, qs] = o[0], l[0]
    return out, lse


def reference_kvcache_attention(q, k_cache, v_cache, cache_seqlens, k=None, v=None, cache_batch_idx=None,
                                block_table=None, alibi_slopes=None, attn_mask=None, **options):
    """KV-cache attention from first principles: gather each batch entry's cached keys (contiguous or
    through the block table), append the new ones, and call reference_attention. Does not modify the
    cache. Returns out [batch, seqlen_q, heads_q, head_dim] and lse [batch, heads_q, seqlen_q]."""
    batch = q.shape[0]
    outs, lses = [], []
    for b in range(batch):
        cached = int(cache_seqlens[b])
        if block_table is not None:
            page = k_cache.shape[1]
            rows = [(block_table[b][j // page], j % page) for j in range(cached)]
            keys = np.array([k_cache[blk, off] for blk, off in rows]).reshape(cached, *k_cache.shape[2:])
            values = np.array([v_cache[blk, off] for blk, off in rows]).reshape(cached, *v_cache.shape[2:])
        else:
            entry = b if cache_batch_idx is None else cache_batch_idx[b]
            keys, values = k_cache[entry, :cached], v_cache[entry, :cached]
        if k is not None:
            keys = np.concatenate([keys, k[b]])
            values = np.concatenate([values, v[b]])
        slopes = None if alibi_slopes is None else np.asarray(alibi_slopes)[b] if np.ndim(alibi_slopes) == 2 else alibi_slopes
        mask = None
        if attn_mask is not None:  # key j of entry b is cache position j
            m = np.asarray(attn_mask)
            m = m.reshape((1,) * (4 - m.ndim) + m.shape)
            mask = m[min(b, m.shape[0] - 1)][None]
        o, l = reference_attention(q[b:b + 1], keys[None], values[None], alibi_slopes=slopes, return_lse=True,
                                   attn_mask=mask, **options)
        outs.append(o[0])
        lses.append(l[0])
    return np.array(outs), np.array(lses)


def reference_attention_backward(dout, q, k, v, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                 alibi_slopes=None, sinks=None, out=None, dropout=None, attn_mask=None):
    """Analytic float64 gradients of reference_attention: (dq, dk, dv), plus dsinks when sinks is given.

    With S = q kᵀ · scale, S' = softcap·tanh(S/softcap) − ALiBi (masked to −inf), P = softmax([S', sink])
    and O = P v:  dv = Pᵀ dO;  dP = dO vᵀ;  D = rowsum(dO ∘ O);  dS' = P ∘ (dP − D);
    dS = dS' ∘ (1 − tanh²(S/softcap));  dq = dS k · scale;  dk = dSᵀ q · scale;  dsink = −Σ p_sink · D.
    Grouped kv heads receive the sum over their query heads. `out`, when given, is the forward output as
    stored (float16 or bfloat16 storage rounds it) and D is taken from it, as the library's backward does.
    With `dropout` factors Z: O = (P ∘ Z) v, so dv = (P ∘ Z)ᵀ dO and dP = Z ∘ (dO vᵀ); D is unchanged in form.
    """
    q, k, v, dout = (np.asarray(x, dtype=np.float64) for x in (q, k, v, dout))
    stored_out = out
    batch, seqlen_q, heads_q, head_dim = q.shape
    seqlen_k, heads_kv = k.shape[1], k.shape[2]
    scale = 1.0 / np.sqrt(head_dim) if softmax_scale is None else float(softmax_scale)
    group = heads_q // heads_kv
    s = _softmax(q, k, softmax_scale, causal, window_size, softcap, alibi_slopes, sinks, attn_mask)
    raw, kr, vr = s["raw"], s["kr"], np.repeat(v, group, axis=2)
    p, p_sink = s["p"][..., :seqlen_k], s["p"][..., seqlen_k]
    z = 1.0 if dropout is None else dropout
    out = np.einsum("bhqk,bkhd->bqhd", p * z, vr)
    dout_h = dout.transpose(0, 2, 1, 3)  # [b, h, q, d]
    dv = np.einsum("bhqk,bhqd->bkhd", p * z, dout_h)
    dp = np.einsum("bhqd,bkhd->bhqk", dout_h, vr) * z
    if stored_out is not None:
        out = np.asarray(stored_out, np.float64)
    d_row = np.einsum("bqhd,bqhd->bhq", dout, out)[..., None]
    ds = p * (dp - d_row)
    if softcap > 0:
        ds = ds * (1 - np.tanh(raw / softcap) ** 2)
    dq = np.einsum("bhqk,bkhd->bqhd", ds, kr) * scale
    dk = np.einsum("bhqk,bqhd->bkhd", ds, q) * scale
    dk = dk.reshape(batch, seqlen_k, heads_kv, group, head_dim).sum(axis=3)
    dv = dv.reshape(batch, seqlen_k, heads_kv, group, v.shape[3]).sum(axis=3)
    if sinks is None:
        return dq, dk, dv
    dsinks = -(p_sink * d_row[..., 0]).sum(axis=(0, 2))
    return dq, dk, dv, dsinks

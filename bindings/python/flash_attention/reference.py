"""Reference attention in numpy float64 with exactly the library's semantics: the oracle of the tests."""

import numpy as np


def reference_attention(q, k, v, softmax_scale=None, causal=False, return_lse=False):
    """softmax(q kᵀ · scale) v computed in float64, materialising the full score matrix.

    Same layouts and semantics as flash_attn_func: q [batch, seqlen_q, heads_q, head_dim], k and v
    [batch, seqlen_k, heads_kv, head_dim], grouped-query heads, bottom-right aligned causal mask, rows that
    see no key give 0 and LSE -inf. Returns float64 out (and lse [batch, heads_q, seqlen_q]).
    """
    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    _, seqlen_q, heads_q, head_dim = q.shape
    seqlen_k, heads_kv = k.shape[1], k.shape[2]
    scale = 1.0 / np.sqrt(head_dim) if softmax_scale is None else float(softmax_scale)
    group = heads_q // heads_kv
    k = np.repeat(k, group, axis=2)
    v = np.repeat(v, group, axis=2)
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if causal:
        i = np.arange(seqlen_q)[:, None]
        j = np.arange(seqlen_k)[None, :]
        scores = np.where(j <= i + seqlen_k - seqlen_q, scores, -np.inf)
    row_max = scores.max(axis=-1, keepdims=True) if seqlen_k else np.full(scores.shape[:-1] + (1,), -np.inf)
    safe_max = np.where(np.isneginf(row_max), 0.0, row_max)
    p = np.exp(scores - safe_max)
    total = p.sum(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.einsum("bhqk,bkhd->bqhd", np.where(total > 0, p / total, 0.0), v)
        lse = np.where(total[..., 0] > 0, (safe_max + np.log(total))[..., 0], -np.inf)
    return (out, lse) if return_lse else out

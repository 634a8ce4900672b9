"""FlashAttention-2's calling conventions, shared by the numpy API and the PyTorch adapter.

FA2 code passes its arguments positionally in FA2's order (dropout_p fourth), so every function here takes that
order; dropout's seed, rotary embedding in the KV-cache call and the packed variants (slices of the packed
tensor: strided views, nothing is copied) are shared by both APIs here.
"""

import numbers


def dropout_arguments(dropout_p, seed, draw):
    """(dropout_p, seed) checked, the seed drawn with `draw()` (the framework's global generator, so that
    seeding it makes runs repeatable, as FA2's torch generator does) when dropout is on and none is given.
    The seed keys the library's mask: pass the same to the backward."""
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"dropout_p must be a float, got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p ({dropout_p}) must be in [0, 1) (0 = off)")
    if dropout_p == 0.0:
        return 0.0, 0
    if seed is None:
        seed = draw()
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 1 << 64:
        raise ValueError(f"seed ({seed!r}) must be an integer in [0, 2**64)")
    return float(dropout_p), int(seed)


def rotary_plan(q_shape, k_shape, cos, sin, cache_seqlens, aligned):
    """Checks FA2's rotary arguments of the KV-cache call and returns the row offsets (start, step) of q's
    positions: cache_seqlens + i when `aligned` (causal or windowed: query i is the new key i), else
    cache_seqlens for every row. The new keys k are rotated at cache_seqlens + i. cos/sin: [seqlen_ro,
    rotary_dim / 2], rotary_dim even and at most head_dim (FA2 also asks for a multiple of 16; any size works
    here)."""
    if cos is None or sin is None:
        raise ValueError("rotary_cos and rotary_sin must be given together")
    if k_shape is None:
        raise ValueError("rotary embedding rotates the appended keys: pass k and v with rotary_cos/rotary_sin")
    if cache_seqlens is None:
        raise ValueError("rotary embedding needs cache_seqlens (the position of each entry's first new key)")
    if len(cos.shape) != 2 or tuple(sin.shape) != tuple(cos.shape):
        raise ValueError(f"rotary_cos and rotary_sin must both be [seqlen_ro, rotary_dim / 2], got "
                         f"{tuple(cos.shape)} and {tuple(sin.shape)}")
    if not 1 <= 2 * cos.shape[1] <= q_shape[3]:
        raise ValueError(f"rotary_dim (2 × {cos.shape[1]}) must be in 2...head_dim ({q_shape[3]})")
    return 1 if aligned else 0


def check_rotary_positions(last_position, seqlen_ro):
    if last_position >= seqlen_ro:
        raise ValueError(f"rotary_cos has {seqlen_ro} positions; position {last_position} (cache_seqlens + "
                         "seqlen_new - 1) needs more")


def apply_rotary(x, cos, sin, positions, interleaved, to_float32, back):
    """x [batch, rows, heads, head_dim] (numpy or torch) with its first rotary_dim channels rotated at
    `positions` [batch, rows]: pairs (2i, 2i + 1) when interleaved (GPT-J), (i, i + rotary_dim / 2) otherwise
    (GPT-NeoX): (a, b) -> (a cos - b sin, a sin + b cos), in float32, then `back` to x's dtype (as FA2 does)."""
    half = cos.shape[1]
    c, s = to_float32(cos[positions])[:, :, None, :], to_float32(sin[positions])[:, :, None, :]
    out = to_float32(x) * 1
    first, second = (slice(0, 2 * half, 2), slice(1, 2 * half, 2)) if interleaved else (slice(0, half),
                                                                                       slice(half, 2 * half))
    a, b = out[..., first] * 1, out[..., second] * 1
    out[..., first], out[..., second] = a * c - b * s, a * s + b * c
    return back(out)


def packed_functions(func, varlen_func):
    """FA2's four packed variants over a module's flash_attn_func and flash_attn_varlen_func."""

    def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                                  softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False,
                                  **options):
        """qkv [batch, seqlen, 3, heads, head_dim]: flash_attn_func on its three slices (views, no copy)."""
        _check_packed("qkv", qkv, 5, 2, 3)
        return func(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], dropout_p, softmax_scale, causal, window_size,
                    softcap, alibi_slopes, deterministic, return_attn_probs, **options)

    def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                                 softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False,
                                 **options):
        """kv [batch, seqlen_k, 2, heads_kv, head_dim]: flash_attn_func with k, v its slices (views, no copy)."""
        _check_packed("kv", kv, 5, 2, 2)
        return func(q, kv[:, :, 0], kv[:, :, 1], dropout_p, softmax_scale, causal, window_size, softcap,
                    alibi_slopes, deterministic, return_attn_probs, **options)

    def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None,
                                         causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                                         deterministic=False, return_attn_probs=False, **options):
        """qkv [total, 3, heads, head_dim]: flash_attn_varlen_func on its slices, one cu_seqlens for both."""
        _check_packed("qkv", qkv, 4, 1, 3)
        return varlen_func(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                           dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                           return_attn_probs, **options)

    def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                        dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                                        softcap=0.0, alibi_slopes=None, deterministic=False,
                                        return_attn_probs=False, **options):
        """kv [total_k, 2, heads_kv, head_dim]: flash_attn_varlen_func with k, v its slices."""
        _check_packed("kv", kv, 4, 1, 2)
        return varlen_func(q, kv[:, 0], kv[:, 1], cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                           return_attn_probs, **options)

    return (flash_attn_qkvpacked_func, flash_attn_kvpacked_func, flash_attn_varlen_qkvpacked_func,
            flash_attn_varlen_kvpacked_func)


def _check_packed(name, x, ndim, axis, count):
    shape = tuple(getattr(x, "shape", ()))
    if len(shape) != ndim or shape[axis] != count:
        raise ValueError(f"{name} must have {ndim} dimensions with {count} at axis {axis}, got shape {shape}")

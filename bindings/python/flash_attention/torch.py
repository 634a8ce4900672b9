"""Optional PyTorch adapter: CPU tensors in and out, zero-copy, with autograd and torch.compile support.

Importing ``flash_attention`` never imports torch; only ``import flash_attention.torch`` does, and that import
touches neither numpy's bfloat16 (ml_dtypes) nor anything else slow: tensors are handed to the C library as
pointers, element strides and a dtype code (flash_attention._torch_raw), float16 and bfloat16 included.

Public functions (FlashAttention's names and layouts, plus torch's SDPA):
    flash_attn_func          [batch, seqlen, heads, head_dim], differentiable
    flash_attn_varlen_func   packed [total, heads, head_dim] sequences delimited by cu_seqlens, differentiable
    flash_attn_with_kvcache  decoding against a contiguous or paged KV cache (float, or int8 / float8 with
                             row scales), optional append (no backward, as in FlashAttention-2)
    quantize_kv              keys or values to an 8-bit cache's values and row scales
    scaled_dot_product_attention
                             torch.nn.functional.scaled_dot_product_attention's signature and semantics, so
                             ``F.scaled_dot_product_attention = scaled_dot_product_attention`` works; what the
                             library cannot compute exactly runs through torch's own function (see its doc)

The library is reached through custom operators, so that torch.compile can trace them (each has a fake
implementation that only computes shapes) and autograd can differentiate them:

    torch.ops.flash_attention.forward / backward                 dense
    torch.ops.flash_attention.varlen_forward / varlen_backward   packed sequences
    torch.ops.flash_attention.kvcache_forward                    KV cache, read only
    torch.ops.flash_attention.kvcache_append_forward             KV cache, appends k/v first (mutates it)
    torch.ops.flash_attention.masked_forward / masked_backward   masks, padding, packed sequence ids
                                                                 (flash_attention._torch_masked)

An eager call that needs no gradient (inference, torch.no_grad()) skips the operator dispatch and calls the
library directly: same arguments, same result, a few microseconds less per call.
"""

import math
import numbers
from typing import Optional, Tuple

import torch

from . import _torch_masked as _masked
from . import _torch_raw as _raw
from ._fa2 import apply_rotary, check_rotary_positions, dropout_arguments, packed_functions, rotary_plan
from .api import appends_overlap, check_cache_scales, quantized_rows

__all__ = ["flash_attn_func", "flash_attn_kvpacked_func", "flash_attn_qkvpacked_func", "flash_attn_varlen_func",
           "flash_attn_varlen_kvpacked_func", "flash_attn_varlen_qkvpacked_func", "flash_attn_with_kvcache",
           "quantize_kv", "scaled_dot_product_attention"]

_DTYPES = _raw.DTYPE_CODES
_CACHE_DTYPES = _raw.CACHE_CODES
_PLAIN = (torch.Tensor, torch.nn.Parameter)
_is_compiling = torch.compiler.is_compiling


# --- small helpers ---------------------------------------------------------------------------------------------


def _dim_contiguous(x):
    """x, or a contiguous copy when it is strided along head_dim (the one layout the library cannot read)."""
    if x is not None and x.stride(-1) != 1 and x.shape[-1] > 1:
        return x.contiguous()
    return x


def _direct(q, *tensors):
    """Whether to call the library directly instead of through the operator: eager mode, real CPU tensors
    (not fake or meta ones), and no gradient to record."""
    if _is_compiling() or type(q) not in _PLAIN or not q.is_cpu:
        return False
    if torch.is_grad_enabled():
        for x in tensors:
            if x is not None and x.requires_grad:
                return False
    return True


def _check_tensor(name, x, device, dtypes=_DTYPES):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.device.type not in ("cpu", "meta"):
        raise ValueError(f"{name} is on device {x.device}; flash_attention runs on the CPU only "
                         f"(move it with .cpu(), or use the GPU FlashAttention package for {x.device.type} tensors)")
    if x.device != device:
        raise ValueError(f"{name} is on device {x.device} but q is on {device}")
    if x.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype {', '.join(map(str, dtypes))}, got {x.dtype}")


def _check_qkv(q, k, v, ndim):
    """Types, devices and dtypes, and what the library cannot check itself: it is given one set of sizes
    (q's batch and head_dim, k's heads), so the tensors must agree with each other."""
    if not (type(q) in _PLAIN and type(k) in _PLAIN and type(v) in _PLAIN and q.is_cpu and k.is_cpu and v.is_cpu
            and q.dtype in _DTYPES and k.dtype in _DTYPES and v.dtype is k.dtype):
        # The slow path: find the precise complaint (or accept meta tensors and tensor subclasses).
        if not isinstance(q, torch.Tensor):
            raise TypeError(f"q must be a torch.Tensor, got {type(q).__name__}")
        for name, x in (("q", q), ("k", k), ("v", v)):
            _check_tensor(name, x, q.device)
        if v.dtype != k.dtype:
            raise TypeError(f"v must have the dtype of k ({k.dtype}), got {v.dtype}")
    _check_shapes(q, k, v, ndim)


def _check_shapes(q, k, v, ndim):
    qs, ks = q.shape, k.shape
    if len(qs) != ndim or len(ks) != ndim or v.dim() != ndim:
        for name, x in (("q", q), ("k", k), ("v", v)):
            if x.dim() != ndim:
                raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if v.shape[:-1] != ks[:-1]:
        raise ValueError(f"v shape {tuple(v.shape)} must equal k shape {tuple(ks)} but in the last axis (head_dim_v)")
    if ndim == 4 and (ks[0] != qs[0] or ks[3] != qs[3]):
        raise ValueError(f"k shape {tuple(ks)} does not match q shape {tuple(qs)} in batch and head_dim")
    if ndim == 3 and ks[2] != qs[2]:
        raise ValueError(f"k shape {tuple(ks)} does not match q shape {tuple(qs)} in head_dim")
    if ks[-2] == 0 or qs[-2] % ks[-2] != 0:
        raise ValueError(f"heads_q ({qs[-2]}) is not a multiple of heads_kv ({ks[-2]})")


def _out_shape(q, v):
    """out: q's shape with v's head size (head_dim_v)."""
    return q.shape[:-1] + v.shape[-1:]


def _scale(softmax_scale):
    if softmax_scale is None:
        return None
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, numbers.Real):
        raise TypeError(f"softmax_scale must be a float or None, got {type(softmax_scale).__name__}")
    if softmax_scale == 0.0 or not math.isfinite(softmax_scale):
        raise ValueError(f"softmax_scale ({softmax_scale}) must be finite and nonzero; None means 1/sqrt(head_dim)")
    return float(softmax_scale)


def _window(window_size):
    if window_size == (-1, -1):
        return -1, -1
    if not (isinstance(window_size, (tuple, list)) and len(window_size) == 2):
        raise TypeError(f"window_size must be a (left, right) pair, got {window_size!r}")
    left, right = window_size
    for name, x in (("window_size[0]", left), ("window_size[1]", right)):
        if isinstance(x, bool) or not isinstance(x, numbers.Integral):
            raise TypeError(f"{name} must be an int, got {type(x).__name__}")
        if x < -1:
            raise ValueError(f"{name} ({x}) must be >= -1 (-1 = unbounded)")
    return int(left), int(right)


def _softcap(softcap):
    if softcap == 0.0:
        return 0.0
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real):
        raise TypeError(f"softcap must be a float, got {type(softcap).__name__}")
    if not (softcap >= 0 and math.isfinite(softcap)):
        raise ValueError(f"softcap ({softcap}) must be finite and >= 0 (0 = off)")
    return float(softcap)


def _float32_vector(name, x, device, shapes):
    """alibi_slopes / sinks: any floating tensor of one of `shapes`, converted to contiguous float32
    (differentiably: a gradient of sinks flows back to the caller's dtype)."""
    if x is None:
        return None
    _check_tensor(name, x, device, dtypes=(torch.float32, torch.float16, torch.bfloat16, torch.float64))
    if tuple(x.shape) not in shapes:
        raise ValueError(f"{name} must have shape {' or '.join(str(s) for s in shapes)}, got {tuple(x.shape)}")
    return x.to(torch.float32).contiguous()


def _index_tensor(name, x, shape, device):
    """An index argument as a contiguous int32 tensor of `shape` (Python ints and other integer dtypes are
    converted; the library checks the values)."""
    if not isinstance(x, torch.Tensor):
        x = torch.tensor(x, dtype=torch.int32, device=device)
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise TypeError(f"{name} must hold integers, got {x.dtype}")
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(x.shape)}")
    return x.to(device=device, dtype=torch.int32).contiguous()


# --- dense: custom operators -----------------------------------------------------------------------------------


@torch.library.custom_op("flash_attention::forward", mutates_args=(), device_types="cpu")
def _forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: Optional[float], causal: bool,
    window_left: int, window_right: int, softcap: float, alibi_slopes: Optional[torch.Tensor],
    sinks: Optional[torch.Tensor], num_threads: int, dropout_p: float, seed: int,
    attn_mask: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    q, k, v = _dim_contiguous(q), _dim_contiguous(k), _dim_contiguous(v)
    batch, seqlen_q, heads_q, _ = q.shape
    out = torch.empty(_out_shape(q, v), dtype=q.dtype)
    lse = torch.empty(batch, heads_q, seqlen_q, dtype=torch.float32)
    _raw.forward(q, k, v, out, lse, softmax_scale, causal, window_left, window_right, softcap, alibi_slopes, sinks,
                 num_threads, dropout_p=dropout_p, seed=seed, attn_mask=attn_mask)
    return out, lse


@_forward.register_fake
def _forward_fake(q, k, v, softmax_scale, causal, window_left, window_right, softcap, alibi_slopes, sinks,
                  num_threads, dropout_p, seed, attn_mask=None):
    _check_shapes(q, k, v, 4)
    batch, seqlen_q, heads_q, _ = q.shape
    return q.new_empty(_out_shape(q, v)), q.new_empty((batch, heads_q, seqlen_q), dtype=torch.float32)


@torch.library.custom_op("flash_attention::backward", mutates_args=(), device_types="cpu")
def _backward(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    softmax_scale: Optional[float], causal: bool, window_left: int, window_right: int, softcap: float,
    alibi_slopes: Optional[torch.Tensor], sinks: Optional[torch.Tensor], num_threads: int, dropout_p: float,
    seed: int, attn_mask: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dsinks); dsinks is float32 [heads_q] with sinks, else an empty float32 tensor."""
    dout, q, k, v, out = (_dim_contiguous(x) for x in (dout, q, k, v, out))
    dq, dk, dv = (torch.empty(x.shape, dtype=x.dtype) for x in (q, k, v))
    dsinks = torch.zeros(q.shape[2] if sinks is not None else 0, dtype=torch.float32)
    _raw.backward(dout, q, k, v, out, lse, dq, dk, dv, dsinks if sinks is not None else None, None, softmax_scale,
                  causal, window_left, window_right, softcap, alibi_slopes, sinks, num_threads, dropout_p, seed,
                  attn_mask=attn_mask)
    return dq, dk, dv, dsinks


@_backward.register_fake
def _backward_fake(dout, q, k, v, out, lse, softmax_scale, causal, window_left, window_right, softcap,
                   alibi_slopes, sinks, num_threads, dropout_p, seed, attn_mask=None):
    _check_shapes(q, k, v, 4)
    dsinks = q.new_empty((q.shape[2] if sinks is not None else 0,), dtype=torch.float32)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dsinks


def _setup_context(ctx, inputs, output):
    (q, k, v, softmax_scale, causal, window_left, window_right, softcap, alibi_slopes, sinks, num_threads, dropout_p,
     seed, attn_mask) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, alibi_slopes, sinks, attn_mask)
    ctx.options = (softmax_scale, causal, window_left, window_right, softcap)
    ctx.num_threads, ctx.dropout = num_threads, (dropout_p, seed)
    # The backward covers d(out) only; a gradient through lse would be silently dropped, so lse has none.
    ctx.mark_non_differentiable(lse)


def _autograd_backward(ctx, dout, _dlse):
    q, k, v, out, lse, alibi_slopes, sinks, attn_mask = ctx.saved_tensors
    dq, dk, dv, dsinks = _backward(dout, q, k, v, out, lse, *ctx.options, alibi_slopes, sinks, ctx.num_threads,
                                   *ctx.dropout, attn_mask)
    # No gradient for the options, nor for a float attn_mask (an additive bias is not differentiated).
    return (dq, dk, dv) + (None,) * 6 + ((dsinks if sinks is not None else None), None, None, None, None)


_forward.register_autograd(_autograd_backward, setup_context=_setup_context)


# --- varlen: custom operators ----------------------------------------------------------------------------------


@torch.library.custom_op("flash_attention::varlen_forward", mutates_args=(), device_types="cpu")
def _varlen_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int, max_seqlen_k: int, softmax_scale: Optional[float], causal: bool, window_left: int,
    window_right: int, softcap: float, alibi_slopes: Optional[torch.Tensor], sinks: Optional[torch.Tensor],
    num_threads: int, dropout_p: float, seed: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    q, k, v = _dim_contiguous(q), _dim_contiguous(k), _dim_contiguous(v)
    out = torch.empty(_out_shape(q, v), dtype=q.dtype)
    lse = torch.empty(q.shape[1], q.shape[0], dtype=torch.float32)
    _raw.varlen_forward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                        causal, window_left, window_right, softcap, alibi_slopes, sinks, num_threads, dropout_p, seed)
    return out, lse


@_varlen_forward.register_fake
def _varlen_forward_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
                         window_left, window_right, softcap, alibi_slopes, sinks, num_threads, dropout_p, seed):
    _check_shapes(q, k, v, 3)
    return q.new_empty(_out_shape(q, v)), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("flash_attention::varlen_backward", mutates_args=(), device_types="cpu")
def _varlen_backward(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
    softmax_scale: Optional[float], causal: bool, window_left: int, window_right: int, softcap: float,
    alibi_slopes: Optional[torch.Tensor], sinks: Optional[torch.Tensor], num_threads: int, dropout_p: float,
    seed: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dout, q, k, v, out = (_dim_contiguous(x) for x in (dout, q, k, v, out))
    dq, dk, dv = (torch.empty(x.shape, dtype=x.dtype) for x in (q, k, v))
    dsinks = torch.zeros(q.shape[1] if sinks is not None else 0, dtype=torch.float32)
    _raw.backward(dout, q, k, v, out, lse, dq, dk, dv, dsinks if sinks is not None else None,
                  (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k), softmax_scale, causal, window_left,
                  window_right, softcap, alibi_slopes, sinks, num_threads, dropout_p, seed)
    return dq, dk, dv, dsinks


@_varlen_backward.register_fake
def _varlen_backward_fake(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                          softmax_scale, causal, window_left, window_right, softcap, alibi_slopes, sinks, num_threads,
                          dropout_p, seed):
    _check_shapes(q, k, v, 3)
    dsinks = q.new_empty((q.shape[1] if sinks is not None else 0,), dtype=torch.float32)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dsinks


def _varlen_setup_context(ctx, inputs, output):
    (q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale, causal, window_left, window_right, softcap, alibi_slopes,
     sinks, num_threads, dropout_p, seed) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, alibi_slopes, sinks)
    ctx.options = (max_q, max_k, softmax_scale, causal, window_left, window_right, softcap)
    ctx.num_threads, ctx.dropout = num_threads, (dropout_p, seed)
    ctx.mark_non_differentiable(lse)


def _varlen_autograd_backward(ctx, dout, _dlse):
    q, k, v, out, lse, cu_q, cu_k, alibi_slopes, sinks = ctx.saved_tensors
    dq, dk, dv, dsinks = _varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, *ctx.options, alibi_slopes, sinks,
                                          ctx.num_threads, *ctx.dropout)
    return (dq, dk, dv) + (None,) * 10 + ((dsinks if sinks is not None else None), None, None, None)


_varlen_forward.register_autograd(_varlen_autograd_backward, setup_context=_varlen_setup_context)


# --- KV cache: custom operators (forward only) -----------------------------------------------------------------


def _numpy_bits(x):
    """A numpy view of a CPU tensor's memory (its elements as integers of their size), for overlap checks."""
    return x.detach().view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]).numpy()


def _kvcache_run(q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, cache_leftpad, block_table,
                 softmax_scale, causal, window_left, window_right, softcap, alibi_slopes, sinks, num_threads, lse,
                 k_scale=None, v_scale=None):
    """The KV-cache call, shared by both operators and the direct path; returns out (lse is filled if given).
    k_scale/v_scale: an 8-bit cache's row scales (never with cache_leftpad, which the caller refuses)."""
    q = _dim_contiguous(q)
    out = torch.empty(_out_shape(q, v_cache), dtype=q.dtype)
    if cache_leftpad is None:
        _raw.kvcache_forward(q, k_cache, v_cache, out, lse, cache_seqlens, cache_batch_idx, block_table,
                             _dim_contiguous(k), _dim_contiguous(v), softmax_scale, causal, window_left,
                             window_right, softcap, alibi_slopes, sinks, num_threads, k_scale=k_scale,
                             v_scale=v_scale)
        return out
    options = dict(scale=softmax_scale, causal=causal, window_left=window_left, window_right=window_right,
                   softcap=softcap, alibi=alibi_slopes, sinks=sinks, num_threads=num_threads)
    # Left-padded caches: entry b's keys are cache positions cache_leftpad[b] ... cache_seqlens[b] (+ new).
    rows = cache_batch_idx.tolist() if cache_batch_idx is not None else list(range(q.shape[0]))
    ends = cache_seqlens.tolist()
    starts = cache_leftpad.tolist()
    if k is not None:
        # The append is done here: the library appends only to caches it may describe as non-overlapping rows.
        if appends_overlap(_numpy_bits(k_cache), _numpy_bits(v_cache), rows, ends, k.shape[1]):
            raise ValueError("k_cache and v_cache overlap; appending k and v would write one into the other")
        for b, (row, end) in enumerate(zip(rows, ends)):
            k_cache[row, end:end + k.shape[1]] = k[b]
            v_cache[row, end:end + v.shape[1]] = v[b]
        ends = [end + k.shape[1] for end in ends]
    if not _masked.ranges_forward(q, k_cache, v_cache, out, lse, starts, ends, options, rows=rows):
        for b, (row, start, end) in enumerate(zip(rows, starts, ends)):
            _raw.forward(q[b:b + 1], k_cache[row:row + 1, start:end], v_cache[row:row + 1, start:end],
                         out[b:b + 1], None if lse is None else lse[b:b + 1], **options)
    return out


@torch.library.custom_op("flash_attention::kvcache_forward", mutates_args=(), device_types="cpu")
def _kvcache_forward(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
    cache_batch_idx: Optional[torch.Tensor], cache_leftpad: Optional[torch.Tensor],
    block_table: Optional[torch.Tensor], softmax_scale: Optional[float], causal: bool, window_left: int,
    window_right: int, softcap: float, alibi_slopes: Optional[torch.Tensor], sinks: Optional[torch.Tensor],
    num_threads: int, k_scale: Optional[torch.Tensor] = None, v_scale: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    lse = torch.empty(q.shape[0], q.shape[2], q.shape[1], dtype=torch.float32)
    out = _kvcache_run(q, k_cache, v_cache, None, None, cache_seqlens, cache_batch_idx, cache_leftpad, block_table,
                       softmax_scale, causal, window_left, window_right, softcap, alibi_slopes, sinks, num_threads,
                       lse, k_scale, v_scale)
    return out, lse


@_kvcache_forward.register_fake
def _kvcache_forward_fake(q, k_cache, v_cache, cache_seqlens, cache_batch_idx, cache_leftpad, block_table,
                          softmax_scale, causal, window_left, window_right, softcap, alibi_slopes, sinks, num_threads,
                          k_scale=None, v_scale=None):
    return q.new_empty(_out_shape(q, v_cache)), q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)


# An 8-bit cache's row scales are written by the append as well.
@torch.library.custom_op("flash_attention::kvcache_append_forward",
                         mutates_args=("k_cache", "v_cache", "k_scale", "v_scale"), device_types="cpu")
def _kvcache_append_forward(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    cache_seqlens: torch.Tensor, cache_batch_idx: Optional[torch.Tensor], cache_leftpad: Optional[torch.Tensor],
    block_table: Optional[torch.Tensor], softmax_scale: Optional[float], causal: bool, window_left: int,
    window_right: int, softcap: float, alibi_slopes: Optional[torch.Tensor], sinks: Optional[torch.Tensor],
    num_threads: int, k_scale: Optional[torch.Tensor] = None, v_scale: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    lse = torch.empty(q.shape[0], q.shape[2], q.shape[1], dtype=torch.float32)
    out = _kvcache_run(q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, cache_leftpad, block_table,
                       softmax_scale, causal, window_left, window_right, softcap, alibi_slopes, sinks, num_threads,
                       lse, k_scale, v_scale)
    return out, lse


@_kvcache_append_forward.register_fake
def _kvcache_append_forward_fake(q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, cache_leftpad,
                                 block_table, softmax_scale, causal, window_left, window_right, softcap, alibi_slopes,
                                 sinks, num_threads, k_scale=None, v_scale=None):
    return q.new_empty(_out_shape(q, v_cache)), q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)


# --- masks, padding, packed sequences: custom operators --------------------------------------------------------


@torch.library.custom_op("flash_attention::masked_forward", mutates_args=(), device_types="cpu")
def _masked_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor], padding: Optional[torch.Tensor],
    seq_ids: Optional[torch.Tensor], hint: Optional[torch.Tensor], softmax_scale: Optional[float], causal: bool,
    window_left: int, window_right: int, softcap: float, sinks: Optional[torch.Tensor], num_threads: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of attention under mask / padding / seq_ids (see _torch_masked); the plan is derived here,
    at run time, so that a compiled graph holds one opaque call and no data-dependent branch."""
    q, k, v = _dim_contiguous(q), _dim_contiguous(k), _dim_contiguous(v)
    plan = _masked.cached_plan(q, k, mask, padding, seq_ids, causal, window_left, window_right, hint)
    return _masked.forward(plan, q, k, v, softmax_scale, softcap, sinks, num_threads)


@_masked_forward.register_fake
def _masked_forward_fake(q, k, v, mask, padding, seq_ids, hint, softmax_scale, causal, window_left, window_right,
                         softcap, sinks, num_threads):
    _check_shapes(q, k, v, 4)
    batch, seqlen_q, heads_q, _ = q.shape
    return q.new_empty(_out_shape(q, v)), q.new_empty((batch, heads_q, seqlen_q), dtype=torch.float32)


@torch.library.custom_op("flash_attention::masked_backward", mutates_args=(), device_types="cpu")
def _masked_backward(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    mask: Optional[torch.Tensor], padding: Optional[torch.Tensor], seq_ids: Optional[torch.Tensor],
    hint: Optional[torch.Tensor], softmax_scale: Optional[float], causal: bool, window_left: int, window_right: int,
    softcap: float, sinks: Optional[torch.Tensor], num_threads: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dout, q, k, v = (_dim_contiguous(x) for x in (dout, q, k, v))
    plan = _masked.cached_plan(q, k, mask, padding, seq_ids, causal, window_left, window_right, hint)
    dq, dk, dv, dsinks = _masked.backward(plan, dout, q, k, v, out, lse, softmax_scale, softcap, sinks, num_threads)
    if dsinks is None:
        dsinks = torch.zeros(0, dtype=torch.float32)
    return dq.contiguous(), dk.contiguous(), dv.contiguous(), dsinks.to(torch.float32).contiguous()


@_masked_backward.register_fake
def _masked_backward_fake(dout, q, k, v, out, lse, mask, padding, seq_ids, hint, softmax_scale, causal, window_left,
                          window_right, softcap, sinks, num_threads):
    dsinks = q.new_empty((q.shape[2] if sinks is not None else 0,), dtype=torch.float32)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dsinks


def _masked_setup_context(ctx, inputs, output):
    (q, k, v, mask, padding, seq_ids, hint, softmax_scale, causal, window_left, window_right, softcap, sinks,
     threads) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, mask, padding, seq_ids, hint, sinks)
    ctx.options = (softmax_scale, causal, window_left, window_right, softcap)
    ctx.num_threads = threads
    ctx.mark_non_differentiable(lse)


def _masked_autograd_backward(ctx, dout, _dlse):
    q, k, v, out, lse, mask, padding, seq_ids, hint, sinks = ctx.saved_tensors
    dq, dk, dv, dsinks = _masked_backward(dout, q, k, v, out, lse, mask, padding, seq_ids, hint, *ctx.options, sinks,
                                          ctx.num_threads)
    return (dq, dk, dv) + (None,) * 9 + ((dsinks if sinks is not None else None), None)


_masked_forward.register_autograd(_masked_autograd_backward, setup_context=_masked_setup_context)


def _attention(q, k, v, mask=None, padding=None, seq_ids=None, hint=None, softmax_scale=None, causal=False,
               window_left=-1, window_right=-1, softcap=0.0, sinks=None, num_threads=0):
    """Attention under any of mask / padding / seq_ids, with an optional packed-sequence hint (see
    _torch_masked), differentiable; out only. Tensors must already be checked (the callers do:
    scaled_dot_product_attention, the transformers backend)."""
    if _direct(q, q, k, v, sinks):
        q, k, v = _dim_contiguous(q), _dim_contiguous(k), _dim_contiguous(v)
        plan = _masked.cached_plan(q, k, mask, padding, seq_ids, causal, window_left, window_right, hint)
        return _masked.forward(plan, q, k, v, softmax_scale, softcap, sinks, num_threads, want_lse=False)[0]
    return _masked_forward(q, k, v, mask, padding, seq_ids, hint, softmax_scale, causal, window_left, window_right,
                           softcap, sinks, num_threads)[0]


# --- user-facing functions -------------------------------------------------------------------------------------


def _draw_seed():
    """A dropout seed from torch's default generator: torch.manual_seed(n) makes dropout runs repeatable (FA2
    draws its Philox seed from the same generator)."""
    return int(torch.randint(0, (1 << 63) - 1, (), dtype=torch.int64))


def _fa2_arguments(dropout_p, seed, return_attn_probs):
    """(dropout_p, seed) checked (torch's operators take int64 seeds: [0, 2**63)); FlashAttention-2's arguments
    this adapter does not implement raise instead of being ignored."""
    dropout_p, seed = dropout_arguments(dropout_p, seed, _draw_seed)
    if seed >= 1 << 63:
        raise ValueError(f"seed ({seed}) must be below 2**63 in the torch adapter")
    if return_attn_probs:
        raise NotImplementedError("return_attn_probs: the probability matrix is not materialised by the torch "
                                  "adapter; use return_lse=True (flash_attention.flash_attn_func returns it for "
                                  "small numpy inputs)")
    return dropout_p, seed


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False, *, seed=None, attn_mask=None,
                    sinks=None, return_lse=False, num_threads=0):
    """Exact attention softmax(q kᵀ · scale) v on CPU tensors, differentiable, usable under torch.compile.

    Args:
        q: [batch, seqlen_q, heads_q, head_dim]; float32, float16 or bfloat16.
        k, v: [batch, seqlen_k, heads_kv, head_dim], one dtype (may differ from q's; v may have its own head size,
            head_dim_v, which out then has: multi-head latent attention); heads_q a multiple of
            heads_kv (grouped-query attention, no repeated heads). Any strides (e.g. ``x.transpose(1, 2)`` of a
            [b, h, s, d] tensor) are read in place.
        dropout_p: attention dropout in [0, 1), as FlashAttention-2 applies it (probabilities kept with
            probability 1 - dropout_p and scaled by 1/(1 - dropout_p) before P·V; lse undropped); the backward
            regenerates the same mask.
        softmax_scale: multiplies q kᵀ; None means 1/sqrt(head_dim).
        causal: bottom-right aligned (FlashAttention's convention): query i sees key j iff
            j <= i + seqlen_k - seqlen_q. Equals torch's ``is_causal`` (top-left) only when seqlen_q == seqlen_k;
            in general it is ``torch.nn.attention.bias.causal_lower_right``.
        window_size: (left, right) sliding window around that diagonal, -1 = unbounded. A window of W tokens
            (the query and the W - 1 before it, as models' ``sliding_window = W`` means) is (W - 1, 0).
        softcap: if > 0, scores become softcap * tanh(score / softcap).
        alibi_slopes: [heads_q] or [batch, heads_q] (converted to float32; not differentiated).
        deterministic: accepted for FlashAttention-2 code; every call here is deterministic.
        return_attn_probs: FlashAttention-2's (out, lse, probs) triple; the probabilities are not materialised
            here, so True raises unless return_lse alone is what is needed (use return_lse=True).
        The arguments above are FlashAttention-2's, in its order; those below are keyword-only.
        seed: the dropout mask's key, an integer in [0, 2**63); None draws one from torch's default generator
            (torch.manual_seed makes runs repeatable). The mask is a function of the seed and each element's
            (batch, head, query, key): identical for every num_threads (flash_attention.reference.dropout_mask).
        attn_mask: a mask broadcastable to [batch, heads_q, seqlen_q, seqlen_k], bool (True attends) or float
            (added to the scores after softcap and ALiBi; not differentiated), combined with every other option;
            without alibi_slopes, dropout and return_lse, structured masks (padding, bands) run without reading
            it, others as the library's attn_mask.
        sinks: [heads_q] logits that join the softmax denominator (converted to float32; differentiated).
        return_lse: also return the natural-log log-sum-exp, float32 [batch, heads_q, seqlen_q]
            (not differentiable).
        num_threads: 0 = every online core, 1 = the calling thread; results are identical for every value.

    Returns out (q's dtype, contiguous [batch, seqlen_q, heads_q, head_dim_v]) or (out, lse). Gradients flow to
    q, k, v and sinks. Tensors must be on the CPU (meta tensors give outputs of the right shape and dtype).
    """
    dropout_p, seed = _fa2_arguments(dropout_p, seed, return_attn_probs)
    _check_qkv(q, k, v, 4)
    softmax_scale = _scale(softmax_scale)
    window_left, window_right = _window(window_size)
    softcap = _softcap(softcap)
    heads_q = q.shape[2]
    if attn_mask is not None and alibi_slopes is None and not dropout_p and not return_lse:
        return _attention(q, k, v, mask=attn_mask, softmax_scale=softmax_scale, causal=causal,
                          window_left=window_left, window_right=window_right, softcap=softcap,
                          sinks=_float32_vector("sinks", sinks, q.device, ((heads_q,),)), num_threads=int(num_threads))
    alibi_slopes = _float32_vector("alibi_slopes", alibi_slopes, q.device, ((heads_q,), (q.shape[0], heads_q)))
    sinks = _float32_vector("sinks", sinks, q.device, ((heads_q,),))
    num_threads = int(num_threads)
    if attn_mask is not None:  # the library's attn_mask, read in place
        attn_mask = _library_mask(attn_mask, q, k)
    if _direct(q, q, k, v, sinks):
        q, k, v = _dim_contiguous(q), _dim_contiguous(k), _dim_contiguous(v)
        batch, seqlen_q, _, _ = q.shape
        out = torch.empty(_out_shape(q, v), dtype=q.dtype)
        lse = torch.empty(batch, heads_q, seqlen_q, dtype=torch.float32) if return_lse else None
        _raw.forward(q, k, v, out, lse, softmax_scale, causal, window_left, window_right, softcap, alibi_slopes,
                     sinks, num_threads, dropout_p=dropout_p, seed=seed, attn_mask=attn_mask)
    else:
        out, lse = _forward(q, k, v, softmax_scale, bool(causal), window_left, window_right, softcap, alibi_slopes,
                            sinks, num_threads, dropout_p, seed, attn_mask)
    return (out, lse) if return_lse else out


def _library_mask(mask, q, k):
    """attn_mask as the library reads it: bool, or float32 (an additive bias, detached: not differentiated),
    expanded to 4-D [batch | 1, heads | 1, seqlen_q, seqlen_k] with stride 0 along broadcast axes."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"attn_mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:  # any other dtype is an additive bias, taken in float32 (as the mask planner does)
        mask = mask.detach().to(torch.float32)
    _check_tensor("attn_mask", mask, q.device, dtypes=(torch.bool, torch.float32))
    return _masked.normalise_mask(mask, q.shape[0], q.shape[2], q.shape[1], k.shape[1])


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=0, max_seqlen_k=0, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None, *, seed=None, sinks=None,
                           return_lse=False, num_threads=0):
    """Attention over a batch of sequences of different lengths packed along the rows, differentiable.

    Args:
        q: [total_q, heads_q, head_dim]; k, v: [total_k, heads_kv, head_dim] (any strides, as flash_attn_func).
        cu_seqlens_q, cu_seqlens_k: integer tensors (or lists) [batch + 1], starting at 0, non-decreasing:
            sequence b owns rows cu_seqlens[b] ... cu_seqlens[b + 1] - 1 (checked by the library). Every
            option applies per sequence (causal and window alignment use each sequence's own lengths).
        max_seqlen_q, max_seqlen_k: 0, or upper bounds the library checks.
        The other arguments are those of flash_attn_func (alibi_slopes may be [batch, heads_q]), in
        FlashAttention-2's order.
        block_table: optional integer [batch, max_blocks_per_seq]: k and v are then a paged cache [num_blocks,
            block_size, heads_kv, head_dim] holding sequence b's keys at positions 0 ... cu_seqlens_k[b + 1] -
            cu_seqlens_k[b] - 1 of its blocks (FA2's paged varlen call): eager and forward only, as in FA2.

    Returns out [total_q, heads_q, head_dim_v], or (out, lse) with lse float32 [heads_q, total_q].
    """
    dropout_p, seed = _fa2_arguments(dropout_p, seed, return_attn_probs)
    if block_table is None:
        _check_qkv(q, k, v, 3)
    else:
        if k.dim() != 4 or v.dim() != 4 or tuple(v.shape[:3]) != tuple(k.shape[:3]):
            raise ValueError(f"with block_table, k and v must be one paged cache shape [num_blocks, block_size, "
                             f"heads_kv, head_dim], got {tuple(k.shape)} and {tuple(v.shape)}")
        _check_qkv(q, k[:, 0], v[:, 0], 3)  # types, devices, dtypes; heads and head_dim against q
    if not isinstance(cu_seqlens_q, torch.Tensor):
        cu_seqlens_q = torch.tensor(cu_seqlens_q, dtype=torch.int32)
    if cu_seqlens_q.dim() != 1 or cu_seqlens_q.shape[0] < 1:
        raise ValueError(f"cu_seqlens_q must be 1-D with at least one element, got shape {tuple(cu_seqlens_q.shape)}")
    batch = cu_seqlens_q.shape[0] - 1
    cu_q = _index_tensor("cu_seqlens_q", cu_seqlens_q, (batch + 1,), q.device)
    cu_k = _index_tensor("cu_seqlens_k", cu_seqlens_k, (batch + 1,), q.device)
    softmax_scale = _scale(softmax_scale)
    window_left, window_right = _window(window_size)
    softcap = _softcap(softcap)
    heads_q = q.shape[1]
    alibi_slopes = _float32_vector("alibi_slopes", alibi_slopes, q.device, ((heads_q,), (batch, heads_q)))
    sinks = _float32_vector("sinks", sinks, q.device, ((heads_q,),))
    max_q, max_k, num_threads = int(max_seqlen_q), int(max_seqlen_k), int(num_threads)
    if block_table is not None and not _direct(q, q, k, v, sinks):
        raise NotImplementedError("block_table in flash_attn_varlen_func runs eagerly and forward only (as in "
                                  "FlashAttention-2): no gradients, meta tensors or torch.compile")
    if _direct(q, q, k, v, sinks):
        q, k, v = _dim_contiguous(q), _dim_contiguous(k), _dim_contiguous(v)
        out = torch.empty(_out_shape(q, v), dtype=q.dtype)
        lse = torch.empty(heads_q, q.shape[0], dtype=torch.float32) if return_lse else None
        table = None if block_table is None else _index_tensor("block_table", block_table,
                                                                (batch, block_table.shape[-1]), q.device)
        _raw.varlen_forward(q, k, v, out, lse, cu_q, cu_k, max_q, max_k, softmax_scale, causal, window_left,
                            window_right, softcap, alibi_slopes, sinks, num_threads, dropout_p, seed, table)
    else:
        out, lse = _varlen_forward(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale, bool(causal), window_left,
                                   window_right, softcap, alibi_slopes, sinks, num_threads, dropout_p, seed)
    return (out, lse) if return_lse else out


def _rotated(q, k, cos, sin, cache_seqlens, interleaved, aligned):
    """q and the new keys k rotated as flash_attn_with_kvcache documents (new tensors, torch ops only)."""
    step = rotary_plan(tuple(q.shape), None if k is None else tuple(k.shape), cos, sin, cache_seqlens, aligned)
    starts = torch.as_tensor(cache_seqlens, device=q.device).to(torch.int64).expand(q.shape[0])[:, None]
    k_positions = starts + torch.arange(k.shape[1], device=q.device)
    q_positions = starts + step * torch.arange(q.shape[1], device=q.device)
    if not torch.compiler.is_compiling() and q.device.type == "cpu" and starts.numel():
        if int(starts.min()) < 0:
            raise ValueError(f"cache_seqlens must be >= 0, got {int(starts.min())}")
        check_rotary_positions(max(int(k_positions.max()), int(q_positions.max())), cos.shape[0])

    def rotate(x, positions):
        return apply_rotary(x, cos, sin, positions, interleaved, lambda y: y.to(torch.float32),
                            lambda y: y.to(x.dtype))

    return rotate(q, q_positions), rotate(k, k_positions)


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None, cache_seqlens=None,
                            cache_batch_idx=None, cache_leftpad=None, block_table=None, softmax_scale=None,
                            causal=False, window_size=(-1, -1), softcap=0.0, rotary_interleaved=True,
                            alibi_slopes=None, num_splits=0, return_softmax_lse=False, *, sinks=None,
                            return_lse=False, num_threads=0, k_scale=None, v_scale=None):
    """Attention of new queries against a KV cache, optionally appending new keys/values first (in place).

    Args:
        q: [batch, seqlen_q, heads_q, head_dim].
        k_cache, v_cache: [cache_batch, cache_seqlen, heads_kv, head_dim] (any strides but head_dim's: a
            transformers cache [b, h, s, d] passes as ``cache.transpose(1, 2)``), or with block_table a paged
            cache [num_blocks, block_size, heads_kv, head_dim].
        v_cache may have its own head size, head_dim_v (MLA; it may be a view of k_cache[..., :head_dim_v]), which
            out then has.
        k, v: optional [batch, seqlen_new, heads_kv, head_dim] (v: head_dim_v), written into the cache at positions
            cache_seqlens[b] ... before attending (advance cache_seqlens yourself afterwards).
        k_scale, v_scale: with an 8-bit cache (k_cache/v_cache of dtype torch.int8 or torch.float8_e4m3fn),
            float32 [cache_batch (or num_blocks), cache_seqlen (or block_size), heads_kv], any strides, read in
            place: each cached row stands for its values × its scale (see quantize_kv). New rows k, v (float32,
            float16 or bfloat16) are quantized by the library as they are appended, their scales written here.
            The result is exact attention over the dequantized cache. Not with cache_leftpad.
        cache_seqlens: int or integer tensor [batch]: the end of each entry's cached keys (default: all).
        cache_batch_idx: optional integer tensor [batch]: which cache row each entry uses.
        cache_leftpad: optional integer tensor [batch]: the first cached key of each entry (left-padded
            batches); entry b attends to positions cache_leftpad[b] ... cache_seqlens[b] - 1 (+ the new ones).
            Not with block_table.
        block_table: optional integer tensor [batch, max_blocks_per_seq]: the blocks of each sequence.
        Causal and window alignment use each entry's own key count (bottom-right).
        The other arguments are those of flash_attn_func, in FlashAttention-2's order up to return_softmax_lse
        (its name for return_lse); rotary_cos, rotary_sin and rotary_interleaved as in the numpy function
        (keys rotated before they are written, q at the positions FA2 uses); num_splits is accepted and unused.

    Returns out [batch, seqlen_q, heads_q, head_dim_v], or (out, lse) with lse float32 [batch, heads_q, seqlen_q].
    No backward (FlashAttention-2 has none either): a call that would need one raises.
    """
    if rotary_cos is not None or rotary_sin is not None:
        q, k = _rotated(q, k, rotary_cos, rotary_sin, cache_seqlens, rotary_interleaved,
                        causal or tuple(window_size) != (-1, -1))
    if not (type(q) in _PLAIN and type(k_cache) in _PLAIN and type(v_cache) in _PLAIN and q.is_cpu
            and k_cache.is_cpu and v_cache.is_cpu and q.dtype in _DTYPES and k_cache.dtype in _CACHE_DTYPES
            and v_cache.dtype is k_cache.dtype):
        # The slow path: the precise complaint (or meta tensors and tensor subclasses).
        if not isinstance(q, torch.Tensor):
            raise TypeError(f"q must be a torch.Tensor, got {type(q).__name__}")
        _check_tensor("q", q, q.device)
        for name, x in (("k_cache", k_cache), ("v_cache", v_cache)):
            _check_tensor(name, x, q.device, dtypes=_CACHE_DTYPES)
        if v_cache.dtype != k_cache.dtype:
            raise TypeError(f"v_cache must have the dtype of k_cache ({k_cache.dtype}), got {v_cache.dtype}")
    device = q.device
    if q.dim() != 4 or k_cache.dim() != 4 or v_cache.dim() != 4:
        for name, x in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
            if x.dim() != 4:
                raise ValueError(f"{name} must have 4 dimensions, got shape {tuple(x.shape)}")
    if k_cache.shape[:3] != v_cache.shape[:3]:
        raise ValueError(f"v_cache shape {tuple(v_cache.shape)} must equal k_cache shape {tuple(k_cache.shape)} but in "
                         "the last axis (head_dim_v)")
    batch, seqlen_q, heads_q, head_dim = q.shape
    heads_kv = k_cache.shape[2]
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"k_cache shape {tuple(k_cache.shape)} does not match q shape {tuple(q.shape)} in head_dim")
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together")
    seqlen_new = 0
    if k is not None:
        _check_tensor("k", k, device)
        _check_tensor("v", v, device)
        if v.dtype != k.dtype or (k.dtype != k_cache.dtype and k_cache.dtype not in _raw.QUANTIZED_CODES):
            raise TypeError(f"k and v must have the cache's dtype ({k_cache.dtype}), or one float dtype with an "
                            f"8-bit cache; got {k.dtype} and {v.dtype}")
        if (k.dim() != 4 or v.dim() != 4 or k.shape[:3] != v.shape[:3] or k.shape[0] != batch
                or (*k.shape[2:], v.shape[3]) != (heads_kv, head_dim, v_cache.shape[3])):
            raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must both be ({batch}, seqlen_new, {heads_kv}, "
                             f"head_dim) with head_dim {head_dim} for k and head_dim_v {v_cache.shape[3]} for v")
        seqlen_new = k.shape[1]
    if torch.is_grad_enabled() and (q.requires_grad or k_cache.requires_grad or v_cache.requires_grad or any(
            x is not None and x.requires_grad for x in (k, v, alibi_slopes, sinks))):
        raise RuntimeError("flash_attn_with_kvcache has no backward (FlashAttention-2 has none either); call it "
                           "under torch.no_grad(), or use flash_attn_func / flash_attn_varlen_func to train")
    k_scale, v_scale = _cache_scales(k_cache, k_scale, v_scale, device)
    if cache_leftpad is not None and k_scale is not None:
        raise NotImplementedError("cache_leftpad is not implemented with an 8-bit cache")
    if block_table is not None:
        if cache_leftpad is not None:
            raise ValueError("cache_leftpad cannot be combined with block_table (a paged cache)")
        if not isinstance(block_table, torch.Tensor) or block_table.dim() != 2 or block_table.shape[0] != batch:
            raise ValueError(f"block_table must be a tensor of shape ({batch}, max_blocks_per_seq)")
        block_table = _index_tensor("block_table", block_table, tuple(block_table.shape), device)
        capacity = block_table.shape[1] * k_cache.shape[1]
    else:
        capacity = k_cache.shape[1]
    if cache_seqlens is None:
        cache_seqlens = capacity - seqlen_new
    if isinstance(cache_seqlens, numbers.Integral) and not isinstance(cache_seqlens, bool):
        cache_seqlens = torch.full((batch,), int(cache_seqlens), dtype=torch.int32)
    elif not (type(cache_seqlens) is torch.Tensor and cache_seqlens.dtype is torch.int32
              and cache_seqlens.shape == (batch,) and cache_seqlens.is_contiguous() and cache_seqlens.is_cpu):
        cache_seqlens = _index_tensor("cache_seqlens", cache_seqlens, (batch,), device)
    if cache_batch_idx is not None:
        cache_batch_idx = _index_tensor("cache_batch_idx", cache_batch_idx, (batch,), device)
    if cache_leftpad is not None:
        cache_leftpad = _index_tensor("cache_leftpad", cache_leftpad, (batch,), device)
        if device.type == "cpu":
            rows = cache_batch_idx.tolist() if cache_batch_idx is not None else list(range(batch))
            for b, (row, start, end) in enumerate(zip(rows, cache_leftpad.tolist(), cache_seqlens.tolist())):
                if not (0 <= row < k_cache.shape[0] and 0 <= start <= end and end + seqlen_new <= capacity):
                    raise ValueError(f"entry {b}: cache_leftpad ({start}), cache_seqlens ({end}) + seqlen_new "
                                     f"({seqlen_new}) and cache row ({row}) must satisfy 0 <= leftpad <= seqlens "
                                     f"and seqlens + seqlen_new <= {capacity}, row < {k_cache.shape[0]}")
    softmax_scale = _scale(softmax_scale)
    window_left, window_right = _window(window_size)
    softcap = _softcap(softcap)
    alibi_slopes = _float32_vector("alibi_slopes", alibi_slopes, device, ((heads_q,), (batch, heads_q)))
    sinks = _float32_vector("sinks", sinks, device, ((heads_q,),))
    want_lse = return_lse or return_softmax_lse
    args = (cache_seqlens, cache_batch_idx, cache_leftpad, block_table, softmax_scale, bool(causal), window_left,
            window_right, softcap, alibi_slopes, sinks, int(num_threads))
    if _direct(q):
        lse = torch.empty(batch, heads_q, seqlen_q, dtype=torch.float32) if want_lse else None
        out = _kvcache_run(q, k_cache, v_cache, k, v, *args, lse, k_scale, v_scale)
    elif k is None:
        out, lse = _kvcache_forward(q, k_cache, v_cache, *args, k_scale, v_scale)
    else:
        out, lse = _kvcache_append_forward(q, k_cache, v_cache, k, v, *args, k_scale, v_scale)
    return (out, lse) if want_lse else out


def _cache_scales(k_cache, k_scale, v_scale, device):
    """k_scale and v_scale checked as the numpy API checks them (required with an 8-bit cache, refused with a
    float one, float32 of the cache's shape without head_dim), and on q's device; (None, None) for a float
    cache. Never copied: an append writes its rows' scales into them."""
    scales = check_cache_scales(k_cache, k_scale, v_scale, k_cache.dtype in _raw.QUANTIZED_CODES, torch.Tensor,
                                torch.float32)
    for name, scale in scales:
        _check_tensor(name, scale, device, dtypes=(torch.float32,))
    return k_scale, v_scale


def quantize_kv(x, dtype):
    """Keys or values [..., head_dim] quantized for an 8-bit cache: flash_attention.quantize_kv for torch tensors,
    the same arithmetic (so bit for bit what the library writes when it appends the rows), without ml_dtypes.

    Args:
        x: floating tensor [..., head_dim] (float32, float16, bfloat16 or float64; CPU).
        dtype: torch.int8 or torch.float8_e4m3fn.
    Returns (values of `dtype`, scales float32 x.shape[:-1]): values.float() × scales[..., None] dequantizes.
    """
    if dtype not in _raw.QUANTIZED_CODES:
        raise TypeError(f"dtype must be torch.int8 or torch.float8_e4m3fn, got {dtype}")
    _check_tensor("x", x, torch.device("cpu"), dtypes=(torch.float32, torch.float16, torch.bfloat16, torch.float64))
    # numpy computes in float32; the final rounding of float8 is torch's cast (nearest even, as ml_dtypes').
    values, scales = quantized_rows(x.detach().to(torch.float32).numpy(), _raw.QUANTIZED_CODES[dtype])
    return torch.from_numpy(values).to(dtype), torch.from_numpy(scales)


def _sdpa_supported(query, key, value, attn_mask, dropout_p, scale, enable_gqa):
    """Whether scaled_dot_product_attention can run through this library with torch's exact semantics."""
    if not (isinstance(query, torch.Tensor) and isinstance(key, torch.Tensor) and isinstance(value, torch.Tensor)):
        return False
    ndim = query.dim()
    if ndim not in (3, 4) or key.dim() != ndim or value.dim() != ndim:
        return False
    if dropout_p != 0.0 or (scale is not None and (scale == 0.0 or not math.isfinite(scale))):
        return False
    dtype = query.dtype
    if dtype not in _DTYPES or key.dtype is not dtype or value.dtype is not dtype:
        return False
    if not (query.is_cpu and key.is_cpu and value.is_cpu):
        if not all(x.device.type == "meta" for x in (query, key, value)):
            return False
    qs, ks = query.shape, key.shape
    if value.shape[:-1] != ks[:-1] or qs[0] != ks[0] or qs[-1] != ks[-1] or not 1 <= value.shape[-1] <= 1024:
        return False
    head_dim, seqlen_q, seqlen_k = qs[-1], qs[-2], ks[-2]
    if not (1 <= head_dim <= 1024) or seqlen_q == 0 or seqlen_k == 0:
        return False
    if ndim == 4:
        heads_q, heads_kv = qs[1], ks[1]
        if heads_kv == 0 or (heads_q != heads_kv and not ((enable_gqa or heads_kv == 1) and heads_q % heads_kv == 0)):
            return False
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor) or attn_mask.device != query.device:
            return False
        if attn_mask.dtype != torch.bool and (attn_mask.dtype != dtype or attn_mask.requires_grad):
            return False
        full = (qs[0], qs[1], seqlen_q, seqlen_k) if ndim == 4 else (qs[0], seqlen_q, seqlen_k)
        if not _masked.broadcasts_to(attn_mask.shape, full):
            return False
    return True


(flash_attn_qkvpacked_func, flash_attn_kvpacked_func, flash_attn_varlen_qkvpacked_func,
 flash_attn_varlen_kvpacked_func) = packed_functions(flash_attn_func, flash_attn_varlen_func)


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, *, scale=None,
                                 enable_gqa=False):
    """torch.nn.functional.scaled_dot_product_attention, computed by this library where it can be exactly.

    Same signature (scale and enable_gqa keyword-only, as torch's builtin enforces), same layouts
    ([batch, heads, seqlen, head_dim], or 3-D [batch, seqlen, head_dim]) and same semantics:
    ``is_causal`` is torch's top-left alignment (query i sees keys j <= i, also when seqlen_q != seqlen_k: the
    keys no query sees are cut off, or the band is widened by seqlen_q - seqlen_k); a bool ``attn_mask`` marks
    visible keys, a float one is added to the scores; with both, both apply (as torch does); a fully masked
    row gives 0; grouped heads need ``enable_gqa=True`` unless heads_kv is 1 (torch broadcasts that).

    Through the library (CPU float32/float16/bfloat16, one dtype): no mask; masks that are a key range per
    batch entry with a band around the diagonal (all-true, causal of either alignment, sliding windows,
    key padding, padding with causal) without reading the mask; any other bool mask or additive float mask as
    the library's attn_mask (blocks it hides are skipped). Torch's own function, unchanged, runs the rest:
    dropout_p > 0 (torch's random stream), float masks that require grad, float64, other devices, scale 0.
    The value head size may differ from the query's (multi-head latent attention), as torch allows. So replacing F.scaled_dot_product_attention by this function is safe.
    Differentiable and usable under torch.compile (the mask is examined inside an operator, at run time).
    """
    if not _sdpa_supported(query, key, value, attn_mask, dropout_p, scale, enable_gqa):
        return _masked.torch_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale=scale,
                                  enable_gqa=enable_gqa)
    three_d = query.dim() == 3
    if three_d:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if attn_mask is not None and attn_mask.dim() == 3:
            attn_mask = attn_mask.unsqueeze(1)
    q = query.transpose(1, 2)
    seqlen_q, seqlen_k = query.shape[2], key.shape[2]
    scale = None if scale is None else float(scale)
    if attn_mask is None:
        left, right = -1, -1
        if is_causal:
            # Top-left: query i sees keys j <= i. With seqlen_q <= seqlen_k the keys past seqlen_q are seen by
            # no query (cut them off, then both alignments agree); with more queries than keys, the library's
            # bottom-right diagonal (key i + seqlen_k - seqlen_q) widened by seqlen_q - seqlen_k is j <= i.
            if seqlen_q <= seqlen_k:
                key, value, right = key[:, :, :seqlen_q], value[:, :, :seqlen_q], 0
            else:
                right = seqlen_q - seqlen_k
        if _direct(query, query, key, value):
            # [batch, heads, seqlen, head_dim] in and out, read and written in place: no transposes.
            query, key, value = _dim_contiguous(query), _dim_contiguous(key), _dim_contiguous(value)
            out = torch.empty(_out_shape(query, value), dtype=query.dtype)
            _raw.forward(query, key, value, out, None, scale, False, left, right, heads_first=True)
            return out.squeeze(1) if three_d else out
        out = _forward(q, key.transpose(1, 2), value.transpose(1, 2), scale, False, left, right, 0.0, None, None,
                       0, 0.0, 0)[0]
    else:
        mask = attn_mask
        if is_causal:
            top_left = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=mask.device).tril()
            mask = mask & top_left if mask.dtype == torch.bool else mask.masked_fill(~top_left, -math.inf)
        out = _attention(q, key.transpose(1, 2), value.transpose(1, 2), mask=mask, softmax_scale=scale)
    out = out.transpose(1, 2)
    return out.squeeze(1) if three_d else out

"""Optional PyTorch adapter: CPU tensors in and out, zero-copy, with autograd and torch.compile support.

Importing ``flash_attention`` never imports torch; only ``import flash_attention.torch`` does.

The library is reached through two custom operators, so that torch.compile can trace them (each has a fake
implementation that only computes shapes) and autograd can differentiate them:

    torch.ops.flash_attention.forward(q, k, v, ...)           -> (out, lse)
    torch.ops.flash_attention.backward(dout, q, k, v, out, lse, ...) -> (dq, dk, dv, dsinks)

No data is copied on the way in or out: each tensor's memory is handed to the library as a numpy view
(bfloat16 through a bit-identical int16 view reinterpreted as ``ml_dtypes.bfloat16``), and the arrays the
library fills are wrapped with ``torch.from_numpy``. The one copy is the binding's own: a tensor strided along
head_dim (last stride != 1) is made contiguous first.

Use :func:`flash_attn_func` ([batch, seqlen, heads, head_dim]) or :func:`scaled_dot_product_attention`
([batch, heads, seqlen, head_dim]).
"""

from typing import Optional, Tuple

import numpy as np
import torch

from . import api as _api

__all__ = ["flash_attn_func", "scaled_dot_product_attention"]

_NUMPY_DTYPES = {torch.float32, torch.float16, torch.bfloat16}
_DTYPE_NAMES = "torch.float32, torch.float16 or torch.bfloat16"


# --- tensor <-> numpy, without copies --------------------------------------------------------------------------


def _bfloat16_dtype():
    if _api._BFLOAT16 is None:
        raise TypeError("torch.bfloat16 tensors need the ml_dtypes package (pip install ml_dtypes); "
                        "or pass float32 / float16 tensors")
    return _api._BFLOAT16


def _numpy(t):
    """A numpy view of a CPU tensor's memory (same strides, no copy); None stays None."""
    if t is None:
        return None
    t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(_bfloat16_dtype())
    return t.numpy()


def _tensor(a):
    """A tensor over a numpy array's memory (no copy); ml_dtypes.bfloat16 arrays become torch.bfloat16."""
    if a.dtype == _api._BFLOAT16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def _window(left, right):
    return (int(left), int(right))


# --- custom operators ------------------------------------------------------------------------------------------


@torch.library.custom_op("flash_attention::forward", mutates_args=(), device_types="cpu")
def _forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: Optional[float], causal: bool,
    window_left: int, window_right: int, softcap: float, alibi_slopes: Optional[torch.Tensor],
    sinks: Optional[torch.Tensor], num_threads: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    out, lse = _api.flash_attn_func(
        _numpy(q), _numpy(k), _numpy(v), softmax_scale, causal, window_size=_window(window_left, window_right),
        softcap=softcap, alibi_slopes=_numpy(alibi_slopes), sinks=_numpy(sinks), return_lse=True,
        num_threads=num_threads)
    return _tensor(out), _tensor(lse)


def _check_shapes(q, k, v):
    """The shape rules, for tensors without data (meta and fake tensors); real calls get the library's checks."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != 4:
            raise ValueError(f"{name} must have 4 dimensions, got shape {tuple(x.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"v shape {tuple(v.shape)} must equal k shape {tuple(k.shape)}")
    if k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3]:
        raise ValueError(f"k shape {tuple(k.shape)} does not match q shape {tuple(q.shape)} in batch and head_dim")
    if k.shape[2] == 0 or q.shape[2] % k.shape[2] != 0:
        raise ValueError(f"heads_q ({q.shape[2]}) must be a multiple of heads_kv ({k.shape[2]})")


@_forward.register_fake
def _forward_fake(q, k, v, softmax_scale, causal, window_left, window_right, softcap, alibi_slopes, sinks,
                  num_threads):
    _check_shapes(q, k, v)
    batch, seqlen_q, heads_q, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((batch, heads_q, seqlen_q), dtype=torch.float32)


@torch.library.custom_op("flash_attention::backward", mutates_args=(), device_types="cpu")
def _backward(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    softmax_scale: Optional[float], causal: bool, window_left: int, window_right: int, softcap: float,
    alibi_slopes: Optional[torch.Tensor], sinks: Optional[torch.Tensor], num_threads: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dsinks); dsinks is float32 [heads_q] with sinks, else an empty float32 tensor."""
    grads = _api.flash_attn_backward(
        _numpy(dout), _numpy(q), _numpy(k), _numpy(v), _numpy(out), _numpy(lse), softmax_scale, causal,
        window_size=_window(window_left, window_right), softcap=softcap, alibi_slopes=_numpy(alibi_slopes),
        sinks=_numpy(sinks), num_threads=num_threads)
    dq, dk, dv = (_tensor(g) for g in grads[:3])
    dsinks = _tensor(grads[3]) if sinks is not None else torch.empty(0, dtype=torch.float32)
    return dq, dk, dv, dsinks


@_backward.register_fake
def _backward_fake(dout, q, k, v, out, lse, softmax_scale, causal, window_left, window_right, softcap,
                   alibi_slopes, sinks, num_threads):
    _check_shapes(q, k, v)
    dsinks = q.new_empty((q.shape[2] if sinks is not None else 0,), dtype=torch.float32)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dsinks


def _setup_context(ctx, inputs, output):
    q, k, v, softmax_scale, causal, window_left, window_right, softcap, alibi_slopes, sinks, num_threads = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, alibi_slopes, sinks)
    ctx.options = (softmax_scale, causal, window_left, window_right, softcap)
    ctx.num_threads = num_threads
    # The backward covers d(out) only; a gradient through lse would be silently dropped, so lse has none.
    ctx.mark_non_differentiable(lse)


def _autograd_backward(ctx, dout, _dlse):
    q, k, v, out, lse, alibi_slopes, sinks = ctx.saved_tensors
    dq, dk, dv, dsinks = _backward(dout, q, k, v, out, lse, *ctx.options, alibi_slopes, sinks, ctx.num_threads)
    return dq, dk, dv, None, None, None, None, None, None, (dsinks if sinks is not None else None), None


_forward.register_autograd(_autograd_backward, setup_context=_setup_context)


# --- user-facing functions -------------------------------------------------------------------------------------


def _check_tensor(name, x, device, dtypes=_NUMPY_DTYPES):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.device.type not in ("cpu", "meta"):
        raise ValueError(f"{name} is on device {x.device}; flash_attention runs on the CPU only "
                         f"(move it with .cpu(), or use the GPU FlashAttention package for {x.device.type} tensors)")
    if x.device != device:
        raise ValueError(f"{name} is on device {x.device} but q is on {device}")
    if x.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype {_DTYPE_NAMES}, got {x.dtype}")
    if x.dtype == torch.bfloat16 and x.device.type == "cpu":
        _bfloat16_dtype()


def _float32_vector(name, x, device):
    """alibi_slopes / sinks: any floating tensor, converted to float32 (differentiably, for sinks)."""
    if x is None:
        return None
    _check_tensor(name, x, device, dtypes=(torch.float32, torch.float16, torch.bfloat16, torch.float64))
    return x.to(torch.float32)


def flash_attn_func(q, k, v, softmax_scale=None, causal=False, *, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, sinks=None, return_lse=False, num_threads=0):
    """Exact attention softmax(q kᵀ · scale) v on CPU tensors, differentiable, usable under torch.compile.

    Args:
        q: [batch, seqlen_q, heads_q, head_dim]; float32, float16 or bfloat16 (bfloat16 needs ml_dtypes).
        k, v: [batch, seqlen_k, heads_kv, head_dim], one dtype (may differ from q's); heads_q a multiple of
            heads_kv (grouped-query attention). Any strides (e.g. ``x.transpose(1, 2)`` of a [b, h, s, d]
            tensor) are read in place.
        softmax_scale: multiplies q kᵀ; None means 1/sqrt(head_dim).
        causal: bottom-right aligned (FlashAttention's convention): query i sees key j iff
            j <= i + seqlen_k - seqlen_q. Equals torch's ``is_causal`` (top-left) only when seqlen_q == seqlen_k;
            in general it is ``torch.nn.attention.bias.causal_lower_right``.
        window_size: (left, right) sliding window around that diagonal, -1 = unbounded.
        softcap: if > 0, scores become softcap * tanh(score / softcap).
        alibi_slopes: [heads_q] or [batch, heads_q] (converted to float32; not differentiated).
        sinks: [heads_q] logits that join the softmax denominator (converted to float32; differentiated).
        return_lse: also return the natural-log log-sum-exp, float32 [batch, heads_q, seqlen_q]
            (not differentiable).
        num_threads: 0 = every online core, 1 = the calling thread; results are identical for every value.

    Returns out (q's dtype, contiguous [batch, seqlen_q, heads_q, head_dim]) or (out, lse). Gradients flow to
    q, k, v and sinks. Tensors must be on the CPU (meta tensors give outputs of the right shape and dtype).
    """
    _check_tensor("q", q, q.device if isinstance(q, torch.Tensor) else None)
    _check_tensor("k", k, q.device)
    _check_tensor("v", v, q.device)
    if not (isinstance(window_size, (tuple, list)) and len(window_size) == 2):
        raise TypeError(f"window_size must be a (left, right) pair, got {window_size!r}")
    if softmax_scale is not None:
        softmax_scale = float(softmax_scale)
    out, lse = _forward(q, k, v, softmax_scale, bool(causal), int(window_size[0]), int(window_size[1]),
                        float(softcap), _float32_vector("alibi_slopes", alibi_slopes, q.device),
                        _float32_vector("sinks", sinks, q.device), int(num_threads))
    return (out, lse) if return_lse else out


def scaled_dot_product_attention(query, key, value, causal=False, scale=None, *, window_size=(-1, -1), softcap=0.0,
                                 alibi_slopes=None, sinks=None, return_lse=False, num_threads=0):
    """:func:`flash_attn_func` for the [batch, heads, seqlen, head_dim] layout of torch's SDPA.

    The inputs are passed as transposed views (no copy) and out is returned as a [batch, heads_q, seqlen_q,
    head_dim] view of the contiguous [batch, seqlen_q, heads_q, head_dim] result. Grouped-query attention
    needs no flag (heads_q a multiple of heads_kv). ``causal`` is bottom-right aligned (see flash_attn_func):
    the same as torch's ``is_causal=True`` when seqlen_q == seqlen_k. No attn_mask and no dropout.
    """
    for name, x in (("query", query), ("key", key), ("value", value)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name} must have 4 dimensions [batch, heads, seqlen, head_dim], got shape {tuple(x.shape)}")
    result = flash_attn_func(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), scale, causal,
                             window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks,
                             return_lse=return_lse, num_threads=num_threads)
    if return_lse:
        return result[0].transpose(1, 2), result[1]
    return result.transpose(1, 2)

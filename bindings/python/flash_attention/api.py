"""The numpy-facing API: checks shapes and dtypes, passes arrays to the C library by pointer and strides
(no copies of strided views), and turns status codes into exceptions carrying the library's message."""

import ctypes
import math
import numbers

import numpy as np

from . import _capi
from ._loader import load

_EXCEPTIONS = {
    _capi.FA_ERROR_NULL_POINTER: ValueError,
    _capi.FA_ERROR_INVALID_SHAPE: ValueError,
    _capi.FA_ERROR_INVALID_STRIDE: ValueError,
    _capi.FA_ERROR_INVALID_ARGUMENT: ValueError,
    _capi.FA_ERROR_UNSUPPORTED: ValueError,
    _capi.FA_ERROR_OUT_OF_MEMORY: MemoryError,
    _capi.FA_ERROR_INTERNAL: RuntimeError,
}

_ALGORITHMS = {
    "auto": _capi.FA_ALGORITHM_AUTO,
    "reference": _capi.FA_ALGORITHM_REFERENCE,
    "tiled": _capi.FA_ALGORITHM_TILED,
}


def check_status(lib, status):
    """Raises the exception for a nonzero status, with the library's per-thread message."""
    if status != _capi.FA_OK:
        message = lib.flash_attention_last_error().decode(errors="replace")
        summary = lib.flash_attention_status_string(status).decode()
        raise _EXCEPTIONS.get(status, RuntimeError)(f"{message} ({summary})")


def _array(name, x, ndim):
    """Checks type, dtype and rank; returns the array (a view, or a copy if the last axis is strided)."""
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(x).__name__}")
    if x.dtype != np.float32:
        raise TypeError(f"{name} must have dtype float32, got {x.dtype}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {x.shape}")
    if any(s % x.itemsize for s in x.strides):
        raise ValueError(f"{name} has strides {x.strides} that are not multiples of the element size")
    # The kernel reads head_dim contiguously; a view strided along it is the one case that is copied.
    if x.shape[-1] > 1 and x.strides[-1] != x.itemsize:
        x = np.ascontiguousarray(x)
    return x


def _element_strides(x):
    strides = [s // x.itemsize for s in x.strides]
    # numpy leaves any stride on a size-1 axis or an empty array; the library wants head_dim stride 1.
    if x.shape[-1] <= 1 or x.size == 0:
        strides[-1] = 1
    return strides


def _set_tensor(params, name, x, stride_names):
    setattr(params, name, x.ctypes.data)
    for field, stride in zip(stride_names, _element_strides(x)):
        setattr(params, f"{name}_{field}_stride", stride)


def _int_option(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} ({value}) must be >= {minimum}")
    return int(value)


def flash_attn_func(
    q, k, v, softmax_scale=None, causal=False, *, return_lse=False, num_threads=0, algorithm="auto"
):
    """Exact attention softmax(q kᵀ · scale) v, computed tile by tile (FlashAttention) in the C library.

    Args:
        q: float32 [batch, seqlen_q, heads_q, head_dim].
        k, v: float32 [batch, seqlen_k, heads_kv, head_dim]; heads_q must be a multiple of heads_kv
            (grouped-query attention: query head h reads kv head h // (heads_q // heads_kv)).
        softmax_scale: multiplies q kᵀ; None means 1/sqrt(head_dim).
        causal: bottom-right aligned causal mask: query i sees key j iff j <= i + seqlen_k - seqlen_q.
        return_lse: also return the natural-log log-sum-exp, float32 [batch, heads_q, seqlen_q].
        num_threads: 0 uses every online core, 1 the calling thread only. Results are bitwise identical
            for every value.
        algorithm: "auto", "tiled" or "reference" (the plain float64-accumulating loop, for testing).

    Any strided view is accepted without a copy (e.g. x.transpose(0, 2, 1, 3) of a [b, h, s, d] array)
    except one strided along head_dim, which is copied. Returns out (float32, shape of q, contiguous),
    or (out, lse).
    """
    q = _array("q", q, 4)
    k = _array("k", k, 4)
    v = _array("v", v, 4)
    batch, seqlen_q, heads_q, head_dim = q.shape
    if k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(f"k shape {k.shape} does not match q shape {q.shape} in batch and head_dim")
    if v.shape != k.shape:
        raise ValueError(f"v shape {v.shape} must equal k shape {k.shape}")
    seqlen_k, heads_kv = k.shape[1], k.shape[2]
    if softmax_scale is None:
        scale = 0.0
    else:
        if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, numbers.Real):
            raise TypeError(f"softmax_scale must be a float or None, got {type(softmax_scale).__name__}")
        scale = float(softmax_scale)
        if scale == 0.0 or not math.isfinite(scale):
            raise ValueError(f"softmax_scale ({scale}) must be finite and nonzero; None means 1/sqrt(head_dim)")
    num_threads = _int_option("num_threads", num_threads, 0)
    if algorithm not in _ALGORITHMS:
        raise ValueError(f"algorithm ({algorithm!r}) must be one of {sorted(_ALGORITHMS)}")

    lib = load()
    out = np.empty(q.shape, dtype=np.float32)
    lse = np.empty((batch, heads_q, seqlen_q), dtype=np.float32) if return_lse else None
    params = _capi.Params()
    check_status(lib, lib.flash_attention_params_init(ctypes.byref(params), ctypes.sizeof(params)))
    params.batch, params.seqlen_q, params.seqlen_k = batch, seqlen_q, seqlen_k
    params.heads_q, params.heads_kv, params.head_dim = heads_q, heads_kv, head_dim
    tensor_strides = ("batch", "row", "head", "dim")
    _set_tensor(params, "q", q, tensor_strides)
    _set_tensor(params, "k", k, tensor_strides)
    _set_tensor(params, "v", v, tensor_strides)
    _set_tensor(params, "out", out, tensor_strides)
    if lse is not None:
        _set_tensor(params, "lse", lse, ("batch", "head", "row"))
    params.softmax_scale = scale
    params.causal = 1 if causal else 0
    params.num_threads = num_threads
    params.algorithm = _ALGORITHMS[algorithm]
    check_status(lib, lib.flash_attention_forward(ctypes.byref(params)))
    return (out, lse) if return_lse else out


def library_info():
    """Version, ABI number, path, kernel instruction set and default thread count of the loaded library."""
    lib = load()
    return {
        "version": lib.flash_attention_version_string().decode(),
        "abi_version": lib.flash_attention_abi_version(),
        "library": lib.path,
        "kernel_isa": lib.flash_attention_kernel_isa().decode(),
        "default_num_threads": lib.flash_attention_default_num_threads(),
    }

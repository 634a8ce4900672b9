"""The numpy-facing API: checks shapes and dtypes, passes arrays to the C library by pointer and strides
(no copies of strided views), and turns status codes into exceptions carrying the library's message."""

import ctypes
import math
import numbers
import sys

import numpy as np

from . import _capi
from ._fa2 import apply_rotary, check_rotary_positions, dropout_arguments, packed_functions, rotary_plan
from ._loader import load

class FlashAttentionError(Exception):
    """A status code from the library: `.status` is the FA_ERROR_* code, `.message` the library's message
    naming the argument and the reason. Raised as one of the subclasses below, which also derive from the
    built-in exception an ordinary Python API would raise (ValueError, MemoryError, RuntimeError), so that
    existing except-clauses keep working."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status
        self.message = message


class FlashAttentionValueError(FlashAttentionError, ValueError):
    """Bad input: a NULL, a size, a stride, an option, an index, or a kernel path this CPU lacks."""


class FlashAttentionMemoryError(FlashAttentionError, MemoryError):
    """Scratch memory could not be allocated (FA_ERROR_OUT_OF_MEMORY)."""


class FlashAttentionRuntimeError(FlashAttentionError, RuntimeError):
    """A bug in the library (FA_ERROR_INTERNAL) or a status this binding does not know."""


_EXCEPTIONS = {
    _capi.FA_ERROR_NULL_POINTER: FlashAttentionValueError,
    _capi.FA_ERROR_INVALID_SHAPE: FlashAttentionValueError,
    _capi.FA_ERROR_INVALID_STRIDE: FlashAttentionValueError,
    _capi.FA_ERROR_INVALID_ARGUMENT: FlashAttentionValueError,
    _capi.FA_ERROR_UNSUPPORTED: FlashAttentionValueError,
    _capi.FA_ERROR_OUT_OF_MEMORY: FlashAttentionMemoryError,
    _capi.FA_ERROR_INTERNAL: FlashAttentionRuntimeError,
    _capi.FA_ERROR_INVALID_INDEX: FlashAttentionValueError,
}

_ALGORITHMS = {
    "auto": _capi.FA_ALGORITHM_AUTO,
    "reference": _capi.FA_ALGORITHM_REFERENCE,
    "tiled": _capi.FA_ALGORITHM_TILED,
}
_TENSOR_STRIDES = ("batch", "row", "head", "dim")


_DTYPES = {np.dtype(np.float32): _capi.FA_DTYPE_FLOAT32, np.dtype(np.float16): _capi.FA_DTYPE_FLOAT16}
_DTYPE_NAMES = "float32, float16 or bfloat16 (ml_dtypes.bfloat16)"


def _dtype_known(dtype):
    """Whether the library stores `dtype`. bfloat16 arrays come from the optional ml_dtypes package, which
    only a program that has imported it can have made: so it is looked up in sys.modules, never imported
    here (importing it costs about half a second, and torch users do not need it)."""
    if dtype in _DTYPES:
        return True
    ml_dtypes = sys.modules.get("ml_dtypes")
    if ml_dtypes is not None:
        _DTYPES.setdefault(np.dtype(ml_dtypes.bfloat16), _capi.FA_DTYPE_BFLOAT16)
    return dtype in _DTYPES


def _cache_dtype_code(dtype):
    """FA_DTYPE_* of an 8-bit cache dtype (numpy int8, or ml_dtypes.float8_e4m3fn when the program imported
    ml_dtypes), or None."""
    if dtype == np.int8:
        return _capi.FA_DTYPE_INT8
    ml_dtypes = sys.modules.get("ml_dtypes")
    if ml_dtypes is not None and dtype == np.dtype(ml_dtypes.float8_e4m3fn):
        return _capi.FA_DTYPE_FLOAT8_E4M3
    return None


def quantize_kv(x, dtype):
    """Quantizes keys or values [..., head_dim] for an 8-bit KV cache, the way the library quantizes appended
    rows (bit for bit): per row of head_dim, scale = max|x| / 127 (int8) or / 448 (float8 E4M3FN), stored
    values round-half-even(x · (1 / scale)) (clamped to ±127, or saturated to ±448), 0 for a row of zeros.

    Args:
        x: float array [..., head_dim] (float32, float16 or bfloat16).
        dtype: np.int8 or ml_dtypes.float8_e4m3fn.
    Returns (values of `dtype`, scales float32 x.shape[:-1]); values × scales[..., None] dequantizes.
    (flash_attention.torch.quantize_kv is the same for torch tensors.)
    """
    code = _cache_dtype_code(np.dtype(dtype))
    if code is None:
        raise TypeError(f"dtype must be numpy.int8 or ml_dtypes.float8_e4m3fn, got {np.dtype(dtype)}")
    values, scales = quantized_rows(np.asarray(x).astype(np.float32), code)
    return values.astype(dtype), scales


def quantized_rows(x, code):
    """quantize_kv's arithmetic on a float32 array, for numpy and torch alike: (float32 values ready for the cast
    to the 8-bit type FA_DTYPE_* `code` — already rounded and clamped for int8, saturated for float8, whose cast
    rounds to nearest even — and the float32 row scales)."""
    magnitude = np.abs(x)
    largest = np.where(np.isnan(magnitude), np.float32(0), magnitude).max(axis=-1, initial=np.float32(0))
    scales = (largest / np.float32(127 if code == _capi.FA_DTYPE_INT8 else 448)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inverse = np.where(scales > 0, np.float32(1) / scales, np.float32(0)).astype(np.float32)
    y = (x * inverse[..., None]).astype(np.float32)
    if code == _capi.FA_DTYPE_INT8:
        return np.clip(np.rint(np.nan_to_num(y, nan=0.0)), -127, 127), scales
    return np.clip(y, -448, 448), scales


def check_cache_scales(cache, k_scale, v_scale, quantized, kind, float32):
    """The checks of k_scale/v_scale shared by the numpy API and the torch adapter (same messages): with an
    8-bit cache both are required, `kind` arrays (numpy.ndarray or torch.Tensor) of dtype `float32` shaped like
    the cache without head_dim; with a float cache both must be None. Never copied: an append writes the scales
    of its rows into the caller's arrays. Returns the (name, scale) pairs to pass (none for a float cache)."""
    if not quantized:
        if k_scale is not None or v_scale is not None:
            raise ValueError(f"k_scale/v_scale belong to 8-bit caches; this cache is {cache.dtype}")
        return ()
    expected = tuple(cache.shape[:3])
    for name, scale in (("k_scale", k_scale), ("v_scale", v_scale)):
        if scale is None:
            raise ValueError(f"{name} is required with an 8-bit cache ({cache.dtype})")
        if not isinstance(scale, kind) or scale.dtype != float32 or scale.ndim != 3:
            raise TypeError(f"{name} must be a float32 {kind.__module__}.{kind.__name__} of 3 dimensions")
        if tuple(scale.shape) != expected:
            raise ValueError(f"{name} shape {tuple(scale.shape)} must be the cache's without head_dim, {expected}")
    return ("k_scale", k_scale), ("v_scale", v_scale)


def check_status(lib, status):
    """Raises the exception for a nonzero status, with the library's per-thread message."""
    if status != _capi.FA_OK:
        message = lib.flash_attention_last_error().decode(errors="replace")
        summary = lib.flash_attention_status_string(status).decode()
        raise _EXCEPTIONS.get(status, FlashAttentionRuntimeError)(status, f"{message} ({summary})")


def _array(name, x, ndim, dtype=np.float32):
    """Checks type, dtype and rank; returns the array (a view, or a copy if the last axis is strided).
    dtype None accepts any element type the library stores (float32, float16, bfloat16)."""
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(x).__name__}")
    if dtype is None:
        if not _dtype_known(x.dtype):
            raise TypeError(f"{name} must have dtype {_DTYPE_NAMES}, got {x.dtype}")
    elif x.dtype is not dtype and x.dtype != dtype:
        raise TypeError(f"{name} must have dtype {np.dtype(dtype).name}, got {x.dtype}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension{'s' if ndim > 1 else ''}, got shape {x.shape}")
    if x.itemsize != 1 and any(s % x.itemsize for s in x.strides):
        raise ValueError(f"{name} has strides {x.strides} that are not multiples of the element size")
    # The kernel reads head_dim contiguously; a view strided along it is the one case that is copied.
    if x.ndim and x.shape[-1] > 1 and x.strides[-1] != x.itemsize:
        x = np.ascontiguousarray(x)
    return x


def _element_strides(x):
    strides = [s // x.itemsize for s in x.strides]
    # numpy leaves any stride on a size-1 axis or an empty array; the library wants the last stride 1.
    if x.shape[-1] <= 1 or x.size == 0:
        strides[-1] = 1
    return strides


def _address(x):
    return x.__array_interface__["data"][0]


# Field names per tensor, computed once: building them per call is a measurable part of a small call.
_FIELDS = {}


def _set_tensor(params, name, x, stride_names=_TENSOR_STRIDES):
    """Sets pointer and strides; a 3-D [rows, heads, dim] array (varlen) gets batch stride 0."""
    fields = _FIELDS.get((name, stride_names))
    if fields is None:
        fields = _FIELDS[(name, stride_names)] = [f"{name}_{field}_stride" for field in stride_names]
    setattr(params, name, _address(x))
    strides = _element_strides(x)
    if len(strides) == len(fields) - 1:
        strides = [0] + strides
    for field, stride in zip(fields, strides):
        setattr(params, field, stride)


def _int_option(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} ({value}) must be >= {minimum}")
    return int(value)


_TEMPLATES = {}


def _new_params(lib):
    """A params struct with the library's defaults (initialised once per library, then copied)."""
    template = _TEMPLATES.get(id(lib))
    if template is None:
        template = _capi.Params()
        check_status(lib, lib.flash_attention_params_init(ctypes.byref(template), ctypes.sizeof(template)))
        _TEMPLATES[id(lib)] = template
    return _capi.Params.from_buffer_copy(template)


def _draw_seed():
    """A dropout seed from numpy's global generator: np.random.seed(n) makes dropout runs repeatable."""
    return int(np.random.randint(0, np.iinfo(np.uint64).max, dtype=np.uint64))


def _set_options(params, keep, heads_q, batch, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                 alibi_slopes=None, sinks=None, num_threads=0, algorithm="auto", dropout_p=0.0, seed=0):
    """Checks and sets the options shared by every forward function; arrays to keep alive go to `keep`.
    dropout_p and seed come checked from dropout_arguments."""
    params.dropout_p, params.dropout_seed = dropout_p, seed
    if (softmax_scale is None and window_size == (-1, -1) and softcap == 0.0 and alibi_slopes is None
            and sinks is None and num_threads == 0 and algorithm == "auto" and not isinstance(causal, np.ndarray)):
        params.causal = 1 if causal else 0  # every other field keeps its default
        return
    if softmax_scale is None:
        params.softmax_scale = 0.0
    else:
        if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, numbers.Real):
            raise TypeError(f"softmax_scale must be a float or None, got {type(softmax_scale).__name__}")
        if softmax_scale == 0.0 or not math.isfinite(softmax_scale):
            raise ValueError(f"softmax_scale ({softmax_scale}) must be finite and nonzero; None means 1/sqrt(head_dim)")
        params.softmax_scale = float(softmax_scale)
    params.causal = 1 if causal else 0
    if not (isinstance(window_size, (tuple, list)) and len(window_size) == 2):
        raise TypeError(f"window_size must be a (left, right) pair, got {window_size!r}")
    params.window_left = _int_option("window_size[0]", window_size[0], -1)
    params.window_right = _int_option("window_size[1]", window_size[1], -1)
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real):
        raise TypeError(f"softcap must be a float, got {type(softcap).__name__}")
    if not (softcap >= 0 and math.isfinite(softcap)):
        raise ValueError(f"softcap ({softcap}) must be finite and >= 0 (0 = off)")
    params.softcap = float(softcap)
    if alibi_slopes is not None:
        alibi_slopes = _array("alibi_slopes", alibi_slopes, alibi_slopes.ndim if isinstance(alibi_slopes, np.ndarray) else 1)
        if alibi_slopes.shape not in ((heads_q,), (batch, heads_q)):
            raise ValueError(f"alibi_slopes must have shape ({heads_q},) or ({batch}, {heads_q}), got {alibi_slopes.shape}")
        params.alibi_slopes = _address(alibi_slopes)
        params.alibi_batch_stride = alibi_slopes.strides[0] // 4 if alibi_slopes.ndim == 2 else 0
        keep.append(alibi_slopes)
    if sinks is not None:
        sinks = _array("sinks", sinks, 1)
        if sinks.shape != (heads_q,):
            raise ValueError(f"sinks must have shape ({heads_q},), got {sinks.shape}")
        params.sinks = _address(np.ascontiguousarray(sinks))
        keep.append(sinks)
    params.num_threads = _int_option("num_threads", num_threads, 0)
    if algorithm not in _ALGORITHMS:
        raise ValueError(f"algorithm ({algorithm!r}) must be one of {sorted(_ALGORITHMS)}")
    params.algorithm = _ALGORITHMS[algorithm]


def _set_mask(params, keep, attn_mask, batch, heads_q, rows, keys, min_keys=None):
    """attn_mask (bool or uint8: nonzero attends; float32: added to the scores) broadcast to [batch, heads_q,
    rows, keys] by numpy's rules (broadcast axes get stride 0: nothing is copied). With min_keys (a KV cache)
    its last axis may be longer than the keys any entry sees, and must hold at least min_keys."""
    if attn_mask is None:
        return
    if not isinstance(attn_mask, np.ndarray):
        raise TypeError(f"attn_mask must be a numpy.ndarray, got {type(attn_mask).__name__}")
    if attn_mask.dtype in (np.bool_, np.uint8):
        code = _capi.FA_DTYPE_BOOL
    elif attn_mask.dtype == np.float32:
        code = _capi.FA_DTYPE_FLOAT32
    else:
        raise TypeError(f"attn_mask must be bool, uint8 (nonzero attends) or float32 (added), got {attn_mask.dtype}")
    if not 2 <= attn_mask.ndim <= 4:
        raise ValueError(f"attn_mask must have 2 to 4 dimensions ([batch, heads, queries, keys]), got {attn_mask.shape}")
    if min_keys is not None:
        if attn_mask.shape[-1] < min_keys:
            raise ValueError(f"attn_mask has {attn_mask.shape[-1]} keys; the cache call needs {min_keys}")
        keys = attn_mask.shape[-1]
    try:
        mask = np.broadcast_to(attn_mask, (batch, heads_q, rows, keys))
    except ValueError:
        raise ValueError(f"attn_mask shape {attn_mask.shape} does not broadcast to {(batch, heads_q, rows, keys)}") from None
    keep.append(mask)
    params.attn_mask, params.attn_mask_dtype = _address(mask), code
    (params.attn_mask_batch_stride, params.attn_mask_head_stride, params.attn_mask_row_stride,
     params.attn_mask_col_stride) = (s // mask.itemsize for s in mask.strides)


def _qkv(q, k, v, ndim, kv_ndim=None):
    """Checks q, k, v: any stored dtype, k and v of one dtype and of one shape but for the head size (v's is
    head_dim_v; q may differ in dtype); k and v have kv_ndim dimensions when given (a paged cache under
    packed queries)."""
    q = _array("q", q, ndim, dtype=None)
    k = _array("k", k, kv_ndim or ndim, dtype=None)
    v = _array("v", v, kv_ndim or ndim, dtype=None)
    if v.dtype != k.dtype:
        raise TypeError(f"v must have the dtype of k ({k.dtype}), got {v.dtype}")
    if v.shape[:-1] != k.shape[:-1]:
        raise ValueError(f"v shape {v.shape} must equal k shape {k.shape} but in the last axis (head_dim_v)")
    return q, k, v


def _out_shape(q, v):
    """out: q's shape with v's head size (head_dim_v)."""
    return q.shape[:-1] + v.shape[-1:]


def _index_array(name, x, shape):
    """An int32 index array of the given shape (Python ints and other integer arrays are converted)."""
    x = np.asarray(x)
    if x.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integers, got dtype {x.dtype}")
    if x.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {x.shape}")
    if x.size and (x.min() < np.iinfo(np.int32).min or x.max() > np.iinfo(np.int32).max):
        raise ValueError(f"{name} has values outside int32")
    return np.ascontiguousarray(x, dtype=np.int32)


def flash_attn_func(
    q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
    deterministic=False, return_attn_probs=False, *, seed=None, attn_mask=None, sinks=None, return_lse=False,
    num_threads=0, algorithm="auto"
):
    """Exact attention softmax(q kᵀ · scale) v, computed tile by tile (FlashAttention) in the C library.

    Args:
        q: [batch, seqlen_q, heads_q, head_dim], float32, float16 or bfloat16 (ml_dtypes); out has its dtype.
        k, v: [batch, seqlen_k, heads_kv, head_dim], one dtype (may differ from q's); heads_q must be a multiple of heads_kv
            (grouped-query attention: query head h reads kv head h // (heads_q // heads_kv)). v may have its own
            head size head_dim_v (multi-head latent attention), which out then has.
        dropout_p: attention dropout probability in [0, 1) (training): each probability is kept with
            probability 1 - dropout_p and scaled by 1/(1 - dropout_p) before P·V (the LSE is the undropped
            one, as in FlashAttention-2); the mask is a function of `seed` and the element's (batch, head,
            query, key) only, the same for any num_threads (reference.dropout_mask computes it).
        softmax_scale: multiplies q kᵀ; None means 1/sqrt(head_dim).
        causal: bottom-right aligned causal mask: query i sees key j iff j <= i + seqlen_k - seqlen_q.
        window_size: (left, right) sliding window around the aligned diagonal, -1 = unbounded.
        softcap: if > 0, scores become softcap * tanh(score / softcap) before ALiBi and masking.
        alibi_slopes: float32 [heads_q] or [batch, heads_q]; adds -slope * |i + seqlen_k - seqlen_q - j|.
        deterministic: accepted for FlashAttention-2 code; every call here is deterministic.
        return_attn_probs: return (out, lse, probs) as FlashAttention-2 does, probs float32
            [batch, heads_q, seqlen_q, seqlen_k] computed by the float64 reference (for tests: raises when
            larger than 2**24 elements); with dropout, dropped entries are negated (FA2's S_dmask).
        The arguments above are FlashAttention-2's, in its order; those below are keyword-only.
        seed: the dropout mask's key, an integer in [0, 2**64) (FA2 takes torch's generator state instead);
            None draws one from numpy's global generator (np.random.seed makes runs repeatable). Pass the
            same seed and dropout_p to flash_attn_backward.
        attn_mask: optional mask broadcastable to [batch, heads_q, seqlen_q, seqlen_k]: bool or uint8 (nonzero
            attends) or float32 (added to the scores after softcap and ALiBi, -inf hides). Combines with every
            other option; a row that sees no key gives 0 and LSE -inf. Key blocks it hides entirely are skipped.
        sinks: float32 [heads_q] logits that join the softmax denominator and contribute no value.
        return_lse: also return the natural-log log-sum-exp, float32 [batch, heads_q, seqlen_q].
        num_threads: 0 uses every online core, 1 the calling thread only. Results are bitwise identical
            for every value.
        algorithm: "auto", "tiled" or "reference" (the plain float64-accumulating loop, for testing).

    Any strided view is accepted without a copy (e.g. x.transpose(0, 2, 1, 3) of a [b, h, s, d] array)
    except one strided along head_dim, which is copied. Arithmetic is float32 whatever the storage; out is
    rounded to q's dtype (nearest even). Returns out (q's dtype, contiguous, q's shape with v's head size), or
    (out, lse) with lse float32.
    """
    dropout_p, seed = dropout_arguments(dropout_p, seed, _draw_seed)
    q, k, v = _qkv(q, k, v, 4)
    batch, seqlen_q, heads_q, head_dim = q.shape
    if return_attn_probs:
        if attn_mask is not None:
            raise NotImplementedError("return_attn_probs with attn_mask: use reference._softmax for the probabilities")
        return _with_probabilities(q, k, v, softmax_scale, causal, window_size, softcap, alibi_slopes, sinks,
                                   num_threads, algorithm, dropout_p, seed)
    if k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(f"k shape {k.shape} does not match q shape {q.shape} in batch and head_dim")
    lib = load()
    params = _new_params(lib)
    keep = []
    _set_options(params, keep, heads_q, batch, softmax_scale, causal, window_size, softcap, alibi_slopes, sinks,
                 num_threads, algorithm, dropout_p, seed)
    params.dtype, params.kv_dtype = _DTYPES[q.dtype], _DTYPES[k.dtype]
    out = np.empty(_out_shape(q, v), dtype=q.dtype)
    params.batch, params.seqlen_q, params.seqlen_k = batch, seqlen_q, k.shape[1]
    params.heads_q, params.heads_kv, params.head_dim, params.head_dim_v = heads_q, k.shape[2], head_dim, v.shape[3]
    _set_mask(params, keep, attn_mask, batch, heads_q, seqlen_q, k.shape[1])
    _set_tensor(params, "q", q)
    _set_tensor(params, "k", k)
    _set_tensor(params, "v", v)
    _set_tensor(params, "out", out)
    lse = None
    if return_lse:
        lse = np.empty((batch, heads_q, seqlen_q), dtype=np.float32)
        _set_tensor(params, "lse", lse, ("batch", "head", "row"))
    check_status(lib, lib.flash_attention_forward(ctypes.byref(params)))
    return (out, lse) if return_lse else out


_MAX_PROBABILITIES = 1 << 24


def _with_probabilities(q, k, v, softmax_scale, causal, window_size, softcap, alibi_slopes, sinks, num_threads,
                        algorithm, dropout_p, seed):
    """(out, lse, probs) for return_attn_probs: FlashAttention-2 returns the probability matrix for tests; it
    is the N×N matrix this library exists not to store, so it comes from the float64 reference, bounded."""
    from .reference import _softmax, dropout_mask

    count = q.shape[0] * q.shape[2] * q.shape[1] * k.shape[1]
    if count > _MAX_PROBABILITIES:
        raise ValueError(f"return_attn_probs would materialise {count} probabilities (limit {_MAX_PROBABILITIES}); "
                         "it is meant for small test shapes")
    out, lse = flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                               seed=seed, sinks=sinks, return_lse=True, num_threads=num_threads, algorithm=algorithm)
    probs = _softmax(q, k, softmax_scale, causal, window_size, softcap, alibi_slopes, sinks)["p"][..., :-1]
    if dropout_p > 0:
        probs = np.where(dropout_mask(seed, dropout_p, *probs.shape) > 0, probs, -probs)
    return out, lse, probs.astype(np.float32)


def flash_attn_varlen_func(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=0, max_seqlen_k=0, dropout_p=0.0, softmax_scale=None,
    causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
    return_attn_probs=False, block_table=None, *, seed=None, attn_mask=None, sinks=None, return_lse=False,
    num_threads=0, algorithm="auto"
):
    """Attention over a batch of sequences of different lengths, packed along the row axis.

    Args:
        q: float32 [total_q, heads_q, head_dim]; k, v: float32 [total_k, heads_kv, head_dim].
        cu_seqlens_q, cu_seqlens_k: int32 [batch + 1], starting at 0, non-decreasing: sequence b owns rows
            cu_seqlens[b] ... cu_seqlens[b + 1] - 1. Every option applies per sequence.
        max_seqlen_q, max_seqlen_k: 0, or upper bounds the library checks.
        block_table: optional int32 [batch, max_blocks_per_seq] (FlashAttention-2's paged varlen call): k and v
            are then a paged cache [num_blocks, block_size, heads_kv, head_dim] and sequence b's keys are
            positions 0 ... cu_seqlens_k[b + 1] - cu_seqlens_k[b] - 1 of its blocks. Forward only.
        attn_mask: as in flash_attn_func, broadcastable to [batch, heads_q, longest sequence's queries, its
            keys], query and key positions counted within each sequence.
        The other arguments are those of flash_attn_func (alibi_slopes may be [batch, heads_q]), in
        FlashAttention-2's order; return_attn_probs raises (not implemented for varlen).

    Returns out float32 [total_q, heads_q, head_dim_v], or (out, lse) with lse float32 [heads_q, total_q].
    """
    dropout_p, seed = dropout_arguments(dropout_p, seed, _draw_seed)
    if return_attn_probs:
        raise NotImplementedError("return_attn_probs is not implemented for flash_attn_varlen_func; call "
                                  "flash_attn_func per sequence")
    q, k, v = _qkv(q, k, v, 3, None if block_table is None else 4)
    total_q, heads_q, head_dim = q.shape
    if k.shape[-1] != head_dim:
        raise ValueError(f"k shape {k.shape} does not match q shape {q.shape} in head_dim")
    if not isinstance(cu_seqlens_q, np.ndarray) or cu_seqlens_q.ndim != 1:
        raise TypeError("cu_seqlens_q must be a 1-D numpy integer array")
    batch = cu_seqlens_q.shape[0] - 1
    if batch < 0:
        raise ValueError("cu_seqlens_q must have at least one element")
    cu_q = _index_array("cu_seqlens_q", cu_seqlens_q, (batch + 1,))
    cu_k = _index_array("cu_seqlens_k", cu_seqlens_k, (batch + 1,))
    lib = load()
    params = _new_params(lib)
    keep = [cu_q, cu_k]
    _set_options(params, keep, heads_q, batch, softmax_scale, causal, window_size, softcap, alibi_slopes, sinks,
                 num_threads, algorithm, dropout_p, seed)
    params.dtype, params.kv_dtype = _DTYPES[q.dtype], _DTYPES[k.dtype]
    out = np.empty(_out_shape(q, v), dtype=q.dtype)
    params.batch, params.seqlen_q, params.heads_q, params.heads_kv, params.head_dim = (batch, total_q, heads_q,
                                                                                     k.shape[-2], head_dim)
    params.head_dim_v = v.shape[-1]
    params.seqlen_k = k.shape[0] if block_table is None else int(cu_k[-1])
    if block_table is not None:
        table = _index_array("block_table", block_table, (batch, np.shape(block_table)[-1]))
        keep.append(table)
        params.block_table, params.block_table_batch_stride = _address(table), table.shape[1]
        params.max_blocks_per_seq, params.cache_batch, params.cache_seqlen = table.shape[1], k.shape[0], k.shape[1]
    params.cu_seqlens_q, params.cu_seqlens_k = _address(cu_q), _address(cu_k)
    _set_mask(params, keep, attn_mask, batch, heads_q, int(np.diff(cu_q).max(initial=0)),
              int(np.diff(cu_k).max(initial=0)))
    params.max_seqlen_q = _int_option("max_seqlen_q", max_seqlen_q, 0)
    params.max_seqlen_k = _int_option("max_seqlen_k", max_seqlen_k, 0)
    _set_tensor(params, "q", q)
    _set_tensor(params, "k", k)
    _set_tensor(params, "v", v)
    _set_tensor(params, "out", out)
    lse = None
    if return_lse:
        lse = np.empty((heads_q, total_q), dtype=np.float32)
        params.lse, params.lse_head_stride, params.lse_row_stride = _address(lse), total_q, 1
    check_status(lib, lib.flash_attention_forward_varlen(ctypes.byref(params)))
    return (out, lse) if return_lse else out


def flash_attn_with_kvcache(
    q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None, cache_seqlens=None, cache_batch_idx=None,
    cache_leftpad=None, block_table=None, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
    rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False, *, sinks=None,
    return_lse=False, num_threads=0, algorithm="auto", k_scale=None, v_scale=None, attn_mask=None
):
    """Attention of new queries against a KV cache, optionally appending new keys/values first.

    Args:
        q: float32 [batch, seqlen_q, heads_q, head_dim].
        k_cache, v_cache: float32 [batch_cache, seqlen_cache, heads_kv, head_dim], or with block_table a
            paged cache [num_blocks, block_size, heads_kv, head_dim] (any block_size >= 1). v_cache may have
            another head size, head_dim_v (MLA; v_cache may then be a view of k_cache[..., :head_dim_v]).
        k, v: optional float32 [batch, seqlen_new, heads_kv, head_dim] (v: head_dim_v), written into the cache
            in place at positions cache_seqlens[b] ... before attending (advance cache_seqlens yourself
            afterwards); not when the caches overlap.
        cache_seqlens: int or int32 [batch]: keys already cached per batch entry (default: all of them).
        rotary_cos, rotary_sin: optional [seqlen_ro, rotary_dim / 2] (FlashAttention-2's rotary embedding):
            the new keys k are rotated at positions cache_seqlens[b] + i before they are written (the cache
            holds rotated keys), and q at cache_seqlens[b] + i when causal or windowed, else at cache_seqlens[b]
            for every row. Needs k, v and cache_seqlens. rotary_interleaved: rotate channel pairs (2i, 2i + 1)
            (True, GPT-J style) or (i, i + rotary_dim / 2) (False, GPT-NeoX style). Computed in float32.
        cache_batch_idx: optional int32 [batch]: which cache row each batch entry uses.
        cache_leftpad: optional int32 [batch]: the first cached key of each entry (left-padded batches): entry b
            attends to cache positions cache_leftpad[b] ... cache_seqlens[b] - 1 plus the appended keys. Not with
            block_table or an 8-bit cache.
        block_table: optional int32 [batch, max_blocks_per_seq]: the blocks of each sequence, in order.
        k_scale, v_scale: with an 8-bit cache (k_cache/v_cache of dtype numpy.int8 or
            ml_dtypes.float8_e4m3fn), float32 [batch_cache (or num_blocks), seqlen_cache (or block_size),
            heads_kv]: each cached row stands for its values × its scale (see quantize_kv). New rows k, v
            (float32, float16 or bfloat16) are quantized as they are appended, their scales written here.
            The result is exact attention over the dequantized cache.
        num_splits: accepted for FlashAttention-2 code; the library chooses its own key splits (results do
            not depend on them).
        attn_mask: as in flash_attn_func over [batch, heads_q, seqlen_q, keys], key j being cache position j;
            its last axis may be longer (e.g. the cache capacity) but must cover cache_seqlens[b] + seqlen_new.
        Batch b attends to cache_seqlens[b] + seqlen_new keys, which is the seqlen_k of causal/window
        alignment. Every index is checked before anything is read or written. The arguments up to
        return_softmax_lse are FlashAttention-2's, in its order; those after it are keyword-only.

    Returns out float32 [batch, seqlen_q, heads_q, head_dim_v], or (out, lse) with lse [batch, heads_q, seqlen_q].
    """
    if rotary_cos is not None or rotary_sin is not None:
        q, k = _rotated(q, k, rotary_cos, rotary_sin, cache_seqlens, rotary_interleaved,
                        causal or tuple(window_size) != (-1, -1))
    if cache_leftpad is not None:
        if attn_mask is not None:
            raise NotImplementedError("attn_mask with cache_leftpad: fold the padding into the mask instead")
        return _left_padded_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, cache_leftpad,
                                    block_table, k_scale, dict(
                                        softmax_scale=softmax_scale, causal=causal, window_size=window_size,
                                        softcap=softcap, sinks=sinks, num_threads=num_threads, algorithm=algorithm),
                                    alibi_slopes, return_lse or return_softmax_lse)
    q = _array("q", q, 4, dtype=None)
    quantized = _cache_dtype_code(getattr(k_cache, "dtype", None))
    k_cache = _array("k_cache", k_cache, 4, dtype=k_cache.dtype if quantized else None)
    v_cache = _array("v_cache", v_cache, 4, dtype=k_cache.dtype if quantized else None)
    batch, seqlen_q, heads_q, head_dim = q.shape
    if v_cache.dtype != k_cache.dtype:
        raise TypeError(f"v_cache must have the dtype of k_cache ({k_cache.dtype}), got {v_cache.dtype}")
    if v_cache.shape[:3] != k_cache.shape[:3]:
        raise ValueError(f"v_cache shape {v_cache.shape} must equal k_cache shape {k_cache.shape} but in the last axis"
                         " (head_dim_v)")
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"k_cache shape {k_cache.shape} does not match q shape {q.shape} in head_dim")
    heads_kv, head_dim_v = k_cache.shape[2], v_cache.shape[3]
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if (k is not None) and not cache.flags.writeable:
            raise ValueError(f"{name} must be writable to append k/v")
    lib = load()
    params = _new_params(lib)
    keep = []
    _set_options(params, keep, heads_q, batch, softmax_scale, causal, window_size, softcap, alibi_slopes, sinks,
                 num_threads, algorithm)
    if block_table is not None:
        table = _index_array("block_table", block_table, np.shape(block_table))
        if table.ndim != 2 or table.shape[0] != batch:
            raise ValueError(f"block_table must have shape ({batch}, max_blocks_per_seq), got {table.shape}")
        params.block_table = _address(table)
        params.block_table_batch_stride, params.max_blocks_per_seq = table.shape[1], table.shape[1]
        keep.append(table)
        default_seqlen = table.shape[1] * k_cache.shape[1]
    else:
        default_seqlen = k_cache.shape[1]
    if cache_seqlens is None:
        cache_seqlens = default_seqlen - (0 if k is None else np.shape(k)[1])
    if isinstance(cache_seqlens, numbers.Integral) and not isinstance(cache_seqlens, bool):
        cache_seqlens = np.full(batch, cache_seqlens, dtype=np.int32)
    seqlens = _index_array("cache_seqlens", cache_seqlens, (batch,))
    params.cache_seqlens = _address(seqlens)
    keep.append(seqlens)
    if cache_batch_idx is not None:
        index = _index_array("cache_batch_idx", cache_batch_idx, (batch,))
        params.cache_batch_idx = _address(index)
        keep.append(index)
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together")
    if k is not None:
        k = _array("k", k, 4, dtype=None if quantized else k_cache.dtype)
        v = _array("v", v, 4, dtype=k.dtype)
        if k.shape[:3] != v.shape[:3] or k.shape[0] != batch or (*k.shape[2:], v.shape[3]) != (heads_kv, head_dim,
                                                                                            head_dim_v):
            raise ValueError(f"k {k.shape} and v {v.shape} must both be ({batch}, seqlen_new, {heads_kv}, head_dim) with "
                             f"head_dim {head_dim} for k and head_dim_v {head_dim_v} for v")
        _set_tensor(params, "k_new", k)
        _set_tensor(params, "v_new", v)
        params.seqlen_new = k.shape[1]
        if quantized:
            params.kv_new_dtype = _DTYPES[k.dtype]
    params.dtype, params.kv_dtype = _DTYPES[q.dtype], quantized or _DTYPES[k_cache.dtype]
    # Any strides (the library takes element strides for every axis).
    for name, scale in check_cache_scales(k_cache, k_scale, v_scale, quantized, np.ndarray, np.float32):
        if any(st % 4 for st in scale.strides):
            raise ValueError(f"{name} has strides {scale.strides} that are not multiples of the element size")
        if k is not None and not scale.flags.writeable:
            raise ValueError(f"{name} must be writable to append k/v")
        _set_tensor(params, name, scale, ("batch", "row", "head"))
        keep.append(scale)
    out = np.empty(_out_shape(q, v_cache), dtype=q.dtype)
    params.batch, params.seqlen_q = batch, seqlen_q
    params.heads_q, params.heads_kv, params.head_dim, params.head_dim_v = heads_q, heads_kv, head_dim, head_dim_v
    params.cache_batch, params.cache_seqlen = k_cache.shape[0], k_cache.shape[1]
    if attn_mask is not None:
        needed = int(seqlens.max(initial=0)) + (0 if k is None else k.shape[1])
        _set_mask(params, keep, attn_mask, batch, heads_q, seqlen_q, None, min_keys=needed)
    _set_tensor(params, "q", q)
    _set_tensor(params, "k", k_cache)
    _set_tensor(params, "v", v_cache)
    _set_tensor(params, "out", out)
    want_lse = return_lse or return_softmax_lse
    lse = None
    if want_lse:
        lse = np.empty((batch, heads_q, seqlen_q), dtype=np.float32)
        _set_tensor(params, "lse", lse, ("batch", "head", "row"))
    check_status(lib, lib.flash_attention_forward_kvcache(ctypes.byref(params)))
    return (out, lse) if want_lse else out


def _rotated(q, k, cos, sin, cache_seqlens, interleaved, aligned):
    """q and the new keys k rotated as flash_attn_with_kvcache documents (new arrays; the inputs are kept)."""
    q, k = _array("q", q, 4, dtype=None), _array("k", k, 4, dtype=None) if k is not None else None
    step = rotary_plan(q.shape, None if k is None else k.shape, None if cos is None else np.asarray(cos),
                       None if sin is None else np.asarray(sin), cache_seqlens, aligned)
    cos, sin = np.asarray(cos, np.float32), np.asarray(sin, np.float32)
    starts = np.broadcast_to(_index_array("cache_seqlens", np.broadcast_to(cache_seqlens, (q.shape[0],)),
                                          (q.shape[0],)).astype(np.int64), (q.shape[0],))[:, None]
    k_positions = starts + np.arange(k.shape[1])
    q_positions = starts + step * np.arange(q.shape[1])
    check_rotary_positions(int(max(k_positions.max(initial=0), q_positions.max(initial=0))), cos.shape[0])
    if starts.size and starts.min() < 0:
        raise ValueError(f"cache_seqlens must be >= 0, got {starts.min()}")

    def rotate(x, positions):
        return apply_rotary(x, cos, sin, positions, interleaved, lambda y: np.asarray(y, np.float32),
                            lambda y: y.astype(x.dtype))

    return rotate(q, q_positions), rotate(k, k_positions)


def appends_overlap(k_cache, v_cache, rows, ends, new):
    """Whether appending `new` rows at ends[b] of cache row rows[b] to both caches would write some element of
    k_cache and of v_cache twice (v a view of k's first columns, as an MLA cache may be): the library refuses
    such an append, and so do the bindings' own appends. Exact (np.shares_memory) on the written slices only."""
    if new == 0 or not np.may_share_memory(k_cache, v_cache):
        return False
    targets = [(row, end) for row, end in zip(rows, ends)]
    return any(np.shares_memory(k_cache[r, e:e + new], v_cache[s, f:f + new]) for r, e in targets for s, f in targets)


def _left_padded_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, cache_leftpad, block_table,
                         k_scale, options, alibi_slopes, want_lse):
    """cache_leftpad: every index checked first, the new rows appended, then one call per entry over the slice
    cache_leftpad[b] ... end of its cache row (the library's cache call describes rows that start at 0)."""
    if block_table is not None or k_scale is not None or _cache_dtype_code(getattr(k_cache, "dtype", None)):
        raise NotImplementedError("cache_leftpad is not implemented with block_table or an 8-bit cache")
    q = _array("q", q, 4, dtype=None)
    k_cache = _array("k_cache", k_cache, 4, dtype=None)
    v_cache = _array("v_cache", v_cache, 4, dtype=k_cache.dtype)
    batch, cache_batch, cache_len = q.shape[0], k_cache.shape[0], k_cache.shape[1]
    if v_cache.shape[:3] != k_cache.shape[:3] or k_cache.shape[3] != q.shape[3] or q.shape[2] % max(k_cache.shape[2], 1):
        raise ValueError(f"k_cache {k_cache.shape} and v_cache {v_cache.shape} must be equal but in head_dim_v and "
                         f"match q {q.shape} in head_dim, with heads_q a multiple of heads_kv")
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together")
    new = 0 if k is None else np.shape(k)[1]
    if k is not None and not (np.shape(k) == (batch, new, *k_cache.shape[2:]) and
                              np.shape(v) == (batch, new, *v_cache.shape[2:])):
        raise ValueError(f"k {np.shape(k)} and v {np.shape(v)} must both be ({batch}, seqlen_new, {k_cache.shape[2]}, "
                         f"head_dim) with head_dim {k_cache.shape[3]} for k and head_dim_v {v_cache.shape[3]} for v")
    if cache_seqlens is None:
        cache_seqlens = cache_len - new
    ends = np.broadcast_to(np.asarray(cache_seqlens), (batch,)).astype(np.int64)
    starts = _index_array("cache_leftpad", cache_leftpad, (batch,)).astype(np.int64)
    rows = (np.arange(batch) if cache_batch_idx is None
            else _index_array("cache_batch_idx", cache_batch_idx, (batch,)).astype(np.int64))
    for name, bad in (("cache_batch_idx", (rows < 0) | (rows >= cache_batch)),
                      ("cache_leftpad", (starts < 0) | (starts > ends)),
                      ("cache_seqlens", ends + new > cache_len)):
        if bad.any():
            b = int(np.argmax(bad))
            raise ValueError(f"{name}[{b}] is out of range (cache_leftpad {starts[b]}, cache_seqlens {ends[b]}, "
                             f"{new} new, cache row {rows[b]} of {cache_batch} x {cache_len})")
    if k is not None:
        k, v = _array("k", k, 4, dtype=k_cache.dtype), _array("v", v, 4, dtype=k_cache.dtype)
        if appends_overlap(k_cache, v_cache, rows, ends, new):
            raise ValueError("k_cache and v_cache overlap; appending k and v would write one into the other")
        for b in range(batch):
            k_cache[rows[b], ends[b]:ends[b] + new] = k[b]
            v_cache[rows[b], ends[b]:ends[b] + new] = v[b]
    slopes = None if alibi_slopes is None else np.broadcast_to(
        np.asarray(alibi_slopes, np.float32), (batch, q.shape[2]))
    results = [flash_attn_func(q[b:b + 1], k_cache[rows[b]:rows[b] + 1, starts[b]:ends[b] + new],
                               v_cache[rows[b]:rows[b] + 1, starts[b]:ends[b] + new],
                               alibi_slopes=None if slopes is None else slopes[b], return_lse=True, **options)
               for b in range(batch)]
    out = np.concatenate([r[0] for r in results])
    return (out, np.concatenate([r[1] for r in results])) if want_lse else out


(flash_attn_qkvpacked_func, flash_attn_kvpacked_func, flash_attn_varlen_qkvpacked_func,
 flash_attn_varlen_kvpacked_func) = packed_functions(flash_attn_func, flash_attn_varlen_func)


def merge_attention_states(out_a, lse_a, out_b, lse_b):
    """The exact attention over the union of two disjoint key sets, from the results over each.

    out_* are float32 [..., seqlen, heads, head_dim] and lse_* float32 [..., heads, seqlen] (the layouts
    flash_attn_func returns). A side that saw no key (lse -inf) contributes nothing. Returns (out, lse).
    """
    out_a = _array("out_a", out_a, np.ndim(out_a))
    out_b = _array("out_b", out_b, np.ndim(out_b))
    lse_a = _array("lse_a", lse_a, np.ndim(lse_a)) if isinstance(lse_a, np.ndarray) else _array("lse_a", lse_a, 1)
    lse_b = _array("lse_b", lse_b, np.ndim(lse_b)) if isinstance(lse_b, np.ndarray) else _array("lse_b", lse_b, 1)
    if out_a.ndim < 3 or out_a.shape != out_b.shape:
        raise ValueError(f"out_a {out_a.shape} and out_b {out_b.shape} must have one shape [..., seqlen, heads, head_dim]")
    expected = out_a.shape[:-3] + (out_a.shape[-2], out_a.shape[-3])
    if lse_a.shape != expected or lse_b.shape != expected:
        raise ValueError(f"lse_a {lse_a.shape} and lse_b {lse_b.shape} must have shape {expected}")
    lib = load()
    out = np.empty(out_a.shape, np.float32)
    lse = np.empty(expected, np.float32)
    seqlen, heads, head_dim = out_a.shape[-3:]
    # One call per (leading index, head): its rows are the sequence positions.
    for index in np.ndindex(*out_a.shape[:-3], heads):
        lead, h = index[:-1], index[-1]
        views = [x[lead + (slice(None), h)] for x in (out_a, out_b, out)]
        lse_views = [x[lead + (h,)] for x in (lse_a, lse_b, lse)]
        args = []
        for o, l in zip(views, lse_views):
            args += [_address(o), o.strides[0] // 4, _address(l), l.strides[0] // 4]
        check_status(lib, lib.flash_attention_merge(seqlen, head_dim, *args))
    return out, lse


def _backward(dout, q, k, v, out, lse, cu_seqlens, options, attn_mask=None):
    """Shared by the dense and varlen backward functions; cu_seqlens is None or (cu_q, cu_k, max_q, max_k)."""
    ndim = 3 if cu_seqlens is not None else 4
    q, k, v = _qkv(q, k, v, ndim)
    dout = _array("dout", dout, ndim, dtype=q.dtype)
    out = _array("out", out, ndim, dtype=q.dtype)
    lse = _array("lse", lse, 2 if cu_seqlens is not None else 3)
    if dout.shape != _out_shape(q, v) or out.shape != _out_shape(q, v):
        raise ValueError(f"dout {dout.shape} and out {out.shape} must have q's shape with v's head size, "
                         f"{_out_shape(q, v)}")
    heads_q, head_dim = q.shape[-2], q.shape[-1]
    lib = load()
    params = _new_params(lib)
    keep = []
    if cu_seqlens is not None:
        cu_q, cu_k, max_q, max_k = cu_seqlens
        batch = np.shape(cu_q)[0] - 1
        cu_q = _index_array("cu_seqlens_q", cu_q, (batch + 1,))
        cu_k = _index_array("cu_seqlens_k", cu_k, (batch + 1,))
        keep += [cu_q, cu_k]
        params.cu_seqlens_q, params.cu_seqlens_k = _address(cu_q), _address(cu_k)
        params.max_seqlen_q = _int_option("max_seqlen_q", max_q, 0)
        params.max_seqlen_k = _int_option("max_seqlen_k", max_k, 0)
        params.batch, params.seqlen_q, params.seqlen_k = batch, q.shape[0], k.shape[0]
        _set_mask(params, keep, attn_mask, batch, heads_q, int(np.diff(cu_q).max(initial=0)),
                  int(np.diff(cu_k).max(initial=0)))
        if lse.shape != (heads_q, q.shape[0]):
            raise ValueError(f"lse must have shape {(heads_q, q.shape[0])}, got {lse.shape}")
        params.lse, params.lse_head_stride, params.lse_row_stride = _address(lse), lse.strides[0] // 4, lse.strides[1] // 4
    else:
        batch = q.shape[0]
        if k.shape[0] != batch or k.shape[3] != head_dim:
            raise ValueError(f"k shape {k.shape} does not match q shape {q.shape} in batch and head_dim")
        params.batch, params.seqlen_q, params.seqlen_k = batch, q.shape[1], k.shape[1]
        _set_mask(params, keep, attn_mask, batch, heads_q, q.shape[1], k.shape[1])
        if lse.shape != (batch, heads_q, q.shape[1]):
            raise ValueError(f"lse must have shape {(batch, heads_q, q.shape[1])}, got {lse.shape}")
        _set_tensor(params, "lse", lse, ("batch", "head", "row"))
    params.heads_q, params.heads_kv, params.head_dim, params.head_dim_v = heads_q, k.shape[-2], head_dim, v.shape[-1]
    _set_options(params, keep, heads_q, batch, **options)
    params.dtype, params.kv_dtype = _DTYPES[q.dtype], _DTYPES[k.dtype]
    for name, x in (("q", q), ("k", k), ("v", v), ("out", out)):
        _set_tensor(params, name, x)
    dq, dk, dv = np.empty(q.shape, q.dtype), np.empty(k.shape, k.dtype), np.empty(v.shape, v.dtype)
    backward = _capi.BackwardParams()
    check_status(lib, lib.flash_attention_backward_params_init(ctypes.byref(backward), ctypes.sizeof(backward)))
    backward.forward = ctypes.pointer(params)
    for name, x in (("dout", dout), ("dq", dq), ("dk", dk), ("dv", dv)):
        _set_tensor(backward, name, x)
    dsinks = None
    if options.get("sinks") is not None:
        dsinks = np.zeros(heads_q, np.float32)
        backward.dsinks = _address(dsinks)
    check_status(lib, lib.flash_attention_backward(ctypes.byref(backward)))
    return (dq, dk, dv) if dsinks is None else (dq, dk, dv, dsinks)


def _backward_options(softmax_scale, causal, window_size, softcap, alibi_slopes, sinks, num_threads, dropout_p, seed):
    if dropout_p != 0.0 and seed is None:
        raise ValueError("seed must be the forward call's seed when dropout_p is nonzero (the backward regenerates "
                         "its dropout mask)")
    dropout_p, seed = dropout_arguments(dropout_p, seed, None)
    return dict(softmax_scale=softmax_scale, causal=causal, window_size=window_size, softcap=softcap,
                alibi_slopes=alibi_slopes, sinks=sinks, num_threads=num_threads, algorithm="auto",
                dropout_p=dropout_p, seed=seed)


def flash_attn_backward(
    dout, q, k, v, out, lse, softmax_scale=None, causal=False, *, window_size=(-1, -1), softcap=0.0,
    alibi_slopes=None, sinks=None, num_threads=0, dropout_p=0.0, seed=None, attn_mask=None
):
    """Gradients of flash_attn_func: (dq, dk, dv), or (dq, dk, dv, dsinks) when `sinks` is given.

    dout is the gradient of out; out and lse are what the forward returned for the same q, k, v and
    options (which must be passed again). dq, dk, dv have the dtypes and shapes of q, k, v; with grouped
    heads dk and dv sum over the query heads that share a kv head. Recomputes the probabilities tile by
    tile from lse (FlashAttention-2): no seqlen_q × seqlen_k buffer, and the result is bitwise identical
    for every num_threads. With dropout, pass the forward's dropout_p and seed: the mask is regenerated.
    """
    return _backward(dout, q, k, v, out, lse, None,
                     _backward_options(softmax_scale, causal, window_size, softcap, alibi_slopes, sinks, num_threads,
                                       dropout_p, seed), attn_mask)


def flash_attn_varlen_backward(
    dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=0, max_seqlen_k=0, softmax_scale=None,
    causal=False, *, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, sinks=None, num_threads=0, dropout_p=0.0,
    seed=None, attn_mask=None
):
    """Gradients of flash_attn_varlen_func (packed [total, heads, head_dim] tensors, lse [heads, total_q])."""
    return _backward(dout, q, k, v, out, lse, (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k),
                     _backward_options(softmax_scale, causal, window_size, softcap, alibi_slopes, sinks, num_threads,
                                       dropout_p, seed), attn_mask)


def flash_attn_func_with_backward(q, k, v, softmax_scale=None, causal=False, **options):
    """Runs flash_attn_func and returns (out, lse, backward), where backward(dout) gives the gradients.

    For autograd frameworks: the closure keeps the inputs, out and lse, and passes the same options to
    flash_attn_backward. No framework is needed.
    """
    threads = options.pop("num_threads", 0)
    # The seed is drawn here, once, so that the backward regenerates the forward's mask.
    options["dropout_p"], options["seed"] = dropout_arguments(options.get("dropout_p", 0.0), options.get("seed"),
                                                              _draw_seed)
    out, lse = flash_attn_func(q, k, v, softmax_scale=softmax_scale, causal=causal, return_lse=True,
                               num_threads=threads, **options)

    def backward(dout):
        return flash_attn_backward(dout, q, k, v, out, lse, softmax_scale, causal, num_threads=threads, **options)

    return out, lse, backward


def library_info():
    """Version, ABI number, path, kernel instruction set (the one calls use, and every one this CPU can run,
    the default first; FLASH_ATTENTION_ISA picks one) and default thread count of the loaded library."""
    lib = load()
    return {
        "version": lib.flash_attention_version_string().decode(),
        "abi_version": lib.flash_attention_abi_version(),
        "library": lib.path,
        "kernel_isa": lib.flash_attention_kernel_isa().decode(),
        "available_isas": lib.flash_attention_available_isas().decode().split(","),
        "default_num_threads": lib.flash_attention_default_num_threads(),
    }

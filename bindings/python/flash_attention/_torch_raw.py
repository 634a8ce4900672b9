"""Calls of the C library on torch tensors: pointers, element strides and dtype codes go straight into the
params struct. No numpy, no ml_dtypes (bfloat16 is just the dtype code FA_DTYPE_BFLOAT16), no copies.

This is the hot path of every torch call (a decoding step makes one per layer), so it does only what the
library cannot do itself: it reads the tensors' metadata, fills the struct and turns a nonzero status into
an exception carrying the library's message. Shapes, strides, sizes, overlaps and indices are validated by
the library, which writes nothing when it rejects a call. The callers (flash_attention.torch) allocate the
outputs and have already checked device and dtype.

Layouts (element strides, head_dim stride 1; a tensor strided along head_dim is copied by the caller; v, out,
dv and dout have the head size of v, head_dim_v, which may differ from q's and k's):
    dense:  q, out [batch, seqlen_q, heads_q, head_dim]; k, v [batch, seqlen_k, heads_kv, head_dim];
            lse float32 [batch, heads_q, seqlen_q]
    varlen: q, out [total_q, heads_q, head_dim]; k, v [total_k, heads_kv, head_dim]; lse [heads_q, total_q]
    cache:  k, v [cache_batch, cache_seqlen, heads_kv, head_dim] (or pages), as flash_attention.h says; an
            8-bit cache (int8, float8_e4m3fn) with float32 row scales [cache_batch, cache_seqlen, heads_kv]
"""

import ctypes
import struct

import torch

from . import _capi
from ._loader import load
from .api import check_status

DTYPE_CODES = {torch.float32: _capi.FA_DTYPE_FLOAT32, torch.float16: _capi.FA_DTYPE_FLOAT16,
               torch.bfloat16: _capi.FA_DTYPE_BFLOAT16}
# KV caches may also be 8-bit, each row of head_dim values with a float32 scale (flash_attention.h, FA_DTYPE_INT8).
QUANTIZED_CODES = {torch.int8: _capi.FA_DTYPE_INT8, torch.float8_e4m3fn: _capi.FA_DTYPE_FLOAT8_E4M3}
CACHE_CODES = {**DTYPE_CODES, **QUANTIZED_CODES}

_byref = ctypes.byref
_lib = None                 # the loaded library, set by _library()
_template = None            # flash_attention_params with the library's defaults
_backward_template = None   # flash_attention_backward_params with the library's defaults
_copy = _capi.Params.from_buffer_copy


def _library():
    """Loads the library and initialises the params templates once; returns the library."""
    global _lib, _template, _backward_template
    if _lib is None:
        lib = load()
        params = _capi.Params()
        check_status(lib, lib.flash_attention_params_init(_byref(params), ctypes.sizeof(params)))
        backward = _capi.BackwardParams()
        check_status(lib, lib.flash_attention_backward_params_init(_byref(backward), ctypes.sizeof(backward)))
        _template, _backward_template, _lib = params, backward, lib
    return _lib


def _new_params():
    """(library, a fresh params struct holding the defaults): a copy of the template, ~0.3 µs."""
    if _lib is None:
        _library()
    return _lib, _copy(_template)


def _attn_mask(p, mask):
    """A 4-D [batch | 1, heads | 1, seqlen_q, seqlen_k] mask, bool or float32 (added), read in place; a size-1
    (broadcast) axis gets stride 0."""
    s = [0 if n == 1 else st for n, st in zip(mask.shape, mask.stride())]
    p.attn_mask = mask.data_ptr()
    p.attn_mask_dtype = _capi.FA_DTYPE_BOOL if mask.dtype == torch.bool else _capi.FA_DTYPE_FLOAT32
    p.attn_mask_batch_stride, p.attn_mask_head_stride, p.attn_mask_row_stride, p.attn_mask_col_stride = s


def _options(p, scale, causal, window_left, window_right, softcap, alibi, sinks, num_threads, dropout_p=0.0, seed=0):
    """Every field defaults to "off" in the template; only what differs is written (most calls: nothing or
    `causal`). alibi and sinks must be contiguous float32 tensors (the callers convert)."""
    if dropout_p:
        p.dropout_p, p.dropout_seed = dropout_p, seed
    if scale is not None:
        p.softmax_scale = scale
    if causal:
        p.causal = 1
    if window_left != -1:
        p.window_left = window_left
    if window_right != -1:
        p.window_right = window_right
    if softcap:
        p.softcap = softcap
    if alibi is not None:
        p.alibi_slopes = alibi.data_ptr()
        p.alibi_batch_stride = alibi.stride(0) if alibi.dim() == 2 else 0
    if sinks is not None:
        p.sinks = sinks.data_ptr()
    if num_threads:
        p.num_threads = num_threads


# The sizes and the q, k, v, out pointers and strides are adjacent fields of the struct (batch ... out_dim_stride),
# so one struct.pack_into writes them: about a microsecond less per call than 26 ctypes attribute stores.
_SIZES_AND_TENSORS = struct.Struct("@6q" + "P4q" * 4)
_LSE = struct.Struct("@P3q")
_DTYPES = struct.Struct("@ii")
# k_scale and v_scale, each a pointer and three strides, are adjacent too (the last fields of 0.5).
_SCALES = struct.Struct("@P3qP3q")
_AT_SIZES, _AT_LSE, _AT_DTYPES = _capi.Params.batch.offset, _capi.Params.lse.offset, _capi.Params.dtype.offset
_AT_SCALES = _capi.Params.k_scale.offset
# The field order of flash_attention.h, checked once.
if (_AT_SIZES + _SIZES_AND_TENSORS.size != _AT_LSE
        or _AT_SCALES + _SCALES.size != _capi.Params.v_scale_head_stride.offset + 8):
    raise ImportError("flash_attention._capi.Params does not have the layout _torch_raw packs")


def _dense_tensors(p, q, k, v, out, lse, heads_first=False):
    """Sizes, pointers and strides of 4-D q, k, v, out and the optional lse; sizes from q and k. With
    heads_first, q, k, v and out are [batch, heads, seqlen, head_dim] (torch's SDPA layout), read in place."""
    if heads_first:
        batch, heads_q, seqlen_q, head_dim = q.shape
        _, heads_kv, seqlen_k, _ = k.shape
        qs, ks, vs, os = q.stride(), k.stride(), v.stride(), out.stride()
        _SIZES_AND_TENSORS.pack_into(
            p, _AT_SIZES, batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim,
            q.data_ptr(), qs[0], qs[2], qs[1], 1, k.data_ptr(), ks[0], ks[2], ks[1], 1,
            v.data_ptr(), vs[0], vs[2], vs[1], 1, out.data_ptr(), os[0], os[2], os[1], 1)
    else:
        batch, seqlen_q, heads_q, head_dim = q.shape
        _, seqlen_k, heads_kv, _ = k.shape
        qs, ks, vs, os = q.stride(), k.stride(), v.stride(), out.stride()
        _SIZES_AND_TENSORS.pack_into(
            p, _AT_SIZES, batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim,
            q.data_ptr(), qs[0], qs[1], qs[2], 1, k.data_ptr(), ks[0], ks[1], ks[2], 1,
            v.data_ptr(), vs[0], vs[1], vs[2], 1, out.data_ptr(), os[0], os[1], os[2], 1)
    if v.shape[-1] != head_dim:
        p.head_dim_v = v.shape[-1]
    if lse is not None:
        s = lse.stride()
        _LSE.pack_into(p, _AT_LSE, lse.data_ptr(), s[0], s[1], s[2])
    _DTYPES.pack_into(p, _AT_DTYPES, DTYPE_CODES[q.dtype], CACHE_CODES[k.dtype])


def _varlen_tensors(p, q, k, v, out, lse, cu_q, cu_k, max_q, max_k):
    """3-D packed q, k, v, out; lse [heads_q, total_q]; cu_seqlens contiguous int32 tensors."""
    total_q, heads_q, head_dim = q.shape
    p.batch, p.seqlen_q, p.seqlen_k = cu_q.shape[0] - 1, total_q, k.shape[0]
    p.heads_q, p.heads_kv, p.head_dim, p.head_dim_v = heads_q, k.shape[1], head_dim, v.shape[-1]
    s = q.stride()
    p.q, p.q_row_stride, p.q_head_stride = q.data_ptr(), s[0], s[1]
    s = k.stride()
    p.k, p.k_row_stride, p.k_head_stride = k.data_ptr(), s[0], s[1]
    s = v.stride()
    p.v, p.v_row_stride, p.v_head_stride = v.data_ptr(), s[0], s[1]
    s = out.stride()
    p.out, p.out_row_stride, p.out_head_stride = out.data_ptr(), s[0], s[1]
    if lse is not None:
        s = lse.stride()
        p.lse, p.lse_head_stride, p.lse_row_stride = lse.data_ptr(), s[0], s[1]
    p.cu_seqlens_q, p.cu_seqlens_k = cu_q.data_ptr(), cu_k.data_ptr()
    p.max_seqlen_q, p.max_seqlen_k = max_q, max_k
    p.dtype = DTYPE_CODES[q.dtype]
    p.kv_dtype = DTYPE_CODES[k.dtype]


def forward(q, k, v, out, lse, scale=None, causal=False, window_left=-1, window_right=-1, softcap=0.0, alibi=None,
            sinks=None, num_threads=0, heads_first=False, dropout_p=0.0, seed=0, attn_mask=None):
    """flash_attention_forward into the given out (and lse, if not None); heads_first: see _dense_tensors;
    attn_mask: see _attn_mask."""
    lib, p = _new_params()
    _dense_tensors(p, q, k, v, out, lse, heads_first)
    if attn_mask is not None:
        _attn_mask(p, attn_mask)
    _options(p, scale, causal, window_left, window_right, softcap, alibi, sinks, num_threads, dropout_p, seed)
    status = lib.flash_attention_forward(_byref(p))
    if status:
        check_status(lib, status)


def varlen_forward(q, k, v, out, lse, cu_q, cu_k, max_q=0, max_k=0, scale=None, causal=False, window_left=-1,
                   window_right=-1, softcap=0.0, alibi=None, sinks=None, num_threads=0, dropout_p=0.0, seed=0,
                   block_table=None):
    """flash_attention_forward_varlen into the given out (and lse [heads_q, total_q], if not None). With a
    block_table (contiguous int32 [batch, max_blocks]), k and v are a paged cache [num_blocks, block_size,
    heads_kv, head_dim]."""
    lib, p = _new_params()
    _varlen_tensors(p, q, k, v, out, lse, cu_q, cu_k, max_q, max_k)
    if block_table is not None:
        p.seqlen_k, p.heads_kv = int(cu_k[-1]), k.shape[2]
        for name, x in (("k", k), ("v", v)):
            s = x.stride()
            setattr(p, name, x.data_ptr())
            setattr(p, name + "_batch_stride", s[0])
            setattr(p, name + "_row_stride", s[1])
            setattr(p, name + "_head_stride", s[2])
        p.block_table, p.block_table_batch_stride = block_table.data_ptr(), block_table.stride(0)
        p.max_blocks_per_seq, p.cache_batch, p.cache_seqlen = block_table.shape[1], k.shape[0], k.shape[1]
    _options(p, scale, causal, window_left, window_right, softcap, alibi, sinks, num_threads, dropout_p, seed)
    status = lib.flash_attention_forward_varlen(_byref(p))
    if status:
        check_status(lib, status)


def kvcache_forward(q, k_cache, v_cache, out, lse, cache_seqlens, cache_batch_idx=None, block_table=None,
                    k_new=None, v_new=None, scale=None, causal=False, window_left=-1, window_right=-1, softcap=0.0,
                    alibi=None, sinks=None, num_threads=0, rows=None, k_scale=None, v_scale=None):
    """flash_attention_forward_kvcache into the given out (and lse). cache_seqlens, cache_batch_idx and
    block_table are contiguous int32 tensors. `rows`, if given, is (cache_batch, cache_seqlen, k_batch_stride,
    v_batch_stride): a cache "row" then starts at any key row of the tensor (see _torch_masked's key ranges).
    k_scale, v_scale: the float32 row scales of an 8-bit cache, any strides (read in place, appends write them);
    k_new/v_new may then be of a float type, quantized by the library as it appends them."""
    lib, p = _new_params()
    _dense_tensors(p, q, k_cache, v_cache, out, lse)
    if rows is None:
        p.cache_batch, p.cache_seqlen = k_cache.shape[0], k_cache.shape[1]
    else:
        p.cache_batch, p.cache_seqlen, p.k_batch_stride, p.v_batch_stride = rows
    p.cache_seqlens = cache_seqlens.data_ptr()
    if cache_batch_idx is not None:
        p.cache_batch_idx = cache_batch_idx.data_ptr()
    if block_table is not None:
        p.block_table = block_table.data_ptr()
        p.block_table_batch_stride, p.max_blocks_per_seq = block_table.stride(0), block_table.shape[1]
    if k_new is not None:
        s = k_new.stride()
        p.k_new, p.k_new_batch_stride, p.k_new_row_stride, p.k_new_head_stride = k_new.data_ptr(), s[0], s[1], s[2]
        s = v_new.stride()
        p.v_new, p.v_new_batch_stride, p.v_new_row_stride, p.v_new_head_stride = v_new.data_ptr(), s[0], s[1], s[2]
        p.seqlen_new = k_new.shape[1]
        if k_new.dtype is not k_cache.dtype:
            p.kv_new_dtype = DTYPE_CODES[k_new.dtype]
    if k_scale is not None:
        _SCALES.pack_into(p, _AT_SCALES, k_scale.data_ptr(), *k_scale.stride(), v_scale.data_ptr(), *v_scale.stride())
    _options(p, scale, causal, window_left, window_right, softcap, alibi, sinks, num_threads)
    status = lib.flash_attention_forward_kvcache(_byref(p))
    if status:
        check_status(lib, status)


def backward(dout, q, k, v, out, lse, dq, dk, dv, dsinks=None, varlen=None, scale=None, causal=False,
             window_left=-1, window_right=-1, softcap=0.0, alibi=None, sinks=None, num_threads=0, dropout_p=0.0, seed=0,
             attn_mask=None):
    """flash_attention_backward into dq, dk, dv (and dsinks, float32 [heads_q], if not None). `varlen` is None
    (4-D dense tensors) or (cu_q, cu_k, max_q, max_k) with 3-D packed tensors. dropout_p and seed: the
    forward's."""
    lib, p = _new_params()
    if varlen is None:
        _dense_tensors(p, q, k, v, out, lse)
        names = (("dout", dout), ("dq", dq), ("dk", dk), ("dv", dv))
    else:
        _varlen_tensors(p, q, k, v, out, lse, *varlen)
        # 3-D tensors: the batch stride is ignored by the library; a zero keeps the field list uniform.
        names = (("dout", dout), ("dq", dq), ("dk", dk), ("dv", dv))
    if attn_mask is not None:
        _attn_mask(p, attn_mask)
    _options(p, scale, causal, window_left, window_right, softcap, alibi, sinks, num_threads, dropout_p, seed)
    b = _capi.BackwardParams.from_buffer_copy(_backward_template)
    b.forward = ctypes.pointer(p)
    for name, x in names:
        s = x.stride()
        if varlen is not None:
            s = (0,) + s
        setattr(b, name, x.data_ptr())
        setattr(b, name + "_batch_stride", s[0])
        setattr(b, name + "_row_stride", s[1])
        setattr(b, name + "_head_stride", s[2])
    if dsinks is not None:
        b.dsinks = dsinks.data_ptr()
    status = lib.flash_attention_backward(_byref(b))
    if status:
        check_status(lib, status)

"""FlashAttention for CPUs: exact tiled attention from a Swift C-ABI library, called through ctypes."""

from ._version import __version__
from .api import (
    FlashAttentionError,
    FlashAttentionMemoryError,
    FlashAttentionRuntimeError,
    FlashAttentionValueError,
    flash_attn_backward,
    flash_attn_func,
    flash_attn_func_with_backward,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_backward,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
    flash_attn_with_kvcache,
    library_info,
    merge_attention_states,
    quantize_kv,
)
from .reference import reference_attention, reference_attention_backward

__all__ = [
    "FlashAttentionError",
    "FlashAttentionMemoryError",
    "FlashAttentionRuntimeError",
    "FlashAttentionValueError",
    "flash_attn_backward",
    "flash_attn_func",
    "flash_attn_func_with_backward",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_backward",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_with_kvcache",
    "library_info",
    "merge_attention_states",
    "quantize_kv",
    "reference_attention",
    "reference_attention_backward",
]

"""FlashAttention for CPUs: exact tiled attention from a Swift C-ABI library, called through ctypes."""

from .api import flash_attn_func, library_info
from .reference import reference_attention

__all__ = ["flash_attn_func", "library_info", "reference_attention"]

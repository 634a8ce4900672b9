"""ctypes mirror of include/flash_attention.h, one declaration per C prototype (the C text is above each).

Nothing here checks arguments; `api.py` does that and turns status codes into exceptions.
"""

import ctypes
from ctypes import POINTER, c_char_p, c_float, c_int32, c_int64, c_size_t, c_uint64, c_void_p


# Constants of the header (kept equal by tests/test_abi.py, which parses the header).
FA_ABI_VERSION = 1
FA_OK = 0
FA_ERROR_NULL_POINTER = 1
FA_ERROR_INVALID_SHAPE = 2
FA_ERROR_INVALID_STRIDE = 3
FA_ERROR_INVALID_ARGUMENT = 4
FA_ERROR_UNSUPPORTED = 5
FA_ERROR_OUT_OF_MEMORY = 6
FA_ERROR_INTERNAL = 7
FA_ERROR_INVALID_INDEX = 8
FA_ALGORITHM_AUTO = 0
FA_ALGORITHM_REFERENCE = 1
FA_ALGORITHM_TILED = 2
FA_MAX_HEAD_DIM = 1024
FA_PARAMS_SIZE_V1 = 264
FA_PARAMS_SIZE_V2 = 488
FA_PARAMS_SIZE_V3 = 496
FA_PARAMS_SIZE_V4 = 568
FA_PARAMS_SIZE_V5 = 632
FA_DTYPE_FLOAT32 = 0
FA_DTYPE_FLOAT16 = 1
FA_DTYPE_BFLOAT16 = 2
FA_DTYPE_INT8 = 3
FA_DTYPE_FLOAT8_E4M3 = 4
FA_DTYPE_BOOL = 5
FA_ISA_AVX512 = "avx512"
FA_ISA_AVX2 = "avx2"
FA_ISA_PORTABLE = "portable"
FA_ISA_NEON = "neon"
FA_ISA_REFERENCE = "reference"
FA_ISA_AVX512BF16 = "avx512bf16"
FA_ISA_AMXBF16 = "amxbf16"
# Every kernel path, widest first (the header's FA_ISA_*; FA_ISA_NEON, FA_ISA_AVX512BF16 and FA_ISA_AMXBF16 are appended there).
KERNEL_ISAS = (FA_ISA_AMXBF16, FA_ISA_AVX512BF16, FA_ISA_AVX512, FA_ISA_AVX2, FA_ISA_NEON, FA_ISA_PORTABLE, FA_ISA_REFERENCE)


def _tensor_fields(name, strides):
    return [(name, c_void_p)] + [(f"{name}_{s}_stride", c_int64) for s in strides]


class Params(ctypes.Structure):
    """typedef struct flash_attention_params { ... } flash_attention_params;"""

    _fields_ = (
        [("struct_size", c_uint64)]
        + [(n, c_int64) for n in ("batch", "seqlen_q", "seqlen_k", "heads_q", "heads_kv", "head_dim")]
        + _tensor_fields("q", ("batch", "row", "head", "dim"))
        + _tensor_fields("k", ("batch", "row", "head", "dim"))
        + _tensor_fields("v", ("batch", "row", "head", "dim"))
        + _tensor_fields("out", ("batch", "row", "head", "dim"))
        + _tensor_fields("lse", ("batch", "head", "row"))
        + [("softmax_scale", c_float), ("causal", c_int32), ("num_threads", c_int32), ("algorithm", c_int32)]
        # Inference options (0.2).
        + [("window_left", c_int64), ("window_right", c_int64), ("alibi_slopes", c_void_p),
           ("alibi_batch_stride", c_int64), ("softcap", c_float), ("reserved0", c_int32), ("sinks", c_void_p)]
        # Variable-length batches (0.2).
        + [("cu_seqlens_q", c_void_p), ("cu_seqlens_k", c_void_p), ("max_seqlen_q", c_int64), ("max_seqlen_k", c_int64)]
        # KV cache (0.2).
        + [("cache_seqlens", c_void_p), ("cache_batch_idx", c_void_p), ("block_table", c_void_p),
           ("block_table_batch_stride", c_int64), ("max_blocks_per_seq", c_int64), ("cache_batch", c_int64),
           ("cache_seqlen", c_int64)]
        + _tensor_fields("k_new", ("batch", "row", "head", "dim"))
        + _tensor_fields("v_new", ("batch", "row", "head", "dim"))
        + [("seqlen_new", c_int64)]
        # Element types (0.3).
        + [("dtype", c_int32), ("kv_dtype", c_int32)]
        + [("kv_new_dtype", c_int32), ("reserved1", c_int32)]
        + _tensor_fields("k_scale", ("batch", "row", "head"))
        + _tensor_fields("v_scale", ("batch", "row", "head"))
        # Dropout (0.6).
        + [("dropout_p", c_float), ("reserved2", c_int32), ("dropout_seed", c_uint64)]
        # Attention mask (0.6).
        + [("attn_mask", c_void_p), ("attn_mask_dtype", c_int32), ("reserved3", c_int32)]
        + [(f"attn_mask_{axis}_stride", c_int64) for axis in ("batch", "head", "row", "col")]
        # Value head size (0.6).
        + [("head_dim_v", c_int64)]
    )


class BackwardParams(ctypes.Structure):
    """typedef struct flash_attention_backward_params { ... } flash_attention_backward_params;"""

    _fields_ = (
        [("struct_size", c_uint64), ("forward", POINTER(Params))]
        + _tensor_fields("dout", ("batch", "row", "head", "dim"))
        + _tensor_fields("dq", ("batch", "row", "head", "dim"))
        + _tensor_fields("dk", ("batch", "row", "head", "dim"))
        + _tensor_fields("dv", ("batch", "row", "head", "dim"))
        + [("dsinks", c_void_p)]
    )


def declare(lib):
    """Attaches argtypes/restype to every exported function of `lib`."""
    # int32_t flash_attention_version(void);
    lib.flash_attention_version.argtypes = []
    lib.flash_attention_version.restype = c_int32
    # const char *flash_attention_version_string(void);
    lib.flash_attention_version_string.argtypes = []
    lib.flash_attention_version_string.restype = c_char_p
    # int32_t flash_attention_abi_version(void);
    lib.flash_attention_abi_version.argtypes = []
    lib.flash_attention_abi_version.restype = c_int32
    # const char *flash_attention_status_string(flash_attention_status status);
    lib.flash_attention_status_string.argtypes = [c_int32]
    lib.flash_attention_status_string.restype = c_char_p
    # const char *flash_attention_last_error(void);
    lib.flash_attention_last_error.argtypes = []
    lib.flash_attention_last_error.restype = c_char_p
    # flash_attention_status flash_attention_params_init(flash_attention_params *params, size_t struct_size);
    lib.flash_attention_params_init.argtypes = [POINTER(Params), c_size_t]
    lib.flash_attention_params_init.restype = c_int32
    # flash_attention_status flash_attention_forward(const flash_attention_params *params);
    lib.flash_attention_forward.argtypes = [POINTER(Params)]
    lib.flash_attention_forward.restype = c_int32
    # flash_attention_status flash_attention_forward_varlen(const flash_attention_params *params);
    lib.flash_attention_forward_varlen.argtypes = [POINTER(Params)]
    lib.flash_attention_forward_varlen.restype = c_int32
    # flash_attention_status flash_attention_forward_kvcache(const flash_attention_params *params);
    lib.flash_attention_forward_kvcache.argtypes = [POINTER(Params)]
    lib.flash_attention_forward_kvcache.restype = c_int32
    # flash_attention_status flash_attention_merge(int64_t rows, int64_t head_dim,
    #     const float *out_a, int64_t out_a_row_stride, const float *lse_a, int64_t lse_a_stride,
    #     const float *out_b, int64_t out_b_row_stride, const float *lse_b, int64_t lse_b_stride,
    #     float *out, int64_t out_row_stride, float *lse, int64_t lse_stride);
    lib.flash_attention_merge.argtypes = [c_int64, c_int64] + [c_void_p, c_int64] * 6
    lib.flash_attention_merge.restype = c_int32
    # flash_attention_status flash_attention_backward_params_init(flash_attention_backward_params *params,
    #                                                            size_t struct_size);
    lib.flash_attention_backward_params_init.argtypes = [POINTER(BackwardParams), c_size_t]
    lib.flash_attention_backward_params_init.restype = c_int32
    # flash_attention_status flash_attention_backward(const flash_attention_backward_params *params);
    lib.flash_attention_backward.argtypes = [POINTER(BackwardParams)]
    lib.flash_attention_backward.restype = c_int32
    # const char *flash_attention_kernel_isa(void);
    lib.flash_attention_kernel_isa.argtypes = []
    lib.flash_attention_kernel_isa.restype = c_char_p

    # const char *flash_attention_available_isas(void);
    lib.flash_attention_available_isas.argtypes = []
    lib.flash_attention_available_isas.restype = c_char_p
    # int32_t flash_attention_default_num_threads(void);
    lib.flash_attention_default_num_threads.argtypes = []
    lib.flash_attention_default_num_threads.restype = c_int32
    return lib

/* Compiles the header on its own: as C99 and as C++17, with -Wall -Wextra -Werror (see the Makefile). It
 * also assigns every function to a pointer of the declared type, so a signature drift fails to compile. */
#include "flash_attention.h"

int main(void) {
    int32_t (*version)(void) = flash_attention_version;
    const char *(*version_string)(void) = flash_attention_version_string;
    int32_t (*abi)(void) = flash_attention_abi_version;
    const char *(*status_string)(flash_attention_status) = flash_attention_status_string;
    const char *(*last_error)(void) = flash_attention_last_error;
    flash_attention_status (*init)(flash_attention_params *, size_t) = flash_attention_params_init;
    flash_attention_status (*forward)(const flash_attention_params *) = flash_attention_forward;
    const char *(*isa)(void) = flash_attention_kernel_isa;
    const char *(*isas)(void) = flash_attention_available_isas;
    int32_t (*threads)(void) = flash_attention_default_num_threads;
    flash_attention_status (*varlen)(const flash_attention_params *) = flash_attention_forward_varlen;
    flash_attention_status (*kvcache)(const flash_attention_params *) = flash_attention_forward_kvcache;
    flash_attention_status (*merge)(int64_t, int64_t, const float *, int64_t, const float *, int64_t, const float *,
                                    int64_t, const float *, int64_t, float *, int64_t, float *, int64_t) =
        flash_attention_merge;
    /* Appended fields keep their offsets: a caller compiled against 0.1 (264 bytes) stays compatible. */
    typedef char v1_prefix_is_stable[offsetof(flash_attention_params, window_left) == FA_PARAMS_SIZE_V1 ? 1 : -1];
    (void)sizeof(v1_prefix_is_stable);
    typedef char v3_prefix_is_stable[offsetof(flash_attention_params, kv_new_dtype) == FA_PARAMS_SIZE_V3 ? 1 : -1];
    (void)sizeof(v3_prefix_is_stable);
    typedef char v4_prefix_is_stable[offsetof(flash_attention_params, dropout_p) == FA_PARAMS_SIZE_V4 ? 1 : -1];
    (void)sizeof(v4_prefix_is_stable);
    typedef char v5_prefix_is_stable[offsetof(flash_attention_params, head_dim_v) == FA_PARAMS_SIZE_V5 ? 1 : -1];
    (void)sizeof(v5_prefix_is_stable);
    return !(version && version_string && abi && status_string && last_error && init && forward && isa && isas &&
             threads && varlen && kvcache && merge);
}

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
    int32_t (*threads)(void) = flash_attention_default_num_threads;
    return !(version && version_string && abi && status_string && last_error && init && forward && isa && threads);
}

/* Internal C helpers of the Swift implementation (not API): what Swift cannot express directly. */
#ifndef FA_SHIMS_H
#define FA_SHIMS_H

#define FA_CPU_AVX2_FMA 1u     /* AVX2 and FMA instructions, with YMM state enabled by the OS */
#define FA_CPU_AVX512F 2u      /* AVX-512 Foundation, with ZMM state enabled by the OS */

/* Bit set of FA_CPU_* features this CPU and OS can run; 0 on non-x86 machines. Compiled without ISA
 * flags (cpu_features.c), so it runs on any CPU. */
unsigned fa_cpu_features(void);

/* Sets the function run when the library is finally unloaded (at process exit: the library is linked
 * -z nodelete, so dlclose never unmaps code that worker threads may be sleeping in). The pool uses it to
 * stop and join its workers, so that they never outlive the code they run. */
void fa_set_unload_hook(void (*hook)(void));

/* Asks for the cache line at p ahead of use. Static inline so that Swift inlines it into the kernels:
 * Swift has no prefetch of its own, and a load whose value is unused is optimised away. */
static inline void fa_prefetch(const void *p) { __builtin_prefetch(p, 0, 3); }

#endif

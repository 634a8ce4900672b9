#include "shims.h"

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

/* Asks Linux once for this process's permission to use the AMX tile data (ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA);
 * without it the first tile instruction faults. Elsewhere: no. */
static int amx_permitted(void) {
#if defined(__linux__) && defined(SYS_arch_prctl)
    return syscall(SYS_arch_prctl, 0x1023, 18) == 0;
#else
    return 0;
#endif
}

/* XCR0: which register states the OS saves on context switch. A CPU flag alone is not enough: without
 * OS support the first YMM/ZMM instruction faults. */
static unsigned long long read_xcr0(void) {
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((unsigned long long)hi << 32) | lo;
}

unsigned fa_cpu_features(void) {
    unsigned a, b, c, d, features = 0;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
    int fma = (c & bit_FMA) != 0, osxsave = (c & bit_OSXSAVE) != 0, avx = (c & bit_AVX) != 0;
    int f16c = (c & bit_F16C) != 0;
    if (!osxsave || !avx) return 0;
    unsigned long long xcr0 = read_xcr0();
    int ymm_state = (xcr0 & 0x6) == 0x6;            /* SSE + AVX state */
    int zmm_state = ymm_state && (xcr0 & 0xe0) == 0xe0; /* opmask + ZMM_Hi256 + Hi16_ZMM */
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
    if (ymm_state && fma && f16c && (b & bit_AVX2)) features |= FA_CPU_AVX2_FMA;
    unsigned avx512 = bit_AVX512F | bit_AVX512BW | bit_AVX512DQ | bit_AVX512VL;
    if (zmm_state && (features & FA_CPU_AVX2_FMA) && (b & avx512) == avx512) features |= FA_CPU_AVX512;
    /* AVX512_BF16 is bit 5 of EAX in leaf 7, sub-leaf 1. */
    if ((features & FA_CPU_AVX512) && __get_cpuid_count(7, 1, &a, &b, &c, &d) && (a & (1u << 5)))
        features |= FA_CPU_AVX512_BF16;
    /* AMX-BF16 (EDX bit 22) and AMX-TILE (bit 24) of leaf 7, with XTILECFG and XTILEDATA (bits 17, 18) in XCR0. */
#if defined(FA_AMX_EMULATION)
    if (features & FA_CPU_AVX512_BF16) features |= FA_CPU_AMX_BF16;
#else
    if ((features & FA_CPU_AVX512_BF16) && __get_cpuid_count(7, 0, &a, &b, &c, &d) && (d & (1u << 22)) &&
        (d & (1u << 24)) && (xcr0 & 0x60000) == 0x60000 && amx_permitted())
        features |= FA_CPU_AMX_BF16;
#endif
    /* The vendor string "AuthenticAMD" is EBX, EDX, ECX of leaf 0. */
    if ((features & FA_CPU_AVX512_BF16) && __get_cpuid(0, &a, &b, &c, &d) && b == 0x68747541u && d == 0x69746e65u &&
        c == 0x444d4163u)
        features |= FA_CPU_BF16_FULL_RATE;
    return features;
}
#else
unsigned fa_cpu_features(void) { return 0; }
#endif

#if defined(FA_AMX_EMULATION)
#include <string.h>

/* The emulated tiles of this thread: 16 rows of 64 bytes each (shims.h). */
static _Thread_local union { float f[16][16]; unsigned short h[16][32]; unsigned char b[16][64]; } tiles[8];

void fa_amx_emulated_zero(int tile) { memset(&tiles[tile], 0, sizeof tiles[tile]); }

void fa_amx_emulated_load(int tile, const void *p, long stride) {
    for (int r = 0; r < 16; r++) memcpy(tiles[tile].b[r], (const char *)p + r * stride, 64);
}

void fa_amx_emulated_store(int tile, void *p, long stride) {
    for (int r = 0; r < 16; r++) memcpy((char *)p + r * stride, tiles[tile].b[r], 64);
}

static float widen(unsigned short x) {
    unsigned bits = (unsigned)x << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

void fa_amx_emulated_dot(int c, int a, int b) {
    for (int m = 0; m < 16; m++)
        for (int k = 0; k < 16; k++)
            for (int n = 0; n < 16; n++) {
                tiles[c].f[m][n] += widen(tiles[a].h[m][2 * k]) * widen(tiles[b].h[k][2 * n]);
                tiles[c].f[m][n] += widen(tiles[a].h[m][2 * k + 1]) * widen(tiles[b].h[k][2 * n + 1]);
            }
}
#endif

static void (*unload_hook)(void);

void fa_set_unload_hook(void (*hook)(void)) { unload_hook = hook; }

__attribute__((destructor)) static void fa_unload(void) {
    if (unload_hook) unload_hook();
}

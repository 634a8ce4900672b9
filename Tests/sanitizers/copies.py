"""The kernel copies (module suffixes, comma-separated) the sanitizer builds compile, from the paths this CPU runs
(`flash-attention isas` on stdin): each one it runs, except avx512 where avx512bf16 runs too, since that copy is
the same source with the bfloat16 pair kernels added. Every copy compiles one source, so these cover it."""
import sys

SUFFIXES = {"amxbf16": "AVX512BF16AMX", "avx512bf16": "AVX512BF16", "avx512": "AVX512", "avx2": "AVX2", "neon": "NEON",
            "portable": "Portable"}
paths = sys.stdin.read().split()
chosen = [SUFFIXES[p] for p in paths if p in SUFFIXES and not (p == "avx512" and "avx512bf16" in paths)]
print(",".join(chosen or ["Portable"]))

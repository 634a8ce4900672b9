"""Why float16 q/k/v stay on the float32 products (issue 17's "measure and choose"): the error of the two ways to
use half-precision hardware for float16 inputs, against a float64 reference, beside a float16 SDPA's (products of
float16 inputs summed in float32, P rounded to float16, the output rounded to float16; FA2's rule allows 2× that).

- via bfloat16: q, k, v and P converted to bfloat16 for vdpbf16ps/AMX-BF16 products (3 mantissa bits lost);
- float16 sums: AVX512-FP16's FMAs (vfmadd...ph), whose sums are float16 themselves — it has no float16 dot
  product into float32 (AVX10.2's vdpphps and AMX-FP16 are on later CPUs).
The widened float32 path's error is the output rounding alone. Usage: python3 bench/float16_choice.py"""
import numpy as np
import ml_dtypes

rng = np.random.default_rng(0)


def attention(q, k, v, p_dtype=None):
    s = q @ k.T / np.sqrt(q.shape[1])
    p = np.exp(s - s.max(1, keepdims=True))
    total = p.sum(1, keepdims=True)
    if p_dtype is not None:
        p = p.astype(p_dtype).astype(np.float64)
    return p @ v / total


def float16_sums(q, k, v):
    """Both products with every partial sum rounded to float16, in order (AVX512-FP16 FMAs)."""
    s = np.zeros((q.shape[0], k.shape[0]), np.float16)
    for i in range(q.shape[1]):
        s = (s.astype(np.float32) + q[:, i:i + 1].astype(np.float32) * k[:, i].astype(np.float32)).astype(np.float16)
    s = s.astype(np.float64) / np.sqrt(q.shape[1])
    p = np.exp(s - s.max(1, keepdims=True))
    total = p.sum(1, keepdims=True)
    p16 = p.astype(np.float16)
    o = np.zeros((q.shape[0], v.shape[1]), np.float16)
    for j in range(k.shape[0]):
        o = (o.astype(np.float32) + p16[:, j:j + 1].astype(np.float32) * v[j].astype(np.float32)).astype(np.float16)
    return o.astype(np.float64) / total


def rounded(x):
    return x.astype(np.float16).astype(np.float64)


print("| (seqlen, head_dim) | float16 SDPA model | via bfloat16 | float16 sums (AVX512-FP16) | widened float32 |")
print("|---|---|---|---|---|")
for n, d in ((512, 64), (1024, 128)):
    q, k, v = (rng.standard_normal((n, d)).astype(np.float16) for _ in range(3))
    q64, k64, v64 = (x.astype(np.float64) for x in (q, k, v))
    ref = attention(q64, k64, v64)
    error = lambda out: np.abs(out - ref).max()
    sdpa = error(rounded(attention(q64, k64, v64, np.float16)))
    bf16 = tuple(x.astype(ml_dtypes.bfloat16).astype(np.float64) for x in (q64, k64, v64))
    via_bf16 = error(rounded(attention(*bf16, ml_dtypes.bfloat16)))
    sums = error(rounded(float16_sums(q, k, v)))
    print(f"| ({n}, {d}) | {sdpa:.2e} | {via_bf16:.2e} ({via_bf16 / sdpa:.0f}×) | {sums:.2e} ({sums / sdpa:.0f}×) "
          f"| {error(rounded(ref)):.2e} |")

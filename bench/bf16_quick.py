"""A quick look at bfloat16 prefill beside PyTorch's bfloat16 SDPA in one process, for machines with little time
(the device tool): best of 3 calls after a warm-up at 1 and 16 threads, the bf16 issue's shapes. The full,
interleaved comparison is `python3 bench/bench.py --sections bf16`. Needs torch, ml_dtypes and the binding."""
import sys, time, numpy as np, torch, ml_dtypes
from flash_attention import flash_attn_func
def best(f):
    f(); b = 1e9
    for _ in range(3):
        t = time.perf_counter(); f(); b = min(b, time.perf_counter() - t)
    return b
rng = np.random.default_rng(0)
for threads in (1, 16):
    torch.set_num_threads(threads)
    for shape in ((1, 16, 16, 2048, 128), (1, 32, 8, 2048, 128)):
        b, hq, hk, s, d = shape
        q = rng.standard_normal((b, s, hq, d), dtype=np.float32).astype(ml_dtypes.bfloat16)
        k = rng.standard_normal((b, s, hk, d), dtype=np.float32).astype(ml_dtypes.bfloat16)
        v = rng.standard_normal((b, s, hk, d), dtype=np.float32).astype(ml_dtypes.bfloat16)
        tq, tk, tv = (torch.from_numpy(x.view(np.uint16).astype(np.int32)).to(torch.int32) for x in (q, k, v))
        tq, tk, tv = ((x << 16).view(torch.float32).to(torch.bfloat16).transpose(1, 2).contiguous() for x in (tq, tk, tv))
        for causal in (False, True):
            flops = 4 * b * hq * s * s * d / (2 if causal else 1)
            ours = best(lambda: flash_attn_func(q, k, v, causal=causal, num_threads=threads))
            theirs = best(lambda: torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=causal, enable_gqa=hq != hk))
            print(f"{shape} causal={causal} {threads}T: flash {flops / ours / 1e9:.0f} GFLOP/s, torch bf16 {flops / theirs / 1e9:.0f}, ratio {theirs / ours:.2f}", flush=True)

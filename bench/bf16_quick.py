"""A quick look at bfloat16 attention beside PyTorch's bfloat16 SDPA in one process, for machines with little time
(the device tool): best of 3 calls after a warm-up, the bf16 issue's shapes. The full, interleaved comparison is
`python3 bench/bench.py --sections bf16`. Needs torch, ml_dtypes and the binding.

Usage: python3 bench/bf16_quick.py [--backward] [--threads 1,16] [--heads 16/16,32/8]
  --backward  times the gradients (flash_attn_backward against torch's autograd of its SDPA; the work counted as
              2.5× the forward's FLOPs, five products instead of two) instead of the forward.
"""
import argparse, time, numpy as np, torch, ml_dtypes
from flash_attention import flash_attn_backward, flash_attn_func


def best(f):
    f(); b = 1e9
    for _ in range(3):
        t = time.perf_counter(); f(); b = min(b, time.perf_counter() - t)
    return b


def to_torch(x):
    """A (b, s, h, d) bfloat16 array as a (b, h, s, d) torch.bfloat16 tensor (through float32, which is exact)."""
    return torch.from_numpy(np.ascontiguousarray(x.astype(np.float32).transpose(0, 2, 1, 3))).to(torch.bfloat16)


def calls(q, k, v, dout, causal, threads, backward):
    """The library's call and torch's for one cell."""
    gqa = q.shape[2] != k.shape[2]
    tq, tk, tv, tdout = (to_torch(x) for x in (q, k, v, dout))
    if not backward:
        return (lambda: flash_attn_func(q, k, v, causal=causal, num_threads=threads),
                lambda: torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=causal, enable_gqa=gqa))
    out, lse = flash_attn_func(q, k, v, causal=causal, return_lse=True, num_threads=threads)
    for t in (tq, tk, tv):
        t.requires_grad_(True)
    tout = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=causal, enable_gqa=gqa)
    return (lambda: flash_attn_backward(dout, q, k, v, out, lse, causal=causal, num_threads=threads),
            lambda: torch.autograd.grad(tout, (tq, tk, tv), tdout, retain_graph=True))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--backward", action="store_true")
    parser.add_argument("--threads", default="1,16")
    parser.add_argument("--heads", default="16/16,32/8", help="query/kv heads of the (1, h, 2048, 128) shapes")
    parser.add_argument("--seqlen", type=int, default=2048)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    for threads in map(int, args.threads.split(",")):
        torch.set_num_threads(threads)
        for heads in args.heads.split(","):
            hq, hk = map(int, heads.split("/"))
            b, s, d = 1, args.seqlen, 128
            q, dout = (rng.standard_normal((b, s, hq, d), dtype=np.float32).astype(ml_dtypes.bfloat16) for _ in range(2))
            k, v = (rng.standard_normal((b, s, hk, d), dtype=np.float32).astype(ml_dtypes.bfloat16) for _ in range(2))
            for causal in (False, True):
                flops = 4 * b * hq * s * s * d / (2 if causal else 1) * (2.5 if args.backward else 1)
                ours, theirs = (best(f) for f in calls(q, k, v, dout, causal, threads, args.backward))
                print(f"{'backward' if args.backward else 'forward'} {(b, hq, hk, s, d)} causal={causal} {threads}T: "
                      f"flash {flops / ours / 1e9:.0f} GFLOP/s, torch bf16 {flops / theirs / 1e9:.0f}, "
                      f"ratio {theirs / ours:.2f}", flush=True)


if __name__ == "__main__":
    main()

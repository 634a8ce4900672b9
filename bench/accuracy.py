#!/usr/bin/env python3
"""Forward accuracy: this library's float32 output beside PyTorch SDPA's, both against a float64 reference.

Usage: python3 bench/accuracy.py [--shapes small|bench] [--threads 1,2] [--isas avx512,avx2,portable]

Inputs are N(0, 1) float32 with fixed seeds (the bench's layout, [b, s, h, d]); the error of an output is
‖out − ref‖_F / ‖ref‖_F, ref being flash_attention.reference.reference_attention in float64 (computed one
head at a time to bound its memory). Each kernel path runs in a subprocess of its own, because
FLASH_ATTENTION_ISA is read once per process; PyTorch runs in the parent. Prints one table row per shape:
torch's error, then each path's error and its ratio to torch's, for each thread count.
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bindings" / "python"))

# (batch, heads_q, heads_kv, seqlen, head_dim, causal): the bench's prefill shapes that run in seconds.
SHAPES = {
    "bench": [
        (1, 8, 8, 1024, 64, False),
        (1, 16, 16, 2048, 128, False),
        (4, 32, 32, 512, 128, False),
        (1, 32, 8, 2048, 128, False),
        (1, 16, 16, 2048, 128, True),
    ],
    "small": [(1, 8, 8, 1024, 64, False), (1, 8, 8, 1024, 128, True)],
}


def inputs(shape, seed=0):
    """q, k, v as float32 N(0, 1) in [b, s, h, d], the same for every process."""
    b, hq, hk, s, d, _ = shape
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((b, s, hq, d), dtype=np.float32),
            rng.standard_normal((b, s, hk, d), dtype=np.float32),
            rng.standard_normal((b, s, hk, d), dtype=np.float32))


def reference(shape):
    """The float64 output, one query head at a time."""
    from flash_attention.reference import reference_attention

    q, k, v = inputs(shape)
    group = shape[1] // shape[2]
    out = np.empty(q.shape, np.float64)
    for h in range(shape[1]):
        kv = slice(h // group, h // group + 1)
        out[:, :, h:h + 1] = reference_attention(q[:, :, h:h + 1], k[:, :, kv], v[:, :, kv], causal=shape[5])
    return out


def relative_error(out, ref):
    return float(np.linalg.norm((out - ref).ravel()) / np.linalg.norm(ref.ravel()))


def library_outputs(shape, threads):
    """This library's outputs at each thread count (run in a worker: its kernel path is fixed)."""
    from flash_attention import flash_attn_func

    q, k, v = inputs(shape)
    return {t: flash_attn_func(q, k, v, causal=shape[5], num_threads=t) for t in threads}


def torch_output(shape, threads):
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    q, k, v = (torch.from_numpy(np.ascontiguousarray(x.transpose(0, 2, 1, 3))) for x in inputs(shape))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=shape[5], enable_gqa=shape[1] != shape[2])
    return out.numpy().transpose(0, 2, 1, 3)


def worker(args):
    """Prints {shape index: {threads: error}} for the kernel path FLASH_ATTENTION_ISA names."""
    from flash_attention import library_info

    result = {"isa": library_info()["kernel_isa"], "errors": {}}
    for i, shape in enumerate(SHAPES[args.shapes]):
        ref = reference(shape)
        result["errors"][i] = {t: relative_error(out, ref) for t, out in library_outputs(shape, args.threads).items()}
    print(json.dumps(result))


def run_path(isa, args):
    command = [sys.executable, __file__, "--worker", "--shapes", args.shapes,
               "--threads", ",".join(map(str, args.threads))]
    done = subprocess.run(command, env=dict(os.environ, FLASH_ATTENTION_ISA=isa), capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"kernel path {isa} failed:\n{done.stderr}")
    return json.loads(done.stdout)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="bench")
    parser.add_argument("--threads", type=lambda s: [int(t) for t in s.split(",")], default=[1, 2])
    parser.add_argument("--isas", type=lambda s: s.split(","), default=["avx512", "avx2", "portable"])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    from flash_attention import library_info

    isas = [isa for isa in args.isas if isa in library_info()["available_isas"]]
    paths = [run_path(isa, args) for isa in isas]
    print(f"relative error ‖out − ref‖_F / ‖ref‖_F vs float64; threads {args.threads}; ratio = library / torch")
    print(f"{'shape (b,hq,hk,s,d)':28} {'threads':>7} {'torch':>9} " + " ".join(f"{p['isa']:>17}" for p in paths))
    for i, shape in enumerate(SHAPES[args.shapes]):
        ref = reference(shape)
        for t in args.threads:
            theirs = relative_error(torch_output(shape, t), ref)
            cells = [p["errors"][str(i)][str(t)] for p in paths]
            name = f"{shape[:5]}{' causal' if shape[5] else ''}"
            print(f"{name:28} {t:>7} {theirs:9.3g} " + " ".join(f"{e:9.3g} ({e / theirs:4.2f}×)" for e in cells))


if __name__ == "__main__":
    main()

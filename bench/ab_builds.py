"""A/B of library builds on one machine: each round runs every build in a fresh process (the order alternating
from round to round), best of 3 calls per shape after a warm-up; prints each build's median time and the
median over rounds of each build's ratio to the first one, so that the host's noise falls on all builds alike.

Usage: python3 bench/ab_builds.py NAME=LIB.so,NAME=LIB.so[,...] ROUNDS CASE [THREADS]
CASE: causal, dense, masks (d 64 and 128), masks64 (d 64 only), bf16 (bfloat16 q/k/v, the bf16 issue's shapes),
backward (float32 gradients) or bf16backward (bfloat16 gradients, the bf16 issue's shapes); see CHILD below."""
import json, os, pathlib, subprocess, sys, statistics
LIBS = dict(a.split("=", 1) for a in sys.argv[1].split(","))
ROUNDS = int(sys.argv[2]); CASE = sys.argv[3]; THREADS = int(sys.argv[4]) if len(sys.argv) > 4 else 1
CHILD = r'''
import sys, time, json, numpy as np
sys.path.insert(0, sys.argv[3])
from flash_attention import flash_attn_backward, flash_attn_func
case, threads = sys.argv[1], int(sys.argv[2])
rng = np.random.default_rng(0)
out = {}
def run(name, shape, dtype=np.float32, backward=False, **kw):
    b, hq, hk, s, d = shape
    q = rng.standard_normal((b, s, hq, d), dtype=np.float32); k = rng.standard_normal((b, s, hk, d), dtype=np.float32)
    v = rng.standard_normal((b, s, hk, d), dtype=np.float32)
    q, k, v = (x.astype(dtype) for x in (q, k, v))
    f = lambda: flash_attn_func(q, k, v, num_threads=threads, **kw)
    if backward:
        dout = rng.standard_normal(q.shape, dtype=np.float32).astype(dtype)
        o, lse = flash_attn_func(q, k, v, num_threads=threads, return_lse=True, **kw)
        f = lambda: flash_attn_backward(dout, q, k, v, o, lse, num_threads=threads, **kw)
    f(); best = 1e9
    for _ in range(3):
        t = time.perf_counter(); f(); best = min(best, time.perf_counter() - t)
    out[name] = best * 1e3
if case == "causal":
    run("(4,32,32,512,128) causal", (4, 32, 32, 512, 128), causal=True)
    run("(1,8,8,4096,64) causal", (1, 8, 8, 4096, 64), causal=True)
    run("(1,16,16,2048,128) causal", (1, 16, 16, 2048, 128), causal=True)
    run("(1,8,8,1024,64)", (1, 8, 8, 1024, 64))
elif case == "dense":
    run("(1,8,8,1024,64)", (1, 8, 8, 1024, 64))
    run("(1,16,16,2048,128)", (1, 16, 16, 2048, 128))
    run("(4,32,32,512,128) causal", (4, 32, 32, 512, 128), causal=True)
    run("(1,8,8,2048,64) causal", (1, 8, 8, 2048, 64), causal=True)
elif case in ("masks", "masks64"):
    s = 2048
    keep = np.random.default_rng(1).random((s // 128, s // 128)) < 0.5
    sparse = np.kron(keep, np.ones((128, 128), bool))
    for d in ((64,) if case == "masks64" else (64, 128)):
        shape = (1, 8, 8, s, d)
        run(f"(1,8,{s},{d}) none", shape)
        run(f"(1,8,{s},{d}) all-attend", shape, attn_mask=np.ones((s, s), bool))
        run(f"(1,8,{s},{d}) block-sparse", shape, attn_mask=sparse)
        run(f"(1,8,{s},{d}) block-sparse f32", shape, attn_mask=np.where(sparse, 0, -np.inf).astype(np.float32))
        run(f"(1,8,{s},{d}) random 0.7", shape, attn_mask=np.random.default_rng(2).random((s, s)) < 0.7)
elif case == "bf16":
    import ml_dtypes
    for shape in ((1, 16, 16, 2048, 128), (1, 32, 8, 2048, 128)):
        for causal in (False, True):
            run(f"{shape} bf16" + (" causal" if causal else ""), shape, dtype=ml_dtypes.bfloat16, causal=causal)
elif case in ("backward", "bf16backward"):
    import ml_dtypes
    dtype = ml_dtypes.bfloat16 if case == "bf16backward" else np.float32
    shapes = ((1, 16, 16, 2048, 128), (1, 32, 8, 2048, 128)) if case == "bf16backward" else ((1, 8, 8, 1024, 128), (1, 8, 2, 777, 64))
    for shape in shapes:
        for causal in (False, True):
            run(f"{shape} {case}" + (" causal" if causal else ""), shape, dtype=dtype, backward=True, causal=causal)
print(json.dumps(out))
'''
res = {name: [] for name in LIBS}
for r in range(ROUNDS):
    order = list(LIBS) if r % 2 == 0 else list(LIBS)[::-1]
    for name in order:
        env = dict(os.environ, FLASH_ATTENTION_LIBRARY=LIBS[name])
        bindings = str(pathlib.Path(__file__).resolve().parent.parent / "bindings" / "python")
        out = subprocess.run([sys.executable, "-c", CHILD, CASE, str(THREADS), bindings], env=env, capture_output=True,
                             text=True)
        if out.returncode: print(out.stderr); sys.exit(1)
        res[name].append(json.loads(out.stdout))
names = list(LIBS); base = names[0]
for shape in res[base][0]:
    meds = {n: statistics.median(x[shape] for x in res[n]) for n in names}
    ratios = {n: statistics.median(res[n][i][shape] / res[base][i][shape] for i in range(ROUNDS)) for n in names[1:]}
    print(f"{shape:34s} " + "  ".join(f"{n} {meds[n]:8.2f}" for n in names) + "  " + "  ".join(f"{n}/{base} {ratios[n]:.3f}" for n in names[1:]))

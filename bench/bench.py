#!/usr/bin/env python3
"""Side-by-side benchmark: this library vs numpy's materialised attention vs PyTorch's CPU SDPA.

Usage: python3 bench/bench.py [--quick] [--threads 1,2] [--sections prefill,backward,...] [--out bench/out]
                              [--plot PATH | --no-plot]

Every measurement runs in its own subprocess with the BLAS/OpenMP thread count set in its environment:
idle OpenBLAS threads spin and would steal a core from whatever runs next in the same process. Each cell
is the median of several timed calls after a warm-up. FLOPs are 4·b·h·s_q·s_k·d, halved for causal when
s_q = s_k; a backward pass counts 2.5× its forward's (five products instead of two). "% FMA peak" is relative
to the FMA peak of the widest kernel path (bench/fma_peak.c: independent vector FMA chains on every thread),
measured in the same run at the same thread count; a numpy/OpenBLAS sgemm (2048³) is reported beside it.
The prefill section runs every kernel path this CPU has (FLASH_ATTENTION_ISA per worker): the widest beside
PyTorch round by round, the others (slower) on their own; the other sections run the widest path. Prints a table, and writes <out>/results.json, bench/RESULTS.md (the generated
part) and, when matplotlib is importable, bench/results.png (--plot PATH elsewhere, --no-plot not at all). While
it runs, a one-line `[i/n] section shape ...` progress indicator is drawn on stderr when stderr is a terminal.
"""

import argparse
import datetime
import json
import os
import pathlib
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bindings" / "python"))

# (batch, heads_q, heads_kv, seqlen, head_dim): the prefill shapes of the speed issue.
PREFILL = [
    (1, 8, 8, 1024, 64),
    (1, 8, 8, 4096, 64),
    (1, 16, 16, 2048, 128),
    (4, 32, 32, 512, 128),
    (1, 32, 8, 2048, 128),
]
# Long-context memory checks: (shape, causal).
LONG = [((1, 4, 4, 16384, 64), True), ((1, 1, 1, 65536, 64), True)]
# Sequence sweep for the plot: (1, 8, 8, s, 64).
SWEEP = [256, 512, 1024, 2048, 4096, 8192]
# Decoding: (batch, heads_q, heads_kv, cache length, head_dim), one query per sequence.
DECODE = [(8, 32, 8, 4096, 128), (1, 32, 8, 32768, 128)]
# Sliding window: (batch, heads, seqlen, head_dim, window) against full attention over `window` tokens.
WINDOW = (1, 8, 16384, 64, 512)
# Half precision: the prefill shape and decode shape compared across storage types.
HALF_PREFILL = (1, 16, 16, 2048, 128)
HALF_DECODE = (8, 32, 8, 4096, 128)
DTYPE_NAMES = {0: "float32", 1: "float16", 2: "bfloat16"}
# Quantized caches: the decode shapes with float32, float16, int8 and float8 (e4m3) caches.
CACHE_NAMES = {0: "float32", 1: "float16", 3: "int8", 4: "float8_e4m3"}
# Backward: the prefill shapes, causal and not.
BACKWARD = [(shape, causal) for shape in PREFILL for causal in (False, True)]
# bfloat16 prefill (issue 17): the d=128 shapes, bfloat16 q/k/v on each x86 AVX-512 path (AMX tiles on
# amxbf16, pairs on avx512bf16, widened to float32 on avx512) beside this library's float32 and PyTorch's SDPA in bfloat16 and float32.
BF16_PREFILL = [(1, 16, 16, 2048, 128), (4, 32, 32, 512, 128), (1, 32, 8, 2048, 128)]
BF16_PATHS = ("amxbf16", "avx512bf16", "avx512")
SECTIONS = ("prefill", "long", "sweep", "inference", "half", "quantized", "masks", "mla", "backward", "small", "bf16")
# Masks and dropout: (b, h, s, d) prefill shapes, and the variants timed against the unmasked call.
MASKED = [(1, 8, 2048, 64), (1, 8, 2048, 128)]
MASK_VARIANTS = {0: "no mask", 1: "all-attend mask", 2: "block-sparse mask", 3: "dropout 0.1"}
MASK_BLOCK = 128  # the block-sparse mask: 128 × 128 blocks, half of them hidden (fixed seed)
# Multi-head latent attention (DeepSeek-V2/V3), absorbed decoding: one query per step, (heads_q, cached tokens)
# against one kv head of 576 (512 latent + 64 rotary) whose first 512 columns are the values, float32 and
# bfloat16 caches; reported as cache bytes read per second (each cached row once) beside the copy bandwidth.
MLA_DECODE = [(16, 4096), (128, 4096), (16, 32768), (128, 32768)]
MLA_CACHES = {0: "float32", 2: "bfloat16"}
# Bytes copied to measure the copy bandwidth beside decoding.
COPY_BYTES = 256 << 20


def flops(shape, causal):
    b, hq, _, s, d = shape
    return 4.0 * b * hq * s * s * d / (2 if causal else 1)


# ---- worker side: one implementation, one thread count, one shape ---------------------------------------


def make_inputs(shape, layout, seed=0):
    import numpy as np

    b, hq, hk, s, d = shape
    rng = np.random.default_rng(seed)
    if layout == "bhsd":  # [b, h, s, d] memory (PyTorch's layout), seen as [b, s, h, d]
        q = rng.standard_normal((b, hq, s, d), dtype=np.float32).transpose(0, 2, 1, 3)
        k = rng.standard_normal((b, hk, s, d), dtype=np.float32).transpose(0, 2, 1, 3)
        v = rng.standard_normal((b, hk, s, d), dtype=np.float32).transpose(0, 2, 1, 3)
    else:
        q = rng.standard_normal((b, s, hq, d), dtype=np.float32)
        k = rng.standard_normal((b, s, hk, d), dtype=np.float32)
        v = rng.standard_normal((b, s, hk, d), dtype=np.float32)
    return q, k, v


def numpy_attention(q, k, v, causal):
    """Materialised float32 attention: scores [b, h, s, s], softmax, weighted sum (BLAS matmuls)."""
    import numpy as np

    b, s, hq, d = q.shape
    hk = k.shape[2]
    qh = q.transpose(0, 2, 1, 3)
    kh = np.repeat(k.transpose(0, 2, 1, 3), hq // hk, axis=1)
    vh = np.repeat(v.transpose(0, 2, 1, 3), hq // hk, axis=1)
    scores = np.matmul(qh, kh.transpose(0, 1, 3, 2)) * np.float32(1 / np.sqrt(d))
    if causal:
        scores += np.triu(np.full((s, s), -np.inf, np.float32), 1)
    scores -= scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)
    return np.matmul(scores, vh)


def storage_dtype(code):
    """numpy dtype of FA_DTYPE code 0 (float32), 1 (float16), 2 (bfloat16), 3 (int8) or 4 (float8 e4m3)."""
    import numpy as np

    if code in (2, 4):
        import ml_dtypes

        return ml_dtypes.bfloat16 if code == 2 else ml_dtypes.float8_e4m3fn
    return {0: np.float32, 1: np.float16, 3: np.int8}[code]


def prepare(impl, case, args, threads, layout):
    """Returns (callable, work) for one measurement; work is FLOPs (prefill, window) or bytes read (decode:
    the K and V caches; copy: the source)."""
    import numpy as np

    rng = np.random.default_rng(0)
    if case == "sgemm":
        a = rng.standard_normal((2048, 2048), dtype=np.float32)
        return (lambda: a @ a), 2.0 * 2048**3
    if case == "copy":  # `threads` numpy copies of equal parts, one per thread (numpy releases the GIL)
        import threading

        source = np.ones(args[0] // 4, np.float32)
        target = np.empty_like(source)
        parts = np.array_split(np.arange(source.size), threads)
        bounds = [(int(p[0]), int(p[-1]) + 1) for p in parts]

        def copy():
            workers = [threading.Thread(target=np.copyto, args=(target[lo:hi], source[lo:hi])) for lo, hi in bounds]
            for w in workers:
                w.start()
            for w in workers:
                w.join()

        return copy, source.nbytes
    if case == "decode":  # one query per sequence against a full cache of seqlen_k keys (float32 queries)
        b, hq, hk, sk, d, page, *dtype = args
        code = dtype[0] if dtype else 0
        cache_dtype = storage_dtype(code)
        q = rng.standard_normal((b, 1, hq, d), dtype=np.float32)
        k = rng.standard_normal((b, sk, hk, d), dtype=np.float32)
        v = rng.standard_normal((b, sk, hk, d), dtype=np.float32)
        if code >= 3:  # 8-bit cache: values and per-row scales, both read every step
            from flash_attention import flash_attn_with_kvcache, quantize_kv

            (k, k_scale), (v, v_scale) = quantize_kv(k, cache_dtype), quantize_kv(v, cache_dtype)
            return (lambda: flash_attn_with_kvcache(q, k, v, cache_seqlens=sk, k_scale=k_scale, v_scale=v_scale,
                                                    num_threads=threads)), k.nbytes + v.nbytes + 2 * k_scale.nbytes
        k, v = k.astype(cache_dtype), v.astype(cache_dtype)
        work = k.nbytes + v.nbytes
        if impl == "flash":
            from flash_attention import flash_attn_with_kvcache

            if page:  # the same keys, paged: blocks of `page` rows in shuffled order
                blocks = b * sk // page
                order = rng.permutation(blocks)
                kp = np.empty((blocks, page, hk, d), np.float32)
                vp = np.empty_like(kp)
                kp[order] = k.reshape(blocks, page, hk, d)
                vp[order] = v.reshape(blocks, page, hk, d)
                table = order.reshape(b, sk // page).astype(np.int32)
                return (lambda: flash_attn_with_kvcache(q, kp, vp, cache_seqlens=sk, block_table=table,
                                                        num_threads=threads)), work
            return (lambda: flash_attn_with_kvcache(q, k, v, cache_seqlens=sk, num_threads=threads)), work
        if impl == "torch":
            import torch
            import torch.nn.functional as F

            torch.set_num_threads(threads)
            tq, tk, tv = (torch.from_numpy(np.ascontiguousarray(x.transpose(0, 2, 1, 3))) for x in (q, k, v))
            return (lambda: F.scaled_dot_product_attention(tq, tk, tv, enable_gqa=hq != hk)), work
        return (lambda: numpy_attention(q, k, v, False)), work
    if case == "mla":  # (heads_q, cached tokens, cache dtype code): v is a view of k's first 512 columns
        heads_q, cached, code = args
        from flash_attention import flash_attn_with_kvcache

        cache = rng.standard_normal((1, cached, 1, 576), dtype=np.float32).astype(storage_dtype(code))
        q = rng.standard_normal((1, 1, heads_q, 576), dtype=np.float32)
        return (lambda: flash_attn_with_kvcache(q, cache, cache[..., :512], cache_seqlens=cached,
                                                num_threads=threads)), cache.nbytes
    if case == "masked":  # (b, h, s, d, variant): MASK_VARIANTS; torch gets the block-sparse mask
        b, h, s, d, variant = args
        q, k, v = make_inputs((b, h, h, s, d), layout)
        keep = np.random.default_rng(1).random((s // MASK_BLOCK, s // MASK_BLOCK)) < 0.5
        sparse = np.kron(keep, np.ones((MASK_BLOCK, MASK_BLOCK), bool))
        work = flops((b, h, h, s, d), False)
        if impl == "torch":
            import torch
            import torch.nn.functional as F

            torch.set_num_threads(threads)
            tq, tk, tv = (torch.from_numpy(np.ascontiguousarray(x.transpose(0, 2, 1, 3))) for x in (q, k, v))
            mask = torch.from_numpy(sparse)
            return (lambda: F.scaled_dot_product_attention(tq, tk, tv, attn_mask=mask)), work
        from flash_attention import flash_attn_func

        options = [{}, {"attn_mask": np.ones((s, s), bool)}, {"attn_mask": sparse}, {"dropout_p": 0.1, "seed": 1}]
        return (lambda: flash_attn_func(q, k, v, num_threads=threads, **options[variant])), work
    if case == "window":  # causal sliding window of `left` keys
        b, h, s, d, left = args
        q, k, v = make_inputs((b, h, h, s, d), layout)
        from flash_attention import flash_attn_func

        return (lambda: flash_attn_func(q, k, v, causal=True, window_size=(left, 0), num_threads=threads)), 0.0
    if case == "backward":  # gradients of the prefill shapes; work counted as 2.5× the forward's FLOPs
        shape, causal = tuple(args[:5]), bool(args[5])
        q, k, v = make_inputs(shape, layout)
        dout = make_inputs(shape, layout, seed=1)[0]
        work = 2.5 * flops(shape, causal)
        if impl == "flash":
            from flash_attention import flash_attn_backward, flash_attn_func

            out, lse = flash_attn_func(q, k, v, causal=causal, return_lse=True, num_threads=threads)
            return (lambda: flash_attn_backward(dout, q, k, v, out, lse, causal=causal, num_threads=threads)), work
        if impl == "torch":
            import torch
            import torch.nn.functional as F

            torch.set_num_threads(threads)
            tq, tk, tv = (torch.from_numpy(np.ascontiguousarray(x.transpose(0, 2, 1, 3))).requires_grad_()
                          for x in (q, k, v))
            tdout = torch.from_numpy(np.ascontiguousarray(dout.transpose(0, 2, 1, 3)))
            out = F.scaled_dot_product_attention(tq, tk, tv, is_causal=causal, enable_gqa=shape[1] != shape[2])
            return (lambda: torch.autograd.grad(out, (tq, tk, tv), tdout, retain_graph=True)), work
        raise SystemExit(f"no backward for {impl}")
    shape, causal = tuple(args[:5]), bool(args[5])  # prefill (args[6]: storage dtype code, default float32)
    q, k, v = (x.astype(storage_dtype(args[6])) if len(args) > 6 else x for x in make_inputs(shape, layout))
    work = flops(shape, causal)
    if impl == "flash":
        from flash_attention import flash_attn_func

        return (lambda: flash_attn_func(q, k, v, causal=causal, num_threads=threads)), work
    if impl == "numpy":
        return (lambda: numpy_attention(q, k, v, causal)), work
    if impl == "torch":
        import torch
        import torch.nn.functional as F

        torch.set_num_threads(threads)
        hq, hk = shape[1], shape[2]
        # bfloat16 (ml_dtypes) arrays reach torch through float32 (exact), then become torch.bfloat16.
        half = len(args) > 6 and args[6] == 2
        tq, tk, tv = (torch.from_numpy(np.ascontiguousarray(x.astype(np.float32) if half else x).transpose(0, 2, 1, 3))
                      for x in (q, k, v))
        if half:
            tq, tk, tv = (x.contiguous().to(torch.bfloat16) for x in (tq, tk, tv))
        kw = {"is_causal": causal, "enable_gqa": hq != hk}
        return (lambda: F.scaled_dot_product_attention(tq, tk, tv, **kw)), work
    raise SystemExit(f"unknown implementation {impl}")


def serve(impl, threads, layout):
    """Worker loop: reads JSON requests {case, args, reps}, answers each with a JSON line of timings. The
    last case's inputs are kept, so interleaved requests for one cell pay their set-up once."""
    cache = {}
    for line in sys.stdin:
        request = json.loads(line)
        key = (request["case"], tuple(request["args"]))
        if key not in cache:
            cache.clear()
            run, work = prepare(impl, request["case"], request["args"], threads, layout)
            rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            run()  # warm-up (and pool / page-fault start-up)
            cache[key] = (run, work, rss_before)
        run, work, rss_before = cache[key]
        run()  # this request's own warm-up: another process may have just evicted our data from the caches
        times = []
        for _ in range(request["reps"]):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({"times": times, "flops": work, "rss_before_kib": rss_before, "rss_after_kib": rss_after}),
              flush=True)


def small_call_python(reps=20000):
    """Median microseconds of a (1, 1, 1, 1, 64) call through Python."""
    import numpy as np
    from flash_attention import flash_attn_func

    q = np.ones((1, 1, 1, 64), np.float32)
    for _ in range(100):
        flash_attn_func(q, q, q)
    samples = []
    for _ in range(20):
        start = time.perf_counter()
        for _ in range(reps // 20):
            flash_attn_func(q, q, q)
        samples.append((time.perf_counter() - start) / (reps // 20) * 1e6)
    return statistics.median(samples)


# ---- driver side ------------------------------------------------------------------------------------------


class Worker:
    """A persistent measuring subprocess for one implementation at one thread count, with the BLAS/OpenMP
    thread count set in its environment (idle OpenBLAS threads spin and would steal a core from anything
    else run in the same process)."""

    def __init__(self, impl, threads, layout="bshd", isa=None):
        env = dict(os.environ)
        for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(threads)
        if isa:
            env["FLASH_ATTENTION_ISA"] = isa
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--serve", "--impl", impl, "--threads", str(threads), "--layout", layout],
            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def request(self, case, args, reps):
        self.process.stdin.write(json.dumps({"case": case, "args": list(args), "reps": reps}) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError("benchmark worker died")
        return json.loads(line)

    def close(self):
        self.process.stdin.close()
        self.process.wait()


def summarize(data):
    data["median_s"] = statistics.median(data["times"])
    data["gflops"] = data["flops"] / data["median_s"] / 1e9
    return data


def measure_interleaved(workers, case, args, rounds, reps_per_round):
    """Alternates the workers round by round, so that the host's noise falls on all of them alike; returns
    each worker's pooled timings. Each round starts with an untimed call (warm caches, woken threads).
    `workers` maps a name to a worker, or to (worker, case, args) for a case of its own."""
    pooled = {name: None for name in workers}
    for _ in range(rounds):
        for name, entry in workers.items():
            worker, own_case, own_args = entry if isinstance(entry, tuple) else (entry, case, args)
            r = worker.request(own_case, own_args, reps_per_round)
            if pooled[name] is None:
                pooled[name] = r
            else:
                pooled[name]["times"] += r["times"]
                pooled[name]["rss_after_kib"] = r["rss_after_kib"]
    return {name: summarize(r) for name, r in pooled.items()}


def measure(impl, threads, case, args, reps=5, layout="bshd", isa=None):
    """One implementation alone, in a fresh worker (fresh memory high-water mark)."""
    worker = Worker(impl, threads, layout, isa)
    try:
        return summarize(worker.request(case, args, reps))
    finally:
        worker.close()


def bf16_prefill(results, thread_counts, reps, progress, layout, have_torch, paths):
    """bfloat16 prefill: this library's float32 (default path) and bfloat16 on each AVX-512 path it has, PyTorch's
    SDPA in bfloat16 and float32, alternating round by round in persistent workers."""
    results.setdefault("bf16", [])
    bf16_paths = [isa for isa in BF16_PATHS if isa in paths]
    for t in thread_counts:
        workers = {"flash_f32": (Worker("flash", t, layout), 0)}
        workers.update({f"flash_bf16_{isa}": (Worker("flash", t, layout, isa), 2) for isa in bf16_paths})
        if have_torch:
            workers.update({"torch_bf16": (Worker("torch", t), 2), "torch_f32": (Worker("torch", t), 0)})
        for shape in BF16_PREFILL:
            for causal in (False, True):
                progress.advance("bf16", f"{shape} {'causal' if causal else 'non-causal'} {t}T: {', '.join(workers)}")
                cell = [*shape, int(causal)]
                entries = {name: (w, "prefill", cell + [code]) for name, (w, code) in workers.items()}
                measured = measure_interleaved(entries, None, None, rounds=3, reps_per_round=max(1, reps // 3))
                row = {"shape": shape, "causal": causal, "threads": t}
                for name, r in measured.items():
                    row[name] = r["gflops"]
                results["bf16"].append(row)
        for worker, _ in workers.values():
            worker.close()


def torch_available():
    return subprocess.run([sys.executable, "-c", "import torch"], capture_output=True).returncode == 0


def cpu_model():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return re.search(r"Model name:\s*(.+)", out).group(1).strip()
    except Exception:  # noqa: BLE001
        return platform.processor() or "unknown"


def kernel_paths():
    """The tiled kernel paths this CPU can run, widest first (the library's own list, without "reference")."""
    sys.path.insert(0, str(ROOT / "bindings" / "python"))
    from flash_attention import library_info

    return [isa for isa in library_info()["available_isas"] if isa != "reference"]


def fma_peak(isa, threads):
    """GFLOP/s of bench/fma_peak.c for one kernel path and thread count (built here, or the program named by
    $FLASH_ATTENTION_FMA_PEAK on a machine without a C compiler), or None."""
    exe = pathlib.Path(os.environ.get("FLASH_ATTENTION_FMA_PEAK", ROOT / ".build" / "bench-fma-peak"))
    if not exe.exists():
        build = ["cc", "-O2", str(ROOT / "bench" / "fma_peak.c"), "-lpthread", "-o", str(exe)]
        if subprocess.run(build, capture_output=True).returncode != 0:
            return None
    out = subprocess.run([str(exe), isa, str(threads)], capture_output=True, text=True).stdout
    return float(out) if out.strip() else None


def small_call_c():
    """Median nanoseconds of a (1, 1, 1, 1, 64) call from C (bench/small_call.c, built here)."""
    exe = ROOT / ".build" / "bench-small-call"
    lib = ROOT / ".build" / "release"
    build = ["cc", "-O2", f"-I{ROOT / 'include'}", str(ROOT / "bench" / "small_call.c"), f"-L{lib}",
             "-lFlashAttention", f"-Wl,-rpath,{lib}", "-o", str(exe)]
    if subprocess.run(build, capture_output=True).returncode != 0:
        return None
    out = subprocess.run([str(exe)], capture_output=True, text=True).stdout
    return float(out.split()[0]) if out else None


class Progress:
    """The one-line `[i/n] section shape ...` indicator on stderr, one step per measured cell. Drawn only when
    stderr is a terminal, so that logs and pipes receive the report alone; cut to the terminal's width, since a
    wrapped line cannot be redrawn in place with `\\r`."""

    def __init__(self, total):
        self.total, self.step, self.drawn = total, 0, 0
        self.enabled = sys.stderr.isatty()

    def advance(self, section, text):
        self.step += 1
        if not self.enabled:
            return
        line = f"[{self.step}/{self.total}] {section} {text} ..."[:shutil.get_terminal_size().columns - 1]
        sys.stderr.write("\r" + line.ljust(self.drawn))
        sys.stderr.flush()
        self.drawn = len(line)

    def clear(self):
        if self.drawn:
            sys.stderr.write("\r" + " " * self.drawn + "\r")
            sys.stderr.flush()
            self.drawn = 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--impl", help=argparse.SUPPRESS)
    parser.add_argument("--layout", default="bhsd", help="memory given to this library: bhsd (the same [b, h, s, d] memory PyTorch gets, seen as [b, s, h, d]) or bshd")
    parser.add_argument("--threads", default="1,2", help="thread counts to run (comma-separated)")
    parser.add_argument("--quick", action="store_true", help="prefill shapes only, fewer repetitions")
    parser.add_argument("--paths", help="comma-separated kernel paths for the prefill table (default: every one this"
                        " CPU runs, widest first)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated: " + ", ".join(SECTIONS))
    parser.add_argument("--out", default=str(ROOT / "bench" / "out"))
    parser.add_argument("--plot", default=str(ROOT / "bench" / "results.png"), metavar="PATH",
                        help="where the PNG goes when matplotlib is importable (default: bench/results.png)")
    parser.add_argument("--no-plot", dest="plot", action="store_const", const=None, help="write no PNG")
    args = parser.parse_args()
    if args.serve:
        return serve(args.impl, int(args.threads), args.layout)

    thread_counts = [int(t) for t in args.threads.split(",")]
    reps = 3 if args.quick else 7
    sections = {"prefill"} if args.quick else set(args.sections.split(","))
    have_torch = torch_available()
    impls = ["flash", "numpy"] + (["torch"] if have_torch else [])
    cells = [(shape, causal, t) for shape in PREFILL for causal in (False, True) for t in thread_counts]
    if "prefill" not in sections:
        cells = []
    progress = Progress(len(thread_counts) + len(cells) + len(LONG) * ("long" in sections)
                        + len(SWEEP) * 2 * ("sweep" in sections) + 2 * ("small" in sections)
                        + len(thread_counts) * (len(DECODE) + 2) * ("inference" in sections)
                        + len(thread_counts) * 2 * ("half" in sections)
                        + len(thread_counts) * (len(DECODE) + 1) * ("quantized" in sections)
                        + len(thread_counts) * len(MASKED) * ("masks" in sections)
                        + len(thread_counts) * (len(MLA_DECODE) + 1) * ("mla" in sections)
                        + len(thread_counts) * len(BACKWARD) * ("backward" in sections)
                        + len(thread_counts) * len(BF16_PREFILL) * 2 * ("bf16" in sections))
    paths = kernel_paths()
    if args.paths:
        unknown = set(args.paths.split(",")) - set(paths)
        if unknown:
            raise SystemExit(f"--paths: {', '.join(sorted(unknown))} not available here (available: {', '.join(paths)})")
        paths = args.paths.split(",")
    results = {"date": datetime.date.today().isoformat(), "cpu": cpu_model(), "threads": thread_counts,
               "layout": args.layout, "torch": have_torch, "command": " ".join(["python3", "bench/bench.py"] + sys.argv[1:]),
               "paths": paths, "fma_peak": {isa: {} for isa in paths}, "peak": {}, "prefill": [], "long": [],
               "sweep": [], "small_call": {}, "decode": [], "window": [], "half": [], "quantized": [],
               "masks": [], "mla": [], "backward": [], "bf16": []}
    if have_torch:
        import importlib.metadata

        results["torch_version"] = importlib.metadata.version("torch")
    print(f"CPU: {results['cpu']}; torch: {'yes ' + results.get('torch_version', '') if have_torch else 'not importable'};"
          f" kernel paths: {', '.join(paths)}")
    for t in thread_counts:
        progress.advance("peak", f"FMA peak of {', '.join(paths)} and sgemm 2048³ {t}T")
        for isa in paths:
            results["fma_peak"][isa][t] = fma_peak(isa, t)
        results["peak"][t] = measure("numpy", t, "sgemm", [], reps=reps)["gflops"]

    for t in thread_counts:
        # The widest path and torch alternate round by round; the narrower paths and numpy (slow, and its idle
        # BLAS threads spin) run alone, with fewer repetitions.
        paired = {"flash": Worker("flash", t, args.layout, paths[0])}
        if have_torch:
            paired["torch"] = Worker("torch", t)
        for shape, causal, threads in [c for c in cells if c[2] == t]:
            progress.advance("prefill", f"{shape} {'causal' if causal else 'non-causal'} {t}T: {', '.join(impls + paths[1:])}")
            row = {"shape": shape, "causal": causal, "threads": t}
            cell = [*shape, int(causal)]
            measured = measure_interleaved(paired, "prefill", cell, rounds=3, reps_per_round=max(1, reps // 3))
            for isa in paths[1:]:
                measured["flash_" + isa] = measure("flash", t, "prefill", cell, reps=2 if isa == "portable" else 3,
                                                   layout=args.layout, isa=isa)
            measured["numpy"] = measure("numpy", t, "prefill", cell, reps=max(2, reps // 2))
            for impl, r in measured.items():
                row[impl] = r["gflops"]
                row[impl + "_ms"] = r["median_s"] * 1e3
            results["prefill"].append(row)
        for worker in paired.values():
            worker.close()

    if "long" in sections:
        for shape, causal in LONG:
            progress.advance("long", f"{shape} {'causal' if causal else 'non-causal'} {thread_counts[-1]}T")
            r = measure("flash", thread_counts[-1], "prefill", [*shape, int(causal)], reps=1)
            b, hq, hk, s, d = shape
            tensors_mib = 4 * (2 * b * s * hq * d + 2 * b * s * hk * d) / 2**20
            results["long"].append({"shape": shape, "causal": causal, "gflops": r.get("gflops"),
                                    "tensors_mib": tensors_mib,
                                    "extra_mib": (r["rss_after_kib"] - r["rss_before_kib"]) / 1024})
    if "sweep" in sections:
        for s in SWEEP:
            shape = (1, 8, 8, s, 64)
            entry = {"seqlen": s}
            for impl in ("flash", "numpy"):
                progress.advance("sweep", f"{shape} {impl} {thread_counts[-1]}T")
                r = measure(impl, thread_counts[-1], "prefill", [*shape, 0], reps=3)
                entry[impl] = r.get("gflops")
                entry[impl + "_peak_rss_mib"] = r["rss_after_kib"] / 1024
            results["sweep"].append(entry)
    if "inference" in sections:
        for t in thread_counts:
            progress.advance("inference", f"copy bandwidth {t}T")
            copy = measure("numpy", t, "copy", [COPY_BYTES], reps=reps)
            for shape in DECODE:
                progress.advance("inference", f"decode {shape} {t}T: flash, flash paged-16, torch, numpy")
                workers = {"flash": (Worker("flash", t), "decode", [*shape, 0]),
                           "paged": (Worker("flash", t), "decode", [*shape, 16])}
                if have_torch:
                    workers["torch"] = (Worker("torch", t), "decode", [*shape, 0])
                measured = measure_interleaved(workers, None, None, rounds=3, reps_per_round=max(1, reps // 3))
                for entry in workers.values():
                    entry[0].close()
                measured["numpy"] = measure("numpy", t, "decode", [*shape, 0], reps=3)
                row = {"shape": shape, "threads": t, "copy_gbps": copy["gflops"]}  # "gflops" = work/s/1e9
                for name, r in measured.items():
                    row[name + "_gbps"], row[name + "_ms"] = r["gflops"], r["median_s"] * 1e3
                results["decode"].append(row)
            b, h, s, d, window = WINDOW
            progress.advance("inference", f"sliding window {window} over {(b, h, h, s, d)} vs full {window}-token, {t}T")
            worker = Worker("flash", t, args.layout)
            measured = measure_interleaved(
                {"window": (worker, "window", [b, h, s, d, window]),
                 "full": (worker, "prefill", [b, h, h, window, d, 0])}, None, None, rounds=3, reps_per_round=max(1, reps // 3))
            worker.close()
            linear = measured["full"]["median_s"] * s / window
            results["window"].append({"threads": t, "window_ms": measured["window"]["median_s"] * 1e3,
                                      "linear_ms": linear * 1e3, "ratio": measured["window"]["median_s"] / linear})
    if "half" in sections:
        for t in thread_counts:
            for kind, case, base in (("prefill", "prefill", [*HALF_PREFILL, 0]), ("decode", "decode", [*HALF_DECODE, 0])):
                progress.advance("half", f"{kind} {HALF_PREFILL if kind == 'prefill' else HALF_DECODE} {t}T:"
                                 " float32, float16, bfloat16")
                workers = {code: (Worker("flash", t, args.layout), case, base + [code]) for code in DTYPE_NAMES}
                measured = measure_interleaved(workers, None, None, rounds=3, reps_per_round=max(1, reps // 3))
                for entry in workers.values():
                    entry[0].close()
                row = {"kind": kind, "threads": t}
                for code, r in measured.items():
                    row[DTYPE_NAMES[code] + "_ms"] = r["median_s"] * 1e3
                results["half"].append(row)
    if "quantized" in sections:
        quantized_decode(results, thread_counts, reps, progress)
    if "masks" in sections:
        masked_prefill(results, thread_counts, reps, progress, args.layout, have_torch)
    if "mla" in sections:
        mla_decode(results, thread_counts, reps, progress)
    if "backward" in sections:
        for t in thread_counts:
            # The forward, the backward and torch's backward alternate round by round, each in its own worker.
            workers = {"forward": Worker("flash", t, args.layout), "backward": Worker("flash", t, args.layout)}
            if have_torch:
                workers["torch"] = Worker("torch", t)
            for shape, causal in BACKWARD:
                progress.advance("backward", f"{shape} {'causal' if causal else 'non-causal'} {t}T: flash forward,"
                                 " flash backward" + (", torch backward" if have_torch else ""))
                cell = [*shape, int(causal)]
                entries = {name: (w, "prefill" if name == "forward" else "backward", cell) for name, w in workers.items()}
                measured = measure_interleaved(entries, None, None, rounds=3, reps_per_round=max(1, reps // 3))
                row = {"shape": shape, "causal": causal, "threads": t}
                for name, r in measured.items():
                    row[name + "_ms"] = r["median_s"] * 1e3
                results["backward"].append(row)
            for worker in workers.values():
                worker.close()
    if "bf16" in sections:
        bf16_prefill(results, thread_counts, reps, progress, args.layout, have_torch, paths)
    if "small" in sections:
        progress.advance("small", "(1, 1, 1, 1, 64) from C")
        results["small_call"]["c_us"] = (small_call_c() or float("nan")) / 1000
        progress.advance("small", "(1, 1, 1, 1, 64) through Python")
        env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
        out = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT / 'bench')!r}); "
                              "import bench; print(bench.small_call_python())"], env=env, capture_output=True, text=True)
        results["small_call"]["python_us"] = float(out.stdout.strip() or "nan")

    progress.clear()
    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    report = render(results)
    print("\n" + report)
    if not args.quick and sections == set(SECTIONS):
        write_results_md(report)
    if args.plot:
        plot(results, pathlib.Path(args.plot))


def quantized_decode(results, thread_counts, reps, progress):
    """Decoding against float32, float16, int8 and float8 caches of the same keys, interleaved, beside the copy
    bandwidth of the same run; GB/s counts the bytes a step reads (values, and the 8-bit caches' row scales)."""
    for t in thread_counts:
        progress.advance("quantized", f"copy bandwidth {t}T")
        copy = measure("numpy", t, "copy", [COPY_BYTES], reps=reps)
        for shape in DECODE:
            progress.advance("quantized", f"decode {shape} {t}T: " + ", ".join(CACHE_NAMES.values()))
            workers = {code: (Worker("flash", t), "decode", [*shape, 0, code]) for code in CACHE_NAMES}
            measured = measure_interleaved(workers, None, None, rounds=3, reps_per_round=max(1, reps // 3))
            for entry in workers.values():
                entry[0].close()
            row = {"shape": shape, "threads": t, "copy_gbps": copy["gflops"]}
            for code, r in measured.items():
                row[CACHE_NAMES[code] + "_ms"], row[CACHE_NAMES[code] + "_gbps"] = r["median_s"] * 1e3, r["gflops"]
            results["quantized"].append(row)


def mla_decode(results, thread_counts, reps, progress):
    """MLA's absorbed decoding step (MLA_DECODE) with a float32 and a bfloat16 cache, interleaved, beside the copy
    bandwidth of the same run."""
    for t in thread_counts:
        progress.advance("mla", f"copy bandwidth {t}T")
        copy = measure("numpy", t, "copy", [COPY_BYTES], reps=reps)
        for heads_q, cached in MLA_DECODE:
            progress.advance("mla", f"decode {heads_q} heads, {cached} tokens {t}T: " + ", ".join(MLA_CACHES.values()))
            workers = {code: (Worker("flash", t), "mla", [heads_q, cached, code]) for code in MLA_CACHES}
            measured = measure_interleaved(workers, None, None, rounds=3, reps_per_round=max(1, reps // 3))
            for entry in workers.values():
                entry[0].close()
            row = {"heads_q": heads_q, "cached": cached, "threads": t, "copy_gbps": copy["gflops"]}
            for code, r in measured.items():
                row[MLA_CACHES[code] + "_ms"], row[MLA_CACHES[code] + "_gbps"] = r["median_s"] * 1e3, r["gflops"]
            results["mla"].append(row)


def masked_prefill(results, thread_counts, reps, progress, layout, have_torch):
    """The same prefill without a mask, with an all-attend mask, with a block-sparse mask (half of its 128 × 128
    blocks hidden) and with dropout, interleaved; torch's SDPA with the block-sparse mask beside them."""
    for t in thread_counts:
        for shape in MASKED:
            progress.advance("masks", f"{shape} {t}T: " + ", ".join(MASK_VARIANTS.values()))
            workers = {name: (Worker("flash", t, layout), "masked", [*shape, code])
                       for code, name in MASK_VARIANTS.items()}
            if have_torch:
                workers["torch block-sparse"] = (Worker("torch", t), "masked", [*shape, 2])
            measured = measure_interleaved(workers, None, None, rounds=3, reps_per_round=max(1, reps // 3))
            for entry in workers.values():
                entry[0].close()
            row = {"shape": shape, "threads": t}
            for name, r in measured.items():
                row[name + "_ms"] = r["median_s"] * 1e3
            results["masks"].append(row)


def fmt(x, digits=1):
    return "—" if x is None else f"{x:.{digits}f}"


def render(results):
    paths = results.get("paths") or ["flash"]
    widest = paths[0]

    def by_thread(table, t):
        return table.get(t) or table.get(str(t))

    lines = [f"- Date: {results['date']}; CPU: {results['cpu']}; layout given to this library: {results['layout']};"
             f" kernel paths: {', '.join(paths)} (flash = {widest})",
             f"- Command: `{results['command']}`",
             "- Measured FMA peak (bench/fma_peak.c): "
             + "; ".join(f"{isa} " + ", ".join(f"{t} thread(s) {fmt(p)}" for t, p in results["fma_peak"].get(isa, {}).items())
                         for isa in paths) + " GFLOP/s",
             "- Measured float32 sgemm (numpy/OpenBLAS 2048³): "
             + ", ".join(f"{t} thread(s) {fmt(p)} GFLOP/s" for t, p in results["peak"].items())]
    if results["prefill"]:
        others = "".join(f" | {isa} GFLOP/s" for isa in paths[1:])
        lines += ["", f"| shape (b, hq, hkv, s, d) | causal | threads | flash ms | flash GFLOP/s | % FMA peak{others}"
                  " | numpy GFLOP/s | torch GFLOP/s | flash / torch | flash / numpy |",
                  "|---|---|---|---|---|---" + "|---" * len(paths[1:]) + "|---|---|---|---|"]
    for row in results["prefill"]:
        peak = by_thread(results["fma_peak"].get(widest, {}), row["threads"])
        f, n, t = row.get("flash"), row.get("numpy"), row.get("torch")
        lines.append(
            f"| {tuple(row['shape'])} | {'yes' if row['causal'] else 'no'} | {row['threads']} | {fmt(row.get('flash_ms'))}"
            f" | {fmt(f)} | {fmt(100 * f / peak if f and peak else None, 0)}%"
            + "".join(f" | {fmt(row.get('flash_' + isa))}" for isa in paths[1:])
            + f" | {fmt(n)} | {fmt(t)} | {fmt(f / t if f and t else None, 2)} | {fmt(f / n if f and n else None, 1)} |")
    if results["long"]:
        lines += ["", "| long context (flash) | causal | GFLOP/s | q+k+v+out MiB | extra peak RSS MiB |", "|---|---|---|---|---|"]
        for r in results["long"]:
            lines.append(f"| {tuple(r['shape'])} | {'yes' if r['causal'] else 'no'} | {fmt(r['gflops'])}"
                         f" | {fmt(r['tensors_mib'])} | {fmt(r['extra_mib'])} |")
    if results["sweep"]:
        lines += ["", "| seqlen (1, 8, 8, s, 64) | flash GFLOP/s | numpy GFLOP/s | flash peak RSS MiB | numpy peak RSS MiB |",
                  "|---|---|---|---|---|"]
        for r in results["sweep"]:
            lines.append(f"| {r['seqlen']} | {fmt(r['flash'])} | {fmt(r['numpy'])} | {fmt(r['flash_peak_rss_mib'], 0)}"
                         f" | {fmt(r['numpy_peak_rss_mib'], 0)} |")
    if results["decode"]:
        lines += ["", "| decode (b, hq, hkv, cache, d), 1 query | threads | copy GB/s (read) | flash ms | flash K/V GB/s"
                  " | flash / copy | paged-16 ms | paged / contiguous time | torch K/V GB/s | numpy K/V GB/s |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in results["decode"]:
            lines.append(
                f"| {tuple(r['shape'])} | {r['threads']} | {fmt(r['copy_gbps'])} | {fmt(r['flash_ms'], 2)}"
                f" | {fmt(r['flash_gbps'])} | {fmt(r['flash_gbps'] / r['copy_gbps'], 2)} | {fmt(r['paged_ms'], 2)}"
                f" | {fmt(r['paged_ms'] / r['flash_ms'], 2)} | {fmt(r.get('torch_gbps'))} | {fmt(r.get('numpy_gbps'))} |")
    if results["window"]:
        b, h, s, d, window = WINDOW
        lines += ["", f"| sliding window {window} (causal) over {s} tokens, ({b}, {h}, {h}, s, {d}) | threads | ms"
                  f" | full {window}-token attention × {s // window}, ms | ratio |", "|---|---|---|---|---|"]
        for r in results["window"]:
            lines.append(f"| | {r['threads']} | {fmt(r['window_ms'])} | {fmt(r['linear_ms'])} | {fmt(r['ratio'], 2)} |")
    if results["half"]:
        lines += ["", f"| half precision: prefill {HALF_PREFILL}, decode {HALF_DECODE} with a float32 query | threads"
                  " | float32 ms | float16 ms | bfloat16 ms | float16 speed / float32 | bfloat16 speed / float32 |",
                  "|---|---|---|---|---|---|---|"]
        for r in results["half"]:
            lines.append(f"| {r['kind']} | {r['threads']} | {fmt(r['float32_ms'], 2)} | {fmt(r['float16_ms'], 2)}"
                         f" | {fmt(r['bfloat16_ms'], 2)} | {fmt(r['float32_ms'] / r['float16_ms'], 2)}"
                         f" | {fmt(r['float32_ms'] / r['bfloat16_ms'], 2)} |")
    if results.get("bf16"):
        names = [n for n in results["bf16"][0] if n.startswith(("flash", "torch"))]
        ratios = [f"flash_bf16_{isa}" for isa in BF16_PATHS if f"flash_bf16_{isa}" in names]
        lines += ["", "| bfloat16 prefill (b, hq, hkv, s, d) | causal | threads | " + " | ".join(
                      f"{n} GFLOP/s" for n in names) + " | " + " | ".join(
                      f"{n} / flash_f32" + (f" | {n} / torch_bf16" if "torch_bf16" in names else "") for n in ratios) + " |",
                  "|---|---|---|" + "---|" * (len(names) + len(ratios) * (1 + ("torch_bf16" in names)))]
        for r in results["bf16"]:
            cells = [fmt(r.get(n)) for n in names]
            for n in ratios:
                cells.append(fmt(r[n] / r["flash_f32"], 2))
                if "torch_bf16" in names:
                    cells.append(fmt(r[n] / r["torch_bf16"], 2))
            lines.append(f"| {tuple(r['shape'])} | {'yes' if r['causal'] else 'no'} | {r['threads']} | " + " | ".join(cells) + " |")
    if results.get("quantized"):
        names = list(CACHE_NAMES.values())
        lines += ["", "| decode, cache dtype (b, hq, hkv, cache, d) | threads | copy GB/s | " + " | ".join(
                      f"{n} ms (cache GB/s)" for n in names) + " | int8 speed / float32 | int8 speed / float16 |",
                  "|---|---|---|" + "---|" * len(names) + "---|---|"]
        for r in results["quantized"]:
            cells = " | ".join(f"{fmt(r[n + '_ms'], 2)} ({fmt(r[n + '_gbps'])})" for n in names)
            lines.append(f"| {tuple(r['shape'])} | {r['threads']} | {fmt(r['copy_gbps'])} | {cells}"
                         f" | {fmt(r['float32_ms'] / r['int8_ms'], 2)} | {fmt(r['float16_ms'] / r['int8_ms'], 2)} |")
    if results.get("masks"):
        names = list(MASK_VARIANTS.values()) + ["torch block-sparse"]
        lines += ["", "| masks and dropout, prefill (b, h, s, d) | threads | " + " | ".join(f"{n} ms" for n in names)
                  + " | all-attend / none | block-sparse / none | dropout / none |",
                  "|---|---|" + "---|" * len(names) + "---|---|---|"]
        for r in results["masks"]:
            base = r["no mask_ms"]
            lines.append(f"| {tuple(r['shape'])} | {r['threads']} | " + " | ".join(fmt(r.get(n + "_ms")) for n in names)
                         + f" | {fmt(r['all-attend mask_ms'] / base, 2)} | {fmt(r['block-sparse mask_ms'] / base, 2)}"
                         f" | {fmt(r['dropout 0.1_ms'] / base, 2)} |")
    if results.get("mla"):
        names = list(MLA_CACHES.values())
        lines += ["", "| MLA decode (576/512, 1 kv head): heads_q, cached tokens | threads | copy GB/s | " + " | ".join(
                      f"{n} cache ms (GB/s, / copy)" for n in names) + " |", "|---|---|---|" + "---|" * len(names)]
        for r in results["mla"]:
            cells = " | ".join(f"{fmt(r[n + '_ms'], 2)} ({fmt(r[n + '_gbps'])}, {fmt(r[n + '_gbps'] / r['copy_gbps'], 2)})"
                               for n in names)
            lines.append(f"| {r['heads_q']}, {r['cached']} | {r['threads']} | {fmt(r['copy_gbps'])} | {cells} |")
    if results.get("backward"):
        lines += ["", "| backward (b, hq, hkv, s, d) | causal | threads | forward ms | backward ms | backward / forward"
                  " | backward GFLOP/s (2.5× forward FLOPs) | torch backward ms | flash / torch speed |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in results["backward"]:
            work = 2.5 * flops(r["shape"], r["causal"])
            torch_ms = r.get("torch_ms")
            lines.append(
                f"| {tuple(r['shape'])} | {'yes' if r['causal'] else 'no'} | {r['threads']} | {fmt(r['forward_ms'])}"
                f" | {fmt(r['backward_ms'])} | {fmt(r['backward_ms'] / r['forward_ms'], 2)}"
                f" | {fmt(work / r['backward_ms'] / 1e6)} | {fmt(torch_ms)}"
                f" | {fmt(torch_ms / r['backward_ms'] if torch_ms else None, 2)} |")
    if results["small_call"]:
        lines += ["", f"- Small call (1, 1, 1, 1, 64): {fmt(results['small_call']['c_us'], 2)} µs from C,"
                  f" {fmt(results['small_call']['python_us'], 1)} µs through Python (median)."]
    return "\n".join(lines)


MARK_BEGIN = "<!-- bench.py: begin generated -->"
MARK_END = "<!-- bench.py: end generated -->"


def write_results_md(report):
    path = ROOT / "bench" / "RESULTS.md"
    text = path.read_text() if path.exists() else f"# Benchmark results\n\n{MARK_BEGIN}\n{MARK_END}\n"
    if MARK_BEGIN not in text:
        text += f"\n{MARK_BEGIN}\n{MARK_END}\n"
    head, rest = text.split(MARK_BEGIN, 1)
    tail = rest.split(MARK_END, 1)[1]
    path.write_text(f"{head}{MARK_BEGIN}\n{report}\n{MARK_END}{tail}")


def by_threads(rows):
    """[(thread count, its rows)] in increasing thread count."""
    return [(t, [r for r in rows if r["threads"] == t]) for t in sorted({r["threads"] for r in rows})]


def cell_label(row):
    return ",".join(map(str, row["shape"])) + ("" if "causal" not in row else "\ncausal" if row["causal"] else "\nnon-causal")


def bar_panels(results):
    """The grouped-bar panels that the measured sections fill, prefill first: (title, y label, group labels,
    {series: values}), one panel per thread count. Ratios and times of unequal shapes would not share an axis,
    so every panel is a rate (higher is better)."""
    paths = results.get("paths") or ["flash"]
    series = [(f"this library, {paths[0]}", "flash")] + [(f"this library, {isa}", "flash_" + isa) for isa in paths[1:]]
    panels = [(f"prefill forward, {t} thread(s)", "GFLOP/s", [cell_label(r) for r in rows],
               {name: [r.get(key) for r in rows] for name, key in series + [("torch", "torch"), ("numpy", "numpy")]})
              for t, rows in by_threads(results.get("prefill", []))]
    for t, rows in by_threads(results.get("backward", [])):
        mflop = [flops(r["shape"], r["causal"]) / 1e6 for r in rows]  # MFLOP per ms = GFLOP/s
        panels.append((f"backward, {t} thread(s), counted as 2.5× the forward's FLOPs", "GFLOP/s",
                       [cell_label(r) for r in rows],
                       {"this library forward": [w / r["forward_ms"] for w, r in zip(mflop, rows)],
                        "this library backward": [2.5 * w / r["backward_ms"] for w, r in zip(mflop, rows)],
                        "torch backward": [2.5 * w / r["torch_ms"] if r.get("torch_ms") else None
                                           for w, r in zip(mflop, rows)]}))
    for t, rows in by_threads(results.get("decode", [])):
        panels.append((f"decode (one query, K/V cache read), {t} thread(s)", "GB/s", [cell_label(r) for r in rows],
                       {name: [r.get(key + "_gbps") for r in rows] for name, key in (
                           ("this library", "flash"), ("this library, paged-16", "paged"), ("torch", "torch"),
                           ("numpy", "numpy"), ("memory copy", "copy"))}))
    if results.get("half"):
        rows = results["half"]
        panels.append(("half-precision storage: speed relative to float32", "× float32 speed",
                       [f"{r['kind']}\n{r['threads']} thread(s)" for r in rows],
                       {name: [r["float32_ms"] / r[name + "_ms"] for r in rows] for name in ("float32", "float16", "bfloat16")}))
    return panels


def plot(results, path):
    """Writes one PNG: a grouped bar chart per panel of bar_panels, then the sequence sweep (GFLOP/s and peak
    memory) when it was measured."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError as error:
        print(f"plot skipped: matplotlib is not importable ({error})")
        return
    panels = bar_panels(results)
    rows = len(panels) + bool(results.get("sweep"))
    if not rows:
        print("plot skipped: none of the measured sections has a plot (prefill, backward, inference, half, sweep)")
        return
    fig = plt.figure(figsize=(14, 3.8 * rows), layout="constrained")
    grid = fig.add_gridspec(rows, 2)
    fig.suptitle(f"{results['cpu']}, {results['date']}: float32 unless stated; bars: higher is better")
    for i, (title, ylabel, groups, series) in enumerate(panels):
        ax = fig.add_subplot(grid[i, :])
        series = {name: values for name, values in series.items() if any(v is not None for v in values)}
        width = 0.8 / len(series)
        for k, (name, values) in enumerate(series.items()):
            offsets = [g + (k - (len(series) - 1) / 2) * width for g in range(len(groups))]
            ax.bar(offsets, [float("nan") if v is None else v for v in values], width, label=name)
        ax.set_xticks(range(len(groups)), groups, fontsize=8)
        ax.set(title=title, ylabel=ylabel)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1, 1))  # outside: bars fill the whole panel
    if results.get("sweep"):
        seqlens = [r["seqlen"] for r in results["sweep"]]
        for column, (suffix, ylabel, title) in enumerate((
                ("", "GFLOP/s", "sweep (1, 8, 8, s, 64), non-causal"),
                ("_peak_rss_mib", "peak RSS (MiB)", "sweep: peak memory (lower is better)"))):
            ax = fig.add_subplot(grid[rows - 1, column])
            for impl, name in (("flash", "this library"), ("numpy", "numpy")):
                ax.plot(seqlens, [r[impl + suffix] for r in results["sweep"]], marker="o", label=name)
            ax.set(xscale="log", yscale="log" if suffix else "linear", xlabel="seqlen", ylabel=ylabel, title=title)
            ax.set_xticks(seqlens, [str(n) for n in seqlens])
            ax.minorticks_off()
            ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()

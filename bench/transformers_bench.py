"""This library inside Hugging Face transformers against transformers' own "sdpa" attention, same weights.

    python3 bench/transformers_bench.py                      # the issue's targets: prefill 2048, decode at 2048/8192
    python3 bench/transformers_bench.py --heads-kv 8         # multi-head attention instead of 4:1 grouped heads
    python3 bench/transformers_bench.py --sections overhead,threads

Sections (each cell interleaves the two implementations, repeats, and reports medians; the host is shared and
noisy, so medians of interleaved runs are the only figures worth comparing):
    prefill   model forward over a prompt (cache on, logits of the last token only), ms
    decode    tokens/s of one-token steps against a prefilled DynamicCache (grown by torch.cat each step, as
              transformers does) and a StaticCache (written in place); the cache is copied before each timed
              run, so every run starts from the same length
    attention the attention alone at the model's prefill and decode shapes, this library against torch's
    overhead  microseconds per call of a (batch 1, 1 query, 8 heads, 1 key, head_dim 64) attention from Python
              (flash_attn_func, scaled_dot_product_attention, torch's own) and from C (bench/small_call.c)
    threads   attention alone at decode shapes, 1 vs 2 library threads (the kernel's decode scaling)
Needs torch (pip install torch==2.13.0, the CPU wheel) and transformers; builds random-weight models from a
config (no downloads).
"""

import argparse
import copy
import pathlib
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bindings" / "python"))

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig, StaticCache  # noqa: E402

import flash_attention.torch as ft  # noqa: E402
from flash_attention.transformers import register  # noqa: E402


def interleaved(functions, repeats, setup=None):
    """Median seconds of each function over `repeats` rounds; within a round every function runs once, in an
    order that alternates between rounds (ABBA...), so that a slow drift of the shared host's load falls on
    both alike. setup(i) runs before function i, untimed. Also returns the median of the per-round ratios
    times[1] / times[0], which is what the sections report: robust to rounds a burst of other work spoiled."""
    times = [[] for _ in functions]
    for round_index in range(repeats):
        order = list(range(len(functions)))
        if round_index % 2:
            order.reverse()
        for i in order:
            state = setup(i) if setup else None
            start = time.perf_counter()
            functions[i](state)
            times[i].append(time.perf_counter() - start)
    ratios = [b / a for a, b in zip(times[0], times[1])] if len(functions) > 1 else [1.0]
    return [statistics.median(t) for t in times], statistics.median(ratios)


def build(args, implementation):
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.heads_kv, max_position_embeddings=max(args.decode) + 1024)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation=implementation).eval()


def prefill_section(args, models, names):
    rows = []
    for length in args.prefill:
        ids = torch.randint(0, args.vocab, (args.batch, length), generator=torch.Generator().manual_seed(1))

        def run(model):
            with torch.no_grad():
                model(input_ids=ids, use_cache=True, logits_to_keep=1)

        for model in models:
            run(model)
        times, ratio = interleaved([lambda _, m=m: run(m) for m in models], args.repeats)
        rows.append((length, *[t * 1e3 for t in times], ratio))
        print(f"prefill {length}: " + ", ".join(f"{n} {t * 1e3:.1f} ms" for n, t in zip(names, times))
              + f", time ratio {ratio:.2f} (median of per-round ratios)", flush=True)
    return rows


def decode_section(args, models, names):
    rows = []
    token = torch.randint(0, args.vocab, (args.batch, 1), generator=torch.Generator().manual_seed(2))
    for length in args.decode:
        ids = torch.randint(0, args.vocab, (args.batch, length), generator=torch.Generator().manual_seed(3))
        for kind in ("dynamic", "static"):
            with torch.no_grad():
                if kind == "dynamic":
                    cache = models[1](input_ids=ids, use_cache=True, logits_to_keep=1).cache
                else:
                    cache = StaticCache(config=models[1].config, max_cache_len=length + args.steps + 8)
                    models[1](input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)

            def steps(state, i=None):
                model, cache_copy = state
                with torch.no_grad():
                    for _ in range(args.steps):
                        model(input_ids=token, cache=cache_copy, use_cache=True)

            def setup(i):
                cache_copy = copy.deepcopy(cache)
                with torch.no_grad():  # one untimed step: first-call costs out of the figure
                    models[i](input_ids=token, cache=cache_copy, use_cache=True)
                return models[i], cache_copy

            times, ratio = interleaved([steps, steps], args.repeats, setup)
            rates = [args.batch * args.steps / t for t in times]
            rows.append((length, kind, *rates, 1 / ratio))
            print(f"decode at {length} cached tokens, {kind} cache: "
                  + ", ".join(f"{n} {r:.1f} tokens/s" for n, r in zip(names, rates))
                  + f", speed ratio {1 / ratio:.2f} (median of per-round ratios)", flush=True)
    return rows


def small_call_c(heads):
    exe = ROOT / ".build" / "bench-small-call"
    lib = ROOT / ".build" / "release"
    build = ["cc", "-O2", f"-I{ROOT / 'include'}", str(ROOT / "bench" / "small_call.c"), f"-L{lib}",
             "-lFlashAttention", f"-Wl,-rpath,{lib}", "-o", str(exe)]
    if subprocess.run(build, capture_output=True).returncode != 0:
        return None
    out = subprocess.run([str(exe), str(heads)], capture_output=True, text=True).stdout
    return float(out.split()[0]) / 1e3 if out else None


def overhead_section(args):
    """Per-call microseconds of tiny calls: the fixed cost, so the minimum over rounds is reported beside the
    median (a fixed cost can only be inflated by interference, never deflated)."""
    q = torch.randn(1, 1, 8, 64)
    k = torch.randn(1, 1, 8, 64)
    qt, kt = q.transpose(1, 2), k.transpose(1, 2)
    calls = 2000
    lengths = torch.tensor([1], dtype=torch.int32)
    cases = [
        ("flash_attn_func", lambda: ft.flash_attn_func(q, k, k)),
        ("flash_attn_with_kvcache", lambda: ft.flash_attn_with_kvcache(q, k, k, cache_seqlens=lengths)),
        ("scaled_dot_product_attention (ours)", lambda: ft.scaled_dot_product_attention(qt, kt, kt)),
        ("torch's scaled_dot_product_attention", lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, kt)),
    ]
    results = {}
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            samples = {name: [] for name, _ in cases}
            for _ in range(args.repeats * 3):
                for name, function in cases:
                    for _ in range(200):
                        function()
                    start = time.perf_counter()
                    for _ in range(calls):
                        function()
                    samples[name].append((time.perf_counter() - start) / calls * 1e6)
        for name, values in samples.items():
            results[(name, grad)] = (min(values), statistics.median(values))
    c_us = small_call_c(8)
    for name, _ in cases:
        (g_min, g_med), (n_min, n_med) = results[(name, True)], results[(name, False)]
        print(f"(1, 1, 8, 1, 64) call, {name}: {g_min:.2f} µs min / {g_med:.2f} median (grad mode), "
              f"{n_min:.2f} / {n_med:.2f} (no_grad)", flush=True)
    if c_us is not None:
        print(f"(1, 1, 8, 1, 64) call from C (flash_attention_forward): {c_us:.2f} µs (median)", flush=True)
    return results, c_us


def attention_section(args):
    """The attention alone at the model's shapes, this library against torch's function (what the model-level
    ratios are made of): prefill (causal, q in the projections' [b, s, h, d] memory seen as [b, h, s, d], as
    the models hand it over) and one decode step against a [b, h, s, d] cache."""
    rows = []
    heads, heads_kv, dim = args.heads, args.heads_kv, args.hidden // args.heads
    gqa = heads != heads_kv
    cases = []
    for length in args.prefill:
        q = torch.randn(args.batch, length, heads, dim).transpose(1, 2)
        k = torch.randn(args.batch, length, heads_kv, dim).transpose(1, 2)
        v = torch.randn(args.batch, length, heads_kv, dim).transpose(1, 2)
        cases.append((f"prefill {length}, causal", q, k, v, True, 3))
    for length in args.decode:
        q = torch.randn(args.batch, 1, heads, dim).transpose(1, 2)
        k = torch.randn(args.batch, heads_kv, length, dim)
        v = torch.randn(args.batch, heads_kv, length, dim)
        cases.append((f"decode at {length}", q, k, v, False, max(4, 40000 // length)))
    for label, q, k, v, causal, reps in cases:
        def torch_own(_, q=q, k=k, v=v, causal=causal, reps=reps):
            for _ in range(reps):
                torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)

        def ours(_, q=q, k=k, v=v, causal=causal, reps=reps):
            for _ in range(reps):
                ft.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal)

        with torch.no_grad():
            times, ratio = interleaved([torch_own, ours], args.repeats)
        us = [t / reps * 1e6 for t in times]
        rows.append((label, *us, ratio))
        print(f"attention alone, {label} (b {args.batch}, {heads}/{heads_kv} heads of {dim}): torch {us[0]:.0f} µs, "
              f"this library {us[1]:.0f} µs, time ratio {ratio:.2f}", flush=True)
    return rows


def threads_section(args):
    rows = []
    for length in args.thread_lengths:
        q = torch.randn(1, args.heads, 1, 64).transpose(1, 2)
        k = torch.randn(1, args.heads_kv, length, 64).transpose(1, 2)
        v = torch.randn(1, args.heads_kv, length, 64).transpose(1, 2)
        reps = max(4, 40000 // length)

        def loop(threads):
            def run(_):
                for _ in range(reps):
                    ft.flash_attn_func(q, k, v, num_threads=threads)
            return run

        with torch.no_grad():
            times, _ = interleaved([loop(1), loop(2)], args.repeats)
        us = [t / reps * 1e6 for t in times]
        rows.append((length, *us, us[0] / us[1]))
        print(f"attention decode (1, {args.heads}, {args.heads_kv}, {length}, 64): 1 thread {us[0]:.1f} µs, "
              f"2 threads {us[1]:.1f} µs, speedup {us[0] / us[1]:.2f}", flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="prefill,decode,attention,overhead,threads")
    parser.add_argument("--threads", type=int, default=2, help="torch's threads (this library uses every core)")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1376)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--heads-kv", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prefill", type=lambda s: [int(x) for x in s.split(",")], default=[2048])
    parser.add_argument("--decode", type=lambda s: [int(x) for x in s.split(",")], default=[2048, 8192])
    parser.add_argument("--thread-lengths", type=lambda s: [int(x) for x in s.split(",")],
                        default=[512, 2048, 8192, 32768])
    parser.add_argument("--steps", type=int, default=16, help="decode steps per timed run")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sections = args.sections.split(",")
    name = register()
    print(f"torch {torch.__version__}, {args.threads} torch threads; model: Llama config hidden {args.hidden}, "
          f"{args.layers} layers, {args.heads} heads / {args.heads_kv} kv heads of {args.hidden // args.heads}, "
          f"intermediate {args.intermediate}, vocab {args.vocab}, batch {args.batch}, float32", flush=True)
    if "prefill" in sections or "decode" in sections:
        models = [build(args, "sdpa"), build(args, name)]
        names = ["sdpa", name]
        if "prefill" in sections:
            prefill_section(args, models, names)
        if "decode" in sections:
            decode_section(args, models, names)
    if "attention" in sections:
        attention_section(args)
    if "overhead" in sections:
        overhead_section(args)
    if "threads" in sections:
        threads_section(args)


if __name__ == "__main__":
    main()

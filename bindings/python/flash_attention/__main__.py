"""python -m flash_attention {info,demo}: what is installed, and a quick end-to-end check.

    info [--json]   package and library versions, ABI number, library path, CPU features, kernel ISA, threads
    demo            a few small attentions (plain, causal + GQA, float16) checked against reference_attention

Exit status: 0 on success, 1 if the library cannot be loaded or the demo's results are wrong, 2 on bad usage.
"""

import argparse
import json
import os
import platform
import sys
import time

# The instruction-set extensions the kernel paths care about (avx2: avx2, fma, f16c; avx512: also avx512f,
# avx512bw, avx512dq, avx512vl).
_CPU_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_bf16")


def _cpu():
    """(model name, the interesting flags present) from /proc/cpuinfo; (None, None) where it is unreadable."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            text = cpuinfo.read()
    except OSError:
        return None, None
    model, flags = None, set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model is None:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
    return model, [flag for flag in _CPU_FLAGS if flag in flags]


def _info():
    from . import __version__
    from ._capi import FA_ABI_VERSION
    from .api import library_info

    import numpy

    info = {"package_version": __version__, "binding_abi_version": FA_ABI_VERSION}
    info.update(library_info())
    model, flags = _cpu()
    info.update(
        {
            "cpu": model or platform.machine(),
            "cpu_flags": flags,
            "online_cpus": os.cpu_count(),
            "python": platform.python_version(),
            "numpy": numpy.__version__,
        }
    )
    try:
        import ml_dtypes

        info["ml_dtypes"] = ml_dtypes.__version__
    except ImportError:
        info["ml_dtypes"] = None
    return info


def info_command(args):
    try:
        info = _info()
    except OSError as error:
        print(f"flash_attention: {error}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    rows = [
        ("package", info["package_version"]),
        ("library", f"{info['version']}  ({info['library']})"),
        ("ABI", f"{info['abi_version']} (binding expects {info['binding_abi_version']})"),
        ("kernel ISA", f"{info['kernel_isa']}  (available: {', '.join(info['available_isas'])};"
                       " FLASH_ATTENTION_ISA picks one)"),
        ("threads", f"{info['default_num_threads']} by default (num_threads=0)"),
        ("CPU", info["cpu"]),
        ("CPU flags", " ".join(info["cpu_flags"]) if info["cpu_flags"] is not None else "unknown"),
        ("python", info["python"]),
        ("numpy", info["numpy"]),
        ("ml_dtypes", info["ml_dtypes"] or "not installed (no bfloat16; pip install ml_dtypes)"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    if info["version"] != info["package_version"]:
        print(f"warning: the library is version {info['version']}, the Python package {info['package_version']}",
              file=sys.stderr)
    return 0


def demo_command(args):
    import numpy as np

    from .api import flash_attn_func, library_info
    from .reference import reference_attention

    try:
        info = library_info()
    except OSError as error:
        print(f"flash_attention: {error}", file=sys.stderr)
        return 1
    print(f"libFlashAttention {info['version']} ({info['kernel_isa']}, {info['default_num_threads']} threads)"
          f" from {info['library']}")
    rng = np.random.default_rng(0)
    # (name, batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, causal, dtype, max abs error allowed)
    cases = [
        ("float32", 2, 128, 128, 4, 4, 64, False, np.float32, 1e-5),
        ("float32 causal GQA", 1, 96, 160, 8, 2, 128, True, np.float32, 1e-5),
        ("float16", 1, 64, 64, 2, 2, 64, False, np.float16, 2e-3),
    ]
    try:
        import ml_dtypes

        cases.append(("bfloat16", 1, 64, 64, 2, 2, 64, True, ml_dtypes.bfloat16, 1.6e-2))
    except ImportError:
        print("(no bfloat16 case: ml_dtypes is not installed)")
    failed = False
    for name, batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, causal, dtype, bound in cases:
        q = rng.standard_normal((batch, seqlen_q, heads_q, head_dim), dtype=np.float32).astype(dtype)
        k = rng.standard_normal((batch, seqlen_k, heads_kv, head_dim), dtype=np.float32).astype(dtype)
        v = rng.standard_normal((batch, seqlen_k, heads_kv, head_dim), dtype=np.float32).astype(dtype)
        started = time.perf_counter()
        out = flash_attn_func(q, k, v, causal=causal)
        elapsed = time.perf_counter() - started
        error = float(np.abs(out.astype(np.float64) - reference_attention(q, k, v, causal=causal)).max())
        ok = out.dtype == dtype and out.shape == q.shape and error <= bound
        failed |= not ok
        shape = f"q {list(q.shape)} k/v {list(k.shape)}"
        print(f"{'ok  ' if ok else 'FAIL'} {name:<20} {shape:<40} max |out - reference| = {error:.2e}"
              f" (bound {bound:.0e}), {elapsed * 1e3:.2f} ms")
    print("demo failed" if failed else "demo passed")
    return 1 if failed else 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m flash_attention", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", metavar="{info,demo}")
    info = commands.add_parser("info", help="versions, library path, CPU features, kernel ISA, default threads")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(run=info_command)
    demo = commands.add_parser("demo", help="run small attentions and check them against reference_attention")
    demo.set_defaults(run=demo_command)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())

"""Reliability: fuzzing the C ABI over guard pages, extreme values, out-of-memory, and many threads."""

import pathlib
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

from conftest import assert_close, random_inputs
from flash_attention import flash_attn_func, flash_attn_with_kvcache, reference_attention

HERE = pathlib.Path(__file__).resolve().parent


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 10, 13, 24, 34])
def test_fuzzed_params_never_crash_or_write_outside_outputs(seed):
    # A crash (guard page hit) kills the subprocess, not the test run; its output says what was tried.
    result = subprocess.run([sys.executable, str(HERE / "fuzz_abi.py"), "1500", str(seed)],
                            capture_output=True, text=True, timeout=600)
    print(result.stdout)
    assert result.returncode == 0, f"fuzz run died ({result.returncode}): {result.stdout[-2000:]} {result.stderr[-2000:]}"
    assert "none crashed" in result.stdout


def test_huge_scores_do_not_overflow():
    # Scores of ±1e30 after scaling: the max subtraction keeps every exponent finite.
    q, k, v = random_inputs(31, 1, 40, 50, 2, 2, 8)
    q[..., 0] = np.where(np.arange(40)[None, :, None] % 2 == 0, 1e16, -1e16).astype(np.float32)
    k[..., 0] = np.float32(1e16) * np.sign(k[..., 0])
    out, lse = flash_attn_func(q, k, v, softmax_scale=1e-2, return_lse=True)
    ref_out, ref_lse = reference_attention(q, k, v, softmax_scale=1e-2, return_lse=True)
    assert np.isfinite(out).all() and np.isfinite(lse).all()
    assert np.abs(out - ref_out).max() <= 1e-5
    assert np.allclose(lse, ref_lse, rtol=1e-6)


def test_rows_of_only_negative_infinity_scores():
    q = np.ones((1, 3, 1, 1), np.float32)
    k = np.full((1, 4, 1, 1), -np.inf, np.float32)
    v = np.ones((1, 4, 1, 1), np.float32)
    out, lse = flash_attn_func(q, k, v, return_lse=True)
    ref_out, ref_lse = reference_attention(q, k, v, return_lse=True)
    assert np.array_equal(out, ref_out.astype(np.float32)) and np.all(out == 0)
    assert np.all(np.isneginf(lse)) and np.all(np.isneginf(ref_lse))


@pytest.mark.parametrize("where", ["k", "v"])
@pytest.mark.parametrize("dim", [16, 64])
def test_nan_in_one_key_poisons_only_the_rows_that_see_it(where, dim):
    q, k, v = random_inputs(32, 1, 300, 300, 2, 1, dim)
    poisoned = 150
    (k if where == "k" else v)[0, poisoned, 0, 3] = np.nan
    out = flash_attn_func(q, k, v, causal=True)
    rows_with_nan = np.isnan(out).any(axis=(0, 2, 3))
    # Causal with seqlen_q == seqlen_k: query i sees key 150 iff i >= 150.
    assert not rows_with_nan[:poisoned].any()
    assert rows_with_nan[poisoned:].all()
    ref = reference_attention(q, k, v, causal=True)
    assert np.array_equal(np.isnan(ref), np.isnan(out))
    assert np.nanmax(np.abs(out - ref)) <= 1e-5
    # The same through a sliding window: rows past the window no longer see it.
    out = flash_attn_func(q, k, v, causal=True, window_size=(20, 0))
    rows_with_nan = np.isnan(out).any(axis=(0, 2, 3))
    assert rows_with_nan.nonzero()[0].tolist() == list(range(poisoned, poisoned + 21))


def test_nan_in_a_cached_key_poisons_only_its_sequence():
    q, k_cache, v_cache = random_inputs(33, 3, 1, 500, 4, 2, 64)
    v_cache[1, 17, 1, 5] = np.nan
    out = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=np.array([500, 500, 500], np.int32))
    bad = np.isnan(out).any(axis=(1, 3))
    assert bad.tolist() == [[False] * 4, [False, False, True, True], [False] * 4]


def test_denormal_inputs_match_the_reference():
    q, k, v = random_inputs(34, 1, 64, 64, 2, 2, 32)
    tiny = np.float32(1e-39)
    out = flash_attn_func(q * tiny, k, v * tiny)
    ref = reference_attention(q * tiny, k, v * tiny)
    assert np.abs(out - ref).max() <= 1e-44


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc and an enforced RLIMIT_AS (Linux)")
@pytest.mark.parametrize("algorithm, keys, margin_mib", [("auto", 500_000, 2), ("reference", 50_000_000, 64)])
def test_out_of_memory_is_a_status_not_a_crash(algorithm, keys, margin_mib):
    # Caps the address space just above what the process uses, then asks for a workspace larger than the
    # margin: the tiled kernels' split-KV partials for head_dim 1024 (megabytes), the reference loop's scores
    # for 50,000,000 keys (400 MB; the keys are one row broadcast with stride 0).
    script = textwrap.dedent(f"""
        import resource, sys
        sys.path.insert(0, {str(HERE.parent)!r})
        import numpy as np
        from flash_attention import flash_attn_func
        q = np.ones((1, 1, 1, 1024), np.float32)
        k = np.broadcast_to(np.ones((1, 1, 1, 1024), np.float32), (1, {keys}, 1, 1024))
        # Load everything first, down the same path.
        flash_attn_func(q[..., :8], k[:, :3, :, :8], k[:, :3, :, :8], num_threads=1, algorithm={algorithm!r})
        flash_attn_func(q[..., :8], k[:, :20_000, :, :8], k[:, :20_000, :, :8], num_threads=1)
        used = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
        resource.setrlimit(resource.RLIMIT_AS, (used + ({margin_mib} << 20), resource.RLIM_INFINITY))
        caught = None
        try:
            flash_attn_func(q, k, k, num_threads=1, algorithm={algorithm!r})
        except MemoryError as error:
            caught = error
        resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        print("MemoryError:", caught)
    """)
    # Under a cap 2 MiB above use, glibc itself may abort the process when it lazily allocates another
    # library's thread-local data ("cannot allocate memory for thread-local data"): no library can turn that
    # into a status, so such a run is repeated; the library's own answer must be the MemoryError every time.
    for _ in range(5):
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
        if "thread-local data" not in result.stderr:
            break
    assert result.returncode == 0, result.stderr
    assert "could not allocate" in result.stdout and "out of memory" in result.stdout


def test_eight_threads_two_hundred_calls_each():
    problems = [random_inputs(40 + i, 1 + i % 2, 17 + 29 * i, 23 + 31 * i, 4, 1 + i % 2, [8, 16, 40, 64][i % 4])
                for i in range(8)]
    expected = [flash_attn_func(*p, causal=i % 2 == 1, num_threads=1).tobytes() for i, p in enumerate(problems)]
    failures = []

    def worker(index):
        for call in range(200):
            i = (index + call) % 8
            out = flash_attn_func(*problems[i], causal=i % 2 == 1, num_threads=call % 3)
            if out.tobytes() != expected[i]:
                failures.append((index, call))

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, f"{len(failures)} of 1600 calls differed"


@pytest.mark.parametrize("seqlen_q", [1, 40])
def test_nan_in_a_query_row_gives_that_row_nan_output_and_lse(seqlen_q):
    # A row whose scores are all NaN must not look like a row that saw no key (LSE −inf), or a merge or a
    # ring step would silently drop it.
    q, k, v = random_inputs(35, 2, seqlen_q, 300, 4, 2, 64)
    q[1, seqlen_q - 1, 2, :] = np.nan
    out, lse = flash_attn_func(q, k, v, return_lse=True)
    assert np.isnan(out[1, seqlen_q - 1, 2]).all() and np.isnan(lse[1, 2, seqlen_q - 1])
    bad = np.isnan(lse)
    assert bad.sum() == 1 and np.isnan(out).sum() == 64
    ref_out, ref_lse = reference_attention(q, k, v, return_lse=True)
    assert np.abs(out[~np.isnan(out)] - ref_out[~np.isnan(out)]).max() <= 1e-5

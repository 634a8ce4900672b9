"""Python threads calling the library at once (ctypes releases the GIL, so calls really overlap)."""

import threading

from conftest import random_inputs
from flash_attention import flash_attn_func


def test_threads_calling_concurrently_get_exact_results():
    problems = [random_inputs(i, 1, 40 + 31 * i, 60 + 17 * i, 4, 1 + i % 2, [16, 40, 64, 128][i % 4]) for i in range(8)]
    expected = [flash_attn_func(*p, causal=i % 2 == 1, num_threads=1).tobytes() for i, p in enumerate(problems)]
    failures = []

    def worker(index):
        for call in range(25):
            i = (index + call) % 8
            out = flash_attn_func(*problems[i], causal=i % 2 == 1, num_threads=call % 3)
            if out.tobytes() != expected[i]:
                failures.append((index, call))

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures

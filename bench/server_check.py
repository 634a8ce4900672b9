"""Parity on a machine without Swift (the server-CPU check): forward (several shapes, options) and backward
against the float64 reference, and bitwise equality across thread counts 1, 2, 8, 16. Needs FLASH_ATTENTION_LIBRARY
and the binding on PYTHONPATH (see bench/RESULTS.md)."""
import numpy as np
import flash_attention as fa
from flash_attention import flash_attn_func, flash_attn_backward, reference_attention, reference_attention_backward

info = fa.library_info()
print("library", info)
rng = np.random.default_rng(7)
worst = 0.0
cases = [(1, 1, 1, 1, 1, 64, {}), (2, 77, 130, 4, 2, 64, {"causal": True}), (1, 300, 300, 8, 8, 128, {}),
         (1, 513, 257, 6, 3, 40, {"causal": True}), (3, 33, 1000, 2, 1, 256, {"window_size": (100, 5)}),
         (1, 1024, 1024, 16, 16, 128, {"causal": True, "softcap": 30.0})]
for b, sq, sk, hq, hk, d, opt in cases:
    q = rng.standard_normal((b, sq, hq, d), dtype=np.float32)
    k = rng.standard_normal((b, sk, hk, d), dtype=np.float32)
    v = rng.standard_normal((b, sk, hk, d), dtype=np.float32)
    outs = [flash_attn_func(q, k, v, num_threads=t, return_lse=True, **opt) for t in (1, 2, 8, 16)]
    assert all(np.array_equal(o[0], outs[0][0]) and np.array_equal(o[1], outs[0][1]) for o in outs), "thread counts differ"
    ref, ref_lse = reference_attention(q, k, v, return_lse=True, **opt)
    lse, empty = outs[0][1], np.isneginf(ref_lse)  # rows that see no key: LSE -inf, out 0
    assert np.array_equal(np.isneginf(lse), empty), "rows without keys differ"
    err = max(np.abs(outs[0][0] - ref).max(), np.abs(np.where(empty, 0, lse - np.where(empty, 0, ref_lse))).max())
    worst = max(worst, err)
    assert err <= 2e-5, (b, sq, sk, hq, hk, d, opt, err)
    dout = rng.standard_normal(q.shape, dtype=np.float32)
    g = flash_attn_backward(dout, q, k, v, outs[0][0], outs[0][1], num_threads=16, **opt)
    gr = reference_attention_backward(dout, q, k, v, **opt)
    rel = max(np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-6) for x, y in zip(g, gr))
    assert rel <= 1e-4, ("backward", b, sq, sk, hq, hk, d, opt, rel)
    print(f"ok  ({b},{sq},{sk},{hq},{hk},{d}) {opt}: forward max err {err:.2e}, backward rel err {rel:.2e}, threads 1/2/8/16 bitwise equal")
print(f"all parity checks passed (worst forward error {worst:.2e})")

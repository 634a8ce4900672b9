"""The backward pass against float64 analytic gradients, finite differences, and thread-count invariance."""

import ctypes

import numpy as np
import pytest

from conftest import random_inputs
from flash_attention import (
    _capi,
    flash_attn_backward,
    flash_attn_func,
    flash_attn_func_with_backward,
    flash_attn_varlen_backward,
    flash_attn_varlen_func,
    reference_attention,
    reference_attention_backward,
)
from flash_attention._loader import load

RELATIVE_BOUND = 1e-5  # relative (norm) error of each float32 gradient


def relative(a, b):
    return float(np.linalg.norm((a - b).ravel()) / max(np.linalg.norm(np.ravel(b)), 1e-30))


VARIANTS = {
    "plain": {},
    "causal": dict(causal=True),
    "window": dict(causal=True, window_size=(40, 0)),
    "window-two-sided": dict(window_size=(17, 9)),
    "softcap": dict(softcap=3.0),
    "alibi": dict(alibi_slopes=np.array([0.05, 0.1, 0.2, 0.4], np.float32)),
    "sinks": dict(sinks=np.array([0.5, 1.0, -1.0, 2.0], np.float32), causal=True),
    "scale": dict(softmax_scale=0.3),
    "everything": dict(causal=True, window_size=(60, 0), softcap=5.0, sinks=np.array([1, 2, 0, -1], np.float32),
                       alibi_slopes=np.array([0.01, 0.02, 0.03, 0.04], np.float32)),
}
SHAPES = [(1, 70, 90, 4, 2, 32), (2, 130, 100, 4, 4, 64), (1, 200, 200, 4, 1, 128), (1, 97, 300, 4, 2, 59),
          (2, 1, 50, 4, 2, 16), (1, 33, 7, 4, 4, 3)]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}-s{}x{}-h{}/{}-d{}".format(*s))
def test_gradients_match_analytic_reference(variant, shape):
    b, sq, sk, hq, hk, d = shape
    q, k, v = random_inputs(70 + d, b, sq, sk, hq, hk, d)
    dout = np.random.default_rng(71).standard_normal(q.shape).astype(np.float32)
    options = VARIANTS[variant]
    out, lse, backward = flash_attn_func_with_backward(q, k, v, **options)
    grads = backward(dout)
    expected = reference_attention_backward(dout, q, k, v, **options)
    assert len(grads) == len(expected)
    for name, got, want in zip(("dq", "dk", "dv", "dsinks"), grads, expected):
        assert got.shape == np.shape(want)
        assert np.isfinite(got).all()
        if np.linalg.norm(np.ravel(want)) > 1e-6:
            assert relative(got, want) <= RELATIVE_BOUND, f"{name}: relative error {relative(got, want):.3g}"
        else:  # e.g. rows that see no key have zero gradients
            assert np.abs(got).max() <= 1e-6


def test_reference_gradients_match_finite_differences():
    # The oracle itself, checked in float64 by central differences on a tiny problem with every option.
    rng = np.random.default_rng(72)
    q, k, v = (rng.standard_normal(s) for s in ((1, 4, 2, 3), (1, 5, 1, 3), (1, 5, 1, 3)))
    dout = rng.standard_normal(q.shape)
    options = dict(causal=True, window_size=(3, 0), softcap=2.0, alibi_slopes=np.array([0.3, 0.7]),
                   sinks=np.array([0.2, -0.4]))
    grads = reference_attention_backward(dout, q, k, v, **options)
    loss = lambda q_, k_, v_, sinks_: float((reference_attention(q_, k_, v_, **{**options, "sinks": sinks_}) * dout).sum())
    eps = 1e-6
    for index, array in enumerate((q, k, v, options["sinks"])):
        numeric = np.zeros_like(array)
        for position in np.ndindex(array.shape):
            plus, minus = [x.copy() for x in (q, k, v, options["sinks"])], [x.copy() for x in (q, k, v, options["sinks"])]
            plus[index][position] += eps
            minus[index][position] -= eps
            numeric[position] = (loss(*plus) - loss(*minus)) / (2 * eps)
        assert np.abs(numeric - grads[index]).max() <= 1e-6


def test_library_gradients_match_finite_differences_of_the_library():
    # Central differences of the library's own float32 forward, in float64 arithmetic on a tiny problem.
    rng = np.random.default_rng(73)
    q, k, v = (rng.standard_normal(s).astype(np.float32) for s in ((1, 3, 1, 4), (1, 4, 1, 4), (1, 4, 1, 4)))
    dout = rng.standard_normal(q.shape).astype(np.float32)
    out, lse = flash_attn_func(q, k, v, causal=True, return_lse=True)
    dq, dk, dv = flash_attn_backward(dout, q, k, v, out, lse, causal=True)
    eps = 1e-2
    for array, grad in ((q, dq), (k, dk), (v, dv)):
        for position in np.ndindex(array.shape):
            saved = array[position]
            array[position] = saved + eps
            plus = float((flash_attn_func(q, k, v, causal=True).astype(np.float64) * dout).sum())
            array[position] = saved - eps
            minus = float((flash_attn_func(q, k, v, causal=True).astype(np.float64) * dout).sum())
            array[position] = saved
            assert abs((plus - minus) / (2 * eps) - grad[position]) <= 2e-3


def test_varlen_gradients():
    cu_q, cu_k = np.array([0, 5, 5, 130, 131], np.int32), np.array([0, 17, 40, 200, 260], np.int32)
    rng = np.random.default_rng(74)
    q, k, v = (rng.standard_normal(s).astype(np.float32) for s in ((131, 4, 32), (260, 2, 32), (260, 2, 32)))
    dout = rng.standard_normal(q.shape).astype(np.float32)
    out, lse = flash_attn_varlen_func(q, k, v, cu_q, cu_k, causal=True, return_lse=True)
    dq, dk, dv = flash_attn_varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, causal=True)
    for b in range(4):
        qs, ks = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        want = reference_attention_backward(dout[None, qs], q[None, qs], k[None, ks], v[None, ks], causal=True)
        for got, ref in zip((dq[qs], dk[ks], dv[ks]), want):
            assert np.abs(got - ref[0]).max(initial=0) <= 1e-5


# Long enough key ranges that the keys are cut into chunks of several 96-key blocks, each with its own dQ
# partial (8 kv heads: 4 chunks of 3 blocks for 1000 keys).
@pytest.mark.parametrize("variant", ["plain", "causal", "window-two-sided", "sinks"])
@pytest.mark.parametrize("shape", [(1, 500, 1000, 8, 8, 32), (1, 1000, 600, 8, 8, 48)], ids=str)
def test_gradients_with_chunked_keys(variant, shape):
    b, sq, sk, hq, hk, d = shape
    q, k, v = random_inputs(90 + d, b, sq, sk, hq, hk, d)
    dout = np.random.default_rng(91).standard_normal(q.shape).astype(np.float32)
    options = dict(VARIANTS[variant])
    if "sinks" in options:
        options["sinks"] = np.linspace(-1, 2, hq).astype(np.float32)
    out, lse, backward = flash_attn_func_with_backward(q, k, v, **options)
    grads = backward(dout)
    expected = reference_attention_backward(dout, q, k, v, **options)
    for name, got, want in zip(("dq", "dk", "dv", "dsinks"), grads, expected):
        assert relative(got, want) <= RELATIVE_BOUND, f"{name}: relative error {relative(got, want):.3g}"
    for threads in (1, 3):
        again = flash_attn_backward(dout, q, k, v, out, lse, num_threads=threads, **options)
        assert all(x.tobytes() == y.tobytes() for x, y in zip(grads, again))


def test_varlen_gradients_with_chunked_keys():
    cu_q, cu_k = np.array([0, 300, 301, 700], np.int32), np.array([0, 700, 900, 1000], np.int32)
    rng = np.random.default_rng(92)
    q, k, v = (rng.standard_normal(s).astype(np.float32) for s in ((700, 4, 16), (1000, 2, 16), (1000, 2, 16)))
    dout = rng.standard_normal(q.shape).astype(np.float32)
    out, lse = flash_attn_varlen_func(q, k, v, cu_q, cu_k, window_size=(150, 20), return_lse=True)
    dq, dk, dv = flash_attn_varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, window_size=(150, 20))
    for b in range(3):
        qs, ks = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        want = reference_attention_backward(dout[None, qs], q[None, qs], k[None, ks], v[None, ks], window_size=(150, 20))
        for got, ref in zip((dq[qs], dk[ks], dv[ks]), want):
            assert relative(got, ref[0]) <= RELATIVE_BOUND


def test_strided_views_give_the_same_gradients():
    q, k, v = random_inputs(75, 2, 100, 120, 4, 2, 64, layout="bhsd")
    dout = np.random.default_rng(76).standard_normal(q.shape).astype(np.float32)
    out, lse = flash_attn_func(q, k, v, causal=True, return_lse=True)
    strided = flash_attn_backward(dout, q, k, v, out, lse, causal=True)
    dense = flash_attn_backward(*(np.ascontiguousarray(x) for x in (dout, q, k, v, out)), lse, causal=True)
    for a, b in zip(strided, dense):
        assert a.tobytes() == b.tobytes()


def test_gradients_are_bitwise_identical_for_every_thread_count():
    q, k, v = random_inputs(77, 2, 300, 250, 4, 2, 64)
    dout = np.random.default_rng(78).standard_normal(q.shape).astype(np.float32)
    out, lse = flash_attn_func(q, k, v, causal=True, return_lse=True)
    single = flash_attn_backward(dout, q, k, v, out, lse, causal=True, num_threads=1)
    for threads in (2, 3, 0):
        other = flash_attn_backward(dout, q, k, v, out, lse, causal=True, num_threads=threads)
        assert all(a.tobytes() == b.tobytes() for a, b in zip(single, other))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_gradients(dtype):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    dt = np.float16 if dtype == "float16" else ml_dtypes.bfloat16
    q, k, v = (x.astype(dt) for x in random_inputs(79, 1, 80, 90, 4, 2, 64))
    dout = np.random.default_rng(80).standard_normal(q.shape).astype(dt)
    out, lse = flash_attn_func(q, k, v, causal=True, return_lse=True)
    dq, dk, dv = flash_attn_backward(dout, q, k, v, out, lse, causal=True)
    assert dq.dtype == dt and dk.dtype == dt
    # The oracle uses the same (rounded) inputs and the library's rounded out; gradients are rounded once.
    want = reference_attention_backward(dout, q, k, v, causal=True)
    for got, ref in zip((dq, dk, dv), want):
        rounded = np.abs(ref.astype(dt).astype(np.float64) - ref).max()
        assert np.abs(got.astype(np.float64) - ref).max() <= 2 * rounded + 2e-2 * np.abs(ref).max()


def test_backward_errors():
    q, k, v = random_inputs(81, 1, 8, 8, 2, 1, 16)
    out, lse = flash_attn_func(q, k, v, return_lse=True)
    with pytest.raises(ValueError, match="dout .* must have q's shape"):
        flash_attn_backward(out[:, :4], q, k, v, out, lse)
    with pytest.raises(ValueError, match="lse must have shape"):
        flash_attn_backward(out, q, k, v, out, lse[:, :1])
    # Through the C ABI: no lse, a gradient over an input, an unknown struct size.
    lib = load()
    params = _capi.Params()
    lib.flash_attention_params_init(ctypes.byref(params), ctypes.sizeof(params))
    params.batch, params.seqlen_q, params.seqlen_k, params.heads_q, params.heads_kv, params.head_dim = 1, 8, 8, 2, 1, 16
    arrays = {name: np.ascontiguousarray(x) for name, x in (("q", q), ("k", k), ("v", v), ("out", out))}
    for name, x in arrays.items():
        setattr(params, name, x.ctypes.data)
        strides = [s // 4 for s in x.strides]
        for field, stride in zip(("batch", "row", "head"), strides):
            setattr(params, f"{name}_{field}_stride", stride)
    backward = _capi.BackwardParams()
    lib.flash_attention_backward_params_init(ctypes.byref(backward), ctypes.sizeof(backward))
    backward.forward = ctypes.pointer(params)
    grads = {name: np.zeros_like(arrays[src]) for name, src in (("dout", "out"), ("dq", "q"), ("dk", "k"), ("dv", "v"))}
    for name, x in grads.items():
        setattr(backward, name, x.ctypes.data)
        for field, stride in zip(("batch", "row", "head"), [s // 4 for s in x.strides]):
            setattr(backward, f"{name}_{field}_stride", stride)
    assert lib.flash_attention_backward(ctypes.byref(backward)) == _capi.FA_ERROR_NULL_POINTER
    assert b"forward->lse is NULL" in lib.flash_attention_last_error()
    params.lse, params.lse_batch_stride, params.lse_head_stride, params.lse_row_stride = lse.ctypes.data, 16, 8, 1
    backward.dk = arrays["k"].ctypes.data
    assert lib.flash_attention_backward(ctypes.byref(backward)) == _capi.FA_ERROR_INVALID_ARGUMENT
    assert b"dk overlaps k" in lib.flash_attention_last_error()
    backward.dk = grads["dk"].ctypes.data
    backward.struct_size = 7
    assert lib.flash_attention_backward(ctypes.byref(backward)) == _capi.FA_ERROR_UNSUPPORTED
    backward.struct_size = ctypes.sizeof(backward)
    assert lib.flash_attention_backward(ctypes.byref(backward)) == _capi.FA_OK


def naive_float32_gradients(q, k, v, dout, scale, softcap=0.0):
    """A naive float32 implementation (materialised scores, numpy's float32 matmuls): the accuracy bar of
    FlashAttention-2's own tests, which allow a fused kernel a small multiple of its error."""
    qh, kh, vh, gh = (x.transpose(0, 2, 1, 3).astype(np.float32) for x in (q, k, v, dout))
    s = (qh @ kh.transpose(0, 1, 3, 2)) * np.float32(scale)
    t = np.tanh(s / np.float32(softcap)) if softcap else None
    if softcap:
        s = np.float32(softcap) * t
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    o = p @ vh
    ds = p * (gh @ vh.transpose(0, 1, 3, 2) - (gh * o).sum(-1, keepdims=True))
    if softcap:
        ds *= 1 - t * t
    grads = (ds @ kh * np.float32(scale), ds.transpose(0, 1, 3, 2) @ qh * np.float32(scale), p.transpose(0, 1, 3, 2) @ gh)
    return [g.transpose(0, 2, 1, 3) for g in grads]


# (q multiplier, softcap). Logits reach ~50 at ×8 and ~400 at ×50. The backward recomputes the forward's
# scores bit for bit and forms P's exponent as (S − LSE)·log2(e), so its error tracks a naive float32
# implementation's: the bounds are FlashAttention-2's rule of 2× the naive error, on the error's norm, and 3×
# on its largest element (over ten seeds the largest-element ratio ranged 1.2–2.7, the norm ratio below 2).
LARGE_LOGITS = [(8, 0.0), (50, 0.0), (8, 30.0), (50, 30.0)]


@pytest.mark.parametrize("multiplier,softcap", LARGE_LOGITS, ids=lambda x: str(x))
def test_gradients_with_large_logits_track_a_naive_float32_implementation(multiplier, softcap):
    from flash_attention import library_info

    if library_info()["kernel_isa"] == "reference":
        pytest.skip("the reference path's forward scores in float64, so the (portable) backward cannot recompute"
                    " its scores bit for bit, which is what this bound relies on")
    rng = np.random.default_rng(7)
    q = rng.standard_normal((1, 128, 2, 64), dtype=np.float32) * multiplier
    k, v = (rng.standard_normal((1, 256, 2, 64), dtype=np.float32) for _ in range(2))
    dout = rng.standard_normal((1, 128, 2, 64), dtype=np.float32)
    out, lse = flash_attn_func(q, k, v, softcap=softcap, return_lse=True)
    grads = flash_attn_backward(dout, q, k, v, out, lse, softcap=softcap)
    exact = reference_attention_backward(dout, q, k, v, softcap=softcap)
    naive = naive_float32_gradients(q, k, v, dout, 1 / 8, softcap)
    for name, g, n, e in zip(("dq", "dk", "dv"), grads, naive, exact):
        norm, naive_norm = np.linalg.norm(g - e), np.linalg.norm(n - e)
        assert norm <= 2 * naive_norm, f"{name}: error norm {norm:.3g}, naive float32 {naive_norm:.3g}"
        largest, naive_largest = np.abs(g - e).max(), np.abs(n - e).max()
        assert largest <= 3 * naive_largest, f"{name}: max error {largest:.3g}, naive float32 {naive_largest:.3g}"

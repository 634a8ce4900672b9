"""attn_mask: boolean and additive masks over (batch, head, query, key), broadcast and strided, with every other
option, in the dense, varlen and KV-cache calls and the backward, against the float64 reference given the same
mask; rows that see nothing, NaN confined to its row, skipped key blocks, thread invariance, and errors."""

import ctypes

import numpy as np
import pytest

import flash_attention as fa
from conftest import assert_close, assert_gradient, random_inputs
from flash_attention import _capi
from flash_attention._loader import load
from flash_attention.reference import (reference_attention, reference_attention_backward,
                                       reference_kvcache_attention, reference_varlen_attention)


def random_mask(seed, shape, kind, density=0.7):
    """A mask of `shape`: bool, uint8 (values 0..3, nonzero attends) or float32 (0, small biases, -inf)."""
    rng = np.random.default_rng(seed)
    keep = rng.random(shape) < density
    if kind == "bool":
        return keep
    if kind == "uint8":
        return (keep * rng.integers(1, 4, shape)).astype(np.uint8)
    return np.where(keep, rng.normal(0, 1, shape), -np.inf).astype(np.float32)


OPTIONS = {
    "plain": {},
    "causal": dict(causal=True),
    "window-softcap": dict(window_size=(20, 3), softcap=4.0),
    "alibi-sinks": dict(alibi_slopes=np.array([0.01, 0.02, 0.03, 0.04], np.float32),
                        sinks=np.array([0.5, -1.0, 0.0, 2.0], np.float32)),
}
# (batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, mask shape as a function of those)
SHAPES = [(2, 37, 53, 4, 2, 40), (1, 1, 70, 4, 4, 16), (2, 45, 3, 4, 1, 1), (1, 600, 130, 4, 2, 64)]
BROADCASTS = {"full": lambda b, h, sq, sk: (b, h, sq, sk), "per-batch": lambda b, h, sq, sk: (b, 1, sq, sk),
              "shared": lambda b, h, sq, sk: (sq, sk)}


@pytest.mark.parametrize("kind", ["bool", "uint8", "float"])
@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("broadcast", BROADCASTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}-s{}x{}-h{}/{}-d{}".format(*s))
def test_forward_and_gradients_match_the_reference(kind, options, broadcast, shape):
    b, sq, sk, hq, hk, d = shape
    q, k, v = random_inputs(40 + d, b, sq, sk, hq, hk, d)
    mask = random_mask(d + sq, BROADCASTS[broadcast](b, hq, sq, sk), kind)
    options = OPTIONS[options]
    out, lse, backward = fa.flash_attn_func_with_backward(q, k, v, attn_mask=mask, **options)
    ref, ref_lse = reference_attention(q, k, v, attn_mask=mask, return_lse=True, **options)
    assert_close(out, lse, ref, ref_lse)
    if sq * sk > 20000 and kind != "bool":
        return  # the gradients of the long shape once per broadcast is enough
    dout = np.random.default_rng(5).standard_normal(q.shape).astype(np.float32)
    for name, got, want in zip(("dq", "dk", "dv", "dsinks"), backward(dout),
                               reference_attention_backward(dout, q, k, v, attn_mask=mask, **options)):
        assert_gradient(name, got, want)


def test_strided_mask_views_are_read_in_place():
    q, k, v = random_inputs(3, 2, 33, 47, 4, 2, 24)
    base = random_mask(4, (2, 47, 4, 33), "float")  # [b, keys, heads, queries]
    mask = base.transpose(0, 2, 3, 1)  # [b, h, q, k] with a key stride of 4 * 33 elements
    out = fa.flash_attn_func(q, k, v, attn_mask=mask, causal=True)
    assert_close(out, None, reference_attention(q, k, v, attn_mask=mask, causal=True), None)
    column = random_mask(5, (47,), "bool")
    repeated = np.broadcast_to(column, (33, 47))  # a zero row stride
    assert_close(fa.flash_attn_func(q, k, v, attn_mask=repeated), None,
                 reference_attention(q, k, v, attn_mask=repeated), None)


def test_rows_that_see_nothing_give_zero_and_nan_stays_in_its_row():
    q, k, v = random_inputs(6, 1, 20, 30, 2, 2, 16)
    mask = np.ones((1, 2, 20, 30), bool)
    mask[0, 1, 7] = False  # head 1, query 7 sees no key
    mask[0, 0, :, 10:] = False
    dout = np.ones_like(q)
    out, lse, backward = fa.flash_attn_func_with_backward(q, k, v, attn_mask=mask)
    assert (out[0, 7, 1] == 0).all() and lse[0, 1, 7] == -np.inf
    assert np.isfinite(out).all()
    grads = backward(dout)
    assert all(np.isfinite(g).all() for g in grads)
    assert (grads[0][0, 7, 1] == 0).all()
    additive = np.zeros((20, 30), np.float32)
    additive[3, 4] = np.nan
    out = fa.flash_attn_func(q, k, v, attn_mask=additive)
    assert np.isnan(out[0, 3]).all()
    rest = np.delete(out, 3, axis=1)
    assert np.isfinite(rest).all()
    assert_close(rest, None, np.delete(reference_attention(q, k, v), 3, axis=1), None)


def test_block_sparse_masks_skip_blocks_and_stay_exact_for_every_thread_count():
    q, k, v = random_inputs(7, 1, 700, 1000, 8, 2, 64)
    blocks = np.random.default_rng(8).random((1, 8, 1, 1000 // 50 + 1)) < 0.5
    mask = np.repeat(blocks, 50, axis=-1)[..., :1000].repeat(700, axis=2)
    runs = [fa.flash_attn_func(q, k, v, attn_mask=mask, num_threads=n) for n in (1, 2, 3)]
    assert all(np.array_equal(runs[0], r) for r in runs[1:])
    assert_close(runs[0], None, reference_attention(q, k, v, attn_mask=mask), None)
    # A causal-shaped boolean mask gives what causal gives.
    q, k, v = random_inputs(9, 1, 300, 300, 4, 4, 32)
    lower = np.tril(np.ones((300, 300), bool))
    assert_close(fa.flash_attn_func(q, k, v, attn_mask=lower), None, fa.flash_attn_func(q, k, v, causal=True)
                 .astype(np.float64), None)


@pytest.mark.parametrize("options", [{}, dict(causal=True, softcap=30.0)], ids=["plain", "causal-softcap"])
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_block_masks_take_the_unmasked_path_where_they_attend_and_hide_huge_scores(kind, options):
    """2-D block masks (blocks of 128, 64 and 40 queries × keys, so key blocks of the kernels straddle them):
    sub-blocks whose rows all attend every key they see run without staged values, narrowed to those keys;
    keys hidden from all rows have huge scores, which must enter no row's max (else the visible
    probabilities underflow); a float mask mixes 0 / −inf blocks with biased ones (staged beside unstaged)."""
    q, k, v = random_inputs(30, 1, 600, 700, 4, 2, 32)
    k[:, 250:390] *= 100  # hidden from every row below
    rng = np.random.default_rng(31)
    for block in (128, 64, 40):
        keep = rng.random((1, 4, -(-600 // block), -(-700 // block))) < 0.5
        keep[..., 0] = True  # every row sees some key
        mask = np.kron(keep, np.ones((block, block), bool))[..., :600, :700]
        mask[..., 250:390] = False
        if kind == "float":
            biased = np.kron(rng.random(keep.shape) < 0.3, np.ones((block, block)))[..., :600, :700]
            mask = np.where(mask, biased * rng.normal(0, 1, mask.shape), -np.inf).astype(np.float32)
        runs = [fa.flash_attn_func(q, k, v, attn_mask=mask, num_threads=n, return_lse=True, **options) for n in (1, 2, 3)]
        assert all(np.array_equal(runs[0][0], r[0]) and np.array_equal(runs[0][1], r[1]) for r in runs[1:])
        ref, ref_lse = reference_attention(q, k, v, attn_mask=mask, return_lse=True, **options)
        assert_close(runs[0][0], runs[0][1], ref, ref_lse)


def test_fully_masked_rows_and_blocks_with_contiguous_and_strided_masks():
    """Rows that see no key give 0 and lse −inf whether the mask is read with wide loads (column stride 1) or
    element by element (a transposed view), boolean or float; whole query blocks hidden are skipped."""
    q, k, v = random_inputs(32, 1, 300, 200, 2, 2, 16)
    mask = np.random.default_rng(33).random((1, 2, 300, 200)) < 0.6
    mask[..., 100:200, :] = False  # whole sub-blocks of queries, past the first
    mask[0, 1, 7] = False
    for m in (mask, np.where(mask, 0, -np.inf).astype(np.float32)):
        for view in (m, np.ascontiguousarray(m.transpose(0, 1, 3, 2)).transpose(0, 1, 3, 2)):
            out, lse = fa.flash_attn_func(q, k, v, attn_mask=view, return_lse=True)
            assert (out[0, 100:200] == 0).all() and (lse[0, :, 100:200] == -np.inf).all()
            assert (out[0, 7, 1] == 0).all() and lse[0, 1, 7] == -np.inf
            ref, ref_lse = reference_attention(q, k, v, attn_mask=view, return_lse=True)
            assert_close(out, lse, ref, ref_lse)


def test_varlen_masks_use_positions_within_each_sequence():
    rng = np.random.default_rng(10)
    cu_q, cu_k = np.array([0, 5, 5, 80, 81], np.int32), np.array([0, 17, 40, 150, 151], np.int32)
    q = rng.standard_normal((81, 4, 32), dtype=np.float32)
    k, v = (rng.standard_normal((151, 2, 32), dtype=np.float32) for _ in range(2))
    mask = random_mask(11, (4, 4, 75, 110), "float")
    out, lse = fa.flash_attn_varlen_func(q, k, v, cu_q, cu_k, attn_mask=mask, causal=True, return_lse=True)
    ref, ref_lse = reference_varlen_attention(q, k, v, cu_q, cu_k, attn_mask=mask, causal=True)
    assert_close(out, lse, ref, ref_lse)
    dout = rng.standard_normal(q.shape).astype(np.float32)
    grads = fa.flash_attn_varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, attn_mask=mask, causal=True)
    s = 2
    qs, ks = slice(cu_q[s], cu_q[s + 1]), slice(cu_k[s], cu_k[s + 1])
    want = reference_attention_backward(dout[None, qs], q[None, qs], k[None, ks], v[None, ks],
                                        attn_mask=mask[s:s + 1], causal=True)
    assert_gradient("dq", grads[0][qs], want[0][0])
    assert_gradient("dk", grads[1][ks], want[1][0])


@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("seqlen_q", [1, 4])
def test_kvcache_masks_index_cache_positions(paged, seqlen_q):
    rng = np.random.default_rng(12)
    batch, heads_q, heads_kv, d, capacity = 3, 8, 2, 64, 40
    q = rng.standard_normal((batch, seqlen_q, heads_q, d), dtype=np.float32)
    k_new, v_new = (rng.standard_normal((batch, 2, heads_kv, d), dtype=np.float32) for _ in range(2))
    k_cache, v_cache = (rng.standard_normal((batch, capacity, heads_kv, d), dtype=np.float32) for _ in range(2))
    seqlens = np.array([5, 0, 30], np.int32)
    mask = random_mask(13, (batch, 1, seqlen_q, capacity), "bool", density=0.6)  # a tree of drafts, say
    before_k, before_v = k_cache.copy(), v_cache.copy()
    ref, ref_lse = reference_kvcache_attention(q, before_k, before_v, seqlens, k=k_new, v=v_new, attn_mask=mask)
    if paged:
        block = 8
        table = np.arange(batch * capacity // block, dtype=np.int32).reshape(batch, -1)
        k_cache, v_cache = (x.reshape(-1, block, heads_kv, d) for x in (k_cache, v_cache))
        out, lse = fa.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=seqlens,
                                              block_table=table, attn_mask=mask, return_lse=True)
    else:
        out, lse = fa.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=seqlens,
                                              attn_mask=mask, return_lse=True)
    assert_close(out, lse, ref, ref_lse)


def test_mask_errors_name_the_argument():
    q, k, v = random_inputs(1, 2, 5, 6, 2, 2, 8)
    with pytest.raises(TypeError, match="attn_mask must be bool, uint8"):
        fa.flash_attn_func(q, k, v, attn_mask=np.ones((5, 6), np.float64))
    with pytest.raises(ValueError, match="does not broadcast"):
        fa.flash_attn_func(q, k, v, attn_mask=np.ones((5, 7), bool))
    cache = np.zeros((2, 9, 2, 8), np.float32)
    with pytest.raises(ValueError, match="attn_mask has 6 keys; the cache call needs 7"):
        fa.flash_attn_with_kvcache(q, cache, cache.copy(), k[:, :1], v[:, :1], cache_seqlens=6,
                                   attn_mask=np.ones((5, 6), bool))


@pytest.mark.parametrize("field, value, message", [
    ("attn_mask_dtype", 1, "attn_mask_dtype (1) must be FA_DTYPE_BOOL (5) or FA_DTYPE_FLOAT32 (0)"),
    ("reserved3", 2, "reserved3 (2) must be 0"),
    ("attn_mask_col_stride", 2**62, "attn_mask_col_stride"),
    # 4 × 2^60 one-byte steps overflow nothing, yet reach past every user address: a fault if accepted.
    ("attn_mask_row_stride", 2**60, "attn_mask: its strides address memory outside the address space"),
])
def test_c_abi_rejects_bad_mask_fields_and_writes_nothing(field, value, message):
    q, k, v = random_inputs(2, 1, 5, 6, 2, 2, 8)
    out = np.full_like(q, 7.0)
    mask = np.ones((5, 6), np.uint8)
    lib = load()
    params = _capi.Params()
    assert lib.flash_attention_params_init(ctypes.byref(params), ctypes.sizeof(params)) == 0
    params.batch, params.seqlen_q, params.seqlen_k, params.heads_q, params.heads_kv, params.head_dim = 1, 5, 6, 2, 2, 8
    for name, x in (("q", q), ("k", k), ("v", v), ("out", out)):
        setattr(params, name, x.ctypes.data)
        for axis, stride in zip(("batch", "row", "head"), x.strides[:3]):
            setattr(params, f"{name}_{axis}_stride", stride // 4)
    params.attn_mask, params.attn_mask_dtype, params.attn_mask_row_stride = mask.ctypes.data, _capi.FA_DTYPE_BOOL, 6
    assert lib.flash_attention_forward(ctypes.byref(params)) == 0
    assert_close(out, None, reference_attention(q, k, v), None)
    out[:] = 7.0
    setattr(params, field, value)
    assert lib.flash_attention_forward(ctypes.byref(params)) != 0
    assert message in lib.flash_attention_last_error().decode()
    assert (out == 7.0).all()


def test_torch_flash_attn_func_takes_attn_mask_with_autograd():
    torch = pytest.importorskip("torch", reason="torch is optional; the numpy API carries the same kernels")
    import flash_attention.torch as ft

    q, k, v = (torch.from_numpy(x.copy()).requires_grad_() for x in random_inputs(20, 2, 29, 41, 4, 2, 16))
    mask = random_mask(21, (2, 4, 29, 41), "float")
    out = ft.flash_attn_func(q, k, v, causal=True, attn_mask=torch.from_numpy(mask))
    dout = np.random.default_rng(22).standard_normal(out.shape).astype(np.float32)
    out.backward(torch.from_numpy(dout))
    arrays = [x.detach().numpy() for x in (q, k, v)]
    assert_close(out.detach().numpy(), None, reference_attention(*arrays, causal=True, attn_mask=mask), None)
    want = reference_attention_backward(dout, *arrays, causal=True, attn_mask=mask)
    for name, x, expected in zip(("dq", "dk", "dv"), (q, k, v), want):
        assert_gradient(name, x.grad.numpy(), expected)


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_torch_adapter_mask_with_alibi_dropout_and_lse(kind):
    """flash_attn_func(attn_mask=...) in the torch adapter with ALiBi, dropout and return_lse (the library's
    attn_mask through the dense operator): forward, LSE and gradients against the float64 reference given the
    same mask and dropout factors; under torch.compile too."""
    torch = pytest.importorskip("torch", reason="torch is optional; the numpy API carries the same kernels")
    import flash_attention.torch as ft
    from flash_attention.reference import dropout_mask

    b, sq, sk, hq, hk, d = 2, 29, 41, 4, 2, 24
    q, k, v = random_inputs(71, b, sq, sk, hq, hk, d)
    mask = random_mask(72, (b, 1, sq, sk), kind)
    slopes = np.array([0.02, 0.05, 0.1, 0.2], np.float32)
    z = dropout_mask(9, 0.2, b, hq, sq, sk)
    options = dict(causal=True, alibi_slopes=slopes, attn_mask=mask)
    ref, ref_lse = reference_attention(q, k, v, dropout=z, return_lse=True, **options)
    dout = np.random.default_rng(73).standard_normal(ref.shape).astype(np.float32)
    want = reference_attention_backward(dout, q, k, v, dropout=z, **options)
    tq, tk, tv = (torch.from_numpy(x.copy()).requires_grad_() for x in (q, k, v))
    run = lambda *x: ft.flash_attn_func(*x, 0.2, causal=True, alibi_slopes=torch.from_numpy(slopes),  # noqa: E731
                                        attn_mask=torch.from_numpy(mask), seed=9, return_lse=True)
    for attention in (run, torch.compile(run, fullgraph=True)):
        out, lse = attention(tq, tk, tv)
        assert_close(out.detach().numpy(), lse.numpy(), ref, ref_lse)
        grads = torch.autograd.grad(out, (tq, tk, tv), torch.from_numpy(dout))
        for name, got, expected in zip(("dq", "dk", "dv"), grads, want):
            assert_gradient(name, got.numpy(), expected)

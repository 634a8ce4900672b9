"""The PyTorch adapter (flash_attention.torch): parity with torch's SDPA and autograd in float64, zero-copy
strided views, half dtypes, torch.compile, the custom-op contracts (opcheck) and errors.

Skipped entirely when torch is not importable.
"""

import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

import flash_attention.torch as ft  # noqa: E402  (after importorskip)
from flash_attention import _torch_raw  # noqa: E402

# torch.compile's internals warn about their own use of torch.jit; nothing to do with this package.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")

OUT_RELATIVE = 2e-6   # relative (norm) error of float32 out against float64, as for the numpy binding
OUT_ABSOLUTE = 1e-5   # max abs error of float32 out, N(0, 1) inputs
LSE_ABSOLUTE = 1e-5
GRAD_RELATIVE = 1e-5  # relative (norm) error of each float32 gradient against float64 autograd
HALF_DTYPES = [torch.float16, torch.bfloat16]  # bfloat16 needs no ml_dtypes: tensors go to C by pointer


def randn(seed, *shape, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float32).to(dtype)


def qkv_bhsd(seed, b, sq, sk, hq, hk, d, dtype=torch.float32, requires_grad=False):
    """[batch, heads, seqlen, head_dim] tensors (torch's SDPA layout)."""
    tensors = (randn(seed, b, hq, sq, d, dtype=dtype), randn(seed + 1, b, hk, sk, d, dtype=dtype),
               randn(seed + 2, b, hk, sk, d, dtype=dtype))
    return tuple(t.requires_grad_(requires_grad) for t in tensors)


def qkv_bshd(seed, b, sq, sk, hq, hk, d, dtype=torch.float32, requires_grad=False):
    """Contiguous [batch, seqlen, heads, head_dim] tensors (FlashAttention's layout)."""
    tensors = (randn(seed, b, sq, hq, d, dtype=dtype), randn(seed + 1, b, sk, hk, d, dtype=dtype),
               randn(seed + 2, b, sk, hk, d, dtype=dtype))
    return tuple(t.requires_grad_(requires_grad) for t in tensors)


def relative(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float(torch.linalg.vector_norm(a - b) / max(float(torch.linalg.vector_norm(b)), 1e-30))


def assert_out_close(out, ref):
    assert relative(out, ref) <= OUT_RELATIVE, f"relative error {relative(out, ref):.3g}"
    err = float((out.double() - ref).abs().max()) if out.numel() else 0.0
    assert err <= OUT_ABSOLUTE, f"max error {err:.3g}"


def bottom_right_mask(sq, sk, window_size=(-1, 0)):
    """True where query i may see key j (FlashAttention's alignment: the diagonal ends at the last key)."""
    i = torch.arange(sq)[:, None] + sk - sq
    j = torch.arange(sk)[None, :]
    left, right = window_size
    mask = torch.ones(sq, sk, dtype=torch.bool)
    if left >= 0:
        mask &= j >= i - left
    if right >= 0:
        mask &= j <= i + right
    return mask


def reference(q, k, v, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
              sinks=None):
    """Differentiable float64 attention in the [batch, seqlen, heads, head_dim] layout, every option.
    Returns (out, lse); rows that see no key (and no sink) get out 0 and lse -inf."""
    q, k, v = q.double(), k.double(), v.double()
    b, sq, hq, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    k = k.repeat_interleave(hq // hk, dim=2)
    v = v.repeat_interleave(hq // hk, dim=2)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    if alibi_slopes is not None:
        distance = (torch.arange(sq)[:, None] + sk - sq - torch.arange(sk)[None, :]).abs().double()
        slopes = alibi_slopes.double()
        slopes = slopes[None, :, None, None] if slopes.dim() == 1 else slopes[:, :, None, None]
        s = s - slopes * distance
    window = (window_size[0], 0) if causal else tuple(window_size)
    mask = bottom_right_mask(sq, sk, window)
    s = s.masked_fill(~mask, -math.inf)
    if sinks is not None:
        s = torch.cat([s, sinks.double()[None, :, None, None].expand(b, hq, sq, 1)], dim=-1)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])
    if sinks is not None:
        p = p[..., :-1]
    return torch.einsum("bhqk,bkhd->bqhd", p, v), lse


# --- import isolation ------------------------------------------------------------------------------------------


def test_importing_flash_attention_does_not_import_torch():
    code = "import flash_attention, sys; assert 'torch' not in sys.modules, 'torch was imported'"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


# --- forward parity --------------------------------------------------------------------------------------------

SHAPES = [  # batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim
    (1, 64, 64, 4, 4, 32),
    (2, 113, 203, 4, 4, 64),
    (2, 130, 77, 8, 2, 64),     # GQA 4:1, seqlen_q > seqlen_k
    (1, 200, 200, 6, 1, 128),   # MQA
    (3, 1, 257, 4, 2, 40),      # decode-like
    (1, 33, 7, 2, 2, 3),        # odd head_dim
]
SHAPE_IDS = ["b{}-s{}x{}-h{}/{}-d{}".format(*s) for s in SHAPES]


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_forward_matches_torch_sdpa_float64(shape):
    b, sq, sk, hq, hk, d = shape
    q, k, v = qkv_bhsd(1, *shape)
    out = ft.scaled_dot_product_attention(q, k, v, enable_gqa=hq != hk)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), enable_gqa=hq != hk)
    assert out.shape == (b, hq, sq, d) and out.dtype == torch.float32
    assert_out_close(out, ref)
    _, lse = ft.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), return_lse=True)
    _, ref_lse = reference(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    assert lse.shape == (b, hq, sq) and lse.dtype == torch.float32
    assert float((lse.double() - ref_lse).abs().max()) <= LSE_ABSOLUTE


@pytest.mark.parametrize("shape", [(2, 97, 97, 4, 2, 64), (1, 256, 256, 4, 4, 128)], ids=lambda s: f"s{s[1]}-d{s[5]}")
def test_causal_equal_lengths_matches_torch_is_causal(shape):
    q, k, v = qkv_bhsd(2, *shape)
    out = ft.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3, enable_gqa=True)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True, scale=0.3,
                                         enable_gqa=shape[3] != shape[4])
    assert_out_close(out, ref)


@pytest.mark.parametrize("sq,sk", [(50, 170), (1, 90), (120, 40)])
def test_causal_unequal_lengths_is_bottom_right(sq, sk):
    """torch's is_causal is top-left aligned; FlashAttention's is bottom-right, so compare with that mask.
    With seqlen_q > seqlen_k the first seqlen_q - seqlen_k queries see no key: out 0, lse -inf."""
    q, k, v = qkv_bhsd(3, 2, sq, sk, 4, 2, 64)
    out, lse = ft.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True,
                                  return_lse=True)
    out = out.transpose(1, 2)
    mask = bottom_right_mask(sq, sk)
    seen = mask.any(dim=1)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask, enable_gqa=True)
    assert_out_close(out[:, :, seen], ref[:, :, seen])
    assert torch.equal(out[:, :, ~seen], torch.zeros_like(out[:, :, ~seen]))
    assert torch.isneginf(lse[:, :, ~seen]).all() and torch.isfinite(lse[:, :, seen]).all()
    if hasattr(torch.nn.attention, "bias"):  # torch's own lower-right causal bias agrees where defined
        bias = torch.nn.attention.bias.causal_lower_right(sq, sk)
        if sq <= sk:
            ref2 = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=bias, enable_gqa=True)
            assert_out_close(out, ref2)


OPTIONS = {
    "window": dict(window_size=(40, 7)),
    "causal-window": dict(causal=True, window_size=(25, 0)),
    "softcap": dict(softcap=2.5, causal=True),
    "alibi": dict(alibi_slopes=torch.tensor([0.05, 0.1, 0.2, 0.4])),
    "alibi-batch": dict(alibi_slopes=torch.rand(2, 4, generator=torch.Generator().manual_seed(5))),
    "sinks": dict(sinks=torch.tensor([0.5, 1.0, -1.0, 2.0]), causal=True),
    "everything": dict(causal=True, window_size=(60, 0), softcap=5.0, sinks=torch.tensor([1.0, 2.0, 0.0, -1.0]),
                       alibi_slopes=torch.tensor([0.01, 0.02, 0.03, 0.04]), softmax_scale=0.2),
}


@pytest.mark.parametrize("variant", OPTIONS)
def test_forward_options_match_float64_reference(variant):
    q, k, v = qkv_bshd(4, 2, 90, 150, 4, 2, 48)
    out, lse = ft.flash_attn_func(q, k, v, return_lse=True, **OPTIONS[variant])
    ref, ref_lse = reference(q, k, v, **OPTIONS[variant])
    assert_out_close(out, ref)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    finite = torch.isfinite(ref_lse)
    assert float((lse.double()[finite] - ref_lse[finite]).abs().max()) <= LSE_ABSOLUTE


def test_num_threads_bitwise_invariant():
    q, k, v = qkv_bshd(6, 2, 150, 150, 4, 2, 64, requires_grad=True)
    results = []
    for threads in (1, 3, 0):
        out = ft.flash_attn_func(q, k, v, causal=True, num_threads=threads)
        results.append((out, *torch.autograd.grad(out, (q, k, v), torch.ones_like(out))))
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


# --- gradients -------------------------------------------------------------------------------------------------

GRAD_CASES = {
    "plain": ((2, 70, 90, 4, 4, 32), {}),
    "gqa-causal": ((2, 100, 100, 8, 2, 64), dict(causal=True)),
    "causal-sq<sk": ((1, 60, 140, 4, 2, 64), dict(causal=True)),
    "mqa-d128": ((1, 128, 96, 4, 1, 128), {}),
    "odd-d": ((1, 33, 47, 2, 2, 3), dict(softmax_scale=0.7)),
    "window": ((1, 120, 120, 4, 2, 32), dict(window_size=(30, 10))),
    "softcap": ((1, 80, 80, 4, 4, 32), dict(softcap=3.0, causal=True)),
    "alibi": ((2, 64, 96, 4, 2, 32), dict(alibi_slopes=torch.tensor([0.05, 0.1, 0.2, 0.4]))),
    "sinks": ((2, 64, 96, 4, 2, 32), dict(sinks=torch.tensor([0.5, 1.0, -1.0, 2.0]), causal=True)),
    "everything": ((1, 90, 130, 4, 2, 40), dict(causal=True, window_size=(50, 0), softcap=5.0,
                                                sinks=torch.tensor([1.0, 2.0, 0.0, -1.0]),
                                                alibi_slopes=torch.tensor([0.01, 0.02, 0.03, 0.04]))),
}


@pytest.mark.parametrize("case", GRAD_CASES)
def test_gradients_match_float64_autograd(case):
    shape, options = GRAD_CASES[case]
    options = dict(options)
    q, k, v = qkv_bshd(10, *shape, requires_grad=True)
    leaves = [q, k, v]
    if "sinks" in options:
        options["sinks"] = options["sinks"].clone().requires_grad_(True)
        leaves.append(options["sinks"])
    dout = randn(11, *q.shape)
    out = ft.flash_attn_func(q, k, v, **options)
    grads = torch.autograd.grad(out, leaves, dout)
    ref, _ = reference(q, k, v, **options)
    expected = torch.autograd.grad(ref, leaves, dout.double())
    for name, got, want, leaf in zip(("dq", "dk", "dv", "dsinks"), grads, expected, leaves):
        assert got.dtype == leaf.dtype and got.shape == leaf.shape
        assert relative(got, want) <= GRAD_RELATIVE, f"{name}: relative error {relative(got, want):.3g}"


@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_gradients_match_torch_sdpa_float64(causal):
    q, k, v = qkv_bhsd(12, 2, 77, 77, 6, 2, 64, requires_grad=True)
    out = ft.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    loss = (out * torch.linspace(-1, 1, out.shape[-1])).square().sum()  # a non-trivial dout
    grads = torch.autograd.grad(loss, (q, k, v))
    q64, k64, v64 = (x.detach().double().requires_grad_(True) for x in (q, k, v))
    ref = F.scaled_dot_product_attention(q64, k64, v64, is_causal=causal, enable_gqa=True)
    expected = torch.autograd.grad((ref * torch.linspace(-1, 1, 64).double()).square().sum(), (q64, k64, v64))
    for got, want in zip(grads, expected):
        assert relative(got, want) <= GRAD_RELATIVE


def test_sinks_gradient_follows_sinks_dtype():
    q, k, v = qkv_bshd(13, 1, 20, 30, 2, 1, 16, requires_grad=True)
    sinks = torch.tensor([0.5, -0.5], dtype=torch.float64, requires_grad=True)
    ft.flash_attn_func(q, k, v, sinks=sinks).sum().backward()
    assert sinks.grad.dtype == torch.float64 and torch.isfinite(sinks.grad).all()
    ref, _ = reference(q, k, v, sinks=sinks)
    (expected,) = torch.autograd.grad(ref.sum(), sinks)
    assert relative(sinks.grad, expected) <= GRAD_RELATIVE


def test_lse_is_not_differentiable_and_gradients_only_where_required():
    q, k, v = qkv_bshd(14, 1, 10, 12, 2, 2, 8)
    q.requires_grad_(True)
    out, lse = ft.flash_attn_func(q, k, v, return_lse=True)
    assert out.requires_grad and not lse.requires_grad
    out.sum().backward()
    assert q.grad is not None and k.grad is None and v.grad is None
    with torch.no_grad():
        assert not ft.flash_attn_func(q, k, v).requires_grad
    with torch.inference_mode():
        assert torch.equal(ft.flash_attn_func(q, k, v), out.detach())


# --- strided views and zero-copy -------------------------------------------------------------------------------


def test_strided_views_give_identical_results():
    """Transposed [b, h, s, d] storage, sliced sequences and heads, and broadcast (stride-0) k/v give the
    bitwise-identical forward and backward of contiguous copies."""
    base_q = randn(20, 2, 8, 2 * 70, 32)   # [b, h, s, d] storage
    base_k = randn(21, 2, 4, 90, 32)
    base_v = randn(22, 1, 90, 4, 32)
    views = (base_q[:, ::2, ::2].transpose(1, 2),   # [2, 70, 4, 32], strided in every axis but head_dim
             base_k[:, ::2].transpose(1, 2),        # [2, 90, 2, 32]
             base_v[:, :, :2].expand(2, 90, 2, 32))  # stride 0 along batch
    assert not any(x.is_contiguous() for x in views)
    copies = tuple(x.contiguous() for x in views)
    dout = randn(23, 2, 70, 4, 32)
    results = []
    for tensors in (views, copies):
        leaves = tuple(x.detach().requires_grad_(True) for x in tensors)
        inputs = (leaves[0], leaves[1], leaves[2])
        out, lse = ft.flash_attn_func(*inputs, causal=True, return_lse=True)
        results.append((out, lse, *torch.autograd.grad(out, leaves, dout)))
    for a, b in zip(*results):
        assert torch.equal(a, b)
    # A non-contiguous dout (the expanded gradient of .sum()) gives the same gradients as a contiguous one.
    leaves = tuple(x.detach().requires_grad_(True) for x in views)
    ft.flash_attn_func(*leaves, causal=True).sum().backward()
    expected = torch.autograd.grad(ft.flash_attn_func(*leaves, causal=True), leaves, torch.ones(2, 70, 4, 32))
    for leaf, want in zip(leaves, expected):
        assert torch.equal(leaf.grad, want)


def test_sdpa_layout_matches_flash_layout():
    q, k, v = qkv_bhsd(24, 2, 60, 60, 4, 2, 16)
    out = ft.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    direct = ft.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
    assert torch.equal(out, direct.transpose(1, 2))
    assert out.is_contiguous()  # written by the library in torch's [b, h, s, d] layout, no transpose


@pytest.mark.parametrize("dtype", [torch.float32] + HALF_DTYPES, ids=str)
def test_zero_copy(monkeypatch, dtype):
    """The library sees the tensors' own memory, and out/lse/gradients are the tensors the library wrote."""
    seen = {}
    real_forward, real_backward = _torch_raw.forward, _torch_raw.backward

    def forward(q, k, v, out, lse, *args, **kwargs):
        seen["forward"] = [None if x is None else x.data_ptr() for x in (q, k, v, out, lse)]
        return real_forward(q, k, v, out, lse, *args, **kwargs)

    def backward(dout, q, k, v, out, lse, dq, dk, dv, *args, **kwargs):
        seen["backward"] = [x.data_ptr() for x in (dout, q, k, v, out, lse, dq, dk, dv)]
        return real_backward(dout, q, k, v, out, lse, dq, dk, dv, *args, **kwargs)

    monkeypatch.setattr(_torch_raw, "forward", forward)
    monkeypatch.setattr(_torch_raw, "backward", backward)
    q, k, v = (x.transpose(1, 2).requires_grad_(True) for x in
               (randn(30, 1, 4, 9, 8, dtype=dtype), randn(31, 1, 2, 11, 8, dtype=dtype), randn(32, 1, 2, 11, 8, dtype=dtype)))
    out, lse = ft.flash_attn_func(q, k, v, return_lse=True)
    assert seen["forward"] == [x.data_ptr() for x in (q, k, v, out, lse)]
    dout = randn(33, *out.shape, dtype=dtype)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    assert seen["backward"] == [x.data_ptr() for x in (dout, q, k, v, out, lse, *grads)]
    with torch.no_grad():  # the direct path (no operator dispatch) is zero-copy as well
        out = ft.flash_attn_func(q, k, v)
    assert seen["forward"][:4] == [x.data_ptr() for x in (q, k, v, out)]


# --- half dtypes -----------------------------------------------------------------------------------------------


def rounding_rule(out, ref, dtype):
    """FlashAttention's acceptance rule: error <= 2 x the error of the float64 result rounded to dtype."""
    out, ref = out.detach(), ref.detach()
    ours = float((out.double() - ref).abs().max())
    rounded = float((ref.to(dtype).double() - ref).abs().max())
    assert ours <= 2 * rounded + 1e-12, f"error {ours:.3g} > 2 x {rounded:.3g}"


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_half_forward_and_backward(dtype, causal):
    q, k, v = qkv_bhsd(40, 2, 113, 113, 4, 2, 64, dtype=dtype, requires_grad=True)
    out = ft.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    assert out.dtype == dtype
    q64, k64, v64 = (x.detach().double().requires_grad_(True) for x in (q, k, v))
    ref = F.scaled_dot_product_attention(q64, k64, v64, is_causal=causal, enable_gqa=True)
    rounding_rule(out, ref, dtype)
    dout = randn(41, *out.shape, dtype=dtype)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    expected = torch.autograd.grad(ref, (q64, k64, v64), dout.double())
    for got, want, leaf in zip(grads, expected, (q, k, v)):
        assert got.dtype == dtype and got.shape == leaf.shape
        # float32 arithmetic, then one rounding to the half dtype: about eps / 4 here, bound eps.
        assert relative(got, want) <= torch.finfo(dtype).eps, f"relative error {relative(got, want):.3g}"


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_float32_queries_with_half_keys(dtype):
    q = randn(42, 1, 50, 4, 32)
    k, v = randn(43, 1, 80, 2, 32, dtype=dtype), randn(44, 1, 80, 2, 32, dtype=dtype)
    out = ft.flash_attn_func(q, k, v, causal=True)
    assert out.dtype == torch.float32
    ref, _ = reference(q, k, v, causal=True)
    assert float((out.double() - ref).abs().max()) <= OUT_ABSOLUTE


def test_torch_adapter_needs_no_ml_dtypes_and_imports_fast():
    """bfloat16 tensors go to the library as a dtype code: ml_dtypes is never imported (it used to cost most of
    the 0.6-0.75 s import); importing flash_attention.torch after torch stays well under 0.2 s."""
    code = (
        "import sys, time, torch\n"
        "sys.modules['ml_dtypes'] = None  # any import of ml_dtypes now fails\n"
        "start = time.perf_counter()\n"
        "import flash_attention.torch as ft\n"
        "elapsed = time.perf_counter() - start\n"
        "x = torch.randn(1, 5, 2, 8).to(torch.bfloat16)\n"
        "out = ft.flash_attn_func(x, x, x)\n"
        "assert out.dtype == torch.bfloat16\n"
        "print(elapsed)\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    result = subprocess.run([sys.executable, "-c", code], check=True, env=env, capture_output=True, text=True)
    assert float(result.stdout.split()[-1]) < 0.2


# --- torch.compile and the custom-op contracts -----------------------------------------------------------------


def loss_fn(q, k, v, sinks):
    q = q * 1.5
    out = ft.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True, sinks=sinks,
                             softcap=4.0)
    return (out.float() * torch.linspace(-1, 1, out.shape[-1])).square().sum()


def check_compiled(compiled, shape, seed):
    q, k, v = qkv_bhsd(seed, *shape, requires_grad=True)
    sinks = torch.tensor([0.1, -0.2, 0.3, 0.0][:shape[3]], requires_grad=True)
    leaves = (q, k, v, sinks)
    got = compiled(*leaves)
    got_grads = torch.autograd.grad(got, leaves)
    want = loss_fn(*leaves)
    want_grads = torch.autograd.grad(want, leaves)
    # The graph around the op may be fused and reordered by the compiler; the op itself is the same call.
    assert torch.allclose(got, want, rtol=1e-5)
    for a, b in zip(got_grads, want_grads):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def cxx_compiler():
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++") or shutil.which("c++")


@pytest.mark.skipif(cxx_compiler() is None, reason="torch.compile's inductor backend needs a C++ compiler on CPU")
def test_torch_compile_inductor_fullgraph():
    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True)
    check_compiled(compiled, (2, 33, 33, 4, 2, 16), 50)


def test_torch_compile_aot_eager_dynamic_shapes():
    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager", dynamic=True)
    for seed, shape in enumerate([(2, 33, 33, 4, 2, 16), (1, 20, 57, 4, 4, 16), (3, 64, 48, 4, 1, 16)]):
        check_compiled(compiled, shape, 60 + seed)


def test_opcheck():
    """torch.library.opcheck: schema, fake (meta) implementations, autograd registration, AOT dispatch."""
    q, k, v = qkv_bshd(70, 2, 9, 13, 4, 2, 8, requires_grad=True)
    sinks = torch.tensor([0.1, 0.2, 0.3, 0.4], requires_grad=True)
    alibi = torch.tensor([0.1, 0.2, 0.3, 0.4])
    forward_args = [
        (q, k, v, None, False, -1, -1, 0.0, None, None, 0, 0.0, 0),
        (q, k, v, 0.5, True, 5, 0, 2.0, alibi, sinks, 1, 0.25, 12345),
    ]
    for args in forward_args:
        torch.library.opcheck(torch.ops.flash_attention.forward.default, args)
        with torch.no_grad():
            out, lse = torch.ops.flash_attention.forward(*args)
        dout = torch.randn_like(out)
        # The backward op has no autograd of its own (no double backward), so its inputs need no grad.
        options = tuple(x.detach() if isinstance(x, torch.Tensor) else x for x in args[3:])
        backward_args = (dout, q.detach(), k.detach(), v.detach(), out, lse) + options
        torch.library.opcheck(torch.ops.flash_attention.backward.default, backward_args)


def test_meta_tensors_give_shapes():
    q = torch.empty(2, 7, 8, 16, device="meta", dtype=torch.float16)
    k = torch.empty(2, 11, 2, 16, device="meta", dtype=torch.float16)
    out, lse = ft.flash_attn_func(q, k, k, return_lse=True)
    assert out.device.type == "meta" and out.shape == q.shape and out.dtype == torch.float16
    assert lse.shape == (2, 8, 7) and lse.dtype == torch.float32
    with pytest.raises(ValueError, match="multiple of heads_kv"):
        ft.flash_attn_func(q, torch.empty(2, 11, 3, 16, device="meta", dtype=torch.float16),
                           torch.empty(2, 11, 3, 16, device="meta", dtype=torch.float16))


# --- errors ----------------------------------------------------------------------------------------------------


def test_non_cpu_device_is_a_clear_error():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():  # a CUDA tensor without a GPU: the device check runs before any data is touched
        x = torch.empty(1, 4, 2, 8, device="cuda")
        with pytest.raises(ValueError, match="CPU only"):
            ft.flash_attn_func(x, x, x)
    cpu, meta = torch.empty(1, 4, 2, 8), torch.empty(1, 4, 2, 8, device="meta")
    with pytest.raises(ValueError, match="device meta but q is on cpu"):
        ft.flash_attn_func(cpu, meta, meta)


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32, torch.complex64], ids=str)
def test_wrong_dtype_is_a_type_error(dtype):
    good = torch.zeros(1, 4, 2, 8)
    bad = torch.zeros(1, 4, 2, 8, dtype=dtype)
    with pytest.raises(TypeError, match="q must have dtype"):
        ft.flash_attn_func(bad, good, good)
    with pytest.raises(TypeError, match="v must have dtype"):
        ft.flash_attn_func(good, good, bad)


def test_other_type_errors():
    x = torch.zeros(1, 4, 2, 8)
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        ft.flash_attn_func(np.zeros((1, 4, 2, 8), np.float32), x, x)
    with pytest.raises(TypeError, match="v must have the dtype of k"):
        ft.flash_attn_func(x, x, x.half())
    with pytest.raises(TypeError, match="window_size"):
        ft.flash_attn_func(x, x, x, window_size=3)
    with pytest.raises(TypeError):  # torch's own function answers what the library does not take
        ft.scaled_dot_product_attention(np.zeros((1, 2, 4, 8), np.float32), x, x)


@pytest.mark.parametrize("q_shape,kv_shape,message", [
    ((1, 4, 3, 8), (1, 4, 2, 8), r"heads_q \(3\) is not a multiple of heads_kv \(2\)"),
    ((1, 4, 2, 8), (2, 4, 2, 8), "does not match q shape"),
    ((1, 4, 2, 8), (1, 4, 2, 16), "does not match q shape"),
    ((4, 2, 8), (1, 4, 2, 8), "q must have 4 dimensions"),
])
def test_wrong_shape_is_a_value_error_with_the_library_message(q_shape, kv_shape, message):
    q, kv = torch.zeros(q_shape), torch.zeros(kv_shape)
    with pytest.raises(ValueError, match=message):
        ft.flash_attn_func(q, kv, kv)


def test_bad_options_are_value_errors():
    x = torch.zeros(1, 4, 2, 8)
    with pytest.raises(ValueError, match="sinks must have shape"):
        ft.flash_attn_func(x, x, x, sinks=torch.zeros(3))
    with pytest.raises(ValueError, match="softcap"):
        ft.flash_attn_func(x, x, x, softcap=-1.0)
    with pytest.raises(ValueError, match="window_size"):
        ft.flash_attn_func(x, x, x, window_size=(-2, 0))
    with pytest.raises(ValueError, match="4 dimensions"):
        ft.flash_attn_func(torch.zeros(4, 2, 8), x, x)

"""flash_attention.torch.scaled_dot_product_attention as a drop-in for torch's, and the mask plans behind it
(flash_attention._torch_masked): results against torch's own function in float64, which path ran (library or
torch's fallback), gradients, torch.compile, and replacing F.scaled_dot_product_attention.

Tolerances: float32 out within 2e-6 relative (norm) and 1e-5 absolute of float64 on N(0, 1) inputs, as for the
rest of the binding; gradients within 1e-5 relative. Skipped entirely when torch is not importable.
"""

import math
import warnings

import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

import flash_attention.torch as ft  # noqa: E402
from flash_attention import _torch_masked, _torch_raw  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")

OUT_RELATIVE = 2e-6
OUT_ABSOLUTE = 1e-5
GRAD_RELATIVE = 1e-5
TORCH_SDPA = torch._C._nn.scaled_dot_product_attention  # torch's own, whatever F's attribute holds


def randn(seed, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def qkv(seed, b, hq, hk, sq, sk, d, dtype=torch.float32):
    return randn(seed, b, hq, sq, d, dtype=dtype), randn(seed + 1, b, hk, sk, d, dtype=dtype), \
        randn(seed + 2, b, hk, sk, d, dtype=dtype)


def relative(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float(torch.linalg.vector_norm(a - b) / max(float(torch.linalg.vector_norm(b)), 1e-30))


def assert_close(out, ref):
    assert out.shape == ref.shape
    assert relative(out, ref) <= OUT_RELATIVE, f"relative error {relative(out, ref):.3g}"
    assert float((out.detach().double() - ref.detach()).abs().max()) <= OUT_ABSOLUTE


def reference(q, k, v, **kwargs):
    """torch's own function in float64 (the semantics to match)."""
    mask = kwargs.pop("attn_mask", None)
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.double()
    return TORCH_SDPA(q.double(), k.double(), v.double(), attn_mask=mask, **kwargs)


class Paths:
    """Counts library calls and torch fallbacks during a block."""

    def __init__(self, monkeypatch):
        self.library, self.torch = 0, 0
        for name in ("forward", "varlen_forward", "kvcache_forward"):
            real = getattr(_torch_raw, name)
            monkeypatch.setattr(_torch_raw, name, self._wrap(real, "library"))
        monkeypatch.setattr(_torch_masked, "torch_sdpa", self._wrap(TORCH_SDPA, "torch"))
        monkeypatch.setattr(ft._masked, "torch_sdpa", _torch_masked.torch_sdpa)

    def _wrap(self, real, counter):
        def call(*args, **kwargs):
            setattr(self, counter, getattr(self, counter) + 1)
            return real(*args, **kwargs)
        return call


def causal_lower_right(sq, sk):
    i = torch.arange(sq)[:, None] + sk - sq
    return torch.arange(sk)[None, :] <= i


# --- no mask: is_causal with torch's top-left alignment --------------------------------------------------------

@pytest.mark.parametrize("sq,sk", [(64, 64), (37, 101), (101, 37), (1, 50), (50, 1)], ids=lambda x: str(x))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "is_causal"])
def test_no_mask_matches_torch(sq, sk, causal, monkeypatch):
    paths = Paths(monkeypatch)
    q, k, v = qkv(1, 2, 4, 4, sq, sk, 32)
    out = ft.scaled_dot_product_attention(q, k, v, is_causal=causal)
    assert_close(out, reference(q, k, v, is_causal=causal))
    assert out.dtype == q.dtype and paths.library == 1 and paths.torch == 0


def test_gqa_scale_and_broadcast_heads():
    q, k, v = qkv(2, 2, 8, 2, 40, 60, 64)
    assert_close(ft.scaled_dot_product_attention(q, k, v, scale=0.3, enable_gqa=True),
                 reference(q, k, v, scale=0.3, enable_gqa=True))
    k1, v1 = k[:, :1], v[:, :1]  # one kv head: torch broadcasts it without enable_gqa
    assert_close(ft.scaled_dot_product_attention(q, k1, v1, is_causal=True), reference(q, k1, v1, is_causal=True))
    with pytest.raises(RuntimeError):  # 8 query heads on 2 kv heads without enable_gqa: torch's own error
        ft.scaled_dot_product_attention(q, k, v)


def test_three_dimensional_inputs():
    q, k, v = (x[:, 0] for x in qkv(3, 3, 1, 1, 20, 30, 16))
    mask = padding([30, 22, 9], 30, left=False)[:, None, :]
    assert_close(ft.scaled_dot_product_attention(q, k, v, is_causal=True), reference(q, k, v, is_causal=True))
    assert_close(ft.scaled_dot_product_attention(q, k, v, attn_mask=mask), reference(q, k, v, attn_mask=mask))


# --- masks the library expresses exactly ---------------------------------------------------------------------

B, H, HK, SQ, SK, D = 3, 4, 2, 37, 53, 32


def padding(lengths, seqlen, left):
    positions = torch.arange(seqlen)[None, :]
    lengths = torch.tensor(lengths)[:, None]
    return positions >= seqlen - lengths if left else positions < lengths


def masks():
    i = torch.arange(SQ)[:, None] + SK - SQ
    j = torch.arange(SK)[None, :]
    left_pad = padding([SK, SK - 5, SK - 20], SK, left=True)
    right_pad = padding([SK, SK - 5, SK - 20], SK, left=False)
    return {
        "all-true": (torch.ones(SQ, SK, dtype=torch.bool), _torch_masked.DENSE),
        "top-left-causal": (torch.ones(SQ, SK, dtype=torch.bool).tril(), _torch_masked.DENSE),
        "bottom-right-causal": (causal_lower_right(SQ, SK), _torch_masked.DENSE),
        "window-7": ((j <= i) & (j > i - 7), _torch_masked.DENSE),
        "band-both-sides": ((j <= i + 3) & (j >= i - 10), _torch_masked.DENSE),
        "left-padding": (left_pad[:, None, None, :], _torch_masked.RANGES),
        "left-padding-causal": (left_pad[:, None, None, :] & (j <= i), _torch_masked.RANGES),
        "left-padding-window": (left_pad[:, None, None, :] & (j <= i) & (j > i - 9), _torch_masked.RANGES),
        "right-padding": (right_pad[:, None, None, :], _torch_masked.RANGES),
        "right-padding-top-left-causal": (right_pad[:, None, None, :] & torch.ones(SQ, SK, dtype=torch.bool).tril(),
                                          _torch_masked.PER_BATCH),
        "right-padding-past-a-window": (right_pad[:, None, None, :] & (j <= i - (SK - SQ)) & (j > i - (SK - SQ) - 5),
                                        _torch_masked.PER_BATCH),
        "per-head-identical": ((left_pad[:, None, None, :] & (j <= i)).expand(B, H, SQ, SK), _torch_masked.RANGES),
        "empty-entry": (torch.stack([torch.ones(SQ, SK, dtype=torch.bool), torch.zeros(SQ, SK, dtype=torch.bool),
                                     torch.ones(SQ, SK, dtype=torch.bool).tril()])[:, None], _torch_masked.PER_BATCH),
    }


MASKS = masks()


@pytest.mark.parametrize("name", MASKS)
def test_expressible_bool_masks_run_in_the_library(name, monkeypatch):
    mask, kind = MASKS[name]
    q, k, v = qkv(4, B, H, HK, SQ, SK, D)
    plan = _torch_masked.plan(q.transpose(1, 2), k.transpose(1, 2), mask=mask)
    assert plan.kind == kind
    paths = Paths(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback would warn
        out = ft.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    assert_close(out, reference(q, k, v, attn_mask=mask, enable_gqa=True))
    assert paths.torch == 0 and paths.library >= 1


@pytest.mark.parametrize("name", ["left-padding-causal", "right-padding", "window-7"])
def test_float_masks_of_zero_and_minus_infinity(name, monkeypatch):
    mask, kind = MASKS[name]
    additive = torch.zeros(mask.shape).masked_fill(~mask, -math.inf)
    q, k, v = qkv(5, B, H, HK, SQ, SK, D)
    paths = Paths(monkeypatch)
    out = ft.scaled_dot_product_attention(q, k, v, attn_mask=additive, enable_gqa=True)
    assert_close(out, reference(q, k, v, attn_mask=additive, enable_gqa=True))
    assert paths.torch == 0


def test_mask_and_is_causal_both_apply(monkeypatch):
    """torch 2.13 applies attn_mask and its top-left is_causal together; so does the drop-in."""
    mask = padding([SK, SK - 5, SK - 20], SK, left=False)[:, None, None, :]
    q, k, v = qkv(6, B, H, HK, SQ, SK, D)
    paths = Paths(monkeypatch)
    out = ft.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=True, enable_gqa=True)
    assert_close(out, reference(q, k, v, attn_mask=mask, is_causal=True, enable_gqa=True))
    assert paths.torch == 0


@pytest.mark.filterwarnings("ignore:flash_attention")
def test_fully_masked_rows_give_zero_like_torch():
    q, k, v = qkv(7, 2, 2, 2, 10, 12, 16)
    mask = torch.ones(2, 1, 10, 12, dtype=torch.bool)
    mask[1] = False
    mask[0, 0, :3] = False
    out = ft.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    ref = reference(q, k, v, attn_mask=mask)
    assert torch.equal(ref[1], torch.zeros_like(ref[1])) and torch.equal(out[1], torch.zeros_like(out[1]))
    assert_close(out, ref)


# --- what falls back to torch's own function -------------------------------------------------------------------


def test_other_masks_run_in_the_library_as_its_attn_mask(monkeypatch):
    q, k, v = qkv(8, B, H, HK, SQ, SK, D)
    mask = torch.rand(B, 1, SQ, SK, generator=torch.Generator().manual_seed(1)) > 0.4
    paths = Paths(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = ft.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    assert paths.torch == 0 and paths.library == 1
    assert_close(out, reference(q, k, v, attn_mask=mask, enable_gqa=True))
    per_head = torch.rand(1, H, SQ, SK, generator=torch.Generator().manual_seed(2)) > 0.5
    assert _torch_masked.plan(q.transpose(1, 2), k.transpose(1, 2), mask=per_head).kind == _torch_masked.MASK
    out = ft.scaled_dot_product_attention(q, k, v, attn_mask=per_head, is_causal=True, enable_gqa=True)
    assert_close(out, reference(q, k, v, attn_mask=per_head & torch.ones(SQ, SK, dtype=torch.bool).tril(),
                                enable_gqa=True))


def test_additive_biases_run_in_the_library_and_other_unsupported_calls_are_torchs_own(monkeypatch):
    q, k, v = qkv(9, 2, 4, 4, 20, 30, 16)
    bias = randn(10, 2, 1, 20, 30)
    paths = Paths(monkeypatch)
    assert_close(ft.scaled_dot_product_attention(q, k, v, attn_mask=bias), reference(q, k, v, attn_mask=bias))
    assert_close(ft.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=True),
                 reference(q, k, v, attn_mask=bias, is_causal=True))
    assert paths.torch == 0 and paths.library == 2
    q64, k64, v64 = q.double(), k.double(), v.double()
    assert torch.equal(ft.scaled_dot_product_attention(q64, k64, v64, is_causal=True),
                       TORCH_SDPA(q64, k64, v64, is_causal=True))
    # dropout: torch's own function with torch's random stream (the library has no dropout).
    torch.manual_seed(123)
    ours = ft.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    torch.manual_seed(123)
    assert torch.equal(ours, TORCH_SDPA(q, k, v, dropout_p=0.5))
    assert torch.equal(ft.scaled_dot_product_attention(q, k, v, scale=0.0), TORCH_SDPA(q, k, v, scale=0.0))
    with pytest.raises(TypeError):  # the keyword-only arguments of torch's builtin
        ft.scaled_dot_product_attention(q, k, v, None, 0.0, False, 0.5)


# --- gradients -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["left-padding-causal", "right-padding-top-left-causal", "window-7",
                                  "empty-entry", "right-padding-past-a-window"])
def test_masked_gradients_match_float64(name):
    mask, _ = MASKS[name]
    q, k, v = (x.requires_grad_(True) for x in qkv(11, B, H, HK, SQ, SK, D))
    dout = randn(14, B, H, SQ, D)
    out = ft.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    q64, k64, v64 = (x.detach().double().requires_grad_(True) for x in (q, k, v))
    ref = TORCH_SDPA(q64, k64, v64, attn_mask=mask, enable_gqa=True)
    expected = torch.autograd.grad(ref, (q64, k64, v64), dout.double())
    for got, want in zip(grads, expected):
        assert relative(got, want) <= GRAD_RELATIVE, f"relative error {relative(got, want):.3g}"


@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_attn_mask_gradients_match_float64(kind):
    q, k, v = (x.requires_grad_(True) for x in qkv(15, 2, 4, 2, 20, 30, 16))
    mask = torch.rand(2, 1, 20, 30, generator=torch.Generator().manual_seed(3)) > 0.4
    if kind == "additive":
        mask = torch.where(mask, randn(16, 2, 1, 20, 30), -math.inf)
    out = ft.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    q64, k64, v64 = (x.detach().double().requires_grad_(True) for x in (q, k, v))
    ref = TORCH_SDPA(q64, k64, v64, attn_mask=mask if kind == "bool" else mask.double(), enable_gqa=True)
    expected = torch.autograd.grad(ref.square().sum(), (q64, k64, v64))
    for got, want in zip(grads, expected):
        assert relative(got, want) <= GRAD_RELATIVE


def test_attn_mask_with_softcap_and_sinks_matches_float64_autograd():
    """A general mask with softcap and sinks (torch's function has neither): the library's attn_mask, forward
    and backward, against float64 autograd."""
    q, k, v = (x.transpose(1, 2).requires_grad_(True) for x in qkv(27, 2, 4, 2, 20, 30, 16))
    sinks = torch.tensor([0.5, -1.0, 2.0, 0.0], requires_grad=True)
    mask = torch.rand(2, 1, 20, 30, generator=torch.Generator().manual_seed(4)) > 0.4
    out = ft._attention(q, k, v, mask=mask, softcap=2.5, sinks=sinks)
    dout = randn(28, *out.shape)
    grads = torch.autograd.grad(out, (q, k, v, sinks), dout)
    q64, k64, v64, s64 = (x.detach().double().requires_grad_(True) for x in (q, k, v, sinks))
    scores = torch.matmul(q64.transpose(1, 2), k64.transpose(1, 2).repeat_interleave(2, 1).transpose(-1, -2)) / 4.0
    scores = (2.5 * torch.tanh(scores / 2.5)).masked_fill(~mask, -math.inf)
    scores = torch.cat([scores, s64[None, :, None, None].expand(2, 4, 20, 1)], -1)
    ref = torch.matmul(torch.softmax(scores, -1)[..., :-1], v64.transpose(1, 2).repeat_interleave(2, 1))
    ref = ref.transpose(1, 2)
    assert_close(out, ref)
    expected = torch.autograd.grad(ref, (q64, k64, v64, s64), dout.double())
    for got, want in zip(grads, expected):
        assert relative(got, want) <= GRAD_RELATIVE, f"relative error {relative(got, want):.3g}"


# --- half precision, strides -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_dtypes_follow_the_rounding_rule(dtype):
    """FlashAttention's rule: error against float64 at most 2x that of the float64 result rounded to dtype."""
    mask = MASKS["left-padding-causal"][0]
    q, k, v = qkv(16, B, H, HK, SQ, SK, D, dtype=dtype)
    out = ft.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    ref = reference(q, k, v, attn_mask=mask, enable_gqa=True)
    assert out.dtype == dtype
    ours = float((out.double() - ref).abs().max())
    rounded = float((ref.to(dtype).double() - ref).abs().max())
    assert ours <= 2 * rounded + 1e-12


def test_ranges_plan_reads_a_transformers_cache_in_place(monkeypatch):
    """Left-padded decoding against a [batch, heads, seqlen, head_dim] cache: one KV-cache call whose cache
    rows start inside the tensor, no copy; and the per-entry route gives the same result bitwise."""
    cache_k, cache_v = randn(17, 3, 2, 300, 64), randn(18, 3, 2, 300, 64)
    q = randn(19, 3, 8, 1, 64)
    mask = padding([300, 250, 7], 300, left=True)[:, None, None, :]
    seen = []
    real = _torch_raw.kvcache_forward
    monkeypatch.setattr(_torch_raw, "kvcache_forward",
                        lambda *a, **kw: seen.append((a[1].data_ptr(), a[2].data_ptr())) or real(*a, **kw))
    with torch.no_grad():
        out = ft.scaled_dot_product_attention(q, cache_k, cache_v, attn_mask=mask, enable_gqa=True)
    assert seen == [(cache_k.data_ptr(), cache_v.data_ptr())]
    assert_close(out, reference(q, cache_k, cache_v, attn_mask=mask, enable_gqa=True))
    monkeypatch.setattr(_torch_masked, "ranges_forward", lambda *a, **kw: False)  # force one call per entry
    _torch_masked._cache.clear()
    with torch.no_grad():
        per_entry = ft.scaled_dot_product_attention(q, cache_k, cache_v, attn_mask=mask, enable_gqa=True)
    assert torch.equal(out, per_entry)


def test_ranges_call_declines_when_out_lies_in_the_described_cache():
    """The one-call route describes each entry's keys as a cache row reaching max(lengths) keys, which can
    extend past the last entry's real keys; when out lies there (the library would reject the overlap) the
    route declines, writing nothing, and the per-entry calls run instead."""
    storage = torch.zeros(2 * 2 * 40 * 16 + 2 * 40 * 16 + 4 * 16)
    k = storage[:2 * 40 * 2 * 16].view(2, 40, 2, 16)          # entries 0 and 1, 40 keys each
    v = torch.randn(2, 40, 2, 16)
    k.copy_(torch.randn(2, 40, 2, 16))
    q = torch.randn(2, 1, 4, 16)
    out = storage[2 * 40 * 2 * 16 + 16:][:2 * 4 * 16].view(2, 1, 4, 16)   # right after k's memory
    options = dict(scale=None, softcap=0.0, sinks=None, num_threads=0, window_left=-1, window_right=-1)
    before = out.clone()
    assert not _torch_masked.ranges_forward(q, k, v, out, None, [0, 30], [40, 40], options)
    assert torch.equal(out, before)
    fresh = torch.empty(2, 1, 4, 16)
    assert _torch_masked.ranges_forward(q, k, v, fresh, None, [0, 30], [40, 40], options)
    for b, start in enumerate([0, 30]):
        ref = reference(q[b:b + 1].transpose(1, 2), k[b:b + 1, start:].transpose(1, 2),
                        v[b:b + 1, start:].transpose(1, 2), enable_gqa=True).transpose(1, 2)
        assert_close(fresh[b:b + 1], ref)


# --- packed sequences ------------------------------------------------------------------------------------------


def packed_mask(lengths, window=None):
    ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])
    i, j = torch.arange(len(ids))[:, None], torch.arange(len(ids))[None, :]
    mask = (ids[:, None] == ids[None, :]) & (j <= i)
    if window:
        mask &= j > i - window
    return ids, mask


@pytest.mark.parametrize("window", [None, 6])
def test_packed_sequences_from_a_hint_and_as_seq_ids(window):
    ids, mask = packed_mask([10, 25, 1, 14], window)
    q, k, v = (x.transpose(1, 2) for x in qkv(20, 1, 4, 2, 50, 50, 32))
    left = window - 1 if window else -1
    ref = reference(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                    enable_gqa=True).transpose(1, 2)
    plan = _torch_masked.plan(q, k, mask=mask, hint=ids[None])
    assert plan.kind == _torch_masked.PACKED and plan.cu.tolist() == [0, 10, 35, 36, 50]
    assert_close(ft._attention(q, k, v, mask=mask, hint=ids[None]), ref)
    assert_close(ft._attention(q, k, v, seq_ids=ids[None], causal=True, window_left=left), ref)
    # A hint that does not reproduce the mask is not used.
    wrong = torch.cat([torch.zeros(20), torch.ones(30)]).long()[None]
    assert _torch_masked.plan(q, k, mask=mask, hint=wrong).kind == _torch_masked.MASK


def test_packed_gradients_match_float64():
    ids, mask = packed_mask([7, 20, 13])
    q, k, v = (x.transpose(1, 2).requires_grad_(True) for x in qkv(21, 2, 4, 2, 40, 40, 16))
    out = ft._attention(q, k, v, seq_ids=ids[None], causal=True)
    dout = randn(22, *out.shape)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    q64, k64, v64 = (x.detach().double().requires_grad_(True) for x in (q, k, v))
    ref = TORCH_SDPA(q64.transpose(1, 2), k64.transpose(1, 2), v64.transpose(1, 2), attn_mask=mask,
                     enable_gqa=True).transpose(1, 2)
    expected = torch.autograd.grad(ref, (q64, k64, v64), dout.double())
    for got, want in zip(grads, expected):
        assert relative(got, want) <= GRAD_RELATIVE


def test_softcap_and_sinks_under_a_mask():
    """The masked path carries softcap and sinks (the transformers backend's Gemma 2 and gpt-oss options)."""
    mask = MASKS["left-padding-causal"][0]
    q, k, v = (x.transpose(1, 2) for x in qkv(23, B, H, HK, SQ, SK, D))
    sinks = torch.tensor([0.5, -1.0, 2.0, 0.0])
    out = ft._attention(q, k, v, mask=mask, softcap=3.0, sinks=sinks)
    q64, k64, v64 = (x.double().transpose(1, 2) for x in (q, k, v))
    s = torch.matmul(q64, k64.repeat_interleave(2, 1).transpose(-1, -2)) / math.sqrt(D)
    s = (3.0 * torch.tanh(s / 3.0)).masked_fill(~mask, -math.inf)
    s = torch.cat([s, sinks.double()[None, :, None, None].expand(B, H, SQ, 1)], -1)
    p = torch.softmax(s, -1)[..., :-1]
    ref = torch.matmul(p, v64.repeat_interleave(2, 1)).transpose(1, 2)
    assert_close(out, ref)


# --- torch.compile and the operator contracts -------------------------------------------------------------------


def masked_loss(q, k, v, mask):
    out = ft.scaled_dot_product_attention(q * 1.5, k, v, attn_mask=mask, enable_gqa=True)
    return (out * torch.linspace(-1, 1, out.shape[-1])).square().sum()


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_with_masks(backend):
    if backend == "inductor":
        import shutil
        if not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")):
            pytest.skip("torch.compile's inductor backend needs a C++ compiler on CPU")
    torch._dynamo.reset()
    compiled = torch.compile(masked_loss, fullgraph=True, backend=backend)
    for name in ("left-padding-causal", "right-padding-top-left-causal"):
        mask = MASKS[name][0]
        q, k, v = (x.requires_grad_(True) for x in qkv(24, B, H, HK, SQ, SK, D))
        got = compiled(q, k, v, mask)
        got_grads = torch.autograd.grad(got, (q, k, v))
        want = masked_loss(q, k, v, mask)
        want_grads = torch.autograd.grad(want, (q, k, v))
        assert torch.allclose(got, want, rtol=1e-5)
        for a, b in zip(got_grads, want_grads):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_opcheck_masked_operators():
    q, k, v = (x.transpose(1, 2).requires_grad_(True) for x in qkv(25, 2, 4, 2, 9, 13, 8))
    mask = padding([13, 6], 13, left=True)[:, None, None, :]
    ids = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2, 2]])
    square = tuple(x.detach()[:, :9].requires_grad_(True) for x in (k, v))
    for args in [(q, k, v, mask, None, None, None, None, False, -1, -1, 0.0, None, 0),
                 (q, k, v, None, padding([13, 9], 13, left=False), None, None, 0.5, True, 4, 0, 2.0, None, 1),
                 (q, *square, None, None, ids, None, None, True, -1, 0, 0.0, None, 0)]:
        torch.library.opcheck(torch.ops.flash_attention.masked_forward.default, args)


# --- replacing torch's function --------------------------------------------------------------------------------


def test_replacing_torch_function_keeps_torch_modules_working(monkeypatch):
    """F.scaled_dot_product_attention = ours: torch's own modules (TransformerEncoderLayer with a key padding
    mask, MultiheadAttention with a causal mask) give their unpatched results."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True).eval()
    mha = torch.nn.MultiheadAttention(64, 4, batch_first=True).eval()
    x = randn(26, 3, 20, 64)
    pad = padding([20, 14, 3], 20, left=False) == False  # noqa: E712  (True = padded, torch's convention)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(20)
    with torch.no_grad():
        want = layer(x, src_key_padding_mask=pad), mha(x, x, x, attn_mask=causal, need_weights=False)[0]
        monkeypatch.setattr(F, "scaled_dot_product_attention", ft.scaled_dot_product_attention)
        got = layer(x, src_key_padding_mask=pad), mha(x, x, x, attn_mask=causal, need_weights=False)[0]
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-5)


# --- value heads of their own size (MLA) -----------------------------------------------------------------------


@pytest.mark.parametrize("mask", [None, "bool", "padding"])
def test_value_head_size_of_its_own_runs_in_the_library(mask, monkeypatch):
    """torch allows value.shape[-1] != query.shape[-1]; so does the library (head_dim_v): forward and gradients
    against torch's own function in float64, with no mask, a general mask (the library's attn_mask) and a key
    padding mask (a key-range plan)."""
    q, k, _ = qkv(31, 2, 4, 4, 23, 37, 40)
    v = randn(34, 2, 4, 37, 24).requires_grad_()
    q, k = q.requires_grad_(), k.requires_grad_()
    attn_mask = None
    if mask == "bool":
        attn_mask = randn(35, 2, 1, 23, 37) > -0.5
    elif mask == "padding":
        attn_mask = (torch.arange(37) < torch.tensor([[30], [37]]))[:, None, None, :]
    paths = Paths(monkeypatch)
    out = ft.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    assert paths.library >= 1 and paths.torch == 0
    ref = reference(q, k, v, attn_mask=attn_mask)
    assert_close(out, ref)
    dout = randn(36, *out.shape)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    want = torch.autograd.grad(ref, (q, k, v), dout.double())
    for got, w in zip(grads, want):
        assert relative(got, w) <= GRAD_RELATIVE


def test_flash_attn_functions_with_value_head_size():
    """flash_attn_func (autograd), flash_attn_varlen_func and flash_attn_with_kvcache with MLA's absorbed cache
    (v a view of k's first columns), against torch's own attention in float64."""
    q = randn(41, 2, 19, 4, 48).requires_grad_()
    k, v = randn(42, 2, 29, 2, 48).requires_grad_(), randn(43, 2, 29, 2, 16).requires_grad_()
    out = ft.flash_attn_func(q, k, v, causal=True)
    ref = reference(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                    attn_mask=causal_lower_right(19, 29), enable_gqa=True).transpose(1, 2)
    assert_close(out, ref)
    dout = randn(44, *out.shape)
    for got, want in zip(torch.autograd.grad(out, (q, k, v), dout), torch.autograd.grad(ref, (q, k, v), dout.double())):
        assert relative(got, want) <= GRAD_RELATIVE
    cu = torch.tensor([0, 19, 38], dtype=torch.int32)
    cu_k = torch.tensor([0, 29, 58], dtype=torch.int32)
    packed = ft.flash_attn_varlen_func(q.detach().reshape(38, 4, 48), k.detach().reshape(58, 2, 48),
                                       v.detach().reshape(58, 2, 16), cu, cu_k, 19, 29, causal=True)
    assert_close(packed.reshape(out.shape), ref)
    cache = randn(45, 2, 300, 1, 576)
    query = randn(46, 2, 1, 16, 576)
    with torch.no_grad():
        decoded = ft.flash_attn_with_kvcache(query, cache, cache[..., :512],
                                             cache_seqlens=torch.tensor([300, 123], dtype=torch.int32))
    for b, n in enumerate((300, 123)):
        want = reference(query[b:b + 1].transpose(1, 2), cache[b:b + 1, :n].transpose(1, 2),
                         cache[b:b + 1, :n, :, :512].transpose(1, 2)).transpose(1, 2)
        assert_close(decoded[b:b + 1], want)

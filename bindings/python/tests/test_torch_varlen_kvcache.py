"""flash_attention.torch's varlen and KV-cache functions: parity with float64 references per sequence, varlen
gradients, in-place appends, paged and left-padded caches, fake kernels (opcheck) and torch.compile.

Tolerances as in test_torch.py: float32 out within 2e-6 relative (norm) and 1e-5 absolute of float64, LSE within
1e-5, gradients within 1e-5 relative. Skipped entirely when torch is not importable.
"""

import math

import pytest

torch = pytest.importorskip("torch")

import flash_attention.torch as ft  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")

OUT_RELATIVE = 2e-6
OUT_ABSOLUTE = 1e-5
LSE_ABSOLUTE = 1e-5
GRAD_RELATIVE = 1e-5


def randn(seed, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def relative(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float(torch.linalg.vector_norm(a - b) / max(float(torch.linalg.vector_norm(b)), 1e-30))


def assert_close(out, ref):
    assert out.shape == ref.shape
    assert relative(out, ref) <= OUT_RELATIVE, f"relative error {relative(out, ref):.3g}"
    if out.numel():
        assert float((out.double() - ref).abs().max()) <= OUT_ABSOLUTE


def attention64(q, k, v, causal=False, window=(-1, -1), softcap=0.0, scale=None):
    """float64 attention of one sequence, [seqlen, heads, head_dim], bottom-right aligned; (out, lse [heads, sq])."""
    q, k, v = q.double(), k.double(), v.double()
    sq, hq, d = q.shape
    sk, hk = k.shape[0], k.shape[1]
    k, v = k.repeat_interleave(hq // hk, 1), v.repeat_interleave(hq // hk, 1)
    s = torch.einsum("qhd,khd->hqk", q, k) * (1 / math.sqrt(d) if scale is None else scale)
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    i = torch.arange(sq)[:, None] + sk - sq
    j = torch.arange(sk)[None, :]
    left, right = window[0], 0 if causal else window[1]
    visible = torch.ones(sq, sk, dtype=torch.bool)
    if left >= 0:
        visible &= j >= i - left
    if right >= 0:
        visible &= j <= i + right
    s = s.masked_fill(~visible, -math.inf)
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - torch.where(torch.isneginf(lse), 0.0, lse)[..., None])
    return torch.einsum("hqk,khd->qhd", p, v), lse


# --- varlen ----------------------------------------------------------------------------------------------------

VARLEN = {
    "plain": dict(),
    "causal": dict(causal=True),
    "window-softcap": dict(causal=True, window_size=(6, 0), softcap=4.0),
    "scale": dict(softmax_scale=0.25),
}


def varlen_inputs(seed, lengths_q, lengths_k, hq=4, hk=2, d=32, requires_grad=False):
    cu_q = [0]
    cu_k = [0]
    for a, b in zip(lengths_q, lengths_k):
        cu_q.append(cu_q[-1] + a)
        cu_k.append(cu_k[-1] + b)
    q, k, v = randn(seed, cu_q[-1], hq, d), randn(seed + 1, cu_k[-1], hk, d), randn(seed + 2, cu_k[-1], hk, d)
    return [x.requires_grad_(requires_grad) for x in (q, k, v)], cu_q, cu_k


@pytest.mark.parametrize("name", VARLEN)
def test_varlen_matches_float64_per_sequence(name):
    options = VARLEN[name]
    (q, k, v), cu_q, cu_k = varlen_inputs(1, [17, 1, 0, 40], [23, 9, 5, 40])
    out, lse = ft.flash_attn_varlen_func(q, k, v, torch.tensor(cu_q), cu_k, return_lse=True, **options)
    assert lse.shape == (4, q.shape[0])
    window = options.get("window_size", (-1, -1))
    for b in range(4):
        rows, keys = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        ref, ref_lse = attention64(q[rows], k[keys], v[keys], options.get("causal", False), window,
                                   options.get("softcap", 0.0), options.get("softmax_scale"))
        assert_close(out[rows], ref)
        finite = torch.isfinite(ref_lse)
        assert torch.equal(torch.isneginf(lse[:, rows]), ~finite)
        if finite.any():
            assert float((lse[:, rows].double() - ref_lse)[finite].abs().max()) <= LSE_ABSOLUTE


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_gradients_match_float64(causal):
    (q, k, v), cu_q, cu_k = varlen_inputs(2, [13, 30, 7], [20, 30, 11], requires_grad=True)
    out = ft.flash_attn_varlen_func(q, k, v, cu_q, cu_k, causal=causal)
    dout = randn(5, *out.shape)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    leaves = [x.detach().double().requires_grad_(True) for x in (q, k, v)]
    ref = torch.cat([attention64(leaves[0][cu_q[b]:cu_q[b + 1]], leaves[1][cu_k[b]:cu_k[b + 1]],
                                 leaves[2][cu_k[b]:cu_k[b + 1]], causal)[0] for b in range(3)])
    expected = torch.autograd.grad(ref, leaves, dout.double())
    for got, want in zip(grads, expected):
        assert relative(got, want) <= GRAD_RELATIVE


def test_varlen_bfloat16_and_strided_views():
    """bfloat16 without ml_dtypes, and [total, heads, dim] views of other layouts, read in place."""
    (q, k, v), cu_q, cu_k = varlen_inputs(3, [9, 14], [9, 14])
    base = randn(6, 2, q.shape[0], 32).transpose(0, 1)  # [total, 2 heads, 32] with heads strided apart
    k2, v2 = base, base * 0.5
    out = ft.flash_attn_varlen_func(q.bfloat16(), k2.bfloat16(), v2.bfloat16(), cu_q, cu_k, causal=True)
    assert out.dtype == torch.bfloat16
    ref = torch.cat([attention64(q.bfloat16()[cu_q[b]:cu_q[b + 1]], k2.bfloat16()[cu_k[b]:cu_k[b + 1]],
                                 v2.bfloat16()[cu_k[b]:cu_k[b + 1]], True)[0] for b in range(2)])
    ours = float((out.double() - ref).abs().max())
    rounded = float((ref.bfloat16().double() - ref).abs().max())
    assert ours <= 2 * rounded


def test_varlen_errors():
    (q, k, v), cu_q, cu_k = varlen_inputs(4, [5, 6], [5, 6])
    with pytest.raises(ValueError, match="cu_seqlens_k must have shape"):
        ft.flash_attn_varlen_func(q, k, v, cu_q, cu_k[:2])
    with pytest.raises(ValueError, match="cu_seqlens"):  # the library's index check
        ft.flash_attn_varlen_func(q, k, v, [0, 5, 99], cu_k)
    with pytest.raises(TypeError, match="integers"):
        ft.flash_attn_varlen_func(q, k, v, torch.tensor([0.0, 5.0, 11.0]), cu_k)


def test_varlen_opcheck_and_compile():
    (q, k, v), cu_q, cu_k = varlen_inputs(7, [5, 8], [6, 8], requires_grad=True)
    cu_q, cu_k = torch.tensor(cu_q, dtype=torch.int32), torch.tensor(cu_k, dtype=torch.int32)
    for args in [(q, k, v, cu_q, cu_k, 0, 0, None, False, -1, -1, 0.0, None, None, 0, 0.0, 0),
                 (q, k, v, cu_q, cu_k, 8, 8, 0.5, True, 3, 0, 2.0, None, torch.tensor([0.1, 0.2, 0.3, 0.4]), 1, 0.2,
                  99)]:
        torch.library.opcheck(torch.ops.flash_attention.varlen_forward.default, args)

    def loss(q, k, v):
        return ft.flash_attn_varlen_func(q * 2, k, v, cu_q, cu_k, causal=True).square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    got, want = compiled(q, k, v), loss(q, k, v)
    assert torch.allclose(got, want, rtol=1e-6)
    for a, b in zip(torch.autograd.grad(got, (q, k, v)), torch.autograd.grad(want, (q, k, v))):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


# --- KV cache --------------------------------------------------------------------------------------------------


def test_kvcache_decode_against_a_transformers_layout_cache():
    """A [batch, heads, seqlen, head_dim] cache passed as a transposed view, per-entry lengths."""
    cache_k, cache_v = randn(10, 3, 2, 64, 32), randn(11, 3, 2, 64, 32)
    q = randn(12, 3, 1, 8, 32)
    lengths = [64, 20, 1]
    with torch.no_grad():
        out, lse = ft.flash_attn_with_kvcache(q, cache_k.transpose(1, 2), cache_v.transpose(1, 2),
                                              cache_seqlens=torch.tensor(lengths), causal=True, return_lse=True)
    for b, n in enumerate(lengths):
        ref, ref_lse = attention64(q[b], cache_k[b, :, :n].transpose(0, 1), cache_v[b, :, :n].transpose(0, 1), True)
        assert_close(out[b], ref)
        assert float((lse[b].double() - ref_lse).abs().max()) <= LSE_ABSOLUTE


def test_kvcache_append_writes_the_cache_in_place():
    cache_k, cache_v = torch.zeros(2, 40, 2, 16), torch.zeros(2, 40, 2, 16)
    prefix_k, prefix_v = randn(13, 2, 30, 2, 16), randn(14, 2, 30, 2, 16)
    cache_k[:, :30], cache_v[:, :30] = prefix_k, prefix_v
    k_new, v_new, q = randn(15, 2, 3, 2, 16), randn(16, 2, 3, 2, 16), randn(17, 2, 3, 4, 16)
    seqlens = torch.tensor([30, 25], dtype=torch.int32)
    with torch.no_grad():
        out = ft.flash_attn_with_kvcache(q, cache_k, cache_v, k_new, v_new, cache_seqlens=seqlens, causal=True)
    for b, n in enumerate([30, 25]):
        assert torch.equal(cache_k[b, n:n + 3], k_new[b]) and torch.equal(cache_v[b, n:n + 3], v_new[b])
        keys = torch.cat([prefix_k[b, :n], k_new[b]])
        values = torch.cat([prefix_v[b, :n], v_new[b]])
        assert_close(out[b], attention64(q[b], keys, values, True)[0])


def test_kvcache_paged_matches_contiguous():
    block = 8
    contiguous_k, contiguous_v = randn(18, 2, 48, 2, 32), randn(19, 2, 48, 2, 32)
    order = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    pages_k = torch.empty(12, block, 2, 32)
    pages_v = torch.empty(12, block, 2, 32)
    table = order.view(2, 6).to(torch.int32)
    for b in range(2):
        for j in range(6):
            pages_k[table[b, j]] = contiguous_k[b, j * block:(j + 1) * block]
            pages_v[table[b, j]] = contiguous_v[b, j * block:(j + 1) * block]
    q = randn(20, 2, 2, 4, 32)
    seqlens = torch.tensor([48, 13])
    with torch.no_grad():
        paged = ft.flash_attn_with_kvcache(q, pages_k, pages_v, cache_seqlens=seqlens, block_table=table, causal=True)
        plain = ft.flash_attn_with_kvcache(q, contiguous_k, contiguous_v, cache_seqlens=seqlens, causal=True)
    assert torch.allclose(paged, plain, atol=1e-6)
    for b, n in enumerate([48, 13]):
        assert_close(paged[b], attention64(q[b], contiguous_k[b, :n], contiguous_v[b, :n], True)[0])


@pytest.mark.parametrize("append", [False, True])
def test_kvcache_leftpad(append):
    """cache_leftpad: entry b's keys are positions leftpad[b] ... seqlens[b] - 1 (+ the appended ones)."""
    cache_k, cache_v = randn(21, 3, 50, 2, 16), randn(22, 3, 50, 2, 16)
    reference_k, reference_v = cache_k.clone(), cache_v.clone()
    q = randn(23, 3, 2, 4, 16)
    leftpad = torch.tensor([0, 7, 30])
    seqlens = torch.tensor([40, 40, 45])
    new = (randn(24, 3, 2, 2, 16), randn(25, 3, 2, 2, 16)) if append else (None, None)
    with torch.no_grad():
        out = ft.flash_attn_with_kvcache(q, cache_k, cache_v, *new, cache_seqlens=seqlens, cache_leftpad=leftpad,
                                         causal=True, window_size=(5, 0))
    for b in range(3):
        start, end = int(leftpad[b]), int(seqlens[b])
        keys, values = reference_k[b, start:end], reference_v[b, start:end]
        if append:
            keys, values = torch.cat([keys, new[0][b]]), torch.cat([values, new[1][b]])
            assert torch.equal(cache_k[b, end:end + 2], new[0][b])
        assert_close(out[b], attention64(q[b], keys, values, True, (5, 0))[0])


def test_kvcache_errors():
    cache = torch.zeros(2, 10, 2, 16)
    q = torch.zeros(2, 1, 4, 16)
    with pytest.raises(ValueError, match="cache_seqlens"):  # the library's index check
        with torch.no_grad():
            ft.flash_attn_with_kvcache(q, cache, cache, cache_seqlens=torch.tensor([3, 11]))
    with pytest.raises(RuntimeError, match="no backward"):
        ft.flash_attn_with_kvcache(q.requires_grad_(True), cache, cache)
    with pytest.raises(ValueError, match="block_table"):
        with torch.no_grad():
            ft.flash_attn_with_kvcache(q.detach(), cache, cache, cache_leftpad=[0, 0],
                                       block_table=torch.zeros(2, 1, dtype=torch.int32))
    with pytest.raises(ValueError, match="k and v must be given together"):
        with torch.no_grad():
            ft.flash_attn_with_kvcache(q.detach(), cache, cache, k=torch.zeros(2, 1, 2, 16))


def test_kvcache_opcheck_and_compile():
    cache_k, cache_v = randn(26, 2, 12, 2, 8), randn(27, 2, 12, 2, 8)
    q = randn(28, 2, 1, 4, 8)
    seqlens = torch.tensor([12, 5], dtype=torch.int32)
    torch.library.opcheck(torch.ops.flash_attention.kvcache_forward.default,
                          (q, cache_k, cache_v, seqlens, None, None, None, None, True, -1, -1, 0.0, None, None, 0))
    k_new, v_new = randn(29, 2, 1, 2, 8), randn(30, 2, 1, 2, 8)
    torch.library.opcheck(torch.ops.flash_attention.kvcache_append_forward.default,
                          (q, cache_k.clone(), cache_v.clone(), k_new, v_new, torch.tensor([4, 5], dtype=torch.int32),
                           None, None, None, None, True, -1, -1, 0.0, None, None, 0))

    def step(q, k_cache, v_cache, k, v, lengths):
        return ft.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=lengths, causal=True)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    eager_cache = (cache_k.clone(), cache_v.clone())
    compiled_cache = (cache_k.clone(), cache_v.clone())
    lengths = torch.tensor([4, 5], dtype=torch.int32)
    with torch.no_grad():
        want = step(q, *eager_cache, k_new, v_new, lengths)
        got = compiled(q, *compiled_cache, k_new, v_new, lengths)
    assert torch.equal(got, want)
    assert torch.equal(compiled_cache[0], eager_cache[0]) and torch.equal(compiled_cache[1], eager_cache[1])

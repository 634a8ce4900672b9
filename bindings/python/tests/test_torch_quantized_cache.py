"""flash_attention.torch with 8-bit KV caches (torch.int8, torch.float8_e4m3fn) and float32 row scales: exact
attention over the dequantized cache against the float64 reference, on every storage (contiguous, indexed,
paged, a transposed [b, h, s, d] cache with strided scales read in place), GQA ratio and odd head_dim, with
appends quantized bit for bit as quantize_kv; the custom operators (opcheck, torch.compile); and the errors,
which raise and write nothing. Skipped entirely when torch is not importable (ml_dtypes is not needed).
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import flash_attention.torch as ft  # noqa: E402
from flash_attention import FlashAttentionError, quantize_kv  # noqa: E402
from flash_attention.reference import reference_kvcache_attention  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")

DTYPES = {"int8": torch.int8, "float8": torch.float8_e4m3fn}
# Exact attention over the dequantized cache: the float32-cache bound of test_quantized_cache.py.
BOUND = 3e-6

# (batch, seqlen_q, seqlen_new, cache_seqlens, heads_q, heads_kv, head_dim, options)
CASES = {
    "decode-mha-d59": (3, 1, 0, [300, 17, 0], 2, 2, 59, {}),
    "decode-gqa4-d128-append": (2, 1, 1, [299, 0], 8, 2, 128, dict(causal=True)),
    "decode-mqa-d40-split": (1, 1, 0, [1500], 4, 1, 40, {}),
    "chunk-append-gqa2-d1": (2, 5, 3, [100, 7], 4, 2, 1, dict(causal=True)),
    "prefill-window-softcap": (1, 13, 5, [90], 4, 2, 64, dict(causal=True, window_size=(30, 0), softcap=20.0)),
}
CAPACITY = 1501


def randn(generator, *shape):
    return torch.randn(*shape, generator=generator)


def dequantized(values, scales):
    """float64 numpy array of values × scales (the cache the attention is exact over)."""
    return (values.double() * scales.double()[..., None]).numpy()


def storage(storage_name, batch, heads_kv, dim, generator):
    """(cache shape, a function from a float cache tensor to the one stored, the location options): contiguous,
    indexed (cache_batch_idx), paged with an odd page, or a [b, h, s, d] tensor passed as its transposed view."""
    if storage_name.startswith("paged"):
        page = int(storage_name.split("-")[1])
        per_seq = (CAPACITY + page - 1) // page
        blocks = batch * per_seq + 2
        table = torch.randperm(blocks, generator=generator)[:batch * per_seq].view(batch, per_seq).to(torch.int32)
        return (blocks, page, heads_kv, dim), dict(block_table=table)
    where = dict(cache_batch_idx=torch.tensor([batch + 1, 0, 2][:batch])) if storage_name == "indexed" else {}
    return (batch + 2, CAPACITY, heads_kv, dim), where


def make_cache(shape, dtype, generator, transposed, multiplier=1.0):
    """An 8-bit cache of `shape` and its scales; transposed: both are views of [b, h, s, ...] tensors."""
    x = randn(generator, *shape) * multiplier
    if not transposed:
        return ft.quantize_kv(x, dtype)
    values, scales = ft.quantize_kv(x.transpose(1, 2).contiguous(), dtype)
    return values.transpose(1, 2), scales.transpose(1, 2)


def cache_index(where, shape, b, position):
    if "block_table" in where:
        return int(where["block_table"][b][position // shape[1]]), position % shape[1]
    return (int(where["cache_batch_idx"][b]) if "cache_batch_idx" in where else b), position


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("storage_name", ["contiguous", "indexed", "paged-7", "transposed"])
@pytest.mark.parametrize("case", CASES)
def test_quantized_cache_matches_float64_over_the_dequantized_cache(dtype, storage_name, case):
    batch, seqlen_q, seqlen_new, seqlens, heads, heads_kv, dim, options = CASES[case]
    generator = torch.Generator().manual_seed(sum(map(ord, case + storage_name + dtype)))
    shape, where = storage(storage_name, batch, heads_kv, dim, generator)
    transposed = storage_name == "transposed"
    k_cache, k_scale = make_cache(shape, DTYPES[dtype], generator, transposed)
    v_cache, v_scale = make_cache(shape, DTYPES[dtype], generator, transposed, 3.0)
    q = randn(generator, batch, seqlen_q, heads, dim)
    # New rows in float16: the library converts and quantizes them as it appends them.
    k_new, v_new = ((randn(generator, batch, seqlen_new, heads_kv, dim).half() for _ in range(2)) if seqlen_new
                    else (None, None))
    before = [x.clone() for x in (k_cache, v_cache, k_scale, v_scale)]
    cache_seqlens = torch.tensor(seqlens, dtype=torch.int32)
    with torch.no_grad():
        out, lse = ft.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=cache_seqlens,
                                              k_scale=k_scale, v_scale=v_scale, return_lse=True, **where, **options)
    # The appended rows hold what quantize_kv gives for them, and nothing else changed.
    expected = [x.clone() for x in before]
    for new, (values, scales) in zip((k_new, v_new) if seqlen_new else (), (expected[:3:2], expected[1::2])):
        quantized_values, quantized_scales = ft.quantize_kv(new, DTYPES[dtype])
        for b in range(batch):
            for j in range(seqlen_new):
                index = cache_index(where, shape, b, seqlens[b] + j)
                values[index], scales[index] = quantized_values[b, j], quantized_scales[b, j]
    for name, got, want in zip(("k_cache", "v_cache", "k_scale", "v_scale"), (k_cache, v_cache, k_scale, v_scale),
                               expected):
        assert torch.equal(got.view(torch.uint8) if got.element_size() == 1 else got,
                           want.view(torch.uint8) if want.element_size() == 1 else want), f"{name} differs"
    # The reference: the dequantized cache as it was, plus the dequantized new rows.
    k_ref, v_ref = dequantized(before[0], before[2]), dequantized(before[1], before[3])
    if seqlen_new:
        k_new, v_new = (dequantized(*ft.quantize_kv(x, DTYPES[dtype])) for x in (k_new, v_new))
    location = {name: x.numpy() for name, x in where.items()}
    ref_out, ref_lse = reference_kvcache_attention(q.numpy(), k_ref, v_ref, seqlens, k_new, v_new, **location, **options)
    assert np.abs(out.numpy() - ref_out).max() <= BOUND * max(1.0, np.abs(ref_out).max())
    finite = np.isfinite(ref_lse)
    assert np.array_equal(np.isfinite(lse.numpy()), finite)
    assert np.abs(lse.numpy()[finite] - ref_lse[finite]).max(initial=0) <= BOUND * max(1.0, np.abs(ref_lse[finite]).max(initial=0))


@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_kv_matches_the_numpy_one(dtype):
    """Bit for bit flash_attention.quantize_kv (whose rounding test_quantized_cache.py checks), from bfloat16 input;
    a row of zeros has scale 0 and values 0. The numpy float8 type needs ml_dtypes: that comparison is skipped
    without it."""
    x = torch.randn(4, 9, 40, generator=torch.Generator().manual_seed(5)).bfloat16() * 7
    x[1, 2] = 0
    values, scales = ft.quantize_kv(x, DTYPES[dtype])
    assert values.dtype == DTYPES[dtype] and scales.dtype == torch.float32 and scales.shape == (4, 9)
    assert scales[1, 2] == 0 and not values[1, 2].view(torch.uint8).any()
    numpy_dtype = np.int8 if dtype == "int8" else pytest.importorskip("ml_dtypes").float8_e4m3fn
    want_values, want_scales = quantize_kv(x.float().numpy(), numpy_dtype)
    assert np.array_equal(values.view(torch.uint8).numpy(), want_values.view(np.uint8))
    assert np.array_equal(scales.numpy(), want_scales)


def small_problem(dtype=torch.int8):
    generator = torch.Generator().manual_seed(53)
    q = randn(generator, 2, 1, 4, 32)
    (kq, ks), (vq, vs) = (ft.quantize_kv(randn(generator, 2, 64, 2, 32), dtype) for _ in range(2))
    new = randn(generator, 2, 1, 2, 32)
    return q, kq, vq, ks, vs, new


@pytest.mark.parametrize("dtype", DTYPES)
def test_quantized_cache_errors_raise_and_write_nothing(dtype):
    q, kq, vq, ks, vs, new = small_problem(DTYPES[dtype])
    before = [x.clone() for x in (kq, vq, ks, vs)]
    float_cache = torch.zeros(2, 64, 2, 32)
    calls = [
        (ValueError, "k_scale is required", dict(v_scale=vs)),
        (ValueError, "v_scale is required", dict(k_scale=ks)),
        (ValueError, "must be the cache's without head_dim", dict(k_scale=ks[:, :10], v_scale=vs)),
        (TypeError, "v_scale must be a float32 torch.Tensor", dict(k_scale=ks, v_scale=vs.half())),
        (TypeError, "k_scale must be a float32 torch.Tensor of 3 dim", dict(k_scale=ks.numpy(), v_scale=vs)),
        (TypeError, "k_scale must be a float32 torch.Tensor of 3 dim", dict(k_scale=ks[..., None], v_scale=vs)),
        # 8-bit rows carry no scale: new rows must be of a float type.
        (TypeError, "k must have dtype torch.float32", dict(k=kq[:, :1], v=vq[:, :1], k_scale=ks, v_scale=vs)),
        (TypeError, "k and v must have", dict(k=new, v=new.half(), k_scale=ks, v_scale=vs)),
        (NotImplementedError, "cache_leftpad is not implemented with an 8-bit cache",
         dict(cache_leftpad=[0, 0], k_scale=ks, v_scale=vs)),
        # The library's checks: scales that overlap cannot both be written; a position past the cache.
        (FlashAttentionError, "k_scale and v_scale overlap", dict(k=new, v=new, k_scale=ks, v_scale=ks)),
        (FlashAttentionError, "exceeds the cache capacity", dict(k=new, v=new, cache_seqlens=64, k_scale=ks,
                                                                 v_scale=vs)),
    ]
    for error, message, arguments in calls:
        arguments.setdefault("cache_seqlens", 32)
        with pytest.raises(error, match=message), torch.no_grad():
            ft.flash_attn_with_kvcache(q, kq, vq, **arguments)
    with pytest.raises(ValueError, match="k_scale/v_scale belong to 8-bit caches; this cache is torch.float32"):
        with torch.no_grad():
            ft.flash_attn_with_kvcache(q, float_cache, float_cache, new, new, cache_seqlens=3, k_scale=ks, v_scale=vs)
    with pytest.raises(TypeError, match="dtype must be torch.int8 or torch.float8_e4m3fn"):
        ft.quantize_kv(q, torch.float16)
    for got, want in zip((kq, vq, ks, vs), before):
        assert torch.equal(got.view(torch.uint8) if got.element_size() == 1 else got,
                           want.view(torch.uint8) if want.element_size() == 1 else want)
    assert not float_cache.any()


def test_quantized_cache_opcheck_and_compile():
    q, kq, vq, ks, vs, new = small_problem()
    seqlens = torch.tensor([40, 17], dtype=torch.int32)
    options = (None, None, None, None, True, -1, -1, 0.0, None, None, 0)
    torch.library.opcheck(torch.ops.flash_attention.kvcache_forward.default,
                          (q, kq, vq, seqlens, *options, ks, vs))
    torch.library.opcheck(torch.ops.flash_attention.kvcache_append_forward.default,
                          (q, kq.clone(), vq.clone(), new, new * 2, seqlens, *options, ks.clone(), vs.clone()))

    def step(q, k_cache, v_cache, k, v, k_scale, v_scale):
        return ft.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=seqlens, causal=True,
                                          k_scale=k_scale, v_scale=v_scale)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    eager = [x.clone() for x in (kq, vq, ks, vs)]
    traced = [x.clone() for x in (kq, vq, ks, vs)]
    with torch.no_grad():
        want = step(q, eager[0], eager[1], new, new * 2, eager[2], eager[3])
        got = compiled(q, traced[0], traced[1], new, new * 2, traced[2], traced[3])
    assert torch.equal(got, want)
    for a, b in zip(traced, eager):  # the appended values and their scales, written by both
        assert torch.equal(a, b)
    assert not torch.equal(eager[2], ks)

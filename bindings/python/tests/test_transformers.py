"""The transformers backend (flash_attention.transformers) inside real transformers models with random weights:
Llama, Mistral (sliding window), Qwen2 (sliding window on some layers), Gemma 2 (softcap, alternating sliding
layers); no padding, left and right padding, packed sequences, greedy generation with dynamic and static
caches, gradients, torch.compile, and the clear errors.

Accuracy bars (written once):
  * logits: |ours - eager| <= 2 x |eager - sdpa| (the difference between transformers' own two float32
    implementations), max over real (non-padding) positions; Gemma 2 has no sdpa, so there, and for every
    model as well, |ours - float64 eager| <= 2 x |float32 eager - float64 eager|;
  * each bar is also shown to be tight enough to catch the mistakes it exists for (padding ignored, the
    window off by one), so these tests can fail;
  * greedy generation: token-identical to sdpa (eager for Gemma 2).
Skipped with the reason when torch or transformers is not installed (pip install "./bindings/python[transformers]").
"""

import copy
import inspect
import warnings

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers", reason="transformers is not installed "
                                   "(pip install 'flash-attention[transformers]' or pip install transformers)")

import transformers  # noqa: E402
from transformers import (AutoModelForCausalLM, Gemma2Config, LlamaConfig, MistralConfig,  # noqa: E402
                          Qwen2Config, StaticCache)

from flash_attention import _torch_raw  # noqa: E402
from flash_attention.transformers import DEFAULT_NAME, register  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]

NAME = register()
VOCAB, SEQ = 128, 40
WINDOW = 8


def config(kind):
    # initializer_range 0.15: sharp attention patterns, so that masking mistakes show in the logits.
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.15)
    if kind == "llama":
        return LlamaConfig(**common)
    if kind == "mistral":
        return MistralConfig(sliding_window=WINDOW, **common)
    if kind == "qwen2":
        return Qwen2Config(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1,
                           layer_types=["full_attention", "sliding_attention"], **common)
    if kind == "deepseek_v3":  # multi-head latent attention: query/key heads of 16 + 8, value heads of 8
        return transformers.DeepseekV3Config(q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=8,
                                moe_intermediate_size=32, first_k_dense_replace=2, n_routed_experts=4,
                                num_experts_per_tok=2, n_group=1, topk_group=1, **{**common, "num_key_value_heads": 4})
    return Gemma2Config(head_dim=16, sliding_window=WINDOW, attn_logit_softcapping=8.0, final_logit_softcapping=30.0,
                        query_pre_attn_scalar=16, **common)


# DeepSeek-V3 (MLA) where this transformers has it (4.50 and later).
KINDS = ["llama", "mistral", "qwen2", "gemma2"] + (["deepseek_v3"] if hasattr(transformers, "DeepseekV3Config") else [])
_models = {}


def models(kind):
    """{implementation: model} with one set of weights; "eager64" is the eager model in float64."""
    if kind not in _models:
        implementations = ["eager", NAME] + ([] if kind == "gemma2" else ["sdpa"])
        built = {}
        for implementation in implementations:
            torch.manual_seed(0)
            built[implementation] = AutoModelForCausalLM.from_config(copy.deepcopy(config(kind)),
                                                                     attn_implementation=implementation).eval()
        state = built["eager"].state_dict()
        for model in built.values():
            model.load_state_dict(state)
        built["eager64"] = copy.deepcopy(built["eager"]).double()
        _models[kind] = built
    return _models[kind]


def inputs(padding):
    ids = torch.randint(0, VOCAB, (3, SEQ), generator=torch.Generator().manual_seed(1))
    if padding is None:
        return ids, None
    lengths = torch.tensor([SEQ, SEQ - 6, SEQ - 23])
    positions = torch.arange(SEQ)[None, :]
    mask = positions >= SEQ - lengths[:, None] if padding == "left" else positions < lengths[:, None]
    return ids, mask.long()


def logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits.double()


def max_error(a, b, valid):
    return float((a - b).abs()[valid].max())


def reference64(built, ids, mask):
    """float64 eager logits at the real positions, each sequence run alone without padding (RoPE scores depend
    on relative positions only, so a left-padded sequence's logits equal its unpadded run's). Padded positions
    are left 0. (The padded float64 eager model itself is no reference: its fully masked rows turn to NaN.)"""
    if mask is None:
        return logits(built["eager64"], ids, None)
    out = torch.zeros(*ids.shape, VOCAB, dtype=torch.float64)
    for b in range(ids.shape[0]):
        real = mask[b].bool()
        out[b, real] = logits(built["eager64"], ids[b:b + 1, real], None)[0]
    return out


@pytest.mark.parametrize("padding", [None, "left", "right"], ids=["no-padding", "left-padding", "right-padding"])
@pytest.mark.parametrize("kind", KINDS)
def test_logits_within_twice_the_eager_sdpa_difference(kind, padding):
    built = models(kind)
    ids, mask = inputs(padding)
    valid = mask.bool() if mask is not None else torch.ones(ids.shape, dtype=torch.bool)
    ours = logits(built[NAME], ids, mask)
    eager = logits(built["eager"], ids, mask)
    eager64 = reference64(built, ids, mask)
    bar64 = 2 * max_error(eager, eager64, valid)
    assert max_error(ours, eager64, valid) <= bar64, "against float64 eager"
    if "sdpa" in built:
        bar = 2 * max_error(eager, logits(built["sdpa"], ids, mask), valid)
        assert max_error(ours, eager, valid) <= max(bar, bar64), "against eager, bar 2 x |eager - sdpa|"
    if padding == "left":
        # The bar catches what it exists for: the same inputs with padding ignored are far outside it. (With
        # right padding and a causal mask no real query sees a padded key, so ignoring it changes nothing.)
        ignored = logits(built["eager"], ids, None)
        assert max_error(ignored, eager64, valid) > 100 * bar64


@pytest.mark.parametrize("kind", ["mistral", "gemma2"])
def test_the_window_off_by_one_would_fail(kind, monkeypatch):
    """A window of W tokens is (W - 1, 0): with W instead, the logits leave the bar (prefill without padding,
    where the backend applies the layer's sliding_window itself)."""
    built = models(kind)
    ids, _ = inputs(None)
    valid = torch.ones(ids.shape, dtype=torch.bool)
    eager, eager64 = logits(built["eager"], ids, None), logits(built["eager64"], ids, None)
    bar64 = 2 * max_error(eager, eager64, valid)
    real = _torch_raw.forward
    signature = inspect.signature(real)

    def widened(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        if bound.arguments["window_left"] >= 0:
            bound.arguments["window_left"] += 1
        return real(*bound.args, **bound.kwargs)

    monkeypatch.setattr(_torch_raw, "forward", widened)
    wrong = logits(built[NAME], ids, None)
    assert max_error(wrong, eager64, valid) > 10 * bar64


@pytest.mark.parametrize("padding", [None, "left"])
@pytest.mark.parametrize("kind", KINDS)
def test_greedy_generation_is_token_identical(kind, padding):
    built = models(kind)
    ids, mask = inputs(padding)
    baseline = "eager" if kind == "gemma2" else "sdpa"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = built[baseline].generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
        got = built[NAME].generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    assert torch.equal(got, want)


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_static_cache_generation_is_token_identical(kind):
    built = models(kind)
    ids, mask = inputs("left")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = built["sdpa"].generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                                      cache_implementation="static")
        got = built[NAME].generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                                   cache_implementation="static")
    assert torch.equal(got, want)


def test_decoding_reads_the_cache_in_place(monkeypatch):
    """One decode step per layer is one library call on the cache tensors themselves (no copy, no repeat of kv
    heads), with and without left padding; the static cache's unfilled tail is not read."""
    built = models("llama")
    model = built[NAME]
    seen = []
    for name in ("forward", "kvcache_forward"):
        real = getattr(_torch_raw, name)
        monkeypatch.setattr(_torch_raw, name, lambda *a, real=real, name=name, **kw:
                            seen.append((name, a[1], a[2], kw)) or real(*a, **kw))
    for padding in (None, "left"):
        ids, mask = inputs(padding)
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, use_cache=True)
            cache = out.past_key_values
            step_mask = None if mask is None else torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], 1)
            seen.clear()
            model(input_ids=ids[:, :1], attention_mask=step_mask, cache=cache, use_cache=True)
        assert len(seen) == 2  # one call per layer
        for layer, (name, k, v, _) in enumerate(seen):
            assert name == ("forward" if padding is None else "kvcache_forward")
            keys, values = cache.layers[layer].keys, cache.layers[layer].values
            assert k.data_ptr() == keys.data_ptr() and v.data_ptr() == values.data_ptr()
            assert k.shape[2] == 2  # the kv heads, not repeated
    ids, mask = inputs(None)
    cache = StaticCache(config=model.config, max_cache_len=SEQ + 30)
    with torch.no_grad():
        model(input_ids=ids, cache=cache, use_cache=True)
        seen.clear()
        model(input_ids=ids[:, :1], cache=cache, use_cache=True)
    assert all(k.shape[1] == SEQ + 1 for _, k, _, _ in seen)  # a key range: the filled part only


def test_packed_sequences_from_position_ids(monkeypatch):
    """Sequences packed into one row (position_ids restarting, no mask, no cache: transformers' condition for
    packing): one varlen call per layer, logits equal to each sequence run alone."""
    built = models("mistral")
    lengths = [11, 17, 12]
    ids = torch.randint(0, VOCAB, (1, sum(lengths)), generator=torch.Generator().manual_seed(2))
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    calls = []
    real = _torch_raw.varlen_forward
    monkeypatch.setattr(_torch_raw, "varlen_forward", lambda *a, **kw: calls.append(a[5].tolist()) or real(*a, **kw))
    with torch.no_grad():
        packed = built[NAME](input_ids=ids, position_ids=position_ids, use_cache=False).logits.double()
    assert calls == [[0, 11, 28, 40]] * 2
    start = 0
    for n in lengths:
        alone = logits(built["eager64"], ids[:, start:start + n], None)
        eager_alone = logits(built["eager"], ids[:, start:start + n], None)
        valid = torch.ones(1, n, dtype=torch.bool)
        assert max_error(packed[:, start:start + n], alone, valid) <= 2 * max_error(eager_alone, alone, valid) + 1e-6
        start += n


def test_gradients_as_close_as_eager_and_sdpa():
    """Training gradients (right padding, the usual training layout; padded labels ignored) against float64
    eager: within twice the larger of eager's and sdpa's own distance to it."""
    built = models("llama")
    ids, mask = inputs("right")
    labels = ids.masked_fill(mask == 0, -100)
    grads = {}
    for implementation in ("eager", "sdpa", NAME, "eager64"):
        model = copy.deepcopy(built[implementation]).train()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        grads[implementation] = torch.cat([p.grad.double().flatten() for p in model.parameters()])
    reference = grads["eager64"]

    def distance(name):
        return float((grads[name] - reference).abs().max())

    assert distance(NAME) <= 2 * max(distance("eager"), distance("sdpa"))


@pytest.mark.parametrize("padding", [None, "left"])
def test_torch_compile_fullgraph(padding):
    built = models("llama")
    ids, mask = inputs(padding)
    model = built[NAME]
    torch._dynamo.reset()

    def forward(ids, mask):
        return model(input_ids=ids, attention_mask=mask).logits

    compiled = torch.compile(forward, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        got, want = compiled(ids, mask), forward(ids, mask)
    valid = mask.bool() if mask is not None else torch.ones(ids.shape, dtype=torch.bool)
    assert torch.allclose(got[valid], want[valid], atol=1e-5)


def test_register_names_and_registrations():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    assert NAME == DEFAULT_NAME and "flash" not in NAME
    assert NAME in AttentionInterface._global_mapping and NAME in AttentionMaskInterface._global_mapping
    assert register("my_cpu_attention", num_threads=1) == "my_cpu_attention"
    for bad in ("flash_cpu", "org/repo", "sdpa"):
        with pytest.raises(ValueError):
            register(bad)


def test_clear_errors():
    built = models("llama")
    ids, mask = inputs(None)
    with pytest.raises(ValueError, match="output_attentions"):
        with torch.no_grad():
            built[NAME](input_ids=ids, output_attentions=True)
    dropout = AutoModelForCausalLM.from_config(LlamaConfig(**{**config("llama").to_dict(), "attention_dropout": 0.1}),
                                               attn_implementation=NAME).train()
    padded_ids, padding = inputs("right")
    with pytest.raises(NotImplementedError, match="dropout"):
        dropout(input_ids=padded_ids, attention_mask=padding)
    bias = torch.randn(3, 1, SEQ, SEQ)
    with pytest.raises(ValueError, match="additive bias"):
        with torch.no_grad():
            built[NAME](input_ids=ids, attention_mask=bias)
    # A float mask of 0 and the dtype's lowest value (transformers' eager convention) is a mask, not a bias.
    visible = torch.ones(SEQ, SEQ, dtype=torch.bool).tril()
    float_mask = torch.zeros(3, 1, SEQ, SEQ).masked_fill(~visible, torch.finfo(torch.float32).min)
    with torch.no_grad():
        got = built[NAME](input_ids=ids, attention_mask=float_mask).logits
        want = built[NAME](input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-6)


def test_eager_style_float_mask_with_padding_rows_under_inference_mode():
    """A 4-D float mask as transformers' eager builds it (left padding: padded query rows hidden entirely by
    the lowest value), under torch.inference_mode (tensors without version counters): the real positions
    match the bool mask's."""
    built = models("llama")
    ids, mask = inputs("left")
    visible = torch.ones(SEQ, SEQ, dtype=torch.bool).tril()[None, None] & mask.bool()[:, None, None, :]
    float_mask = torch.zeros(visible.shape).masked_fill(~visible, torch.finfo(torch.float32).min)
    with torch.inference_mode():
        got = built[NAME](input_ids=ids, attention_mask=float_mask).logits
        want = built[NAME](input_ids=ids, attention_mask=mask).logits
    valid = mask.bool()
    assert torch.allclose(got[valid], want[valid], atol=1e-6)


def test_torch_compile_fullgraph_with_packed_sequences(monkeypatch):
    """Packed sequences under torch.compile(fullgraph=True): the sequence boundaries come from position_ids
    inside the operator, so the graph has no host sync; one varlen call per layer at run time."""
    built = models("llama")
    model = built[NAME]
    lengths = [9, 21, 10]
    ids = torch.randint(0, VOCAB, (1, sum(lengths)), generator=torch.Generator().manual_seed(4))
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    calls = []
    real = _torch_raw.varlen_forward
    monkeypatch.setattr(_torch_raw, "varlen_forward", lambda *a, **kw: calls.append(a[5].tolist()) or real(*a, **kw))
    torch._dynamo.reset()

    def forward(ids, position_ids):
        return model(input_ids=ids, position_ids=position_ids, use_cache=False).logits

    compiled = torch.compile(forward, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        got = compiled(ids, position_ids)
        want = forward(ids, position_ids)
    assert calls and all(c == [0, 9, 30, 40] for c in calls)
    assert torch.allclose(got, want, atol=1e-5)


def test_bidirectional_encoder_with_padding():
    """A BERT encoder (bidirectional attention, right-padded batch, as sentence-embedding models run): hidden
    states at real positions within 2x the eager-vs-sdpa difference, through one key range per entry."""
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, initializer_range=0.2)
    built = {}
    for implementation in ("eager", "sdpa", NAME):
        torch.manual_seed(0)
        built[implementation] = BertModel._from_config(copy.deepcopy(cfg), attn_implementation=implementation).eval()
    for model in built.values():
        model.load_state_dict(built["eager"].state_dict())
    ids, mask = inputs("right")
    with torch.no_grad():
        out = {name: model(input_ids=ids, attention_mask=mask).last_hidden_state for name, model in built.items()}
    valid = mask.bool()
    bar = 2 * float((out["eager"] - out["sdpa"])[valid].abs().max())
    assert float((out[NAME] - out["eager"])[valid].abs().max()) <= bar
    with torch.no_grad():
        ignored = built["eager"](input_ids=ids).last_hidden_state  # padding ignored: far outside the bar
    assert float((ignored - out["eager"])[valid].abs().max()) > 100 * bar


def test_training_with_attention_dropout_runs_and_depends_on_the_seed():
    model = AutoModelForCausalLM.from_config(LlamaConfig(**{**config("llama").to_dict(), "attention_dropout": 0.3}),
                                             attn_implementation=NAME).train()
    ids, _ = inputs(None)
    torch.manual_seed(0)
    first = model(input_ids=ids).logits
    first.square().mean().backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    torch.manual_seed(0)
    assert torch.equal(first, model(input_ids=ids).logits)
    torch.manual_seed(1)
    assert not torch.equal(first, model(input_ids=ids).logits)

"""Hugging Face transformers backend: ``model = AutoModelForCausalLM.from_config(cfg, attn_implementation=register())``.

``register()`` adds two things to transformers under one name, and returns that name:
  * the attention function (ALL_ATTENTION_FUNCTIONS), which runs every layer's attention in this library;
  * the mask function (ALL_MASK_ATTENTION_FUNCTIONS). Without one, transformers builds no mask at all for an
    unknown implementation and padding would be silently ignored. The mask built is exactly the one
    transformers builds for "sdpa" (a bool [batch, 1, seqlen_q, seqlen_k] mask, or None where sdpa needs
    none), so every model transformers supports with sdpa gets the same masking semantics here.

The attention function then recognises what it is given (flash_attention._torch_masked, each guess checked
against the mask, so a wrong guess costs speed, never correctness):
  * no mask: causal (top-left when the keys outnumber the queries, as sdpa's skipped mask means: an empty
    static cache) or bidirectional, with the layer's sliding window (W tokens = window (W - 1, 0));
  * left padding, and a static cache's unfilled tail: a key range per batch entry, one library call, no copy
    (decode reads the cache in place: nothing of the cache is copied per token);
  * right padding: one call per batch entry;
  * packed sequences (position_ids restarting, no padding): varlen over the packed rows, the sequence
    boundaries computed from position_ids inside the operator (no host sync in the graph, so
    torch.compile(fullgraph=True) works); FlashAttention's cu_seq_lens_q/k keyword arguments are used too;
  * sliding windows and softcap (Gemma 2) from the layer, attention sinks (s_aux), grouped-query heads
    without repeating them.
What it cannot do raises a clear error: attention dropout together with a mask, output_attentions, a 4-D float mask
that is an additive bias rather than a mask. A bool mask that fits no plan (e.g. a custom overlay) runs
through torch's scaled_dot_product_attention with a one-time warning.
"""

import torch

from . import torch as _ft

__all__ = ["register", "DEFAULT_NAME"]

DEFAULT_NAME = "fa_cpu"

_registered = {}


def _check_name(name):
    """transformers reads meaning into some names: anything containing "flash" makes it look for the
    flash-attn package or a Hub kernel (and fail), "org/repo" or "name:..." is a Hub kernel reference, and
    the built-in names must not be replaced."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty str, got {name!r}")
    if "flash" in name.lower():
        raise ValueError(f"name {name!r} contains 'flash': transformers would then look for the flash-attn package "
                         "or a Hub kernel instead of this backend; choose another name (default: "
                         f"{DEFAULT_NAME!r})")
    if "/" in name or ":" in name or "|" in name:
        raise ValueError(f"name {name!r} contains '/', ':' or '|', which transformers reads as a Hub kernel or "
                         "a paged implementation")
    if name in ("eager", "sdpa", "flex_attention"):
        raise ValueError(f"name {name!r} is one of transformers' own implementations")


def register(name=DEFAULT_NAME, *, num_threads=0):
    """Registers this library as a transformers attention implementation and returns its name.

    Args:
        name: the ``attn_implementation`` to register (default "fa_cpu"). Must not contain "flash" (see
            _check_name); registering one name again replaces its functions.
        num_threads: threads per attention call, 0 = every online core (results are identical for any value).

    Use: ``AutoModelForCausalLM.from_config(config, attn_implementation=register())``, or
    ``model.set_attn_implementation(register())`` on a loaded model.
    """
    _check_name(name)
    if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 0:
        raise ValueError(f"num_threads must be an int >= 0, got {num_threads!r}")
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None,
                  softcap=None, is_causal=None, s_aux=None, **kwargs):
        return _attention(module, query, key, value, attention_mask, dropout, scaling, sliding_window, softcap,
                          is_causal, s_aux, num_threads, kwargs)

    attention.__name__ = attention.__qualname__ = f"flash_attention_cpu_{name}"
    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, sdpa_mask)
    _registered[name] = num_threads
    return name


def _float_mask_as_bool(mask):
    """A 4-D float mask (0 = visible; -inf or the dtype's lowest value, transformers' eager convention, =
    hidden) as bool; a ValueError for any other values, which make it an additive bias. A row hidden entirely
    by the lowest value gives 0 here where torch would average every key: such rows are padding queries,
    whose outputs no model reads."""
    visible = mask == 0
    hidden = torch.isneginf(mask) | (mask == torch.finfo(mask.dtype).min)
    if not bool((visible | hidden).all()):
        raise ValueError("flash_attention backend: this 4-D float attention_mask holds values other than 0 and "
                         "-inf (an additive bias), which the library cannot apply yet; use "
                         "attn_implementation='sdpa' or 'eager' for this model")
    return visible


def _packed_ids(position_ids, batch, seqlen):
    """Sequence ids from position_ids (transformers' rule: a new sequence wherever the position does not
    advance by one), as torch ops only, so that nothing is read on the host while tracing."""
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape[-1] != seqlen or seqlen < 2:
        return None
    if position_ids.shape[0] not in (1, batch):
        return None
    step = torch.diff(position_ids, dim=-1) != 1
    return torch.cat([torch.zeros_like(step[:, :1]), step], dim=-1).cumsum(-1)


def _attention(module, query, key, value, attention_mask, dropout, scaling, sliding_window, softcap, is_causal,
               s_aux, num_threads, kwargs):
    """query [batch, heads_q, seqlen_q, head_dim], key/value [batch, heads_kv, seqlen_k, head_dim] as the models
    hand them over (value's head size may differ: MLA models such as DeepSeek-V3, passed as they are, without
    the zero padding transformers adds for FlashAttention-2); returns ([batch, seqlen_q, heads_q, value's head
    size], None) as transformers expects."""
    if kwargs.get("output_attentions"):
        raise ValueError("flash_attention backend: output_attentions=True needs the attention weights, which "
                         "this library never materialises; use attn_implementation='eager' for that")
    if dropout and attention_mask is not None:
        raise NotImplementedError(f"flash_attention backend: attention dropout ({dropout}) with an attention mask "
                                  "is not implemented (dropout works in unmasked and packed-sequence training); "
                                  "call model.eval(), set the config's attention_dropout to 0, or use 'sdpa'")
    if query.device.type != "cpu":
        raise ValueError(f"flash_attention backend: tensors are on {query.device}; this library runs on the CPU")
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    head_dim, value_dim = q.shape[-1], v.shape[-1]
    batch, seqlen_q = q.shape[0], q.shape[1]
    seqlen_k = k.shape[1]
    softcap = float(softcap) if softcap else 0.0
    sinks = s_aux.to(torch.float32) if s_aux is not None else None
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if attention_mask is None:
        left = -1
        right = 0 if causal else -1
        if causal and sliding_window:
            left = sliding_window - 1
        cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
        if cu_q is not None and cu_k is not None:
            out = _ft.flash_attn_varlen_func(
                q.reshape(-1, q.shape[2], head_dim), k.reshape(-1, k.shape[2], head_dim),
                v.reshape(-1, v.shape[2], value_dim), cu_q, cu_k, softmax_scale=scaling, causal=causal,
                window_size=(left, -1), softcap=softcap, sinks=sinks, num_threads=num_threads, dropout_p=dropout)
            out = out.view(batch, seqlen_q, q.shape[2], value_dim)
        else:
            if causal and 1 < seqlen_q < seqlen_k:
                # A mask transformers skipped with more keys than queries is sdpa's top-left causal: a prefill
                # into an empty static cache, whose keys past the queries are not written yet.
                k, v = k[:, :seqlen_q], v[:, :seqlen_q]
            out = _ft.flash_attn_func(q, k, v, softmax_scale=scaling, window_size=(left, right), softcap=softcap,
                                      sinks=sinks, num_threads=num_threads, dropout_p=dropout)
    else:
        mask, padding, hint = None, None, None
        if attention_mask.dim() == 2:
            padding = attention_mask  # FlashAttention-style [batch, seqlen_k] padding, queries at the end
        elif attention_mask.dim() == 4:
            mask = attention_mask
            if mask.dtype != torch.bool and not torch.compiler.is_compiling():
                mask = _float_mask_as_bool(mask)
            if seqlen_q == seqlen_k:
                hint = _packed_ids(kwargs.get("position_ids"), batch, seqlen_q)
        else:
            raise ValueError(f"flash_attention backend: attention_mask must be 2-D or 4-D, got shape "
                             f"{tuple(attention_mask.shape)}")
        _ft._check_qkv(q, k, v, 4)
        out = _ft._attention(q, k, v, mask=mask, padding=padding, hint=hint, softmax_scale=scaling,
                             causal=False if mask is not None else causal,
                             window_left=(sliding_window - 1) if (padding is not None and sliding_window) else -1,
                             softcap=softcap, sinks=sinks, num_threads=num_threads)
    return out, None

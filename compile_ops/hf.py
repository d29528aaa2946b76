"""Hugging Face transformers integration (issue 24).

Two ways for a transformers user to get compile_ops' decode attention:

1. The backend: ``torch.compile(model, backend="compile_ops")``, or transformers' own recipe
   ``model.generate(..., past_key_values=StaticCache(...), compile_config=CompileConfig(
   backend="compile_ops"))``. The ``static_cache_attention`` pass finds the model's
   ``repeat_kv`` + SDPA at each decode step and runs the op on the cache itself, with the mask
   the model built (generate()'s prebuilt 4-D mask included).
2. The attention name: ``import compile_ops.hf`` registers ``"compile_ops"`` with transformers'
   ``AttentionInterface`` (and SDPA's mask builder under the same name with
   ``AttentionMaskInterface``), so ``from_pretrained(..., attn_implementation="compile_ops")``
   or ``model.set_attn_implementation("compile_ops")`` runs ``static_cache_attention`` at every
   decode step (one query token), eagerly or compiled with any backend; prefill and whatever the
   op does not take (dropout, softcapping, a position bias, more than one query token) go to
   transformers' SDPA path unchanged.

``FAMILIES`` holds the six model families the tests and ``bench/bench_hf.py`` run: a tiny config
of each (CPU tests) and the real shapes of one model of each (benchmarks).
"""

from __future__ import annotations

import weakref
from typing import Optional

import torch

from compile_ops.static_cache import MAX_HEAD, mask_ranges, masked_decode_attention

NAME = "compile_ops"

# ---------------------------------------------------------------------------------------------
# The attention function
# ---------------------------------------------------------------------------------------------
_last_bounds: dict = {}  # eager only: the last mask's bounds, shared by the layers of a step


def _bounds(mask: torch.Tensor, batch: int, length: int):
    if torch.compiler.is_compiling():
        return mask_ranges(mask, batch, length)  # traced: CSE shares it between the layers
    key = (id(mask), mask._version, batch, length)
    hit = _last_bounds.get("key")
    if hit == key and _last_bounds["ref"]() is mask:
        return _last_bounds["bounds"]
    b = mask_ranges(mask, batch, length)
    _last_bounds.update(key=key, ref=weakref.ref(mask), bounds=b)
    return b


def _why_not(query, key, value, attention_mask, dropout, kwargs) -> Optional[str]:
    """Why the op does not take this call (None: it does)."""
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        return "not 4-d query / key / value"
    if query.shape[2] != 1:
        return f"{query.shape[2]} query tokens"
    if dropout:
        return "dropout"
    for name in ("softcap", "position_bias", "sinks", "s_aux", "sliding_window_left"):
        if kwargs.get(name) is not None:
            return name
    if query.dtype not in (torch.float32, torch.float16, torch.bfloat16) or \
            key.dtype != query.dtype or value.dtype != query.dtype:
        return "dtypes"
    if key.shape != value.shape or key.shape[-1] != query.shape[-1] or \
            query.shape[-1] > MAX_HEAD or key.shape[0] != query.shape[0] or \
            query.shape[1] % key.shape[1]:
        return "shapes"
    if key.stride(-1) != 1 or value.stride(-1) != 1:
        return "cache not contiguous in head_size"
    if attention_mask is not None:
        m = attention_mask
        if m.dtype != torch.bool and m.dtype not in (torch.float32, query.dtype):
            return "mask dtype"
        want = (query.shape[0], query.shape[1], 1, key.shape[2])
        if not (1 <= m.dim() <= 4 and m.shape[-1] == key.shape[2] and
                all(a in (1, b) for a, b in zip(m.shape[::-1], want[::-1]))):
            return "mask shape"
    return None


def attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
              scaling: Optional[float] = None, is_causal: Optional[bool] = None, **kwargs):
    """transformers' attention-function signature: ``query`` ``[B, H, q, D]``, ``key`` /
    ``value`` ``[B, Hkv, L, D]`` (the whole static cache at decode), the model's mask; returns
    ``([B, q, H, D], None)``. One query token: ``static_cache_attention`` over the cache (no
    ``repeat_kv``), reading only the slots the mask lets through; anything else: SDPA."""
    if _why_not(query, key, value, attention_mask, dropout, kwargs) is not None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    b, h, _, d = query.shape
    bounds = None
    if attention_mask is not None:
        bounds = _bounds(attention_mask, b, key.shape[2])
    out = masked_decode_attention(query.reshape(b, h, d), key, value, attention_mask,
                                  scaling, bounds=bounds)
    return out.view(b, 1, h, d), None


def register(name: str = NAME) -> None:
    """Register ``attention`` (and SDPA's boolean mask builder) with transformers under
    ``name``. Done on ``import compile_ops.hf``; needs transformers >= 4.48."""
    from transformers import AttentionInterface

    AttentionInterface.register(name, attention)
    try:
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:  # older transformers: masks are built per implementation name elsewhere
        return
    AttentionMaskInterface.register(name, sdpa_mask)


# ---------------------------------------------------------------------------------------------
# Six model families: a tiny config (CPU tests) and one real model's shapes (benchmarks)
# ---------------------------------------------------------------------------------------------
# Real shapes: Llama-3-8B, Qwen2-7B, Mistral-7B-v0.1, Gemma-7B, Phi-3-mini-4k, Qwen3-8B.
_REAL = {
    "llama": ("LlamaConfig", dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", dict(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_attention_heads=28,
        num_key_value_heads=4, max_position_embeddings=32768, rope_theta=1000000.0,
        rms_norm_eps=1e-6, tie_word_embeddings=False)),
    "mistral": ("MistralConfig", dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=32768, rope_theta=10000.0,
        rms_norm_eps=1e-5, sliding_window=4096, tie_word_embeddings=False)),
    "gemma": ("GemmaConfig", dict(
        vocab_size=256000, hidden_size=3072, intermediate_size=24576, num_attention_heads=16,
        num_key_value_heads=16, head_dim=256, max_position_embeddings=8192,
        hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6)),
    "phi3": ("Phi3Config", dict(
        vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_attention_heads=32,
        num_key_value_heads=32, max_position_embeddings=4096, rope_theta=10000.0,
        rms_norm_eps=1e-5, pad_token_id=32000, tie_word_embeddings=False)),
    "qwen3": ("Qwen3Config", dict(
        vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
        rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)),
}

# Tiny: 2 layers, hidden 128, 4 query / 2 KV heads (Gemma: head 64 with 2 KV heads; Phi-3:
# MHA as the real one), weights large enough that greedy tokens are well separated in float32.
# Mistral's sliding window is 8 slots, so a 64-slot cache crosses it within a test.
_TINY_COMMON = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                    initializer_range=0.2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
_TINY = {
    "llama": dict(),
    "qwen2": dict(),
    "mistral": dict(sliding_window=8),
    "gemma": dict(head_dim=64, hidden_activation="gelu_pytorch_tanh"),
    "phi3": dict(num_key_value_heads=4),
    "qwen3": dict(head_dim=32),
}

FAMILIES = tuple(_REAL)


def config(family: str, *, tiny: bool = False, layers: Optional[int] = None):
    """The transformers config of `family` (one of FAMILIES): tiny, or the real model's shapes
    with `layers` decoder layers (default: tiny 2, real 4)."""
    import transformers

    if family not in _REAL:
        raise ValueError(f"unknown family {family!r}; one of {FAMILIES}")
    cls_name, real = _REAL[family]
    cls = getattr(transformers, cls_name)
    if tiny:
        kw = dict(_TINY_COMMON, **_TINY[family])
        if family == "gemma":
            kw["num_key_value_heads"] = 2
    else:
        kw = dict(real)
    kw["num_hidden_layers"] = layers if layers is not None else (2 if tiny else 4)
    return cls(**kw)


def build(family: str, *, tiny: bool = False, layers: Optional[int] = None,
          device="cpu", dtype=torch.float32, seed: int = 0,
          attn_implementation: Optional[str] = None):
    """A random-weight causal LM of `family` (nothing downloaded), in eval mode."""
    import transformers

    cfg = config(family, tiny=tiny, layers=layers)
    if attn_implementation is not None:
        cfg._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    return model.to(dtype).eval()


register()

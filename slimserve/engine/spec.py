"""One description of a servable Llama: shapes, rotary embedding, head_dim, KV-cache bytes.

Every part that needs a model's dimensions (the torch and llama.cpp backends, the GGUF
export, the KV budget, pruning) reads them here, from a Hugging Face config, so a config
that changes shape (a pruned `head_dim`, a new rope type) is handled in one place.
Imports torch only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

ROPE_TYPES = ("default", "linear", "llama3")
#: Weights per block of GGUF's quantized types (q8_0, q4_0, q4_1): a row must split into them.
QUANT_BLOCK = 32


def text_config(config: Any) -> Any:
    """The language model's config (multimodal configs nest it)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def head_dim_of(config: Any) -> int:
    """Per-head width: explicit `head_dim` (set by pruning), else hidden_size / heads."""
    cfg = text_config(config)
    return int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)


def kv_heads_of(config: Any) -> int:
    cfg = text_config(config)
    return int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)


def kv_bytes_per_token(config: Any, dtype: torch.dtype) -> int:
    """Bytes of K and V cache one token takes across all layers."""
    cfg = text_config(config)
    elem = torch.empty((), dtype=dtype).element_size()
    return int(2 * cfg.num_hidden_layers * kv_heads_of(cfg) * head_dim_of(cfg) * elem)


@dataclass(frozen=True, slots=True, kw_only=True)
class LlamaShape:
    """The dimensions of a Llama model, read from its Hugging Face config."""

    n_layers: int
    hidden_size: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    #: The rope type ("default", "linear", "llama3") and its parameters.
    rope: Mapping[str, Any]
    tie_word_embeddings: bool

    @classmethod
    def from_config(cls, config: Any) -> LlamaShape:
        """Read a `LlamaConfig` (or anything with its attributes).

        Raises:
            ValueError: the config uses a feature this backend does not implement.
        """
        reason = unsupported_reason(config)
        if reason is not None:
            raise ValueError(f"not a servable Llama: {reason}")
        rope = rope_parameters(config)
        n_heads = int(config.num_attention_heads)
        return cls(
            n_layers=int(config.num_hidden_layers),
            hidden_size=int(config.hidden_size),
            n_heads=n_heads,
            n_kv_heads=kv_heads_of(config),
            head_dim=head_dim_of(config),
            intermediate_size=int(config.intermediate_size),
            vocab_size=int(config.vocab_size),
            rms_norm_eps=float(config.rms_norm_eps),
            rope_theta=float(rope["rope_theta"]),
            rope=rope,
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        )


def rope_parameters(config: Any) -> dict[str, Any]:
    """`config.rope_parameters` (transformers 5), else legacy `rope_theta` + `rope_scaling`."""
    params = getattr(config, "rope_parameters", None)
    if params is None:
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params = dict(params)
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    return params


def unsupported_reason(config: Any) -> str | None:
    """Why `config` is not a Llama the engine can serve, or None when it is."""
    if getattr(config, "model_type", None) != "llama":
        return f"model_type is {getattr(config, 'model_type', None)!r}, not 'llama'"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"hidden_act {config.hidden_act!r} is not 'silu'"
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(config, flag, False):
            return f"{flag}=True is not implemented (only bias-free projections)"
    rope = rope_parameters(config)
    if rope["rope_type"] not in ROPE_TYPES:
        return f"rope type {rope['rope_type']!r} is not one of {ROPE_TYPES}"
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        return "partial_rotary_factor != 1.0 is not implemented"
    n_heads = int(config.num_attention_heads)
    n_kv = kv_heads_of(config)
    if n_heads % n_kv != 0:
        return f"num_attention_heads {n_heads} is not a multiple of num_key_value_heads {n_kv}"
    return None


def supports(config: Any) -> bool:
    """Whether a Hugging Face config describes a Llama the engine can serve."""
    return unsupported_reason(config) is None


def gguf_unsupported_reason(config: Any, weight_type: str) -> str | None:
    """Why this Llama cannot be exported to GGUF with `weight_type`, or None when it can."""
    reason = unsupported_reason(config)
    if reason is not None:
        return reason
    rope = rope_parameters(config)
    if rope["rope_type"] != "default":
        return f"rope type {rope['rope_type']!r} is not exported to GGUF yet"
    return quantized_width_problem(config, weight_type)


def quantized_width_problem(config: Any, weight_type: str) -> str | None:
    """Why `weight_type` blocks cannot hold this model's widths, or None when they can."""
    if weight_type not in ("q8_0", "q4_0", "q4_1"):
        return None
    cfg = text_config(config)
    dims = (
        int(cfg.hidden_size),
        int(cfg.intermediate_size),
        int(cfg.num_attention_heads) * head_dim_of(cfg),
    )
    if any(d % QUANT_BLOCK for d in dims):
        return (
            f"{weight_type} needs hidden, intermediate and attention widths that are multiples "
            f"of {QUANT_BLOCK}, and this model has {dims}"
        )
    return None

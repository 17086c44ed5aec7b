"""Quantization stage: torchao weight quantization and dtype casts, serialized as safetensors.

Schemes and what runs them:

| scheme            | how                                  | kernels that serve it                |
|-------------------|--------------------------------------|--------------------------------------|
| int8-weight-only  | torchao Int8WeightOnlyConfig, per row| CPU: aten._weight_int8pack_mm (fast  |
|                   |                                      | backend); eager: torchao dequantize  |
| int8-dynamic      | torchao Int8DynamicActivationInt8... | eager: torchao int8 matmul           |
| int4-weight-only  | torchao Int4WeightOnlyConfig         | CUDA only (tinygemm); refused on CPU |
| bfloat16, float16 | cast                                 | any; float16 needs CUDA to be fast   |

Embedding and lm_head stay in full precision: quantizing the tied lm_head is what wrecked
perplexity with PyTorch's dynamic quantization here (DESIGN §7).
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, cast, get_args

import torch

log = logging.getLogger(__name__)

CONFIG_VERSION = 1
Scheme = Literal["int8-weight-only", "int8-dynamic", "int4-weight-only", "bfloat16", "float16"]

KERNELS: dict[str, str] = {
    "int8-weight-only": "cpu: aten._weight_int8pack_mm (llama backend) | eager: torchao",
    "int8-dynamic": "eager: torchao int8 dynamic-activation matmul",
    "int4-weight-only": "cuda: torchao int4 tinygemm",
    "bfloat16": "any device",
    "float16": "cuda (cpu runs it slowly)",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class QuantizeConfig:
    version: int = CONFIG_VERSION
    scheme: Scheme = "int8-weight-only"
    #: int4 only: weights per scale group.
    group_size: int = 128

    def __post_init__(self) -> None:
        if self.version != CONFIG_VERSION:
            raise ValueError(f"QuantizeConfig version={self.version} is not supported (use 1)")
        if self.scheme not in get_args(Scheme):
            raise ValueError(
                f"scheme={self.scheme!r} is not known; use one of {', '.join(get_args(Scheme))}"
            )
        if self.group_size not in (32, 64, 128, 256):
            raise ValueError(f"group_size={self.group_size} must be 32, 64, 128 or 256")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantizeConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown QuantizeConfig keys {unknown}; allowed: {sorted(known)}")
        return cls(**data)


def check_supported(config: QuantizeConfig, device: torch.device) -> None:
    """Refuse, before any work, a scheme this device has no kernel for."""
    if config.scheme == "int4-weight-only" and device.type != "cuda":
        raise ValueError(
            "int4-weight-only needs CUDA (torchao's int4 kernels); this run is on "
            f"{device}. Use int8-weight-only on CPU."
        )


def _torchao_config(config: QuantizeConfig) -> Any:
    from torchao.quantization import (
        Int4WeightOnlyConfig,
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
    )

    if config.scheme == "int8-weight-only":
        return Int8WeightOnlyConfig()
    if config.scheme == "int8-dynamic":
        return Int8DynamicActivationInt8WeightConfig()
    return Int4WeightOnlyConfig(group_size=config.group_size)


def quantize(model: Any, tokenizer: Any, config: QuantizeConfig) -> tuple[Any, dict[str, Any]]:
    """Return the quantized model and the manifest's `quantization` record.

    torchao schemes go through transformers' `TorchAoConfig`, so `save_pretrained` writes
    safetensors that `from_pretrained` reads back (no pickle). Embeddings and lm_head are
    left alone (`include_input_output_embeddings=False`).
    """
    device = next(model.parameters()).device
    check_supported(config, device)
    record: dict[str, Any] = {
        "scheme": config.scheme,
        "kernels": KERNELS[config.scheme],
        "embeddings": "full precision",
    }
    if config.scheme in ("bfloat16", "float16"):
        return model.to(getattr(torch, config.scheme)), record
    import importlib.metadata

    from transformers import AutoModelForCausalLM, TorchAoConfig

    record["library"] = f"torchao {importlib.metadata.version('torchao')}"
    with tempfile.TemporaryDirectory() as tmp:
        # Quantize at load: the one path whose result transformers can serialize.
        model.save_pretrained(tmp, safe_serialization=True)
        quantized = AutoModelForCausalLM.from_pretrained(
            tmp,
            dtype=torch.float32,
            quantization_config=TorchAoConfig(_torchao_config(config)),
            device_map=None,
        )
    cast(Any, quantized).to(device)
    cast(Any, quantized).eval()
    log.info("quantized to %s", config.scheme)
    return quantized, record

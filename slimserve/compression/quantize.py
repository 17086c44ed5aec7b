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

Imports ``.stage``; torchao and transformers inside ``quantize``.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from typing import Any, Literal, cast, get_args

import torch

from slimserve.compression.stage import (
    StageConfig,
    StageContext,
    StageOutcome,
    StageSpec,
    check_choice,
)

log = logging.getLogger(__name__)

Scheme = Literal["int8-weight-only", "int8-dynamic", "int4-weight-only", "bfloat16", "float16"]

KERNELS: dict[str, str] = {
    "int8-weight-only": "cpu: aten._weight_int8pack_mm (llama backend) | eager: torchao",
    "int8-dynamic": "eager: torchao int8 dynamic-activation matmul",
    "int4-weight-only": "cuda: torchao int4 tinygemm",
    "bfloat16": "any device",
    "float16": "cuda (cpu runs it slowly)",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class QuantizeConfig(StageConfig):
    scheme: Scheme = "int8-weight-only"
    #: int4 only: weights per scale group.
    group_size: int = 128

    def validate(self) -> None:
        check_choice("scheme", self.scheme, get_args(Scheme))
        if self.group_size not in (32, 64, 128, 256):
            raise ValueError(f"group_size={self.group_size} must be 32, 64, 128 or 256")


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


def run_quantize(
    model: Any, tokenizer: Any, config: QuantizeConfig, ctx: StageContext
) -> StageOutcome:
    """The ``quantize`` stage: a new, quantized model and the manifest's record of it."""
    quantized, record = quantize(model, tokenizer, config)
    return StageOutcome(model=quantized, quantization=record)


def check_quantize(config: QuantizeConfig, ctx: StageContext) -> None:
    check_supported(config, ctx.device)


STAGE = StageSpec(
    name="quantize",
    config=QuantizeConfig,
    run=run_quantize,
    order=3,
    check=check_quantize,
    at_most_once=True,
)

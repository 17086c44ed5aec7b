"""Quantization stage: torchao weight quantization and dtype casts, serialized as safetensors.

Schemes and what runs them:

| scheme            | how                                  | kernels that serve it                |
|-------------------|--------------------------------------|--------------------------------------|
| int8-weight-only  | torchao Int8WeightOnlyConfig, per row| CPU: aten._weight_int8pack_mm (fast  |
|                   |                                      | backend); eager: torchao dequantize  |
| int8-dynamic      | torchao Int8DynamicActivationInt8... | eager: torchao int8 matmul           |
| int4-weight-only  | torchao Int4WeightOnlyConfig, tile-  | CUDA only: aten._weight_int4pack_mm  |
|                   | packed, bfloat16, quantized on CUDA  | (tinygemm); refused on CPU           |
| bfloat16, float16 | cast                                 | any; float16 needs CUDA to be fast   |

Embedding and lm_head are not quantized: quantizing the tied lm_head is what wrecked
perplexity with PyTorch's dynamic quantization here (DESIGN §7). They stay float32, except
under int4, whose kernel takes bfloat16 activations: the whole model is bfloat16 there.

int4 packing: torchao's default int4 layout ("plain") needs the separate `mslk` kernels; the
tile-packed layout runs on PyTorch's own tinygemm kernel (`aten._weight_int4pack_mm`), which
every CUDA build of torch has, on bfloat16 weights packed on the GPU itself.

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
    "int4-weight-only": "cuda: aten._weight_int4pack_mm (torchao tile-packed int4, tinygemm)",
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
    from torchao.quantization.quantize_.workflows import Int4PackingFormat

    return Int4WeightOnlyConfig(
        group_size=config.group_size, int4_packing_format=Int4PackingFormat.TILE_PACKED_TO_4D
    )


def _load_for(config: QuantizeConfig, device: torch.device) -> tuple[torch.dtype, str | None]:
    """The dtype and `device_map` a scheme is quantized at load with: int4's tile-packed
    weights are bfloat16 and packed by a CUDA kernel, so they load onto the GPU; the int8
    schemes quantize float32 weights on the CPU (then move)."""
    if config.scheme == "int4-weight-only":
        return torch.bfloat16, str(device)
    return torch.float32, None


def quantize(model: Any, tokenizer: Any, config: QuantizeConfig) -> tuple[Any, dict[str, Any]]:
    """Return the quantized model and the manifest's `quantization` record.

    torchao schemes go through transformers' `TorchAoConfig`, so `save_pretrained` writes
    safetensors that `from_pretrained` reads back (no pickle). Embeddings and lm_head are
    left alone (`include_input_output_embeddings=False`).
    """
    device = next(model.parameters()).device
    check_supported(config, device)
    int4 = config.scheme == "int4-weight-only"
    embeddings = {"int4-weight-only": "bfloat16, not quantized", "bfloat16": "bfloat16",
                  "float16": "float16"}  # fmt: skip
    record: dict[str, Any] = {
        "scheme": config.scheme,
        "kernels": KERNELS[config.scheme],
        "embeddings": embeddings.get(config.scheme, "full precision"),
    }
    if config.scheme in ("bfloat16", "float16"):
        return model.to(getattr(torch, config.scheme)), record
    import importlib.metadata

    from transformers import AutoModelForCausalLM, TorchAoConfig

    record["library"] = f"torchao {importlib.metadata.version('torchao')}"
    if int4:
        record["group_size"] = config.group_size
    dtype, device_map = _load_for(config, device)
    with tempfile.TemporaryDirectory() as tmp:
        # Quantize at load: the one path whose result transformers can serialize.
        model.save_pretrained(tmp, safe_serialization=True)
        quantized = AutoModelForCausalLM.from_pretrained(
            tmp,
            dtype=dtype,
            quantization_config=TorchAoConfig(_torchao_config(config)),
            device_map=device_map,
        )
    cast(Any, quantized).to(device)
    cast(Any, quantized).eval()
    done, total = quantized_linears(quantized)
    record["quantized_linears"] = f"{done} of {total}"
    if done < total:
        # torchao leaves a weight whose input width its group size does not divide as it
        # was (e.g. int4 group 128 on SmolLM2's 576-wide projections): say so, loudly.
        log.warning(
            "%s quantized %d of %d linear layers; the others stay %s (group_size=%d)",
            config.scheme, done, total, dtype, config.group_size,
        )  # fmt: skip
    log.info("quantized to %s (%d of %d linear layers)", config.scheme, done, total)
    return quantized, record


def quantized_linears(model: Any) -> tuple[int, int]:
    """(quantized, all) decoder linear layers: lm_head is never quantized, so not counted."""
    from torchao.utils import TorchAOBaseTensor

    head = model.get_output_embeddings()
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head]
    return sum(isinstance(m.weight, TorchAOBaseTensor) for m in linears), len(linears)


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

"""The quantize schemes the recipe tests do not run (int8-dynamic, bfloat16, float16): each
writes an artifact that reloads from the registry, checksummed, in its own number format,
with logits near its parent's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from slimserve.compression.quantize import KERNELS, QuantizeConfig, quantize
from slimserve.registry.artifact import load_model, publish_model
from slimserve.registry.store import Registry
from tests.helpers import publish_tiny

IDS = torch.tensor([[5, 17, 42, 99, 7, 3]])


@pytest.mark.parametrize(
    ("scheme", "dtype", "tolerance"),
    [("int8-dynamic", torch.float32, 0.1), ("bfloat16", torch.bfloat16, 0.05),
     ("float16", torch.float16, 0.01)],
)  # fmt: skip
def test_a_scheme_publishes_a_model_that_reloads_close_to_its_parent(
    tmp_path: Path, scheme: str, dtype: torch.dtype, tolerance: float
) -> None:
    parent = publish_tiny(tmp_path, "tiny")
    model, tok = load_model(parent)
    with torch.inference_mode():
        expected = model(IDS).logits.float()
    quantized, record = quantize(model, tok, QuantizeConfig(scheme=scheme))  # type: ignore[arg-type]
    assert record["scheme"] == scheme and record["kernels"] == KERNELS[scheme]
    art = publish_model(Registry(tmp_path), "tiny-q", quantized, tok, quantization=record)
    assert art.manifest["quantization"]["scheme"] == scheme

    reloaded, _ = load_model(Registry(tmp_path).get("tiny-q", "1"))
    layer = reloaded.model.layers[0].mlp.down_proj.weight
    if scheme == "int8-dynamic":
        # torchao's tensor subclass: int8 data behind a float interface.
        assert "Int8" in type(layer).__name__ or "Affine" in type(layer).__name__, type(layer)
    else:
        assert layer.dtype == dtype
    with torch.inference_mode():
        got = reloaded(IDS).logits.float()
    assert (got - expected).abs().max().item() < tolerance
    assert not torch.equal(got, expected)  # it did change the numbers

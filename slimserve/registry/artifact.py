"""Saving a model into the registry and loading it back, safetensors only.

The engine loads artifacts through it and the compression toolkit publishes through it; it
imports no other part of slimserve but the registry.
"""

from __future__ import annotations

import importlib.metadata
import logging
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from slimserve.registry.errors import IntegrityError
from slimserve.registry.store import Artifact, Registry

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

_LIBRARIES = ("torch", "transformers", "safetensors", "tokenizers", "torchao", "torch-pruning")
# Files a model directory may hold that carry no executable payload.
_ALLOWED_SUFFIXES = (".safetensors", ".json", ".jinja", ".txt", ".model", ".tiktoken")


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for lib in _LIBRARIES:
        try:
            out[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def count_parameters(model: PreTrainedModel) -> int:
    """Unique parameters: `parameters()` yields a tied embedding/lm_head once.

    (Deduplicating by `data_ptr()` would be wrong: quantized tensor subclasses report 0.)
    """
    return sum(p.numel() for p in model.parameters())


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out: Path) -> None:
    """Write weights (safetensors), config and tokenizer into `out`."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        method = getattr(quantizer.quantization_config, "quant_method", "")
        if getattr(method, "value", method) == "gguf":
            # Weights were dequantized on load; the gguf marker only blocks serialization.
            quantizer.remove_quantization_config(model)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    for path in out.rglob("*"):
        if path.is_file() and not path.name.endswith(_ALLOWED_SUFFIXES):
            path.unlink()  # nothing pickled or executable enters the registry


def build_manifest(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    parent: str | None = None,
    source: Mapping[str, Any] | None = None,
    recipe: Mapping[str, Any] | None = None,
    metrics: Mapping[str, float] | None = None,
    quantization: Mapping[str, Any] | None = None,
    data: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The descriptive part of a manifest; the registry adds name, version and files."""
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    return {
        "parent": parent,
        "source": dict(source) if source else None,
        "recipe": dict(recipe) if recipe else None,
        "architecture": model.config.to_dict(),
        "dtype": dtype,
        "parameters": count_parameters(model),
        "quantization": dict(quantization) if quantization else {"scheme": "none"},
        "tokenizer": True,
        "chat_template": bool(getattr(tokenizer, "chat_template", None)),
        "metrics": dict(metrics or {}),
        "data": dict(data) if data else None,
        "libraries": library_versions(),
    }


def publish_model(
    registry: Registry,
    name: str,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    **manifest: Any,
) -> Artifact:
    """Save `model` and `tokenizer` as `name`'s next version (atomically)."""
    with registry.staging() as staged:
        save_model(model, tokenizer, staged)
        return registry.publish(name, staged, build_manifest(model, tokenizer, **manifest))


def load_model(
    artifact: Artifact,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    verify: bool = True,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Verify every checksum, then load weights (safetensors only) and tokenizer.

    Raises:
        IntegrityError: a file is missing, altered or not listed in the manifest.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if verify:
        artifact.verify()
    if not any(rel.endswith(".safetensors") for rel in artifact.files):
        raise IntegrityError(f"{artifact.ref} holds no safetensors weights")
    model = AutoModelForCausalLM.from_pretrained(
        artifact.path, use_safetensors=True, dtype=dtype or "auto", device_map=None
    )
    # transformers' decorated `to`/`eval` confuse mypy; they are the plain nn.Module ones.
    cast(Any, model).to(device)
    cast(Any, model).eval()
    tokenizer = AutoTokenizer.from_pretrained(artifact.path)
    log.info("loaded %s (%s) on %s", artifact.ref, artifact.digest[:12], device)
    return model, tokenizer

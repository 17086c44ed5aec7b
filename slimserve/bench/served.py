"""The plan `slimserve serve` serves a version with on this machine, for the benchmarks.

`bench serve` gives every system that runs slimserve's engine (the server, the engine
in-process and in its own process, llama.cpp's own server on the exported weights) the
same plan: the one qualification chose, read from (or written to) the registry's verdict
cache exactly as `serve` does with the same model config and thread count, so the systems
differ only by what the benchmark compares.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from slimserve.engine.backends.select import Plan
    from slimserve.engine.config import ModelConfig
    from slimserve.engine.qualify import Selection
    from slimserve.registry.store import Artifact


def served_selection(
    registry: Path, ref: str, config: ModelConfig
) -> tuple[Artifact, Selection | None]:
    """The artifact `ref` names and what `serve` would choose for it here (None: a plan
    that needs no qualification, chosen statically). Qualifies in throwaway processes
    when the cache has no verdict, as `serve` would at its start."""
    import torch

    from slimserve.engine.launch import needs_qualification
    from slimserve.engine.manager import ModelManager
    from slimserve.engine.process import ChildSpec
    from slimserve.registry.store import Registry, parse_model_ref

    name, version = parse_model_ref(ref)
    reg = Registry(registry)
    artifact = reg.get(name, version)
    if not needs_qualification(config):
        return artifact, None
    spec = ChildSpec(
        registry=str(registry),
        name=artifact.name,
        version=artifact.version,
        config=config,
        threads=torch.get_num_threads(),  # what `serve --threads` gives its engines
    )
    qualifier = ModelManager(reg, config).qualifier  # the registry's own verdict cache
    return artifact, qualifier.select(spec, artifact.digest)


def served_plan(registry: Path, ref: str, config: ModelConfig) -> tuple[Artifact, Plan | None]:
    """`served_selection`'s plan (None: the static choice)."""
    artifact, selection = served_selection(registry, ref, config)
    return artifact, selection.plan if selection is not None else None

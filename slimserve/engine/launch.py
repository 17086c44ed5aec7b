"""Start a model's engine in its own supervised process, by the plan this machine qualified.

`launch` is what the model manager calls for each load: choose the plan (`qualify`), then
start the engine process under a supervisor; the engine process verifies every file and
holds the tokenizer too (the server does no text work). A plan that keeps crashing is
marked bad here and, for `--backend auto`, the next restart serves by the next qualified
plan. Imports no grpc, and
no torch: the server process holds no weights.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

from slimserve.engine.backends.select import Plan
from slimserve.engine.config import ModelConfig
from slimserve.engine.loader import LoadedModel
from slimserve.engine.process import ChildSpec
from slimserve.engine.qualify import Qualifier, Selection
from slimserve.engine.supervisor import SupervisedEngine
from slimserve.registry.store import Artifact

log = logging.getLogger(__name__)


def needs_qualification(config: ModelConfig) -> bool:
    """False when only a float32 torch forward (the reference itself) can serve."""
    load = config.load
    if not load.qualify:
        return False
    pinned_reference = load.backend in ("llama", "hf") and load.dtype != "bfloat16"
    return not pinned_reference or bool(load.backend_plugins)


def _torch_threads() -> int:
    """The threads `serve --threads` gave torch (which it imports only then); 0 leaves the
    engine process torch's default, which is what this process would have had."""
    torch = sys.modules.get("torch")
    return int(torch.get_num_threads()) if torch is not None else 0


def _with(base: ChildSpec, selection: Selection) -> ChildSpec:
    return dataclasses.replace(
        base,
        plan=selection.plan.to_dict(),
        refused=selection.refused,
        measured=selection.measured,
    )


def launch(
    artifact: Artifact,
    registry_root: Path,
    config: ModelConfig,
    qualifier: Qualifier,
    *,
    on_state: Callable[[bool], None] | None = None,
) -> LoadedModel:
    """Qualify (or read the cached verdicts), then start the engine process.

    Raises:
        LoadFailed, IntegrityFailure: what the engine process reported while loading.
    """
    base = ChildSpec(
        registry=str(registry_root),
        name=artifact.name,
        version=artifact.version,
        config=config,
        threads=_torch_threads(),
        log_level=logging.getLogger().getEffectiveLevel(),
    )
    current = base
    if needs_qualification(config):
        current = _with(base, qualifier.select(base, artifact.digest))

    def make_spec() -> ChildSpec:
        return current

    def on_crash_loop(spec: ChildSpec, reason: str) -> None:
        nonlocal current
        if spec.plan is None:
            log.error("%s keeps crashing (%s); no other plan to move to", spec.ref, reason)
            return
        plan = Plan.from_dict(spec.plan)
        qualifier.mark_bad(base, artifact.digest, plan, reason)
        if config.load.backend != "auto" and not config.load.backend_plugins:
            log.error("%s keeps crashing with the pinned %s (%s)", spec.ref, plan.key, reason)
            return
        try:
            current = _with(base, qualifier.select(base, artifact.digest))
        except Exception as exc:
            log.error("%s: no other qualified plan after %s failed: %s", spec.ref, plan.key, exc)
            return
        log.warning(
            "%s: %s is marked bad on this machine (%s); auto now serves with %s",
            spec.ref,
            plan.key,
            reason,
            (current.plan or {}).get("backend"),
        )

    engine = SupervisedEngine(
        make_spec, policy=config.restart, on_state=on_state, on_crash_loop=on_crash_loop
    )
    engine.start()
    log.info("serving %s in engine process %s: %s", artifact.ref, engine.pid, engine.info.kernels)
    return LoadedModel(artifact=artifact, engine=engine, loaded_at=time.time())

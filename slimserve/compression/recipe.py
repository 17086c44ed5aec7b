"""Recipes: TOML files naming compression stages, run in order into one new version.

    name = "prune20-distill"
    description = "..."
    [[stage]]
    type = "prune"
    mlp_ratio = 0.2
    [[stage]]
    type = "distill"
    steps = 120

Every stage's config is validated before any work starts. A run publishes nothing unless it
finishes; distillation checkpoints live in `<registry>/.work/` so an interrupted run resumes
where it stopped (pruning is deterministic and simply runs again).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from slimserve.compression.data import TextSource, load_text_file, pydoc_topics, token_chunks
from slimserve.compression.distill import DistillConfig, distill_
from slimserve.compression.errors import RecipeError
from slimserve.compression.evaluate import EvaluateConfig, evaluate
from slimserve.compression.prune import PruneConfig, prune_
from slimserve.compression.quantize import QuantizeConfig, check_supported, quantize
from slimserve.registry.errors import IntegrityError
from slimserve.registry.store import Artifact, Registry, validate_name

log = logging.getLogger(__name__)

#: Stage type → config class; each config carries its own `version`.
STAGES: dict[str, type[Any]] = {
    "prune": PruneConfig,
    "distill": DistillConfig,
    "quantize": QuantizeConfig,
    "evaluate": EvaluateConfig,
}
# Metrics that describe how a model must be fed rather than how well it does: a compressed
# version reads the same inputs as its parent, so it keeps them (``prompt_format``: the fraud
# client refuses a scorer trained on prompts it no longer writes).
INHERITED_METRICS = ("prompt_format",)
_ORDER = {"prune": 0, "distill": 1, "quantize": 2, "evaluate": 3}

#: progress(stage label, done, total)
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True, slots=True)
class Stage:
    type: str
    config: Any


@dataclass(frozen=True, slots=True)
class Recipe:
    name: str
    description: str
    stages: tuple[Stage, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "stages": [{"type": s.type, "config": s.config.to_dict()} for s in self.stages],
        }

    @property
    def digest(self) -> str:
        raw = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(raw).hexdigest()


def parse_recipe(data: dict[str, Any], origin: str = "recipe") -> Recipe:
    """Validate a recipe mapping. Raises RecipeError naming the stage and field."""
    unknown = sorted(set(data) - {"name", "description", "stage"})
    if unknown:
        raise RecipeError(
            f"{origin}: unknown top-level keys {unknown}; allowed: name, description, stage"
        )
    name = data.get("name")
    if not isinstance(name, str) or not name:
        raise RecipeError(f"{origin}: 'name' must be a non-empty string")
    raw_stages = data.get("stage")
    if not isinstance(raw_stages, list) or not raw_stages:
        raise RecipeError(f"{origin}: at least one [[stage]] table is required")
    stages = []
    for i, raw in enumerate(raw_stages, start=1):
        if not isinstance(raw, dict) or "type" not in raw:
            raise RecipeError(f"{origin}: stage {i} has no 'type'")
        kind = raw["type"]
        if kind not in STAGES:
            raise RecipeError(
                f"{origin}: stage {i}: unknown type {kind!r}; known: {', '.join(STAGES)}"
            )
        fields = {k: v for k, v in raw.items() if k != "type"}
        try:
            config = STAGES[kind].from_dict(fields)
        except (ValueError, TypeError) as exc:
            raise RecipeError(f"{origin}: stage {i} ({kind}): {exc}") from exc
        stages.append(Stage(kind, config))
    orders = [_ORDER[s.type] for s in stages]
    if orders != sorted(orders):
        raise RecipeError(
            f"{origin}: stages must run in the order prune, distill, quantize, evaluate"
        )
    if [s.type for s in stages].count("quantize") > 1:
        raise RecipeError(f"{origin}: at most one quantize stage")
    if stages[-1].type != "evaluate":
        stages.append(Stage("evaluate", EvaluateConfig()))
    return Recipe(name=name, description=str(data.get("description", "")), stages=tuple(stages))


def load_recipe(path: Path) -> Recipe:
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise RecipeError(f"cannot read recipe {path}: {exc}") from exc
    return parse_recipe(data, origin=str(path))


@dataclass(frozen=True, slots=True, kw_only=True)
class CompressJob:
    recipe: Recipe
    parent: Artifact
    to_name: str
    data: Path | None = None
    eval_text: Path | None = None
    device: str = "cpu"


def _train_source(path: Path | None) -> TextSource:
    return load_text_file(path) if path is not None else pydoc_topics("train")


def _load_parent(parent: Artifact, device: torch.device) -> tuple[Any, Any]:
    from slimserve.registry.artifact import load_model

    if parent.manifest.is_quantized:
        raise RecipeError(f"{parent.ref} is quantized; compress from an unquantized version")
    model, tok = load_model(parent, device=device, dtype=torch.float32)
    return model, tok


def work_dir(registry: Registry, job: CompressJob) -> Path:
    key = f"{job.parent.name}-{job.parent.version}-{job.recipe.digest[:16]}"
    return registry.root / ".work" / key


def compress(registry: Registry, job: CompressJob, progress: Progress | None = None) -> Artifact:
    """Run every stage on the parent and publish `job.to_name`'s next version.

    Raises:
        IntegrityError: the parent fails its checksums (nothing is loaded).
        RecipeError: a stage cannot run here (e.g. int4 without CUDA), before any work.
    """
    from slimserve.registry.artifact import build_manifest, save_model

    validate_name(job.to_name)
    device = torch.device(job.device)
    for stage in job.recipe.stages:
        if stage.type == "quantize":
            try:
                check_supported(stage.config, device)
            except ValueError as exc:
                raise RecipeError(str(exc)) from exc
    try:
        job.parent.verify()
    except IntegrityError as exc:
        raise IntegrityError(f"refusing to compress: {exc}") from exc
    model, tok = _load_parent(job.parent, device)
    train = _train_source(job.data)
    work = work_dir(registry, job)
    quant: dict[str, Any] | None = None
    reports: dict[str, Any] = {}
    metrics: dict[str, Any] = {}
    n = len(job.recipe.stages)
    for i, stage in enumerate(job.recipe.stages, start=1):
        label = f"[{i}/{n}] {stage.type}"
        log.info("%s %s", label, json.dumps(stage.config.to_dict()))
        cfg = stage.config
        if stage.type == "prune":
            calib = token_chunks(tok, train.text, cfg.seq_len, cfg.calibration_samples)
            report = prune_(model, cfg, calib, _adapt(progress, label))
            reports[f"stage{i}_prune"] = report.to_dict()
        elif stage.type == "distill":
            teacher, _ = _load_parent(job.parent, device)
            teacher.requires_grad_(False)
            batches = token_chunks(tok, train.text, cfg.seq_len, cfg.steps * cfg.batch_size)
            dreport = distill_(
                model,
                teacher,
                batches,
                cfg,
                checkpoint_dir=work / f"stage{i}-distill",
                progress=_distill_progress(progress, label),
            )
            del teacher
            reports[f"stage{i}_distill"] = {
                "steps_done": dreport.steps_done,
                "final_loss": dreport.final_loss,
                "seconds": dreport.seconds,
                "stopped_by_time": dreport.stopped_by_time,
                "resumed_from_step": dreport.resumed_from_step,
            }
        elif stage.type == "quantize":
            model, quant = quantize(model, tok, cfg)
        if progress is not None and stage.type != "evaluate":
            progress(label, 1, 1)
    final_eval = job.recipe.stages[-1].config
    with registry.staging() as staged:
        save_model(model, tok, staged)
        size = sum(p.stat().st_size for p in staged.rglob("*.safetensors"))
        if progress is not None:
            progress(f"[{n}/{n}] evaluate", 0, 1)
        metrics = evaluate(model, tok, final_eval, text=job.eval_text, model_bytes=size)
        if progress is not None:
            progress(f"[{n}/{n}] evaluate", 1, 1)
        manifest = build_manifest(
            model,
            tok,
            parent=job.parent.ref,
            recipe={**job.recipe.to_dict(), "digest": job.recipe.digest, "reports": reports},
            metrics={**_inherited_metrics(job.parent), **metrics},
            quantization=quant,
            data={"train": {"name": train.name, "sha256": train.digest}},
        )
        artifact = registry.publish(job.to_name, staged, manifest)
    shutil.rmtree(work, ignore_errors=True)
    return artifact


def _inherited_metrics(parent: Artifact) -> dict[str, Any]:
    known = parent.manifest.metrics
    return {key: known[key] for key in INHERITED_METRICS if key in known}


def _adapt(progress: Progress | None, label: str) -> Callable[[str, int, int], None] | None:
    if progress is None:
        return None

    def on(stage: str, done: int, total: int) -> None:
        progress(f"{label} ({stage})", done, total)

    return on


def _distill_progress(
    progress: Progress | None, label: str
) -> Callable[[int, int, dict[str, float]], None] | None:
    if progress is None:
        return None

    def on(step: int, steps: int, stats: dict[str, float]) -> None:
        progress(f"{label} loss {stats.get('loss', float('nan')):.3f}", step, steps)

    return on

"""Recipes, and the one pipeline that turns a parent version into a published new one.

    name = "prune20-distill"
    description = "..."
    [[stage]]
    type = "prune"
    mlp_ratio = 0.2
    [[stage]]
    type = "distill"
    steps = 120

A stage's ``type`` names a spec in ``.stages``; the rest of its table is the config's
``from_dict``. Every stage's config is validated, and every stage checked against what the
run offers, before any work starts. ``compress`` = ``run_stages`` (refuse a quantized or
corrupt parent, load it, run the stages that transform) + ``publish_compressed`` (save, run
the stages that measure, write the manifest, publish atomically). A caller that measures in
its own way between the two (the fraud trainer) calls both itself, so every new version is
made and published here. A run publishes nothing unless it finishes; training checkpoints
live in ``<registry>/.work/`` so an interrupted run resumes where it stopped (pruning is
deterministic and simply runs again).

Stages that distill on the parent's own answers get them through ``StageContext.teacher_text``,
bound here to the run's registry and parent: generated on first use, published once in
``registry.datasets``, and read back by every later run with the same key.

Imports the registry and ``.data``, ``.errors``, ``.progress``, ``.stage``, ``.stages``,
``.teacher_data``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from slimserve.compression.data import TextSource, load_text_file, pydoc_topics
from slimserve.compression.errors import RecipeError
from slimserve.compression.evaluate import EvaluateConfig
from slimserve.compression.progress import Progress, ProgressEvent, relabelled
from slimserve.compression.stage import Report, StageConfig, StageContext
from slimserve.compression.stages import STAGES, spec_of
from slimserve.compression.teacher_data import (
    TeacherText,
    TeacherTextConfig,
    TeacherTextSource,
    teacher_text,
)
from slimserve.registry.errors import IntegrityError
from slimserve.registry.store import Artifact, Registry, validate_name

log = logging.getLogger(__name__)

# Metrics that describe how a model must be fed rather than how well it does: a compressed
# version reads the same inputs as its parent, so it keeps them (``prompt_format``: the fraud
# client refuses a scorer trained on prompts it no longer writes).
INHERITED_METRICS = ("prompt_format",)


@dataclass(frozen=True, slots=True)
class Stage:
    """One stage of a recipe: its config (the config's type names the stage)."""

    config: StageConfig

    @property
    def type(self) -> str:
        return spec_of(self.config).name


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
    stages = [_parse_stage(raw, i, origin) for i, raw in enumerate(raw_stages, start=1)]
    _check_order(stages, origin)
    if not any(s.type == "evaluate" for s in stages):  # every version is measured
        stages.append(Stage(EvaluateConfig()))
    return Recipe(name=name, description=str(data.get("description", "")), stages=tuple(stages))


def _parse_stage(raw: object, i: int, origin: str) -> Stage:
    if not isinstance(raw, dict) or "type" not in raw:
        raise RecipeError(f"{origin}: stage {i} has no 'type'")
    kind = raw["type"]
    if kind not in STAGES:
        raise RecipeError(f"{origin}: stage {i}: unknown type {kind!r}; known: {', '.join(STAGES)}")
    fields = {k: v for k, v in raw.items() if k != "type"}
    try:
        return Stage(STAGES[kind].config.from_dict(fields))
    except (ValueError, TypeError) as exc:
        raise RecipeError(f"{origin}: stage {i} ({kind}): {exc}") from exc


def _check_order(stages: Sequence[Stage], origin: str) -> None:
    specs = [spec_of(s.config) for s in stages]
    if [s.order for s in specs] != sorted(s.order for s in specs):
        raise RecipeError(f"{origin}: stages must run in the order {', '.join(STAGES)}")
    for spec in STAGES.values():
        if spec.at_most_once and specs.count(spec) > 1:
            raise RecipeError(f"{origin}: at most one {spec.name} stage")


def load_recipe(path: Path, overrides: Sequence[str] = ()) -> Recipe:
    """Read and validate a recipe file, with ``overrides`` (``apply_overrides``) applied.

    Raises:
        RecipeError: the file cannot be read, an override is malformed, or a stage is invalid.
    """
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise RecipeError(f"cannot read recipe {path}: {exc}") from exc
    return parse_recipe(apply_overrides(data, overrides, str(path)), origin=str(path))


def apply_overrides(
    data: dict[str, Any], overrides: Sequence[str], origin: str = "recipe"
) -> dict[str, Any]:
    """The recipe mapping with each ``STAGE.KEY=VALUE`` set: STAGE is a stage type (every
    stage of it) or a 1-based position, VALUE a TOML value (a bare word is a string). The
    result is validated like any recipe, and its digest records what actually ran.

    Raises:
        RecipeError: a malformed override, or a STAGE the recipe does not have.
    """
    stages = [dict(s) if isinstance(s, dict) else s for s in data.get("stage", [])]
    for text in overrides:
        target, dot, rest = text.partition(".")
        key, eq, raw = rest.partition("=")
        if not (dot and eq and target and key.strip()):
            raise RecipeError(f"{origin}: override {text!r} is not STAGE.KEY=VALUE")
        picked = [
            s for i, s in enumerate(stages, start=1)
            if isinstance(s, dict) and target in (str(i), s.get("type"))
        ]  # fmt: skip
        if not picked:
            raise RecipeError(f"{origin}: override {text!r}: the recipe has no stage {target!r}")
        for stage in picked:
            stage[key.strip()] = _toml_value(raw.strip())
    return {**data, "stage": stages} if "stage" in data else data


def _toml_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw  # a bare word: a string


@dataclass(frozen=True, slots=True, kw_only=True)
class CompressJob:
    """A recipe to run on a parent. ``data``: calibration and distillation text (.txt or
    .jsonl; default: the built-in pydoc text). ``examples``: ``(prompt, label)`` pairs for a
    finetune stage. ``eval_text``: what the evaluate stage measures perplexity on."""

    recipe: Recipe
    parent: Artifact
    to_name: str
    data: Path | None = None
    eval_text: Path | None = None
    device: str = "cpu"
    examples: Sequence[tuple[str, str]] = ()


@dataclass(slots=True, kw_only=True)
class Compressed:
    """A model that went through a job's transforming stages, not yet published."""

    model: Any
    tokenizer: Any
    context: StageContext  # what the stages were given (the measuring ones reuse it)
    reports: dict[str, Report] = field(default_factory=dict)  # "stage<i>_<type>" -> report
    quantization: Mapping[str, Any] | None = None

    def report(self, stage_type: str) -> Report | None:
        """The last report of a stage of this type, or None."""
        found = [r for key, r in self.reports.items() if key.endswith(f"_{stage_type}")]
        return found[-1] if found else None


def load_parent(parent: Artifact, device: torch.device) -> tuple[Any, Any]:
    """A fresh full-precision copy of the parent and its tokenizer (already verified)."""
    from slimserve.registry.artifact import load_model

    return load_model(parent, device=device, dtype=torch.float32, verify=False)


def _refuse_quantized(parent: Artifact) -> None:
    scheme = parent.manifest.quantization_scheme
    if scheme != "none":
        raise RecipeError(
            f"{parent.ref} is quantized ({scheme}); compress or fine-tune an unquantized "
            f"version, e.g. {parent.name}@1"
        )


def work_dir(registry: Registry, job: CompressJob, train: TextSource) -> Path:
    """Where this job's checkpoints live: one directory per parent, recipe and inputs."""
    inputs = hashlib.sha256(train.digest.encode())
    inputs.update(json.dumps([list(e) for e in job.examples]).encode())
    key = f"{job.parent.name}-{job.parent.version}-{job.recipe.digest[:16]}"
    return registry.root / ".work" / f"{key}-{inputs.hexdigest()[:8]}"


def teacher_source(registry: Registry, parent: Artifact, device: torch.device) -> TeacherTextSource:
    """The parent's teacher text for a config, from ``registry`` (made there when absent)."""

    def source(
        config: TeacherTextConfig, *, teacher: Any = None, progress: Progress | None = None
    ) -> TeacherText:
        return teacher_text(
            registry, parent, config, model=teacher, device=str(device), progress=progress
        )

    return source


def run_stages(
    registry: Registry, job: CompressJob, progress: Progress | None = None
) -> Compressed:
    """Check every stage, verify and load the parent, run the stages that transform.

    Raises:
        RecipeError: a stage cannot run here (e.g. int4 without CUDA, a finetune without
            examples), or the parent is quantized; before any work.
        IntegrityError: the parent fails its checksums (nothing is loaded).
    """
    validate_name(job.to_name)
    device = torch.device(job.device)
    train = load_text_file(job.data) if job.data is not None else pydoc_topics("train")
    base = StageContext(
        device=device,
        train=train,
        examples=job.examples,
        work_dir=work_dir(registry, job, train),
        load_parent=lambda: load_parent(job.parent, device)[0],
        eval_text=job.eval_text,
        teacher_text=teacher_source(registry, job.parent, device),
    )
    for stage in job.recipe.stages:
        check = spec_of(stage.config).check
        try:
            if check is not None:
                check(stage.config, base)
        except ValueError as exc:
            raise RecipeError(str(exc)) from exc
    _refuse_quantized(job.parent)
    try:
        job.parent.verify()
    except IntegrityError as exc:
        raise IntegrityError(f"refusing to compress: {exc}") from exc
    model, tokenizer = load_parent(job.parent, device)
    done = Compressed(model=model, tokenizer=tokenizer, context=base)
    for i, stage, ctx in _stage_contexts(job, base, progress, measures=False):
        spec = spec_of(stage.config)
        log.info("%s %s", _label(i, job, spec.name), json.dumps(stage.config.to_dict()))
        outcome = spec.run(done.model, tokenizer, stage.config, ctx)
        done.model = outcome.model
        if outcome.report is not None:
            done.reports[f"stage{i}_{spec.name}"] = outcome.report
        if outcome.quantization is not None:
            done.quantization = outcome.quantization
        _finished(progress, _label(i, job, spec.name))
    return done


def publish_compressed(
    registry: Registry,
    job: CompressJob,
    done: Compressed,
    progress: Progress | None = None,
    *,
    metrics: Mapping[str, Any] | None = None,
    notes: Mapping[str, Any] | None = None,
    data: Mapping[str, Any] | None = None,
) -> Artifact:
    """Save ``done``, run the job's measuring stages on it, publish ``job.to_name``'s next
    version and drop the job's checkpoints.

    ``metrics`` join the measured ones (measured win); ``notes`` join the recipe record
    (its own keys win); ``data`` replaces the record of the training text.
    """
    from slimserve.registry.artifact import build_manifest, save_model

    train = done.context.train
    with registry.staging() as staged:
        save_model(done.model, done.tokenizer, staged)
        size = sum(p.stat().st_size for p in staged.rglob("*.safetensors"))
        measured: dict[str, Any] = {}
        sized = dataclasses.replace(done.context, model_bytes=size)
        for i, stage, ctx in _stage_contexts(job, sized, progress, measures=True):
            label = _label(i, job, stage.type)
            if progress is not None:
                progress(ProgressEvent(stage=label, done=0, total=1))
            outcome = spec_of(stage.config).run(done.model, done.tokenizer, stage.config, ctx)
            measured |= dict(outcome.metrics or {})
            _finished(progress, label)
        recipe = {
            **(notes or {}),
            **job.recipe.to_dict(),
            "digest": job.recipe.digest,
            "parent_digest": job.parent.digest,
            "reports": {key: report.to_dict() for key, report in done.reports.items()},
        }
        manifest = build_manifest(
            done.model,
            done.tokenizer,
            parent=job.parent.ref,
            recipe=recipe,
            metrics={**_inherited_metrics(job.parent), **(metrics or {}), **measured},
            quantization=done.quantization,
            data=data or _data_record(train, done.reports),
        )
        artifact = registry.publish(job.to_name, staged, manifest)
    shutil.rmtree(done.context.work_dir, ignore_errors=True)
    return artifact


def compress(registry: Registry, job: CompressJob, progress: Progress | None = None) -> Artifact:
    """Run every stage on the parent and publish `job.to_name`'s next version.

    Raises:
        IntegrityError: the parent fails its checksums (nothing is loaded).
        RecipeError: a stage cannot run here (e.g. int4 without CUDA), or the parent is
            quantized; before any work.
    """
    return publish_compressed(registry, job, run_stages(registry, job, progress), progress)


def _stage_contexts(
    job: CompressJob, base: StageContext, progress: Progress | None, *, measures: bool
) -> list[tuple[int, Stage, StageContext]]:
    """(1-based position, stage, its context) of the stages that measure, or the others."""
    out = []
    for i, stage in enumerate(job.recipe.stages, start=1):
        spec = spec_of(stage.config)
        if spec.measures != measures:
            continue
        ctx = dataclasses.replace(
            base,
            work_dir=base.work_dir / f"stage{i}-{spec.name}",
            progress=relabelled(progress, f"[{i}/{len(job.recipe.stages)}]"),
        )
        out.append((i, stage, ctx))
    return out


def _label(i: int, job: CompressJob, name: str) -> str:
    return f"[{i}/{len(job.recipe.stages)}] {name}"


def _finished(progress: Progress | None, label: str) -> None:
    if progress is not None:
        progress(ProgressEvent(stage=label, done=1, total=1))


def _data_record(train: TextSource, reports: Mapping[str, Report]) -> dict[str, Any]:
    """The run's text, and the teacher text a stage distilled on (when one did)."""
    record: dict[str, Any] = {"train": {"name": train.name, "sha256": train.digest}}
    for report in reports.values():
        used = report.to_dict().get("data", {}).get("teacher_text")
        if used:
            record["teacher_text"] = used
    return record


def _inherited_metrics(parent: Artifact) -> dict[str, Any]:
    known = parent.manifest.metrics
    return {key: known[key] for key in INHERITED_METRICS if key in known}

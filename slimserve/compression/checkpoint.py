"""Training checkpoints without pickle, written atomically, refused when they do not fit.

``<checkpoint_dir>/step-00000042/`` holds ``student.safetensors`` (the trained model's
weights; a tied tensor stored once), ``optimizer.safetensors`` (AdamW tensors, flattened) and
``state.json`` (step, param groups, the config, digests of the config, the data and both
tensor files). A directory appears by one rename of a complete, fsynced temporary directory,
and older ones are then dropped.

Imports the registry (``sha256_file``, ``fsync_path``, ``IntegrityError``) and the compression
errors.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from slimserve.compression.errors import CheckpointMismatchError
from slimserve.registry.errors import IntegrityError
from slimserve.registry.store import fsync_path, sha256_file

if TYPE_CHECKING:
    from slimserve.compression.training import TrainingConfig

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
# Format 1's name for the trained model's weights (a distillation student, at first).
_MODEL_FILE = "student.safetensors"
_OPTIMIZER_FILE = "optimizer.safetensors"
_STATE_FILE = "state.json"
_CKPT_RE = re.compile(r"^step-(\d{8})$")


def latest_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The newest complete ``step-NNNNNNNN`` directory, or None."""
    if not checkpoint_dir.is_dir():
        return None
    found = [
        p
        for p in checkpoint_dir.iterdir()
        if _CKPT_RE.fullmatch(p.name) and (p / _STATE_FILE).is_file()
    ]
    return max(found, key=lambda p: p.name) if found else None


def save_checkpoint(
    checkpoint_dir: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    config: TrainingConfig,
    *,
    step: int,
    digests: Mapping[str, str],
    world_size: int,
) -> Path:
    """Write ``step-NNNNNNNN/`` atomically and drop older checkpoints. Returns its path."""
    from safetensors.torch import save_file, save_model

    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    final = checkpoint_dir / f"step-{step:08d}"
    tmp = checkpoint_dir / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_model(model, str(tmp / _MODEL_FILE))  # stores a tied tensor once
    tensors, scalars, groups = _flatten_optimizer(optimizer.state_dict())
    save_file(tensors, str(tmp / _OPTIMIZER_FILE))
    state = {
        "format": CHECKPOINT_FORMAT,
        "step": step,
        **digests,
        "config": config.to_dict(),
        "world_size": world_size,
        "param_groups": groups,
        "optimizer_scalars": scalars,
        "files": {name: sha256_file(tmp / name) for name in (_MODEL_FILE, _OPTIMIZER_FILE)},
    }
    (tmp / _STATE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True))
    for name in (_MODEL_FILE, _OPTIMIZER_FILE, _STATE_FILE):
        fsync_path(tmp / name)
    fsync_path(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_path(checkpoint_dir)
    for old in checkpoint_dir.iterdir():
        if old != final and _CKPT_RE.fullmatch(old.name):
            shutil.rmtree(old, ignore_errors=True)
    log.info("checkpoint written: %s", final)
    return final


def load_checkpoint(
    checkpoint_dir: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    config: TrainingConfig,
    *,
    digests: Mapping[str, str],
) -> int | None:
    """Load the newest checkpoint into model and optimizer; returns its step, or None.

    Raises:
        CheckpointMismatchError: the checkpoint was made with another config, other data or
            another architecture.
        IntegrityError: a file does not match its recorded sha256, or the state is not JSON.
    """
    from safetensors.torch import load_file, load_model

    path = latest_checkpoint(checkpoint_dir)
    if path is None:
        return None
    try:
        state = json.loads((path / _STATE_FILE).read_text())
    except json.JSONDecodeError as exc:
        raise IntegrityError(f"checkpoint state {path / _STATE_FILE} is not JSON: {exc}") from exc
    _check_compatible(path, state, config, digests)
    for name in (_MODEL_FILE, _OPTIMIZER_FILE):
        if sha256_file(path / name) != state["files"].get(name):
            raise IntegrityError(f"checkpoint file {path / name} does not match its sha256")
    device = next(model.parameters()).device
    try:
        load_model(model, str(path / _MODEL_FILE), strict=True, device=str(device))
    except RuntimeError as exc:
        raise CheckpointMismatchError(
            f"checkpoint {path} does not fit this model's architecture: {exc}"
        ) from exc
    # On CPU: AdamW moves moments to each parameter's device itself, and a non-capturable
    # AdamW needs its `step` counters on the CPU.
    tensors = load_file(str(path / _OPTIMIZER_FILE))
    optimizer.load_state_dict(
        _unflatten_optimizer(tensors, state["optimizer_scalars"], state["param_groups"])
    )
    log.info("resuming training from %s (step %d)", path, state["step"])
    return int(state["step"])


def _check_compatible(
    path: Path, state: Mapping[str, Any], config: TrainingConfig, digests: Mapping[str, str]
) -> None:
    if state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointMismatchError(
            f"checkpoint {path} has format {state.get('format')!r}; this version reads "
            f"{CHECKPOINT_FORMAT}. Use an empty checkpoint_dir."
        )
    if state["config_digest"] != digests["config_digest"]:
        saved, now = state.get("config", {}), config.to_dict()
        changed = sorted(
            f"{k}: {saved.get(k)!r} -> {now[k]!r}"
            for k in now
            if k not in config.NON_TRAJECTORY and saved.get(k) != now[k]
        )
        raise CheckpointMismatchError(
            f"checkpoint {path} was made with a different {type(config).__name__} "
            f"({', '.join(changed)}); use the same config to resume, or another (or empty) "
            "checkpoint_dir to start over"
        )
    if state["data_digest"] != digests["data_digest"]:
        raise CheckpointMismatchError(
            f"checkpoint {path} was made on different training batches; pass the same batches "
            "to resume, or use another (or empty) checkpoint_dir to start over"
        )


def _flatten_optimizer(
    state_dict: Mapping[str, Any],
) -> tuple[dict[str, torch.Tensor], dict[str, Any], list[dict[str, Any]]]:
    """Split an optimizer state_dict into named tensors, JSON scalars and param groups."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for index, per_param in state_dict["state"].items():
        for key, value in per_param.items():
            name = f"{index}.{key}"
            if isinstance(value, torch.Tensor):
                tensors[name] = value.detach().contiguous()
            else:
                scalars[name] = value
    groups = [
        {k: list(v) if isinstance(v, tuple) else v for k, v in group.items()}
        for group in state_dict["param_groups"]
    ]
    return tensors, scalars, groups


def _unflatten_optimizer(
    tensors: Mapping[str, torch.Tensor],
    scalars: Mapping[str, Any],
    groups: list[dict[str, Any]],
) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in [*tensors.items(), *scalars.items()]:
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    param_groups = [
        {k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in group.items()}
        for group in groups
    ]
    return {"state": state, "param_groups": param_groups}

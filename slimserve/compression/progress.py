"""The one progress callback every compression stage reports through.

A stage calls ``progress(ProgressEvent(...))`` as it goes: pruning per calibration batch and
per layer, training every ``log_every`` optimizer steps and after the last one, scoring per
batch. A recipe run relabels each stage's events with its place in the run (``[2/4] ...``).

Imports nothing from the package.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True, kw_only=True)
class ProgressEvent:
    """One report from a running stage.

    ``stage`` names what runs (``"prune (calibrate)"``, ``"distill"``, ``"[2/4] finetune"``);
    ``done`` of ``total`` units (batches, layers, optimizer steps) are finished, ``elapsed_s``
    seconds after the stage began. ``metrics`` holds what a training stage measures since its
    previous report (``loss``, the mean over those steps; ``lr``; ``grad_norm`` when clipping).
    """

    stage: str
    done: int
    total: int
    elapsed_s: float = 0.0
    metrics: Mapping[str, float] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """The stage, with the loss when there is one: ``"[2/4] distill loss 1.234"``."""
        loss = self.metrics.get("loss")
        return self.stage if loss is None else f"{self.stage} loss {loss:.3f}"


Progress = Callable[[ProgressEvent], None]


def relabelled(progress: Progress | None, prefix: str) -> Progress | None:
    """``progress`` with ``prefix`` put before every event's stage (None stays None)."""
    if progress is None:
        return None

    def report(event: ProgressEvent) -> None:
        progress(dataclasses.replace(event, stage=f"{prefix} {event.stage}"))

    return report

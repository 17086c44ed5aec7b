"""What every compression stage shares: its config base, what it is given, what it returns.

A stage is one module that defines a config (a ``StageConfig``), a runner and a
``StageSpec`` naming both; ``slimserve.compression.stages`` lists the specs, keyed by the
recipe's stage name and by config type (as torchao keys its handlers by config type).

``StageConfig`` writes ``version``, ``to_dict`` and ``from_dict`` once: a config is a frozen,
keyword-only dataclass whose ``version`` field defaults to its current version; ``from_dict``
refuses keys outside its fields and hands an older version it still reads (``OLD_VERSIONS``)
to ``upgrade`` first; any other version is refused by validation.

Imports only ``slimserve.compression.data``, ``.progress`` and (for types) ``.teacher_data``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Protocol, Self, TypeVar, cast

if TYPE_CHECKING:
    import torch

    from slimserve.compression.data import TextSource
    from slimserve.compression.progress import Progress
    from slimserve.compression.teacher_data import TeacherTextSource


@dataclass(frozen=True, slots=True, kw_only=True)
class StageConfig:
    """Base of every stage's config. A subclass redeclares ``version`` when it moves on."""

    version: int = 1
    #: Older versions ``from_dict`` still reads, through ``upgrade``.
    OLD_VERSIONS: ClassVar[frozenset[int]] = frozenset()

    def __post_init__(self) -> None:
        current = self.current_version()
        if self.version != current:
            raise ValueError(
                f"{type(self).__name__} version={self.version!r} is not supported; use "
                f"{current} (from_dict upgrades older versions)"
            )
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming a bad field and its fix; a subclass overrides this."""

    @classmethod
    def current_version(cls) -> int:
        """The version this class reads and writes: its ``version`` field's default."""
        return cast(int, cls.__dataclass_fields__["version"].default)

    @classmethod
    def upgrade(cls, data: dict[str, Any], version: int) -> dict[str, Any]:
        """Rewrite a ``to_dict`` of an older ``version`` (one in ``OLD_VERSIONS``) into the
        current keys and meanings; unchanged by default (the keys stayed, a meaning moved)."""
        return data

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        """Build from ``to_dict`` output (or a recipe table) of this or an older version.

        Raises:
            ValueError: an unknown key, an unknown version, or a value that fails validation.
        """
        fields = dict(data)
        version = fields.get("version", cls.current_version())
        if version in cls.OLD_VERSIONS:
            fields = {**cls.upgrade(fields, version), "version": cls.current_version()}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} keys {unknown}; allowed: {sorted(known)}")
        return cls(**fields)


def check_int(name: str, value: object, *, minimum: int) -> None:
    """Raise ValueError unless ``value`` is an int (not a bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}")


def check_float(
    name: str, value: object, *, low: float, high: float = math.inf, low_open: bool = False
) -> None:
    """Raise ValueError unless ``value`` is a finite number in [low, high] ((low, high])."""
    ok = (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and (value > low if low_open else value >= low)
        and value <= high
    )
    if not ok:
        bound = f"> {low}" if low_open else f">= {low}"
        upper = f" and <= {high}" if math.isfinite(high) else ""
        raise ValueError(f"{name}={value!r} is invalid; use a finite number {bound}{upper}")


def check_choice(name: str, value: object, choices: Sequence[str]) -> None:
    """Raise ValueError unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not known; use one of {', '.join(choices)}")


class Report(Protocol):
    """What a stage reports; ``to_dict`` is what the manifest records."""

    def to_dict(self) -> dict[str, Any]: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class StageContext:
    """What a run offers a stage besides the model and its tokenizer.

    ``train``: calibration and distillation text. ``examples``: ``(prompt, label)`` pairs a
    fine-tune trains on. ``work_dir``: this stage's own checkpoint directory, removed once
    the version is published. ``load_parent``: a fresh full-precision copy of the parent (a
    distillation teacher). ``model_bytes``: the size of the saved weights, known to stages
    that measure (they run after saving). ``progress`` is already labelled with the stage's
    place in the run. ``teacher_text``: the parent's answers to the shipped prompts, made
    once per key and kept in the registry (``.teacher_data``); None outside a recipe run.
    """

    device: torch.device
    train: TextSource
    examples: Sequence[tuple[str, str]]
    work_dir: Path
    load_parent: Callable[[], Any]
    eval_text: Path | None = None
    model_bytes: int | None = None
    progress: Progress | None = None
    teacher_text: TeacherTextSource | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class StageOutcome:
    """A stage's result: the model (a stage may return a new one), a report, and for a
    quantizing stage the manifest's ``quantization`` record; a measuring stage's metrics."""

    model: Any
    report: Report | None = None
    quantization: Mapping[str, Any] | None = None
    metrics: Mapping[str, Any] | None = None


C = TypeVar("C", bound=StageConfig)


@dataclass(frozen=True, slots=True, kw_only=True)
class StageSpec(Generic[C]):
    """One stage: its recipe name, config type, runner, place in the order and checks.

    ``run(model, tokenizer, config, context)`` does the work; ``check(config, context)``
    raises ValueError before any work when the stage cannot run with what the run offers
    (int4 without CUDA, a fine-tune without examples). ``measures``: the stage reads the
    saved artifact (its size) and changes nothing, so it runs after saving.
    """

    name: str
    config: type[C]
    run: Callable[[Any, Any, C, StageContext], StageOutcome]
    order: int
    check: Callable[[C, StageContext], None] | None = None
    measures: bool = False
    at_most_once: bool = False

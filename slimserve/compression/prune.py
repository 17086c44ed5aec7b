"""Structured pruning of Llama-architecture Hugging Face causal LMs, in place.

Steps, in Torch-Pruning's LLM-example order: plan the counts (fails fast on a ratio that
would empty a layer) → optionally remove whole decoder layers (depth), ranked by Block
Influence on calibration text → importance (weights, activations on calibration text, or one
gradient of the calibration LM loss) → remove MLP channels and whole query heads → rewrite
``model.config`` so a plain ``AutoModelForCausalLM.from_pretrained`` reloads the result.

Depth and width together follow NVIDIA's Minitron recipe (prune both, then recover by
distillation). The parts live in their own modules: ``.prune_layers`` (depth, by Block
Influence), ``.prune_importance`` (ranking heads and channels) and ``.prune_surgery``
(removing them and rewriting the config); this one plans, orders the steps and is the
recipe's ``prune`` stage.

Shapes stay uniform across layers: Hugging Face's ``LlamaConfig`` has one
``intermediate_size``, one ``num_attention_heads`` and one ``num_key_value_heads``, so a
global ranking that kept 900 channels in one layer and 1400 in another could not be saved
and reloaded as a Llama model. Every layer therefore loses the same number of channels and
heads, chosen by ranking within the layer; there is no global scope or per-layer ratio.

Imports ``.data``, ``.progress``, ``.stage`` and the prune modules above.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Literal, get_args

import torch
from torch import nn

from slimserve.compression.data import token_chunks
from slimserve.compression.progress import Progress, ProgressEvent
from slimserve.compression.prune_importance import CALIBRATED, eval_mode, importance
from slimserve.compression.prune_layers import block_influence, remove_layers
from slimserve.compression.prune_surgery import (
    LayerPruneReport,
    Plan,
    Shape,
    blocks_of,
    prune_block,
    rewrite_config,
    shape_of,
)
from slimserve.compression.stage import (
    StageConfig,
    StageContext,
    StageOutcome,
    StageSpec,
    check_choice,
    check_int,
)

log = logging.getLogger(__name__)

Importance = Literal["magnitude", "activation", "taylor", "random"]
# Calibration sequences per forward pass: bounds activation memory (the (B, T, vocab)
# logits dominate: 4 x 256 x 49152 fp32 = 200 MB for SmolLM2).
_BATCH = 4


@dataclass(frozen=True, slots=True, kw_only=True)
class PruneConfig(StageConfig):
    """What to remove and how to rank it. Ratios are fractions of what each layer has.

    ``mlp_ratio``: MLP intermediate channels removed per layer. ``head_ratio``: query heads
    removed within each kv group (so every group keeps the same count and grouped-query
    attention stays consistent). ``kv_head_ratio``: whole kv heads removed, each with its
    query heads. Head counts round half up per group. ``layers_removed``: whole decoder
    layers removed first, lowest Block Influence on the calibration text first (always
    calibrated, whatever ``importance`` ranks heads and channels by).

    ``channel_multiple``: the MLP keeps a multiple of this many channels, the multiple
    nearest ``(1 - mlp_ratio)`` of its width (at least one multiple, at most the width), so
    quantized kernels whose blocks hold 32 weights of a row (GGUF q8_0/q4) can store every
    pruned row; 1 keeps the count nearest the ratio.

    Version 2 added ``channel_multiple`` (default 32); a version 1 table reads as
    ``channel_multiple = 1``, which is how it pruned.
    """

    version: int = 2
    OLD_VERSIONS: ClassVar[frozenset[int]] = frozenset({1})
    mlp_ratio: float = 0.0
    head_ratio: float = 0.0
    kv_head_ratio: float = 0.0
    layers_removed: int = 0
    # Weight magnitude ranks worse than random on SmolLM2 (DESIGN §7): activation is the
    # default, Taylor the alternative.
    importance: Importance = "activation"
    calibration_samples: int = 32
    seq_len: int = 256
    seed: int = 0
    channel_multiple: int = 32
    #: What importance and Block Influence are measured on: "text", the run's text (the
    #: Python docs unless --data), or "teacher", the parent's answers to the shipped prompts
    #: (the train split of the dataset distillation uses), so the units kept are the ones
    #: what the parent knows runs through, not only one domain's.
    calibration: Literal["text", "teacher"] = "text"
    teacher_prompts: int = 0  # as distill's: the first N shipped prompts; 0 = all
    teacher_new_tokens: int = 192  # as distill's: most tokens the teacher writes per prompt

    @classmethod
    def upgrade(cls, data: dict[str, Any], version: int) -> dict[str, Any]:
        return {"channel_multiple": 1, **data}

    def validate(self) -> None:
        for name in ("mlp_ratio", "head_ratio", "kv_head_ratio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{name}={value!r} must be a number in [0, 1)")
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name}={value!r} is outside [0, 1); use e.g. 0.2 for 20%")
        for name, low in (
            ("calibration_samples", 1),
            ("seq_len", 2),
            ("seed", 0),
            ("layers_removed", 0),
            ("channel_multiple", 1),
            ("teacher_prompts", 0),
            ("teacher_new_tokens", 1),
        ):
            check_int(name, getattr(self, name), minimum=low)
        nothing = self.mlp_ratio == self.head_ratio == self.kv_head_ratio == 0
        if nothing and self.layers_removed == 0:
            raise ValueError(
                "mlp_ratio, head_ratio, kv_head_ratio and layers_removed are all 0: "
                "nothing to prune"
            )
        check_choice("importance", self.importance, get_args(Importance))
        check_choice("calibration", self.calibration, ("text", "teacher"))


@dataclass(frozen=True, slots=True, kw_only=True)
class PruneReport:
    params_before: int
    params_after: int
    intermediate_size: tuple[int, int]  # (before, after)
    # (1 - mlp_ratio) of the width, before rounding to a multiple of channel_multiple.
    intermediate_requested: float
    channel_multiple: int
    num_attention_heads: tuple[int, int]
    num_key_value_heads: tuple[int, int]
    num_hidden_layers: tuple[int, int]
    # Block Influence of every original layer (empty when no layer was removed).
    layer_influence: tuple[float, ...]
    layers: tuple[LayerPruneReport, ...]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def prune_(
    model: nn.Module,
    config: PruneConfig,
    calibration: torch.Tensor | None,
    progress: Progress | None = None,
) -> PruneReport:
    """Remove MLP channels and attention heads from ``model`` in place; update its config.

    Args:
        model: a Hugging Face ``LlamaForCausalLM`` (or any model with the same
            ``model.layers[i].self_attn.{q,k,v,o}_proj`` / ``mlp.{gate,up,down}_proj``).
        config: ratios and importance.
        calibration: token ids, int64, shape (N, T) with N >= ``calibration_samples`` and
            T >= ``seq_len`` (the first rows and columns are used); required for the
            ``activation`` and ``taylor`` importances, ignored by the others.
        progress: gets ``"prune (calibrate)"`` events per calibration batch and
            ``"prune (layers)"`` events per layer pruned.

    Returns:
        Parameter counts and the heads and channels each layer kept.

    Raises:
        ValueError: the model is not Llama-shaped, a ratio would remove every head or
            channel of a layer or group, ``layers_removed`` would leave no layer, or
            calibration is missing or too small. Raised before the model is touched.
    """
    blocks = blocks_of(model)
    shape = shape_of(model)
    plan = _plan(config, shape)
    layers_before = len(blocks)
    if config.layers_removed >= layers_before:
        raise ValueError(
            f"layers_removed={config.layers_removed} would remove all {layers_before} layers; "
            f"use at most {layers_before - 1}"
        )
    calibrated = config.importance in CALIBRATED or config.layers_removed > 0
    batches = _calibration(config, calibration) if calibrated else None
    params_before = _count(model)

    influence: list[float] = []
    source = list(range(layers_before))
    if config.layers_removed:
        assert batches is not None  # calibrated above
        with eval_mode(model):
            scores_by_layer = block_influence(model, batches, progress)
        influence = scores_by_layer.tolist()
        source = remove_layers(model, scores_by_layer, layers_before - config.layers_removed)
        blocks = blocks_of(model)

    scores = importance(model, blocks, shape, config, batches=batches, progress=progress)
    reports = []
    for i, (block, score) in enumerate(zip(blocks, scores, strict=True)):
        reports.append(prune_block(i, block, score, shape, plan, source=source[i]))
        if progress is not None:
            progress(ProgressEvent(stage="prune (layers)", done=i + 1, total=len(blocks)))
    rewrite_config(model, shape, plan)

    report = PruneReport(
        params_before=params_before,
        params_after=_count(model),
        intermediate_size=(shape.channels, plan.channels),
        intermediate_requested=round((1.0 - config.mlp_ratio) * shape.channels, 2),
        channel_multiple=config.channel_multiple,
        num_attention_heads=(shape.heads, plan.kv_heads * plan.heads_per_group),
        num_key_value_heads=(shape.kv_heads, plan.kv_heads),
        num_hidden_layers=(layers_before, len(blocks)),
        layer_influence=tuple(influence),
        layers=tuple(reports),
    )
    log.info("pruned %d -> %d parameters", report.params_before, report.params_after)
    return report


def _removed(ratio: float, n: int) -> int:
    # Round half up: Python's round() would send 1.5 heads to 2 but 2.5 to 2.
    return math.floor(ratio * n + 0.5)


def kept_channels(ratio: float, n: int, multiple: int) -> int:
    """MLP channels to keep of ``n`` when removing ``ratio``: the multiple of ``multiple``
    nearest ``(1 - ratio) * n`` (halves round up), at least ``multiple`` and at most the
    largest multiple within ``n``. Nothing removed keeps ``n`` as it is; a width below
    ``multiple`` rounds to the count alone."""
    if ratio == 0 or n < multiple:
        return n - _removed(ratio, n)
    nearest = math.floor((1.0 - ratio) * n / multiple + 0.5) * multiple
    return min(max(nearest, multiple), n // multiple * multiple)


def _plan(config: PruneConfig, shape: Shape) -> Plan:
    group = shape.heads // shape.kv_heads
    kv_gone = _removed(config.kv_head_ratio, shape.kv_heads)
    heads_gone = _removed(config.head_ratio, group)
    channels_gone = shape.channels - kept_channels(
        config.mlp_ratio, shape.channels, config.channel_multiple
    )
    if kv_gone >= shape.kv_heads:
        raise ValueError(
            f"kv_head_ratio={config.kv_head_ratio} would remove all {shape.kv_heads} kv heads "
            f"of every layer; use a ratio below {(shape.kv_heads - 0.5) / shape.kv_heads:.3f}"
        )
    if heads_gone >= group:
        raise ValueError(
            f"head_ratio={config.head_ratio} would remove all {group} query heads of every "
            f"kv group; use a ratio below {(group - 0.5) / group:.3f}"
        )
    if channels_gone >= shape.channels:
        raise ValueError(
            f"mlp_ratio={config.mlp_ratio} would remove all {shape.channels} MLP channels"
        )
    return Plan(shape.kv_heads - kv_gone, group - heads_gone, shape.channels - channels_gone)


def _calibration(config: PruneConfig, calibration: torch.Tensor | None) -> list[torch.Tensor]:
    n, t = config.calibration_samples, config.seq_len
    if calibration is None:
        if config.importance not in CALIBRATED:  # only depth pruning asked for it
            raise ValueError(
                f"layers_removed={config.layers_removed} needs calibration token ids of shape "
                f"(>= {n}, >= {t}) to rank layers by Block Influence; pass them"
            )
        raise ValueError(
            f"importance={config.importance!r} needs calibration token ids of shape "
            f"(>= {n}, >= {t}); pass them, or use importance='random'/'magnitude'"
        )
    if calibration.dim() != 2 or calibration.shape[0] < n or calibration.shape[1] < t:
        raise ValueError(
            f"calibration has shape {tuple(calibration.shape)}; need (>= {n}, >= {t}) for "
            f"calibration_samples={n}, seq_len={t}"
        )
    ids = calibration[:n, :t].long()
    return [ids[i : i + _BATCH] for i in range(0, n, _BATCH)]


def _count(model: nn.Module) -> int:
    # parameters() yields a tied embedding / lm_head once.
    return sum(p.numel() for p in model.parameters())


def run_prune(model: Any, tokenizer: Any, config: PruneConfig, ctx: StageContext) -> StageOutcome:
    """The ``prune`` stage: calibrate on the run's text or the parent's teacher text
    (deterministic either way, so a rerun after an interruption prunes the same units)."""
    if config.calibration == "teacher":
        from slimserve.compression.teacher_data import TeacherTextConfig, packed_chunks

        if ctx.teacher_text is None:
            raise ValueError("calibration='teacher' needs a recipe run (it has teacher text)")
        # The dataset a distill stage with the same teacher settings trains on (made here
        # with the parent, before it is pruned, when the registry has none yet).
        wanted = TeacherTextConfig(
            prompts=config.teacher_prompts, max_new_tokens=config.teacher_new_tokens
        )
        data = ctx.teacher_text(wanted, teacher=model, progress=ctx.progress)
        calibration = packed_chunks(data.train, config.seq_len, config.calibration_samples)
    else:
        calibration = token_chunks(
            tokenizer, ctx.train.text, config.seq_len, config.calibration_samples
        )
    report = prune_(model, config, calibration, ctx.progress)
    return StageOutcome(model=model, report=report)


STAGE = StageSpec(name="prune", config=PruneConfig, run=run_prune, order=0)

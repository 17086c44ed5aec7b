"""Structural surgery on a Llama decoder: the modules pruning touches, and their removal.

Hand-driven torch-pruning: its DependencyGraph does not terminate on grouped-query attention
with q/k/v in ``num_heads`` (upstream issue #527), and for the MLP the graph would only
rediscover the one group written out here (gate/up rows + down column) at the cost of
tracing the whole model. The low-level functions do the surgery; ``rewrite_config`` then
makes ``model.config`` describe the new shapes so a plain ``from_pretrained`` reloads it.

Imports ``slimserve.engine.spec`` (``head_dim_of``: the one reading of a Llama's head size).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from slimserve.engine.spec import head_dim_of


@dataclass(frozen=True, slots=True, kw_only=True)
class LayerPruneReport:
    layer: int  # index in the pruned model
    source_layer: int  # index in the model before pruning
    kept_heads: tuple[int, ...]  # original query-head indices
    kept_kv_heads: tuple[int, ...]  # original kv-head indices
    kept_channels: int


@dataclass(frozen=True, slots=True)
class Block:
    """The modules of one decoder layer that pruning touches."""

    attn: Any  # LlamaAttention: num_key_value_groups is rewritten
    mlp: Any  # LlamaMLP: intermediate_size is rewritten
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    gate: nn.Linear
    up: nn.Linear
    down: nn.Linear

    def scored(self) -> tuple[nn.Linear, ...]:
        """The weights that importance scores: (q, o, gate, up, down)."""
        return self.q, self.o, self.gate, self.up, self.down


@dataclass(frozen=True, slots=True)
class Shape:
    heads: int  # query heads per layer
    kv_heads: int
    head_dim: int
    channels: int  # MLP intermediate size


@dataclass(frozen=True, slots=True)
class Scores:
    heads: torch.Tensor  # (heads,), higher = more important
    channels: torch.Tensor  # (channels,)


@dataclass(frozen=True, slots=True)
class Plan:
    """How many of each unit to keep in every layer."""

    kv_heads: int
    heads_per_group: int
    channels: int


def blocks_of(model: nn.Module) -> list[Block]:
    names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    try:
        layers = decoder_layers(model)
        return [
            Block(layer.self_attn, layer.mlp, *(_linear(layer, n) for n in names))
            for layer in layers
        ]
    except (AttributeError, TypeError, ValueError) as e:
        raise ValueError(
            "prune_ supports Llama-architecture models (model.layers[i].self_attn.q_proj, "
            f"mlp.gate_proj, ...); got {type(model).__name__}: {e}"
        ) from e


def _linear(layer: nn.Module, name: str) -> nn.Linear:
    parent = layer.self_attn if name[0] in "qkvo" else layer.mlp
    module = getattr(parent, name)
    if not isinstance(module, nn.Linear):
        raise TypeError(f"{name} is {type(module).__name__}, not nn.Linear")
    return module


def shape_of(model: nn.Module) -> Shape:
    cfg: Any = model.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = head_dim_of(cfg)
    return Shape(heads, kv_heads, head_dim, cfg.intermediate_size)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__} has no model.layers ModuleList")
    return layers


def select(scores: torch.Tensor, keep: int) -> list[int]:
    """Indices of the ``keep`` highest scores, ascending (original order is preserved)."""
    return sorted(torch.topk(scores, keep).indices.tolist())


def prune_block(
    i: int, block: Block, scores: Scores, shape: Shape, plan: Plan, *, source: int
) -> LayerPruneReport:
    group = shape.heads // shape.kv_heads
    # Query head h reads kv head h // group (transformers' repeat_kv layout), so a kv head's
    # score is the sum of its query heads' scores.
    kept_kv = select(scores.heads.view(shape.kv_heads, group).sum(1), plan.kv_heads)
    kept_heads = [
        g * group + h
        for g in kept_kv
        for h in select(scores.heads[g * group : (g + 1) * group], plan.heads_per_group)
    ]
    kept_channels = select(scores.channels, plan.channels)

    # Hand-driven torch-pruning: its DependencyGraph does not terminate on grouped-query
    # attention with q/k/v in num_heads (upstream issue #527), and for the MLP the graph
    # would only rediscover the one group written out here (gate/up rows + down column) at
    # the cost of tracing the whole model. The low-level functions do the surgery.
    head_cols = _dropped(kept_heads, shape.heads, shape.head_dim)
    kv_rows = _dropped(kept_kv, shape.kv_heads, shape.head_dim)
    channels = _dropped(kept_channels, shape.channels, 1)
    for linear, idxs, out in (
        (block.q, head_cols, True),
        (block.o, head_cols, False),
        (block.k, kv_rows, True),
        (block.v, kv_rows, True),
        (block.gate, channels, True),
        (block.up, channels, True),
        (block.down, channels, False),
    ):
        _drop(linear, idxs, out=out)

    # transformers reads these module attributes at forward time, not the config.
    block.attn.num_key_value_groups = plan.heads_per_group
    block.mlp.intermediate_size = plan.channels
    return LayerPruneReport(
        layer=i,
        source_layer=source,
        kept_heads=tuple(kept_heads),
        kept_kv_heads=tuple(kept_kv),
        kept_channels=len(kept_channels),
    )


def _dropped(kept: list[int], n: int, width: int) -> list[int]:
    """Row (or column) indices of the units of ``width`` rows not in ``kept``."""
    keep = set(kept)
    return [u * width + d for u in range(n) if u not in keep for d in range(width)]


def _drop(linear: nn.Linear, idxs: list[int], *, out: bool) -> None:
    """Remove output rows (``out``) or input columns ``idxs`` of ``linear``."""
    if not idxs:
        return
    flag = linear.weight.requires_grad  # torch-pruning builds new Parameters (requires_grad)
    if out:
        tp.prune_linear_out_channels(linear, idxs)
    else:
        tp.prune_linear_in_channels(linear, idxs)
    for p in linear.parameters():
        p.requires_grad_(flag)


def rewrite_config(model: nn.Module, shape: Shape, plan: Plan) -> None:
    cfg: Any = model.config
    # head_dim explicitly: it no longer equals hidden_size // num_attention_heads.
    cfg.head_dim = shape.head_dim
    cfg.intermediate_size = plan.channels
    cfg.num_attention_heads = plan.kv_heads * plan.heads_per_group
    cfg.num_key_value_heads = plan.kv_heads

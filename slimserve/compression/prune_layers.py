"""Depth pruning: rank decoder layers by Block Influence and remove the least influential.

Block Influence is ShortGPT's score (Men et al., 2024): one minus the mean cosine similarity
between the hidden state entering a layer and the one leaving it; a layer that barely turns
the residual stream goes first. Torch-Pruning has no depth pruning, so it is written here (a
forward hook and a list surgery).

Imports ``.prune_importance`` (calibration passes), ``.prune_surgery`` and ``.progress``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from slimserve.compression.progress import Progress
from slimserve.compression.prune_importance import run_calibration
from slimserve.compression.prune_surgery import decoder_layers, select

log = logging.getLogger(__name__)


@torch.no_grad()
def block_influence(
    model: nn.Module, batches: list[torch.Tensor], progress: Progress | None
) -> torch.Tensor:
    """Block Influence of every decoder layer, (layers,): 1 - mean over calibration tokens of
    cos(hidden state in, hidden state out). Higher = the layer changes more."""
    layers = decoder_layers(model)
    sums = torch.zeros(len(layers), dtype=torch.float64)
    tokens = sum(b.numel() for b in batches)

    def hook(i: int) -> Callable[..., None]:
        def fn(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
            x = args[0] if args else kwargs["hidden_states"]
            y = out[0] if isinstance(out, tuple) else out
            cos = torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)
            sums[i] += float(cos.double().sum())

        return fn

    handles = [
        layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)
    ]
    try:
        run_calibration(model, batches, progress)
    finally:
        for handle in handles:
            handle.remove()
    return (1.0 - sums / tokens).float()


def remove_layers(model: nn.Module, influence: torch.Tensor, keep: int) -> list[int]:
    """Keep the ``keep`` layers of highest influence, in their order; renumber them for the
    KV cache and rewrite ``num_hidden_layers``. Returns the kept layers' original indices."""
    kept = select(influence, keep)
    layers = decoder_layers(model)
    inner: Any = model.model  # LlamaModel
    inner.layers = nn.ModuleList([layers[i] for i in kept])
    for new, layer in enumerate(inner.layers):
        # The attention's layer_idx addresses the KV cache; gaps would index past its end.
        layer.self_attn.layer_idx = new
    cfg: Any = model.config
    cfg.num_hidden_layers = keep
    types = getattr(cfg, "layer_types", None)
    if isinstance(types, list) and len(types) == len(influence):
        cfg.layer_types = [types[i] for i in kept]
    log.info("removed layers %s", sorted(set(range(len(influence))) - set(kept)))
    return kept

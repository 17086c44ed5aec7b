"""How much each attention head and MLP channel matters: the pruning importances.

``magnitude``: squared weight norms. ``activation``: each unit's contribution to the residual
stream on calibration text (Wanda's activation-times-weight idea, per unit). ``taylor``:
first-order Taylor, |w * dL/dw| of the calibration LM loss (LLM-Pruner's score).
``random``: seeded. Weight magnitude ranks worse than random on SmolLM2 (DESIGN §7).

Imports ``.prune_surgery`` (the blocks and shapes scored) and ``.progress``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import nn

from slimserve.compression.progress import Progress, ProgressEvent
from slimserve.compression.prune_surgery import Block, Scores, Shape

if TYPE_CHECKING:
    from slimserve.compression.prune import PruneConfig

# The importances that read calibration text.
CALIBRATED = ("activation", "taylor")


def importance(
    model: nn.Module,
    blocks: list[Block],
    shape: Shape,
    config: PruneConfig,
    *,
    batches: list[torch.Tensor] | None,
    progress: Progress | None,
) -> list[Scores]:
    """Every layer's head and channel scores by ``config.importance``; higher = keep."""
    if config.importance == "random":
        gen = torch.Generator().manual_seed(config.seed)
        return [
            Scores(
                torch.rand(shape.heads, generator=gen), torch.rand(shape.channels, generator=gen)
            )
            for _ in blocks
        ]
    if config.importance == "magnitude":
        return [_magnitude(block, shape) for block in blocks]
    if batches is None:  # prune_ calibrates for every calibrated importance
        raise RuntimeError(f"no calibration batches for importance={config.importance!r}")
    with eval_mode(model):
        if config.importance == "activation":
            return _activation(model, blocks, shape, batches, progress)
        return _taylor(model, blocks, shape, batches, progress)


def _per_unit(parts: Sequence[torch.Tensor], shape: Shape) -> Scores:
    """Sum weight-shaped element scores, in ``Block.scored`` order, over each head's q rows
    and o columns and each channel's gate/up rows and down column."""
    q, o, gate, up, down = parts
    hidden = q.shape[1]
    heads = q.view(shape.heads, shape.head_dim, hidden).sum((1, 2))  # q: (H*D, hidden)
    heads = heads + o.view(hidden, shape.heads, shape.head_dim).sum((0, 2))  # o: (hidden, H*D)
    return Scores(heads.cpu(), (gate.sum(1) + up.sum(1) + down.sum(0)).cpu())


@torch.no_grad()
def _magnitude(block: Block, shape: Shape) -> Scores:
    # Squared L2 norm of every weight a head or channel owns.
    return _per_unit([m.weight.float().pow(2) for m in block.scored()], shape)


@torch.no_grad()
def _activation(
    model: nn.Module,
    blocks: list[Block],
    shape: Shape,
    batches: list[torch.Tensor],
    progress: Progress | None,
) -> list[Scores]:
    """Summed squared norm of each unit's contribution to the residual stream.

    Channel j adds a_j * W_down[:, j], so its score is sum(a_j^2) * ||W_down[:, j]||^2 (Wanda's
    activation-times-weight idea, per channel); head h adds W_o[:, h] x_h, computed exactly.
    """
    heads = [torch.zeros(shape.heads) for _ in blocks]
    channels = [torch.zeros(shape.channels) for _ in blocks]
    hooks = []
    for block, h, c in zip(blocks, heads, channels, strict=True):
        hooks.append(block.o.register_forward_pre_hook(_head_hook(block.o, h, shape)))
        hooks.append(block.down.register_forward_pre_hook(_channel_hook(c)))
    try:
        run_calibration(model, batches, progress)
    finally:
        for hook in hooks:
            hook.remove()
    return [
        Scores(h, c * block.down.weight.float().pow(2).sum(0).cpu())
        for block, h, c in zip(blocks, heads, channels, strict=True)
    ]


def _head_hook(o_proj: nn.Linear, acc: torch.Tensor, shape: Shape) -> Callable[..., None]:
    def hook(_: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        x = args[0].float()
        x = x.view(*x.shape[:-1], shape.heads, shape.head_dim)  # (B, T, H, D)
        w = o_proj.weight.float().view(-1, shape.heads, shape.head_dim)  # (hidden, H, D)
        contribution = torch.einsum("bthd,ehd->bthe", x, w)  # (B, T, H, hidden)
        acc.add_(contribution.pow(2).sum((0, 1, 3)).cpu())

    return hook


def _channel_hook(acc: torch.Tensor) -> Callable[..., None]:
    def hook(_: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        acc.add_(args[0].float().pow(2).sum((0, 1)).cpu())  # (B, T, I) -> (I,)

    return hook


def _taylor(
    model: nn.Module,
    blocks: list[Block],
    shape: Shape,
    batches: list[torch.Tensor],
    progress: Progress | None,
) -> list[Scores]:
    """First-order Taylor: sum of |w * dL/dw| over each unit's weights (LLM-Pruner's
    element-wise score), with the gradient of the mean LM loss over all calibration tokens."""
    weights = [m.weight for block in blocks for m in block.scored()]
    with _requires_grad(weights):
        grads = run_calibration(model, batches, progress, wrt=weights)
    per_weight = [
        (w.detach().float() * g.float()).abs() for w, g in zip(weights, grads, strict=True)
    ]
    n = len(blocks[0].scored())
    return [_per_unit(per_weight[i * n : (i + 1) * n], shape) for i in range(len(blocks))]


def run_calibration(
    model: nn.Module,
    batches: list[torch.Tensor],
    progress: Progress | None,
    *,
    wrt: Sequence[torch.Tensor] = (),
) -> list[torch.Tensor]:
    """Forward every batch. With ``wrt``, return d(mean LM loss)/d``wrt`` over all batches;
    ``torch.autograd.grad`` leaves the model's ``.grad`` fields untouched."""
    device = next(model.parameters()).device
    total = sum(len(b) for b in batches)
    grads: list[torch.Tensor] = []
    for step, batch in enumerate(batches):
        ids = batch.to(device)
        with torch.set_grad_enabled(bool(wrt)):
            out = model(input_ids=ids, labels=ids if wrt else None, use_cache=False)
            if wrt:
                part = torch.autograd.grad(out.loss * (len(batch) / total), list(wrt))
                grads = (
                    list(part) if not grads else [a + b for a, b in zip(grads, part, strict=True)]
                )
        if progress is not None:
            progress(ProgressEvent(stage="prune (calibrate)", done=step + 1, total=len(batches)))
    return grads


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextmanager
def _requires_grad(params: list[torch.Tensor]) -> Iterator[None]:
    before = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p, flag in zip(params, before, strict=True):
            p.requires_grad_(flag)

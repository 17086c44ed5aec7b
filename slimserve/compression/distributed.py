"""The training loop's view of torch.distributed: rank, world size, barrier, reductions.

A process group is created (and destroyed by its creator) when none exists and
``WORLD_SIZE`` > 1: the one environment read in the package, because torchrun's contract is
its environment. Without one, every helper here is a no-op for a single process.

Imports nothing from the package.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True, slots=True)
class Dist:
    rank: int
    world_size: int
    created: bool  # we initialised the process group, so we destroy it

    @classmethod
    def single(cls) -> Dist:
        """One process, no process group."""
        return cls(0, 1, created=False)

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module to call forward on: DDP around ``model`` when there are several ranks."""
        if self.world_size == 1:
            return model
        index = next(model.parameters()).device.index
        return nn.parallel.DistributedDataParallel(
            model,
            device_ids=None if index is None else [index],  # None on CPU
        )

    def reduce(self, stats: torch.Tensor, flag: bool) -> tuple[torch.Tensor, bool]:
        """The mean of ``stats`` (k,) over ranks, and whether any rank raised ``flag``."""
        both = torch.cat([stats.float().cpu(), torch.tensor([float(flag)])])
        if self.world_size > 1:
            backend_device = "cuda" if dist.get_backend() == "nccl" else "cpu"
            both = both.to(backend_device)
            dist.all_reduce(both)
            both = both.cpu()
            both[:-1] /= self.world_size
        return both[:-1], bool(both[-1] > 0)

    def close(self) -> None:
        if self.created:
            dist.destroy_process_group()


def init_distributed(device: torch.device) -> Dist:
    """Join the process group torchrun set up (creating it when needed), or run alone."""
    if dist.is_available() and dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size(), created=False)
    # torchrun's contract is its environment; init_process_group("env://") reads the rest.
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1 or not dist.is_available():
        return Dist.single()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), created=True)


def grad_sync(model: nn.Module, *, last_micro: bool) -> contextlib.AbstractContextManager[object]:
    """DDP all-reduces gradients only on the last micro-batch of a step."""
    if isinstance(model, nn.parallel.DistributedDataParallel) and not last_micro:
        return model.no_sync()
    return contextlib.nullcontext()

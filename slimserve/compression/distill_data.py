"""What a distillation trains on: its batches, their seeded order and their digest.

``distill_batches`` builds the (N, seq_len) token chunks a distill stage trains on: the run's
text, or the teacher's stored answers to the shipped prompts (``.teacher_data``) with a share
of the run's text mixed in. ``sample_indices`` makes the data order a function of
``(seed, position)``, so a resumed run draws exactly the batches an uninterrupted one would.

Imports ``.data``, ``.teacher_data`` and ``.training`` (``derive_seed``).
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

import torch

from slimserve.compression.data import Tokenizer, token_chunks
from slimserve.compression.teacher_data import TeacherTextConfig, packed_chunks
from slimserve.compression.training import derive_seed

if TYPE_CHECKING:
    from slimserve.compression.stage import StageContext


def distill_batches(
    tokenizer: Tokenizer,
    ctx: StageContext,
    *,
    seq_len: int,
    count: int,
    teacher_text: TeacherTextConfig | None = None,
    text_share: float = 0.0,
    teacher: Any = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Up to ``count`` chunks (N, seq_len) int64 to distill on, and the record of their source.

    Without ``teacher_text``: chunks of the run's text (``ctx.train``). With it: the train
    split of the run's teacher text (``ctx.teacher_text``, made with ``teacher`` if not yet
    stored), packed end to end, plus chunks of the run's text making ``text_share`` of all.

    Raises:
        ValueError: too little text for one chunk, or teacher text outside a recipe run.
    """
    text_record = {"name": ctx.train.name, "sha256": ctx.train.digest}
    if teacher_text is None:
        chunks = token_chunks(tokenizer, ctx.train.text, seq_len, count)
        return chunks, {"text": text_record | {"sequences": chunks.shape[0]}}
    if ctx.teacher_text is None:
        raise ValueError("teacher text needs a recipe run (a registry and a parent)")
    data = ctx.teacher_text(teacher_text, teacher=teacher, progress=ctx.progress)
    own = packed_chunks(data.train, seq_len, count)
    n_text = min(round(own.shape[0] * text_share / (1.0 - text_share)), count)
    parts = [own]
    if n_text:
        parts.append(token_chunks(tokenizer, ctx.train.text, seq_len, n_text))
    record = {
        "teacher_text": data.record() | {"sequences": own.shape[0]},
        "text": text_record | {"sequences": parts[-1].shape[0] if n_text else 0},
    }
    return torch.cat(parts), record


def sample_indices(n: int, seed: int, start: int, count: int) -> torch.Tensor:
    """Positions [start, start+count) of an endless stream of seeded permutations of range(n)."""
    parts: list[torch.Tensor] = []
    pos, end = start, start + count
    while pos < end:
        epoch, offset = divmod(pos, n)
        gen = torch.Generator().manual_seed(derive_seed(seed, "epoch", epoch))
        perm = torch.randperm(n, generator=gen)
        take = min(n - offset, end - pos)
        parts.append(perm[offset : offset + take])
        pos += take
    return torch.cat(parts)


def data_digest(batches: torch.Tensor) -> str:
    """sha256 of the token ids with their shape and dtype."""
    h = hashlib.sha256(f"{tuple(batches.shape)}:{batches.dtype}".encode())
    h.update(batches.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()

"""What a distillation trains on: its batches, their seeded order and digest, teacher samples.

``distill_batches`` builds the (N, seq_len) token chunks a distill stage trains on: the run's
text, or the teacher's stored answers to the shipped prompts (``.teacher_data``) with a share
of the run's text mixed in. ``sample_indices`` makes the data order a function of
``(seed, position)``, so a resumed run draws exactly the batches an uninterrupted one would.
``teacher_generate_batches`` samples fixed-length sequences from a teacher in memory, with
no engine and no registry (a quick check; recipes use ``.teacher_data``).

Imports ``.data``, ``.teacher_data`` and ``.training`` (``derive_seed``).
"""

from __future__ import annotations

import hashlib
import inspect
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

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


def teacher_generate_batches(
    teacher: nn.Module,
    tokenizer: Tokenizer,
    prompts: list[str],
    *,
    seq_len: int,
    n: int,
    seed: int,
    temperature: float = 1.0,
    batch_size: int = 8,
) -> torch.Tensor:
    """Sample `n` sequences (n, seq_len) int64: a prompt, then the teacher's continuation.

    Row i continues ``prompts[i % len(prompts)]`` (cut to seq_len - 1 tokens). Sampling uses
    its own generator seeded with `seed` and never stops early: the end-of-sequence token
    (when the tokenizer has one) is never drawn, so every row is full length.

    Raises:
        ValueError: no prompts, a prompt that encodes to nothing, or a bound below its minimum.
    """
    if not prompts or n < 1 or seq_len < 2 or temperature <= 0 or batch_size < 1:
        raise ValueError(
            f"need prompts (got {len(prompts)}), n >= 1 (got {n}), seq_len >= 2 "
            f"(got {seq_len}), temperature > 0 (got {temperature}), batch_size >= 1"
        )
    encoded = [tokenizer.encode(p, add_special_tokens=True)[: seq_len - 1] for p in prompts]
    empty = [i for i, ids in enumerate(encoded) if not ids]
    if empty:
        raise ValueError(f"prompts {empty} encode to no tokens; pass non-empty prompts")
    eos = getattr(tokenizer, "eos_token_id", None)
    out = torch.empty((n, seq_len), dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    was_training = teacher.training
    teacher.eval()
    try:
        for p_index, prompt_ids in enumerate(encoded):
            rows = list(range(p_index, n, len(prompts)))
            for chunk in _chunks(rows, batch_size):
                ids = torch.tensor([prompt_ids] * len(chunk), dtype=torch.long)  # (rows, P)
                out[chunk] = _sample(
                    teacher, ids, seq_len=seq_len, gen=gen, temperature=temperature, eos=eos
                )
    finally:
        teacher.train(was_training)
    return out


def _chunks(rows: list[int], size: int) -> Iterator[list[int]]:
    for i in range(0, len(rows), size):
        yield rows[i : i + size]


@torch.no_grad()
def _sample(
    teacher: nn.Module,
    ids: torch.Tensor,
    *,
    seq_len: int,
    gen: torch.Generator,
    temperature: float,
    eos: int | None,
) -> torch.Tensor:
    device = next(teacher.parameters()).device
    pieces = [ids]
    # transformers 5.24 renamed `past_key_values` to `cache` (the old name warns).
    params = inspect.signature(teacher.forward).parameters
    cache_name = "cache" if "cache" in params else "past_key_values"
    out = teacher(input_ids=ids.to(device), use_cache=True, logits_to_keep=1)
    for pos in range(ids.shape[1], seq_len):
        logits = out.logits[:, -1].float().cpu() / temperature  # (count, vocab)
        if eos is not None and 0 <= eos < logits.shape[-1]:
            logits[:, eos] = -math.inf
        token = torch.multinomial(logits.softmax(-1), 1, generator=gen)  # (count, 1)
        pieces.append(token)
        if pos + 1 < seq_len:
            cache = {cache_name: getattr(out, cache_name)}
            out = teacher(input_ids=token.to(device), use_cache=True, **cache)
    return torch.cat(pieces, dim=1)

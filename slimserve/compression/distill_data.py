"""What a distillation trains on: seeded batch order, a digest of the data, teacher samples.

``sample_indices`` makes the data order a function of ``(seed, position)``, so a resumed run
draws exactly the batches an uninterrupted one would. ``teacher_generate_batches`` samples
sequences from the teacher itself, for distilling on the teacher's own distribution.

Imports ``.training`` (``derive_seed``) and, for types, ``.data``.
"""

from __future__ import annotations

import hashlib
import inspect
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch import nn

from slimserve.compression.training import derive_seed

if TYPE_CHECKING:
    from slimserve.compression.data import Tokenizer


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

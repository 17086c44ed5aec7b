"""Label log-probabilities after a prompt, batched as the server's ``Score`` computes them.

Token ids are built as ``Score`` builds them: the prompt with the tokenizer's special tokens,
the label without, concatenated. Batches are left-padded so every label ends at the last
position; the model then computes logits only for the last few positions
(``logits_to_keep``) instead of ``(B, T, vocab)``. With single-token labels the prompt alone
is run and its last position read. The fine-tune stage trains on these quantities and
``label_probabilities`` scores with them, so a model is scored on exactly what it learned.

Imports ``.progress``; torch and transformers are imported inside the functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from slimserve.compression.progress import Progress, ProgressEvent

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass(frozen=True, slots=True)
class LabelTable:
    """The label set: texts and their token ids."""

    texts: tuple[str, ...]
    ids: tuple[tuple[int, ...], ...]

    @property
    def single(self) -> bool:
        return all(len(ids) == 1 for ids in self.ids)

    @property
    def longest(self) -> int:
        return max(len(ids) for ids in self.ids)


def label_table(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> LabelTable:
    """Encode labels without special tokens. Raises ValueError on a label with no tokens."""
    ids = []
    for text in texts:
        encoded = tuple(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else ()
        if not encoded:
            raise ValueError(f"label {text!r} encodes to no tokens; use a non-empty label")
        ids.append(tuple(int(i) for i in encoded))
    return LabelTable(tuple(texts), tuple(ids))


def prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: str, room: int | None) -> list[int]:
    """The prompt as the server encodes it (with special tokens), cut to ``room`` if given."""
    ids = [int(i) for i in tokenizer(prompt, add_special_tokens=True)["input_ids"]]
    return ids if room is None else cut(ids, room)


def cut(ids: list[int], room: int) -> list[int]:
    """The last ``room`` tokens: a long prompt loses its oldest tokens, keeping the question."""
    if room < 1:
        raise ValueError("max_seq_len leaves no room for a prompt after the longest label")
    return ids[-room:]


def pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return int(pad or 0)  # masked out either way


def label_probabilities(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    labels: Sequence[str],
    *,
    batch_size: int = 16,
    max_seq_len: int = 512,
    progress: Progress | None = None,
) -> list[list[float]]:
    """For each prompt, the probability of each label (in ``labels`` order), summing to 1.

    As the server's ``Score``: the sum of the label tokens' log-probabilities after the
    prompt, softmaxed across the labels. ``progress`` gets a ``"score"`` event per batch
    (``done`` prompts of ``total``).

    Raises:
        ValueError: no labels, or a label that encodes to no tokens.
    """
    import torch

    if not labels:
        raise ValueError("labels is empty; give at least one label, e.g. [' yes', ' no']")
    table = label_table(tokenizer, list(labels))
    pad = pad_id(tokenizer)
    room = max_seq_len - table.longest
    out: list[list[float]] = []
    was_training = model.training
    cast(Any, model).eval()  # transformers' decorated `eval` is untyped
    try:
        with torch.inference_mode():
            for begin in range(0, len(prompts), batch_size):
                chunk = [
                    prompt_ids(tokenizer, p, room) for p in prompts[begin : begin + batch_size]
                ]
                logp = label_logprobs(model, chunk, table, pad)  # (b, labels)
                out.extend(torch.softmax(logp, dim=-1).tolist())
                if progress is not None:
                    progress(ProgressEvent(stage="score", done=len(out), total=len(prompts)))
    finally:
        model.train(was_training)
    return out


def label_logprobs(
    model: PreTrainedModel, prompts: Sequence[list[int]], labels: LabelTable, pad: int
) -> torch.Tensor:
    """Vocabulary log-probability of every label after every prompt, (B, labels)."""
    import torch

    if labels.single:
        logits = last_logits(model, prompts, pad, keep=1)[:, -1].float()  # (B, V)
        columns = torch.tensor([ids[0] for ids in labels.ids], device=logits.device)
        return torch.log_softmax(logits, dim=-1)[:, columns]
    seqs = [p + list(ids) for p in prompts for ids in labels.ids]
    spans = [len(ids) for _ in prompts for ids in labels.ids]
    return continuation_logprobs(model, seqs, spans, pad).view(len(prompts), -1)


def continuation_logprobs(
    model: PreTrainedModel, seqs: Sequence[list[int]], spans: Sequence[int], pad: int
) -> torch.Tensor:
    """Summed log-probability of the last ``spans[i]`` tokens of each sequence, (B,)."""
    import torch

    keep = max(spans) + 1
    logits = last_logits(model, seqs, pad, keep=keep)  # (B, keep, V)
    # Position j of the kept window predicts token j + 1 of the window; the last predicts
    # past the end and is dropped.
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, keep - 1, V)
    targets = torch.tensor([s[-(keep - 1) :] for s in left_pad(seqs, pad, keep - 1)])
    targets = targets.to(logp.device)
    token_logp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, keep - 1)
    span = torch.tensor(spans, device=logp.device).unsqueeze(1)  # (B, 1)
    in_label = torch.arange(keep - 1, device=logp.device) >= (keep - 1 - span)
    return (token_logp * in_label).sum(dim=1)


def last_logits(
    model: PreTrainedModel, seqs: Sequence[list[int]], pad: int, *, keep: int
) -> torch.Tensor:
    """Logits of the last ``keep`` positions of left-padded sequences, (B, keep, vocab)."""
    import torch

    device = next(model.parameters()).device
    width = max(len(s) for s in seqs)
    ids = torch.tensor(left_pad(seqs, pad, width), device=device)  # (B, T)
    mask = torch.tensor(
        [[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=device
    )  # (B, T)
    # Positions count from each row's first real token, as for an unpadded prompt.
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep)
    logits: torch.Tensor = out.logits
    return logits


def left_pad(seqs: Sequence[list[int]], pad: int, width: int) -> list[list[int]]:
    return [[pad] * (width - len(s)) + s[-width:] for s in seqs]

"""The plain eager backend: any Hugging Face causal LM, one KV cache object per slot.

It always works (every architecture transformers supports) and is the reference the fast
backends are tested against. Decode runs each slot's step separately, so its throughput
does not grow with the batch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from slimserve.engine.backends.base import prompt_logprobs_from
from slimserve.engine.spec import kv_bytes_per_token
from slimserve.engine.types import TokenLogprob

if TYPE_CHECKING:
    from transformers import PreTrainedModel


class HFBackend:
    """Backend over a `transformers` model with a `DynamicCache` per slot."""

    name = "hf-eager"

    def __init__(self, model: PreTrainedModel, *, max_slots: int, max_seq_len: int) -> None:
        self.model = model
        self.max_slots = max_slots
        self.max_seq_len = max_seq_len
        self.vocab_size = int(model.config.get_text_config().vocab_size)
        self.device = next(model.parameters()).device
        self._dtype = next(model.parameters()).dtype
        self._caches: dict[int, Any] = {}

    @torch.inference_mode()
    def prefill(self, slot: int, token_ids: list[int]) -> torch.Tensor:
        ids = torch.tensor([token_ids], device=self.device)
        out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1)
        self._caches[slot] = out.cache
        logits: torch.Tensor = out.logits[0, -1]
        return logits.float()

    @torch.inference_mode()
    def decode(self, slots: list[int], token_ids: list[int]) -> torch.Tensor:
        rows = []
        for slot, tok in zip(slots, token_ids, strict=True):
            ids = torch.tensor([[tok]], device=self.device)
            out = self.model(input_ids=ids, cache=self._caches[slot], use_cache=True)
            self._caches[slot] = out.cache
            rows.append(out.logits[0, -1])
        return torch.stack(rows).float()

    def release(self, slot: int) -> None:
        self._caches.pop(slot, None)

    @torch.inference_mode()
    def score(self, prompt_ids: list[int], continuations: list[list[int]]) -> list[float]:
        return score_with(self.model, prompt_ids, continuations, self.device)

    def score_batch(self, jobs: list[tuple[list[int], list[list[int]]]]) -> list[list[float]]:
        # Prompts differ in length; one padded batch per job keeps the eager path simple.
        return [self.score(p, c) for p, c in jobs]

    @torch.inference_mode()
    def prompt_logprobs(self, prompt_ids: list[int], top_n: int) -> list[TokenLogprob]:
        ids = torch.tensor([prompt_ids], device=self.device)
        hidden = self.model.base_model(input_ids=ids).last_hidden_state[0]  # (T, hidden)
        head: Any = self.model.get_output_embeddings()  # type: ignore[no-untyped-call]
        return prompt_logprobs_from(lambda a, b: head(hidden[a:b]), prompt_ids[1:], top_n)

    def kv_bytes_per_slot(self) -> int:
        return kv_bytes_per_token(self.model.config, self._dtype) * self.max_seq_len


def score_with(
    model: Any, prompt_ids: list[int], continuations: list[list[int]], device: torch.device
) -> list[float]:
    """Sum of log-probs of each continuation after the prompt, one right-padded batch.

    Only the positions that predict a continuation token get logits (`logits_to_keep`):
    (labels, longest label, vocab) floats, not (labels, prompt + label, vocab).
    """
    seqs = [prompt_ids + c[:-1] for c in continuations]  # a last token is never an input
    width = max(map(len, seqs))
    ids = torch.zeros((len(seqs), width), dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    start = len(prompt_ids)
    longest = max(map(len, continuations))
    # Token t is predicted by position t-1: keep positions start-1 .. start-1+longest-1.
    keep = torch.arange(start - 1, start - 1 + longest, device=device)
    logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits
    logp = torch.log_softmax(logits.float(), dim=-1)  # (B, longest, vocab)
    out = []
    for i, c in enumerate(continuations):
        targets = torch.tensor(c, device=device)
        out.append(float(logp[i, torch.arange(len(c), device=device), targets].sum()))
    return out

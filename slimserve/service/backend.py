"""The contract between the scheduler and whatever runs the model's forward passes.

The engine's scheduler owns requests, sampling and detokenization; a backend owns weights
and KV-cache memory. Memory is organised in *slots*: one slot holds one sequence's cache.
A backend never sees a request, a tokenizer or protobuf.
"""

from __future__ import annotations

from typing import Protocol

import torch


class Backend(Protocol):
    """Forward passes over slot-addressed KV caches.

    Every method is called from the engine's single worker thread, never concurrently.
    """

    #: Name recorded in `GetModelInfo` (e.g. "hf-eager", "llama-static-cache").
    name: str
    #: How many sequences can hold a cache at once.
    max_slots: int
    #: Longest sequence (prompt + generated) one slot can hold, in tokens.
    max_seq_len: int
    vocab_size: int
    device: torch.device

    def prefill(self, slot: int, token_ids: list[int]) -> torch.Tensor:
        """Start `slot` afresh with `token_ids` (its previous content is dropped).

        Returns the float32 logits of the last position, shape (vocab,).
        """
        ...

    def decode(self, slots: list[int], token_ids: list[int]) -> torch.Tensor:
        """Append one token to each of `slots` (same order) and run one step.

        Returns float32 logits, shape (len(slots), vocab).
        """
        ...

    def release(self, slot: int) -> None:
        """Forget `slot`'s cache; the slot may be prefilled again later."""
        ...

    def score(self, prompt_ids: list[int], continuations: list[list[int]]) -> list[float]:
        """Sum of log-probabilities of each continuation's tokens after `prompt_ids`.

        One batched forward pass over all continuations; touches no slot.
        """
        ...

    def score_batch(self, jobs: list[tuple[list[int], list[list[int]]]]) -> list[list[float]]:
        """`score` for several (prompt, continuations) jobs, in as few passes as it can."""
        ...

    def kv_bytes_per_slot(self) -> int:
        """Bytes of KV cache one slot can occupy at `max_seq_len`."""
        ...

"""The reference a device's output is held to: the artifact in float32 on the CPU, run
through transformers' own forward (no slimserve code), and the measures of agreement.

Greedy output on a GPU is compared with the reference in two ways:

- token for token (`first_divergence`): the device's greedy tokens and the reference's
  own. Where they part, the reference must rank the two tokens within `TIE_NATS_FP32` of
  each other there (a tie that float rounding may break either way); float32 on a GPU
  must meet this on every prompt.
- teacher-forced (`margins`): at each of the device's tokens, in the device's own
  context, how many nats the reference's log-probability of that token is below the
  reference's best (0: the device picked the reference's argmax). bfloat16 rounds every
  activation to 8 bits of mantissa, so its picks may differ where the reference's top two
  are close, and once they differ it continues a text the reference would not have
  written. So single positions are not bounded (SmolLM2 in bfloat16 on the CPU, 4 prompts
  x 32 tokens: 124 of 128 picks were the reference's argmax, the worst 2.4 nats below it);
  the share of picks within `TIE_NATS` of the reference's best must reach
  `BF16_MIN_AGREEMENT`, and the mean gap stay under `BF16_MEAN_MARGIN_NATS` (as
  qualification judges a plan: `slimserve.engine.qualify`).

Score: a label's summed log-probability within `abs + rel * |reference|` nats (bfloat16 on
the CPU, 16 labels: at most 0.11 nats off, on labels of -0.3 to -20 nats).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

#: float32 on a device against float32 on the CPU: tokens may differ only at a tie this close.
TIE_NATS_FP32 = 1e-3
#: A pick this close to the reference's best counts as the same pick (qualify.TIE_NATS).
TIE_NATS = 0.05
#: bfloat16: at least this share of greedy picks the reference's (within TIE_NATS) ...
BF16_MIN_AGREEMENT = 0.9
#: ... and the mean gap to the reference's best at most this.
BF16_MEAN_MARGIN_NATS = 0.25
#: Score: (abs, rel) tolerance of a label's log-probability.
SCORE_TOL_FP32 = (2e-3, 1e-4)
SCORE_TOL_BF16 = (0.1, 0.02)


@dataclass
class Reference:
    """A version loaded in float32 on the CPU, with its tokenizer."""

    model: Any
    tokenizer: Any

    @classmethod
    def load(cls, registry: Path, ref: str) -> Reference:
        from slimserve.registry.artifact import load_model
        from slimserve.registry.store import Registry, parse_model_ref

        model, tokenizer = load_model(
            Registry(registry).get(*parse_model_ref(ref)), device="cpu", dtype=torch.float32
        )
        return cls(model, tokenizer)

    @torch.inference_mode()
    def logprobs(self, ids: Sequence[int], start: int) -> torch.Tensor:
        """float64 log-probabilities predicting ids[start:], each from ids before it,
        (len(ids) - start, vocab): one forward, no cache."""
        logits = self.model(torch.tensor([list(ids[:-1])])).logits[0, start - 1 :]
        return torch.log_softmax(logits.double(), dim=-1)

    @torch.inference_mode()
    def greedy(self, prompt_ids: Sequence[int], n: int) -> list[int]:
        """n greedy tokens, end-of-sequence included like any other (as `ignore_eos`)."""
        ids = list(prompt_ids)
        for _ in range(n):
            ids.append(int(self.model(torch.tensor([ids])).logits[0, -1].argmax()))
        return ids[len(prompt_ids) :]

    def score(self, prompt_ids: Sequence[int], label: str) -> float:
        """The sum of log-probabilities of `label`'s tokens after the prompt, tokenized as
        the server tokenizes Score labels."""
        label_ids = self.tokenizer(label, add_special_tokens=False)["input_ids"]
        lp = self.logprobs([*prompt_ids, *label_ids], len(prompt_ids))
        return float(lp[torch.arange(len(label_ids)), torch.tensor(label_ids)].sum())


def margins(reference: Reference, prompt_ids: Sequence[int], tokens: Sequence[int]) -> list[float]:
    """Per generated token: the reference's best log-probability minus that token's, in
    the context the device generated it in (teacher-forced), nats (0: its argmax)."""
    lp = reference.logprobs([*prompt_ids, *tokens], len(prompt_ids))
    picked = lp[torch.arange(len(tokens)), torch.tensor(list(tokens))]
    return [float(x) for x in lp.max(dim=-1).values - picked]


def first_divergence(
    reference: Reference, prompt_ids: Sequence[int], device: Sequence[int], ref: Sequence[int]
) -> tuple[int | None, float]:
    """Where the device's greedy tokens first differ from the reference's (None: nowhere),
    and the reference's gap there between its pick and the device's, nats."""
    at = next((i for i, (a, b) in enumerate(zip(device, ref, strict=True)) if a != b), None)
    if at is None:
        return None, 0.0
    lp = reference.logprobs([*prompt_ids, *ref[: at + 1]], len(prompt_ids) + at)[0]
    return at, float(lp[ref[at]] - lp[device[at]])


def within(got: float, want: float, tol: tuple[float, float]) -> bool:
    return abs(got - want) <= tol[0] + tol[1] * abs(want)

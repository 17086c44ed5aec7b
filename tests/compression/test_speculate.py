"""The speculate stage on tiny models: a draft's acceptance and speed-up, same outputs."""

from __future__ import annotations

from typing import Any

import pytest

from slimserve.compression.speculate import SpeculateConfig, measure_speculation
from tests.helpers import tiny_model

PROMPTS = ["hello world, hello again; hello", "the quick brown fox jumps", "def main(): return"]


def _prompts(tokenizer: Any) -> list[tuple[int, ...]]:
    return [tuple(tokenizer(p)["input_ids"]) for p in PROMPTS]


def test_a_draft_that_is_its_target_is_always_accepted(tokenizer: Any) -> None:
    target = tiny_model(len(tokenizer), seed=1, tie_word_embeddings=False)
    config = SpeculateConfig(prompts=3, new_tokens=16, draft_tokens=3)
    got = measure_speculation(target, target, tokenizer, _prompts(tokenizer), config)
    assert got["draft_identical_outputs"] == 1.0
    assert got["draft_acceptance_rate"] == pytest.approx(1.0)
    assert got["draft_prompts"] == 3 and got["draft_tokens"] == 3
    assert got["draft_speedup"] > 0 and got["draft_target_tokens_per_s"] > 0


def test_another_models_drafts_are_partly_rejected_and_outputs_stay_the_same(
    tokenizer: Any,
) -> None:
    target = tiny_model(len(tokenizer), seed=1, tie_word_embeddings=False)
    draft = tiny_model(len(tokenizer), seed=5, num_hidden_layers=1, tie_word_embeddings=False)
    config = SpeculateConfig(prompts=3, new_tokens=16)
    got = measure_speculation(draft, target, tokenizer, _prompts(tokenizer), config)
    assert got["draft_identical_outputs"] == 1.0
    assert 0.0 <= got["draft_acceptance_rate"] < 1.0


def test_config_refuses_bad_values() -> None:
    with pytest.raises(ValueError, match="target_weights"):
        SpeculateConfig(target_weights="q2")
    with pytest.raises(ValueError, match="new_tokens"):
        SpeculateConfig(new_tokens=1)

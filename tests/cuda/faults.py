"""A backend that runs out of device memory on purpose, loaded by import path as a backend
plugin (`ModelConfig.backend_plugins`), so the engine process meets a real out-of-memory
error from the device's allocator (not an exception made up in Python) in a real request.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

#: More than any device holds: the allocator refuses it at once (a plain device allocation,
#: no managed memory, so nothing is paged or oversubscribed).
TOO_MUCH = 1 << 50


def trigger_file(registry_root: Path) -> Path:
    """While this file exists, `oom_on_trigger` backends run out of memory in prefill, in a
    step that feeds a prompt chunk (two tokens or more), and in Score: the calls that hold
    activations for a whole prompt. Decode steps go on."""
    return registry_root / "oom-trigger"


class _OomOnTrigger:
    def __init__(self, inner: Any, trigger: Path) -> None:
        self.inner = inner
        self.trigger = trigger
        self.name = "fault-oom-on-trigger"

    def __getattr__(self, attr: str) -> Any:
        return getattr(self.inner, attr)

    def _workspace(self) -> None:
        if self.trigger.exists():
            torch.empty(TOO_MUCH, dtype=torch.uint8, device=self.inner.device)

    def forward(self, feeds: list[Any]) -> torch.Tensor:
        # The engine feeds decode tokens and prompt chunks in one step; a step that fails is
        # fed again one sequence at a time, so only the prompt's request meets the error.
        if any(len(f.tokens) > 1 for f in feeds):
            self._workspace()
        return self.inner.forward(feeds)  # type: ignore[no-any-return]

    def prefill(self, slot: int, token_ids: list[int]) -> torch.Tensor:
        self._workspace()
        return self.inner.prefill(slot, token_ids)  # type: ignore[no-any-return]

    def score(self, prompt_ids: list[int], continuations: list[list[int]]) -> list[float]:
        self._workspace()
        return self.inner.score(prompt_ids, continuations)  # type: ignore[no-any-return]

    def score_batch(self, jobs: list[tuple[list[int], list[list[int]]]]) -> list[list[float]]:
        self._workspace()
        return self.inner.score_batch(jobs)  # type: ignore[no-any-return]


def oom_on_trigger(model: Any, config: Any, max_seq_len: int, tokenizer_json: Path | None) -> Any:
    from slimserve.engine.backends.select import Plan, build_backend

    assert tokenizer_json is not None  # <root>/<name>/<version>/tokenizer.json
    inner = build_backend(model, config, max_seq_len, tokenizer_json, Plan(backend="llama"))
    return _OomOnTrigger(inner, trigger_file(tokenizer_json.parents[2]))

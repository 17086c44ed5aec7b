"""Backends that fail on purpose, loaded by import path as backend plugins
(`ModelConfig.backend_plugins`), so the engine process, its supervisor and qualification
meet real crashes: a real SIGSEGV or SIGABRT in a real child process."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import torch


def _llama(model: Any, config: Any, max_seq_len: int, tokenizer_json: Path | None) -> Any:
    from slimserve.engine.backends.select import Plan, build_backend

    return build_backend(model, config, max_seq_len, tokenizer_json, Plan(backend="llama"))


def trigger_file(registry_root: Path) -> Path:
    """While this file exists, `crash_on_trigger` backends crash on their next prefill."""
    return registry_root / "crash-trigger"


class _Wrapped:
    def __init__(self, inner: Any, name: str) -> None:
        self.inner = inner
        self.name = name

    def __getattr__(self, attr: str) -> Any:
        return getattr(self.inner, attr)


class _SegfaultOnBatch(_Wrapped):
    def decode(self, slots: list[int], token_ids: list[int]) -> torch.Tensor:
        if len(slots) >= 2:  # single-slot steps work, as the AMX crash did
            os.kill(os.getpid(), signal.SIGSEGV)
        return self.inner.decode(slots, token_ids)  # type: ignore[no-any-return]


class _WrongLogits(_Wrapped):
    """Plausible-looking logits for the wrong tokens (shifted by one along the vocabulary)."""

    def prefill(self, slot: int, token_ids: list[int]) -> torch.Tensor:
        return torch.roll(self.inner.prefill(slot, token_ids), 1, dims=-1)

    def decode(self, slots: list[int], token_ids: list[int]) -> torch.Tensor:
        return torch.roll(self.inner.decode(slots, token_ids), 1, dims=-1)

    def score(self, prompt_ids: list[int], continuations: list[list[int]]) -> list[float]:
        return [s - 3.0 for s in self.inner.score(prompt_ids, continuations)]


class _CrashOnTrigger(_Wrapped):
    def __init__(self, inner: Any, name: str, trigger: Path) -> None:
        super().__init__(inner, name)
        self.trigger = trigger

    def prefill(self, slot: int, token_ids: list[int]) -> torch.Tensor:
        if self.trigger.exists():
            os.kill(os.getpid(), signal.SIGSEGV)
        return self.inner.prefill(slot, token_ids)  # type: ignore[no-any-return]

    def forward(self, feeds: list[Any]) -> torch.Tensor:
        """The chunked-prefill path: a step that feeds a prompt chunk crashes too."""
        if self.trigger.exists() and any(len(f.tokens) > 1 for f in feeds):
            os.kill(os.getpid(), signal.SIGSEGV)
        return self.inner.forward(feeds)  # type: ignore[no-any-return]


def abort_at_load(model: Any, config: Any, max_seq_len: int, tokenizer_json: Path | None) -> Any:
    os.abort()


def segfault_on_batch(
    model: Any, config: Any, max_seq_len: int, tokenizer_json: Path | None
) -> Any:
    return _SegfaultOnBatch(_llama(model, config, max_seq_len, tokenizer_json), "fault-segv-batch")


def wrong_logits(model: Any, config: Any, max_seq_len: int, tokenizer_json: Path | None) -> Any:
    return _WrongLogits(_llama(model, config, max_seq_len, tokenizer_json), "fault-wrong-logits")


def crash_on_trigger(model: Any, config: Any, max_seq_len: int, tokenizer_json: Path | None) -> Any:
    assert tokenizer_json is not None  # <root>/<name>/<version>/tokenizer.json
    inner = _llama(model, config, max_seq_len, tokenizer_json)
    return _CrashOnTrigger(inner, "fault-crash-on-trigger", trigger_file(tokenizer_json.parents[2]))


class _NanScores(_Wrapped):
    """Generates as the reference does; batched Score sums after a prompt of more than eight
    tokens are NaN (a broken kernel's output; the short warm-up Score still works)."""

    def score_batch(self, jobs: list[tuple[list[int], list[list[int]]]]) -> list[list[float]]:
        if all(len(prompt) <= 8 for prompt, _ in jobs):
            return self.inner.score_batch(jobs)  # type: ignore[no-any-return]
        return [[float("nan")] * len(conts) for _, conts in jobs]


def nan_scores(model: Any, config: Any, max_seq_len: int, tokenizer_json: Path | None) -> Any:
    return _NanScores(_llama(model, config, max_seq_len, tokenizer_json), "fault-nan-scores")


def hang_at_load(model: Any, config: Any, max_seq_len: int, tokenizer_json: Path | None) -> Any:
    """Loads as slowly as a machine too busy to qualify in time."""
    import time

    time.sleep(3600)
    return _llama(model, config, max_seq_len, tokenizer_json)


def score_log(registry_root: Path) -> Path:
    """Each slow Score chunk a `slow_scores` backend runs appends a line here."""
    return registry_root / "score-chunks"


class _SlowScores(_Wrapped):
    """Score chunks after a prompt of more than eight tokens take `delay_s` each and are
    logged (`score_log`), so a test can see how much of a job the engine still ran after
    its caller left. The short warm-up Score runs at full speed."""

    def __init__(self, inner: Any, name: str, log: Path, delay_s: float) -> None:
        super().__init__(inner, name)
        self.log = log
        self.delay_s = delay_s

    def score_batch(self, jobs: list[tuple[list[int], list[list[int]]]]) -> list[list[float]]:
        import time

        if any(len(prompt) > 8 for prompt, _ in jobs):
            with self.log.open("a") as f:
                f.write(f"{sum(len(conts) for _, conts in jobs)}\n")
            time.sleep(self.delay_s)
        return self.inner.score_batch(jobs)  # type: ignore[no-any-return]


def slow_scores(model: Any, config: Any, max_seq_len: int, tokenizer_json: Path | None) -> Any:
    assert tokenizer_json is not None  # <root>/<name>/<version>/tokenizer.json
    inner = _llama(model, config, max_seq_len, tokenizer_json)
    log = score_log(tokenizer_json.parents[2])
    return _SlowScores(inner, "fault-slow-scores", log, delay_s=0.25)


class _SlowDecode(_Wrapped):
    """Every decode step takes `delay_s` more: a stream long enough to watch its gaps."""

    def __init__(self, inner: Any, name: str, delay_s: float) -> None:
        super().__init__(inner, name)
        self.delay_s = delay_s

    def decode(self, slots: list[int], token_ids: list[int]) -> Any:
        import time

        time.sleep(self.delay_s)
        return self.inner.decode(slots, token_ids)

    def decode_view(self, slots: list[int], token_ids: list[int]) -> Any:
        import time

        time.sleep(self.delay_s)
        return getattr(self.inner, "decode_view", self.inner.decode)(slots, token_ids)


def slow_decode(model: Any, config: Any, max_seq_len: int, tokenizer_json: Path | None) -> Any:
    inner = _llama(model, config, max_seq_len, tokenizer_json)
    return _SlowDecode(inner, "fault-slow-decode", delay_s=0.02)


def hang_trigger(registry_root: Path) -> Path:
    """A `hang_on_trigger` backend's next decode step removes this file and never ends."""
    return registry_root / "hang-trigger"


class _HangOnTrigger(_Wrapped):
    """Decodes as the reference does until the trigger file appears; then one step hangs
    for good (a deadlock in a kernel). The step takes the trigger, so a restart serves."""

    def __init__(self, inner: Any, name: str, trigger: Path) -> None:
        super().__init__(inner, name)
        self.trigger = trigger

    def _maybe_hang(self) -> None:
        import time

        try:
            self.trigger.unlink()
        except FileNotFoundError:
            return
        while True:
            time.sleep(3600)

    def decode(self, slots: list[int], token_ids: list[int]) -> Any:
        self._maybe_hang()
        return self.inner.decode(slots, token_ids)

    def decode_view(self, slots: list[int], token_ids: list[int]) -> Any:
        self._maybe_hang()
        return getattr(self.inner, "decode_view", self.inner.decode)(slots, token_ids)

    def forward(self, feeds: list[Any]) -> Any:
        if any(len(f.tokens) == 1 for f in feeds):  # a decode step (chunked-prefill path)
            self._maybe_hang()
        return self.inner.forward(feeds)


def hang_on_trigger(model: Any, config: Any, max_seq_len: int, tokenizer_json: Path | None) -> Any:
    assert tokenizer_json is not None  # <root>/<name>/<version>/tokenizer.json
    inner = _llama(model, config, max_seq_len, tokenizer_json)
    return _HangOnTrigger(inner, "fault-hang-on-trigger", hang_trigger(tokenizer_json.parents[2]))

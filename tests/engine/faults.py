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

    def forward(self, feeds: list[Any]) -> Any:
        """The chunked-prefill step, which carries the decode tokens when the backend has it."""
        import time

        time.sleep(self.delay_s)
        return self.inner.forward(feeds)


def slow_decode(model: Any, config: Any, max_seq_len: int, tokenizer_json: Path | None) -> Any:
    inner = _llama(model, config, max_seq_len, tokenizer_json)
    return _SlowDecode(inner, "fault-slow-decode", delay_s=0.02)


# ---- a backend a test steers: pause, hold a load, run out of memory, log its calls ------
#
# A `controlled` backend serves as the reference does and reads what to do from files
# under <registry>/.faults, which the test writes through `Controls`: so a test drives
# the engine process as deployed (its own process, the supervisor, the wire) to a known
# point, instead of hoping a 45 ms stream is still running when it acts.

#: How long a paused or held backend waits for the test before going on by itself (a
#: failed test must not leave an engine stuck forever).
GIVE_UP_S = 120.0


def controls_dir(registry_root: Path) -> Path:
    return registry_root / ".faults"


class Controls:
    """The test's side of a `controlled` backend served from `registry_root`.

    - `pause_at_token(n)`: the next sequence about to make its n-th token (1: its prefill)
      stops there, the engine with it, until `release()`; `wait_paused()` returns once it
      has stopped (every earlier token is then on the wire). One pause per arming;
      `killed()` forgets it when the test kills the paused process.
    - `pause_at_score()`: the same, before the next Score chunk.
    - `hold_loads()` / `let_loads()`: engine processes that load meanwhile (a restart)
      wait, so the test sees the model RESTARTING for as long as it needs.
    - `oom_once(stage)`: the next "prefill", "decode" or "score" call raises
      `torch.OutOfMemoryError`; `oom_fired(stage)` says whether it has.
    - `log_calls()`, `calls()`: every backend call from then on, one line each
      ("prefill SLOT TOKENS", "decode SLOT,SLOT", "score TOKENS").
    """

    def __init__(self, registry_root: Path) -> None:
        self.dir = controls_dir(registry_root)
        self.dir.mkdir(exist_ok=True)

    def _write(self, name: str, text: str) -> None:
        tmp = self.dir / f".{name}.tmp"
        tmp.write_text(text)
        tmp.rename(self.dir / name)  # atomic: the backend never reads half a file

    def pause_at_token(self, n: int) -> None:
        assert n >= 1
        self._write("pause", f"token {n}")

    def pause_at_score(self) -> None:
        self._write("pause", "score")

    def wait_paused(self, timeout: float = 60.0) -> None:
        _wait_for((self.dir / "paused").exists, timeout, "the backend never paused")

    def release(self, timeout: float = 60.0) -> None:
        """Let a paused backend go on (a no-op when none is paused); returns once it has."""
        (self.dir / "pause").unlink(missing_ok=True)
        if not (self.dir / "paused").exists():
            return
        self._write("release", "")
        _wait_for(lambda: not (self.dir / "paused").exists(), timeout, "never resumed")

    def killed(self) -> None:
        """The paused engine process was killed: forget its pause (none will resume)."""
        (self.dir / "paused").unlink(missing_ok=True)
        (self.dir / "release").unlink(missing_ok=True)

    def hold_loads(self) -> None:
        self._write("hold-load", "")

    def let_loads(self) -> None:
        (self.dir / "hold-load").unlink(missing_ok=True)

    def oom_once(self, stage: str) -> None:
        assert stage in ("prefill", "decode", "score")
        self._write(f"oom-{stage}", "")

    def oom_fired(self, stage: str) -> bool:
        return not (self.dir / f"oom-{stage}").exists()

    def log_calls(self) -> None:
        self._write("calls", "")

    def calls(self) -> list[str]:
        return (self.dir / "calls").read_text().splitlines()

    def reset(self) -> None:
        """Release any pause and clear every switch (between tests sharing a server)."""
        self.release()
        self.let_loads()
        for path in self.dir.iterdir():
            if path.name != "paused":
                path.unlink(missing_ok=True)


def _wait_for(cond: Any, timeout: float, what: str) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(what)
        time.sleep(0.005)


class _Controlled(_Wrapped):
    """The reference backend, steered by the files `Controls` writes (in the engine process)."""

    def __init__(self, inner: Any, name: str, control: Path) -> None:
        super().__init__(inner, name)
        self.control = control
        #: Tokens each slot's sequence has made (its prefill makes the first).
        self.made: dict[int, int] = {}

    # -- the switches --
    def _pause_if(self, point: str, next_token: int = 0) -> None:
        import time

        armed = self.control / "pause"
        try:
            what = armed.read_text().split()
        except FileNotFoundError:
            return
        if what[0] == "token" and (point != "token" or next_token < int(what[1])):
            return
        if what[0] == "score" and point != "score":
            return
        armed.rename(self.control / "paused")  # one pause per arming; the test waits on it
        release = self.control / "release"
        deadline = time.monotonic() + GIVE_UP_S
        while not release.exists() and time.monotonic() < deadline:
            time.sleep(0.002)
        release.unlink(missing_ok=True)
        (self.control / "paused").unlink(missing_ok=True)

    def _oom_if(self, stage: str) -> None:
        try:
            (self.control / f"oom-{stage}").unlink()
        except FileNotFoundError:
            return
        raise torch.OutOfMemoryError(f"injected: out of memory in {stage}")

    def _log(self, line: str) -> None:
        log = self.control / "calls"
        if log.exists():
            with log.open("a") as f:
                f.write(line + "\n")

    # -- the backend --
    def prefill(self, slot: int, token_ids: list[int]) -> torch.Tensor:
        self._before_prefill([slot], [token_ids])
        return self.inner.prefill(slot, token_ids)  # type: ignore[no-any-return]

    def prefill_batch(self, slots: list[int], prompts: list[list[int]]) -> list[torch.Tensor]:
        self._before_prefill(slots, prompts)
        return self.inner.prefill_batch(slots, prompts)  # type: ignore[no-any-return]

    def _before_prefill(self, slots: list[int], prompts: list[list[int]]) -> None:
        for slot, ids in zip(slots, prompts, strict=True):
            self._log(f"prefill {slot} {len(ids)}")
            self.made[slot] = 1
        self._pause_if("token", 1)
        self._oom_if("prefill")

    def decode(self, slots: list[int], token_ids: list[int]) -> torch.Tensor:
        self._before_decode(slots)
        return self.inner.decode(slots, token_ids)  # type: ignore[no-any-return]

    def decode_view(self, slots: list[int], token_ids: list[int]) -> torch.Tensor:
        self._before_decode(slots)
        view = getattr(self.inner, "decode_view", self.inner.decode)
        return view(slots, token_ids)  # type: ignore[no-any-return]

    def _before_decode(self, slots: list[int]) -> None:
        self._log("decode " + ",".join(map(str, slots)))
        self._pause_if("token", max(self.made.get(s, 0) for s in slots) + 1)
        self._oom_if("decode")
        for s in slots:
            self.made[s] = self.made.get(s, 0) + 1

    def forward(self, feeds: list[Any]) -> torch.Tensor:
        """The chunked-prefill step (`Backend.forward`): decode tokens of the sequences
        that have begun and chunks of prompts being fed, in one call."""
        decode = [f.slot for f in feeds if self.made.get(f.slot, 0) >= 1]
        chunks = [f for f in feeds if self.made.get(f.slot, 0) == 0]
        for f in chunks:
            self._log(f"prefill {f.slot} {len(f.tokens)}")
        if decode:
            self._log("decode " + ",".join(map(str, decode)))
        making = [f.slot for f in feeds if f.logits]
        if making:
            self._pause_if("token", max(self.made.get(s, 0) for s in making) + 1)
        if chunks:
            self._oom_if("prefill")
        if decode:
            self._oom_if("decode")
        out = self.inner.forward(feeds)
        for s in making:
            self.made[s] = self.made.get(s, 0) + 1
        return out  # type: ignore[no-any-return]

    def release(self, slot: int) -> None:
        self.made.pop(slot, None)
        self.inner.release(slot)

    # A new sequence may start from the KV a finished one left in its slot (prefix reuse):
    # it has made no token yet.
    def truncate(self, slot: int, length: int) -> None:
        self.made[slot] = 0
        self.inner.truncate(slot, length)

    def copy_prefix(self, src: int, dst: int, length: int) -> None:
        self.made[dst] = 0
        self.inner.copy_prefix(src, dst, length)

    def score(self, prompt_ids: list[int], continuations: list[list[int]]) -> list[float]:
        self._before_score([(prompt_ids, continuations)])
        return self.inner.score(prompt_ids, continuations)  # type: ignore[no-any-return]

    def score_batch(self, jobs: list[tuple[list[int], list[list[int]]]]) -> list[list[float]]:
        self._before_score(jobs)
        return self.inner.score_batch(jobs)  # type: ignore[no-any-return]

    def _before_score(self, jobs: list[tuple[list[int], list[list[int]]]]) -> None:
        cost = sum(len(prompt) + len(c) - 1 for prompt, conts in jobs for c in conts)
        self._log(f"score {cost}")
        self._pause_if("score")
        self._oom_if("score")


def controlled(model: Any, config: Any, max_seq_len: int, tokenizer_json: Path | None) -> Any:
    """The reference backend steered by `Controls` (see above)."""
    import time

    assert tokenizer_json is not None  # <root>/<name>/<version>/tokenizer.json
    control = controls_dir(tokenizer_json.parents[2])
    control.mkdir(exist_ok=True)
    deadline = time.monotonic() + GIVE_UP_S
    while (control / "hold-load").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    inner = _llama(model, config, max_seq_len, tokenizer_json)
    return _Controlled(inner, "fault-controlled", control)


#: The import path a config names the controlled backend by.
CONTROLLED = "tests.engine.faults:controlled"


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

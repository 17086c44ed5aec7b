"""A prompt's log-probabilities (`echo` with `logprobs`) run a step's budget at a time
beside the running streams, on llama.cpp's real cache, and give what they give whole."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from slimserve.engine.backends import llamacpp
from slimserve.engine.config import EngineConfig
from slimserve.engine.errors import DeadlineExpired
from slimserve.engine.scheduler import Engine
from slimserve.engine.types import GenerationRequest, Prompt, SamplingParams, StopParams
from tests.helpers import tiny_model

pytestmark = pytest.mark.skipif(not llamacpp.available(), reason="llama-cpp-python not installed")

SEQ_LEN = 256
PART = 8  # prompt positions a step may put through (`score_step_tokens`)


def ids(seed: int, n: int, vocab: int = 300) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, vocab) for _ in range(n)]


@pytest.fixture
def backend(tokenizer: Any, tmp_path: Path) -> Any:
    model = tiny_model(len(tokenizer), seed=3)
    tokenizer.save_pretrained(tmp_path)
    b = llamacpp.LlamaCppBackend(
        model.config, model.state_dict(), tmp_path / "tokenizer.json",
        max_slots=2, max_seq_len=SEQ_LEN, threads=1, weight_type="f32",
    )  # fmt: skip
    yield b
    b.close()


class _Stream:
    """A sink that counts a running stream's tokens as they come."""

    def __init__(self) -> None:
        self.tokens = 0
        self.ended = threading.Event()

    def __call__(self, event: Any) -> None:
        self.tokens += len(event.token_ids)
        if event.finish is not None or event.error is not None:
            self.ended.set()


def _stream(engine: Engine) -> _Stream:
    sink = _Stream()
    engine.submit(
        GenerationRequest(
            request_id="stream",
            prompt=Prompt(ids=tuple(ids(1, 5))),
            sampling=SamplingParams(),
            stopping=StopParams(max_new_tokens=SEQ_LEN - 8, ignore_eos=True),
        ),
        sink,
    )
    deadline = time.monotonic() + 30
    while sink.tokens < 2:  # decoding before the echo arrives
        assert time.monotonic() < deadline
        time.sleep(0.005)
    return sink


def test_an_echo_runs_in_parts_beside_a_stream_and_equals_it_whole(
    backend: Any, tokenizer: Any
) -> None:
    prompt = ids(2, 120)
    whole = backend.prompt_logprobs(prompt, 2)  # the backend alone, in one go
    labels = [ids(3, 3), ids(4, 1)]
    scores = backend.score(prompt[:50], labels)  # (the engine's thread owns it after)
    engine = Engine(backend, tokenizer, EngineConfig(score_step_tokens=PART))
    engine.start()
    try:
        stream = _stream(engine)
        at_submit = stream.tokens
        fut = engine.prompt_logprobs(prompt, top_n=2)
        got = fut.result(60)
        between = stream.tokens - at_submit
        # Whole, the echo would run in one step: the stream would get a token or two.
        # Mutation: running prompt-logprob jobs whole (ScoreQueue without parts) fails it.
        assert between >= len(prompt) // PART - 2, f"{between} stream tokens during the echo"
        assert [lp.token_id for lp in got] == prompt[1:]
        for g, w in zip(got, whole, strict=True):
            assert g.logprob == pytest.approx(w.logprob, abs=1e-4)
            assert [t for t, _ in g.top] == [t for t, _ in w.top]
        # A Score after it is unchanged by what the echo left in the scratch (nothing).
        assert engine.score(prompt[:50], labels).result(60) == pytest.approx(scores, abs=1e-5)
    finally:
        engine.shutdown()


def test_an_echo_given_up_part_way_leaves_the_next_score_exact(
    backend: Any, tokenizer: Any
) -> None:
    labels = [ids(5, 4), ids(6, 2)]
    prompt = ids(7, 200)
    want = backend.score(prompt[:60], labels)
    engine = Engine(backend, tokenizer, EngineConfig(score_step_tokens=PART))
    engine.start()
    try:
        stream = _stream(engine)
        # Its deadline passes part-way: 200 positions take 25 steps of the stream.
        late = engine.prompt_logprobs(prompt, top_n=0, deadline=time.monotonic() + 0.02)
        cancelled = engine.prompt_logprobs(prompt, top_n=0)
        deadline = time.monotonic() + 30
        while not (  # the second one has started: part-way in the scratch
            engine._scores.jobs
            and engine._scores.jobs[0].future is cancelled
            and engine._scores.jobs[0].fed >= 3 * PART
        ):
            assert time.monotonic() < deadline
            time.sleep(0.001)
        cancelled.cancel()
        assert engine.score(prompt[:60], labels).result(60) == pytest.approx(want, abs=1e-5)
        # The scratch was emptied when the job left, not found full by the Score (whose
        # batch llama.cpp then refuses for positions out of order, and which the queue
        # retries label by label). Mutation: not emptying it when a part-way job leaves.
        assert backend._logprob_fed == 0
        with pytest.raises(DeadlineExpired, match="prompt tokens"):
            late.result(1)
        assert not stream.ended.is_set()  # the stream went on throughout
    finally:
        engine.shutdown()


def test_a_score_prompt_is_fed_in_parts_beside_a_stream_then_held_for_its_labels(
    backend: Any, tokenizer: Any
) -> None:
    # A 120-token Score prompt with labels of different input rows: its prompt goes a
    # budget at a time into the backend's hold, every label then costs its own tokens, and
    # the scores are those of whole rows. An echo queued right behind it (the next job in
    # the same step) still equals its whole run: the Score's hold never reaches it.
    prompt = ids(5, 120)
    labels = [ids(6 + i, 3) for i in range(6)]
    want = backend.score(prompt, labels)  # whole rows (nothing held yet)
    whole = backend.prompt_logprobs(prompt[:40], 1)
    engine = Engine(backend, tokenizer, EngineConfig(score_step_tokens=PART))
    engine.start()
    try:
        stream = _stream(engine)
        at_submit = stream.tokens
        fut = engine.score(prompt, labels)
        echo = engine.prompt_logprobs(prompt[:40], top_n=1)
        got = fut.result(60)
        between = stream.tokens - at_submit
        # Mutation: holding nothing (`ScoreQueue._holds` False) runs each 122-token row
        # as one chunk over budget: 6 steps, so the stream gets ~6 tokens, not ~15.
        assert between >= len(prompt) // PART - 2, f"{between} stream tokens during the Score"
        assert got == pytest.approx(want, abs=1e-4)
        for g, w in zip(echo.result(60), whole, strict=True):
            assert g.logprob == pytest.approx(w.logprob, abs=1e-4)
        # The hold is emptied once the Score is answered.
        assert backend.lc.llama_memory_seq_pos_max(backend._mem, backend._prompt_seq) == -1
    finally:
        engine.shutdown()


@pytest.mark.parametrize("score_prompt", [3, 30])
def test_a_score_taken_in_the_step_an_echo_ends_leaves_the_echo_exact(
    backend: Any, tokenizer: Any, score_prompt: int
) -> None:
    # An echo of 44 positions ends with a part of 4 (44 = 5 x 8 + 4), and the Score
    # queued behind it takes the rest of that step's budget. The step's chunks run in
    # the order taken, so the echo's last part still reads its KV. Mutation: running a
    # step's labels before its prompt parts (the order before) empties the echo's
    # scratch under it: its last entries come out wrong (llama.cpp refuses the labels'
    # batch over the echo's KV; they are rerun row by row).
    prompt = ids(7, 44)
    whole = backend.prompt_logprobs(prompt, 1)
    labels = [[5], [9]]
    want = backend.score(prompt[:score_prompt], labels)
    engine = Engine(backend, tokenizer, EngineConfig(score_step_tokens=PART))
    engine.start()
    try:
        _stream(engine)
        echo = engine.prompt_logprobs(prompt, top_n=1)
        score = engine.score(prompt[:score_prompt], labels)
        got = echo.result(60)
        assert score.result(60) == pytest.approx(want, abs=1e-4)
        assert [g.logprob for g in got] == pytest.approx([w.logprob for w in whole], abs=1e-4)
    finally:
        engine.shutdown()

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

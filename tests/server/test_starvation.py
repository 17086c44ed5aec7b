"""A stream keeps its pace while other clients send the largest prompt and Score allowed.

The engine runs Score work at most `EngineConfig.score_step_tokens` tokens between two
decode steps, so a Score of many long labels delays a stream's next token by one chunk of
it, never by the whole Score. The stream's inter-token gaps are measured on the client, as
a caller sees them, alone and then under that load; `pytest -s` prints them.
"""

from __future__ import annotations

import dataclasses
import itertools
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from slimserve.clients import Client
from slimserve.server.config import Limits
from tests.conftest import tiny_server_config
from tests.helpers import ServerThread, publish_tiny

pytestmark = pytest.mark.timeout(120)

CONTEXT = 1024
LIMITS = Limits(max_new_tokens=64, default_max_new_tokens=16, max_prompt_tokens=CONTEXT - 8)
STREAM_TOKENS = 60
LABEL_TOKENS = 60
WORDS = "the quick brown fox jumps over the lazy dog hello world again numbers 0123456789 "


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    root = tmp_path_factory.mktemp("registry")
    publish_tiny(root, "tiny", max_position_embeddings=CONTEXT)
    config = tiny_server_config(root, limits=LIMITS)
    config = dataclasses.replace(config, model=config.model.replace(max_seq_len=CONTEXT))
    srv = ServerThread(config).start()
    yield srv
    srv.stop()


def _text_of(c: Client, tok: Any, tokens: int, salt: str) -> str:
    """Text the server reads as close to `tokens` tokens as a cut allows (never more);
    `tok` is the tokenizer publish_tiny gives the model."""
    ids = tok(salt + " " + WORDS * tokens, add_special_tokens=False)["input_ids"]
    text: str = tok.decode(ids[:tokens])
    while len(c.tokenize(text)) > tokens:
        text = text[:-8]
    return text


def _stream_gaps(c: Client) -> list[float]:
    """Milliseconds between the chunks of one greedy stream, after its first token."""
    arrivals = []
    options: dict[str, Any] = dict(max_new_tokens=STREAM_TOKENS, ignore_eos=True, token_ids=True)
    for chunk in c.stream("hello world", **options):
        if chunk.token_ids:
            arrivals.append(time.perf_counter())
    assert len(arrivals) >= STREAM_TOKENS // 2  # one chunk per token, or close to it
    return [(b - a) * 1e3 for a, b in itertools.pairwise(arrivals)]


def _p(gaps: list[float], q: int) -> float:
    return statistics.quantiles(gaps, n=100, method="inclusive")[q - 1]


class Load:
    """Clients that each repeat one call on their own thread until `stop`."""

    def __init__(self, target: str, calls: list[Callable[[Client], Any]]) -> None:
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.done = [0] * len(calls)
        self.clients = [Client(target, timeout=60, retries=0) for _ in calls]
        self.threads = [
            threading.Thread(target=self._repeat, args=(i, call), daemon=True)
            for i, call in enumerate(calls)
        ]

    def _repeat(self, i: int, call: Callable[[Client], Any]) -> None:
        try:
            while not self.stop.is_set():
                call(self.clients[i])
                self.done[i] += 1
        except BaseException as exc:  # reported by the test, not lost on this thread
            self.errors.append(exc)

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)
        for c in self.clients:
            c.close()


def test_a_maximal_score_and_prompt_do_not_starve_a_stream(
    server: ServerThread, tokenizer: Any
) -> None:
    with Client(server.target, timeout=60, retries=0) as c:
        long_prompt = _text_of(c, tokenizer, LIMITS.max_prompt_tokens - 4, "prefill")
        score_prompt = _text_of(c, tokenizer, CONTEXT - 2 * LABEL_TOKENS, "score")
        score_prompt_tokens = len(c.tokenize(score_prompt))
        labels = [
            _text_of(c, tokenizer, LABEL_TOKENS, f"label{i}") for i in range(LIMITS.max_labels)
        ]
        c.generate(long_prompt, max_new_tokens=2)  # both are valid (and warm)
        t0 = time.perf_counter()
        c.score(score_prompt, labels)
        score_ms = (time.perf_counter() - t0) * 1e3
        alone = _stream_gaps(c)

        calls: list[Callable[[Client], Any]] = [
            lambda cl: cl.score(score_prompt, labels),
            lambda cl: cl.generate(long_prompt, max_new_tokens=2),
        ]
        with Load(server.target, calls) as load:
            time.sleep(score_ms / 2e3)  # a Score is under way when the stream starts
            loaded = _stream_gaps(c)
            scores_during = load.done[0]
    assert not load.errors, load.errors
    assert scores_during >= 1 and load.done[1] >= 1  # the load ran beside the stream

    cost = len(labels) * (score_prompt_tokens + LABEL_TOKENS - 1)  # labels may be shorter
    figures = (
        f"stream gaps alone: p50 {_p(alone, 50):.1f} ms, p99 {_p(alone, 99):.1f} ms; "
        f"under a maximal prompt and Score: p50 {_p(loaded, 50):.1f} ms, "
        f"p99 {_p(loaded, 99):.1f} ms; one Score of {len(labels)} labels "
        f"(~{cost} tokens) alone: {score_ms:.0f} ms"
    )
    print("\n" + figures)
    # A Score holding the engine for its whole length would leave gaps of ~score_ms.
    assert _p(loaded, 99) < score_ms / 2, figures

"""A stream makes a token in every engine step while other clients send the largest prompt
and Score allowed.

The engine runs Score work at most `EngineConfig.score_step_tokens` tokens a step and
feeds prompts a step's budget at a time, every step decoding the running streams beside
them: a Score of many long labels or a maximal prompt delays a stream's next token by one
chunk of it, never by the whole. The test reads what the engine did, not the clock (a
time ratio races on a loaded machine): the engine process serves the backend the test
steers (`tests.engine.faults.Controls`), which logs each backend call, and holds the
engine while the test queues the Score, the stream and the prompt, so the three always
meet in the same steps.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from slimserve.clients import Client
from slimserve.server.config import Limits
from tests.conftest import steered_server
from tests.engine.faults import Controls
from tests.helpers import ServerThread, publish_tiny, wait_until

pytestmark = pytest.mark.timeout(120)

#: Longer than two steps' prompt budget (the steered torch backend takes 2048 tokens a
#: step, half of them Score work while a Score waits), so the maximal prompt is still
#: being fed once the stream decodes.
CONTEXT = 2048
LIMITS = Limits(
    max_new_tokens=64, default_max_new_tokens=16, max_prompt_tokens=CONTEXT - 8, max_labels=16
)
STREAM_TOKENS = 60
LABEL_TOKENS = 60
WORDS = "the quick brown fox jumps over the lazy dog hello world again numbers 0123456789 "


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerThread, Controls]]:
    source = tmp_path_factory.mktemp("source")
    publish_tiny(source, "tiny", max_position_embeddings=CONTEXT)
    root = tmp_path_factory.mktemp("starvation") / "reg"
    with steered_server(source, root, limits=LIMITS, max_seq_len=CONTEXT) as s:
        yield s


def _text_of(c: Client, tok: Any, tokens: int, salt: str) -> str:
    """Text the server reads as close to `tokens` tokens as a cut allows (never more);
    `tok` is the tokenizer publish_tiny gives the model."""
    ids = tok(salt + " " + WORDS * tokens, add_special_tokens=False)["input_ids"]
    text: str = tok.decode(ids[:tokens])
    while len(c.tokenize(text)) > tokens:
        text = text[:-8]
    return text


def _call(target: str, call: Callable[[Client], Any]) -> Callable[[], Any]:
    """`call` on a client of its own (each runs on a thread of the test's pool)."""

    def run() -> Any:
        with Client(target, timeout=60, retries=0) as c:
            return call(c)

    return run


def _stream(c: Client) -> int:
    """Tokens of one greedy stream of STREAM_TOKENS."""
    options: dict[str, Any] = dict(max_new_tokens=STREAM_TOKENS, ignore_eos=True, token_ids=True)
    return sum(len(chunk.token_ids) for chunk in c.stream("hello world", **options))


def _between_tokens(calls: list[str], slot: int) -> list[list[str]]:
    """The backend calls between each two tokens of the sequence in `slot`: from the pass
    that fed the last chunk of its prompt (its first token), then each that decoded it."""
    decoded = [i for i, line in enumerate(calls) if _decodes(line, slot)]
    fed = [i for i, line in enumerate(calls[: decoded[0]]) if line.startswith(f"prefill {slot} ")]
    marks = [fed[-1], *decoded]
    return [calls[a + 1 : b] for a, b in itertools.pairwise(marks)]


def _decodes(line: str, slot: int) -> bool:
    kind, *args = line.split()
    return kind == "decode" and str(slot) in args[0].split(",")


def test_a_stream_makes_a_token_every_step_beside_a_maximal_score_and_prompt(
    server: tuple[ServerThread, Controls], tokenizer: Any
) -> None:
    srv, controls = server
    engine = srv.server.models.get("tiny").engine
    score_step_tokens = srv.config.model.engine.score_step_tokens
    with Client(srv.target, timeout=60, retries=0) as c:
        long_prompt = _text_of(c, tokenizer, LIMITS.max_prompt_tokens - 4, "prefill")
        score_prompt = _text_of(c, tokenizer, CONTEXT - 2 * LABEL_TOKENS, "score")
        labels = [
            _text_of(c, tokenizer, LABEL_TOKENS, f"label{i}") for i in range(LIMITS.max_labels)
        ]
    # One label's rows fit a step's Score work; the whole Score is many steps' worth.
    assert CONTEXT - LABEL_TOKENS <= score_step_tokens < len(labels) * CONTEXT // 2

    target = srv.target
    controls.log_calls()
    controls.pause_at_score()
    with ThreadPoolExecutor(3) as pool:
        try:
            score = pool.submit(_call(target, lambda c: c.score(score_prompt, labels)))
            controls.wait_paused()  # the Score's first chunk is about to run; the engine waits
            stream = pool.submit(_call(target, _stream))
            wait_until(lambda: engine.stats().queued == 1, "the stream never queued")
            prompt = pool.submit(_call(target, lambda c: c.generate(long_prompt, max_new_tokens=2)))
            wait_until(lambda: engine.stats().queued == 2, "the maximal prompt never queued")
        finally:
            controls.release()  # also when a wait failed: the calls then end, and the test
        scored, streamed, prompted = score.result(60), stream.result(60), prompt.result(60)
    log = controls.calls()

    assert streamed == STREAM_TOKENS
    assert prompted.generated_tokens == 2
    assert len(scored.scores) == len(labels)
    assert all(math.isfinite(s.logprob) for s in scored.scores)

    # Every Score chunk the engine ran was at most one step's worth.
    score_chunks = [int(line.split()[1]) for line in log if line.startswith("score")]
    assert max(score_chunks) <= score_step_tokens, score_chunks
    assert len(score_chunks) >= len(labels) // 2, log

    # The stream is the sequence decoded in the most steps: one per token after its first.
    decodes = Counter(
        int(s) for line in log if line.startswith("decode") for s in line.split()[1].split(",")
    )
    slot, steps = decodes.most_common(1)[0]
    assert steps == STREAM_TOKENS - 1, log
    # Between two of its tokens the engine ran one step: at most one Score chunk, and
    # chunks of prompts fed in the same pass as the stream's token, never a pass without it.
    gaps = _between_tokens(log, slot)
    assert len(gaps) == STREAM_TOKENS - 1
    for n, gap in enumerate(gaps):
        scores = [line for line in gap if line.startswith("score")]
        assert len(scores) <= 1, f"{len(scores)} Score chunks before token {n + 2}: {gap}"
        assert not [line for line in gap if line.startswith("decode")], gap
        if n:  # (the first also holds the rest of the pass that made the first token)
            prefills = [line.split()[1] for line in gap if line.startswith("prefill")]
            assert gap[: len(scores)] == scores, gap
            assert len(prefills) == len(gap) - len(scores) == len(set(prefills)), gap
    # And the Score and the maximal prompt were both under way while the stream ran.
    assert any(line.startswith("score") for gap in gaps for line in gap), log
    assert any(line.startswith("prefill") for gap in gaps for line in gap), log

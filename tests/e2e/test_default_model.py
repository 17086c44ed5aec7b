"""The real default model (SmolLM2-135M-Instruct) through a real server and client."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from slimserve.clients import ChatMessage, Client, InvalidArgument
from tests.helpers import ServerThread

# The auto race of four float32 plans on the real model: ~3 minutes on 2 vCPUs.
pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def client(real_server: ServerThread) -> Any:
    with Client(real_server.target, timeout=300, retries=0) as c:
        yield c


def test_serving_by_the_fastest_qualified_plan(client: Client) -> None:
    assert client.health() == "SERVING" and client.health(MODEL) == "SERVING"
    (info,) = client.models()
    assert info.ref == f"{MODEL}@1" and info.is_default
    from slimserve.engine.backends import llamacpp

    # "auto" on CPU raced the float32 plans on this machine and serves the fastest of them
    # in its own engine process; every other plan says why it does not serve.
    plans = {"llama/float32", "hf/float32"}
    if llamacpp.available():
        plans |= {"llamacpp/f32/extra-on", "llamacpp/f32/extra-off"}
    assert info.plan in plans and info.kernels and info.engine_pid > 0
    assert set(info.refused) >= plans - {info.plan}
    assert info.measured["decode_tokens_per_s"] > 0
    assert info.measured["probe_perplexity_ratio"] <= 1.01
    assert info.has_chat_template and info.parameters > 100_000_000


def test_chat_stream_is_incremental_and_matches_unary(client: Client) -> None:
    chat = [ChatMessage("user", "Name three colours.")]
    chunks = list(client.stream(chat, max_new_tokens=32))
    unary = client.generate(chat, max_new_tokens=32)
    assert chunks[0].model == f"{MODEL}@1" and chunks[0].input_tokens > 5
    assert chunks[-1].stop_reason in ("EOS_TOKEN", "MAX_TOKENS")
    assert sum(1 for c in chunks if c.text) > 5
    text = "".join(c.text for c in chunks)
    assert text == unary.text and text.strip()
    assert chunks[-1].timings is not None and chunks[-1].timings.ttft_ms > 0


def test_greedy_tokens_equal_transformers_generate(client: Client, default_registry: Path) -> None:
    import torch

    from slimserve.registry.artifact import load_model
    from slimserve.registry.store import Registry

    prompt = "The three primary colours are"
    got = client.generate(prompt, max_new_tokens=24, ignore_eos=True, token_ids=True)
    model, tok = load_model(Registry(default_registry).get(MODEL), verify=False)
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        ref = model.generate(ids, max_new_tokens=24, do_sample=False, min_new_tokens=24)
    assert list(got.token_ids) == ref[0, ids.shape[1] :].tolist()
    assert got.text == tok.decode(ref[0, ids.shape[1] :])


def test_score_equals_transformers_logprobs(client: Client, default_registry: Path) -> None:
    import torch

    from slimserve.registry.artifact import load_model
    from slimserve.registry.store import Registry

    prompt = "Question: Is Paris the capital of France? Answer yes or no.\nAnswer:"
    labels = [" yes", " no", " maybe not"]
    r = client.score(prompt, labels)
    tol = 1e-3
    assert abs(sum(s.probability for s in r.scores) - 1) < 1e-6
    model, tok = load_model(Registry(default_registry).get(MODEL), verify=False)
    p_ids = tok(prompt)["input_ids"]
    for label, got in zip(labels, r.scores, strict=True):
        l_ids = tok(label, add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            logits = model(torch.tensor([p_ids + l_ids])).logits[0].float()
        logp = torch.log_softmax(logits, -1)
        want = sum(float(logp[len(p_ids) - 1 + i, t]) for i, t in enumerate(l_ids))
        assert got.num_tokens == len(l_ids)
        assert abs(got.logprob - want) < tol, (label, got.logprob, want)


def test_cancellation_frees_the_slot(real_server: ServerThread, client: Client) -> None:
    engine = real_server.server.models.get(MODEL).engine
    before = engine.stats().finished.get("CANCELLED", 0)
    stream = client.stream("Tell me a long story.", max_new_tokens=500, ignore_eos=True)
    for _ in range(3):
        next(stream)
    stream.close()  # type: ignore[attr-defined]
    deadline = time.monotonic() + 30
    while engine.stats().finished.get("CANCELLED", 0) == before:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert engine.stats().running == 0


def test_prompt_longer_than_context_is_refused(client: Client) -> None:
    with pytest.raises(InvalidArgument, match="the limit is 1023"):
        client.generate("word " * 1500)
    assert client.generate("Hi", max_new_tokens=2).generated_tokens >= 1

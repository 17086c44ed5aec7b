"""`bench serve --systems ...,prefix`: what the prefix cache saves a first token.

One server of its own (the `slimserve` system's plan, contexts long enough for the
document) answers one-token requests over gRPC, one after another: a ~`Bench.
prefix_tokens` (1,000) token document followed by a short question (~20 tokens). Each
round sends, back to back, a question on a document the server has never seen (nothing
to reuse: the uncached TTFT) and a new question on the one shared document (its KV is
cached: only the question is prefilled). Interleaving them makes a noisy neighbour slow
both alike. Reported: each side's TTFT p50 and p90, their ratio, the tokens the server
says came from its cache (`usage.cached_tokens`) and the hit rate over the shared side.
"""

from __future__ import annotations

import time
from typing import Any

from slimserve.bench.http_load import percentile
from slimserve.bench.mixed import long_text

#: Context per sequence beyond the document: the question and the answer.
ROOM = 128
QUESTIONS = (
    "Which note mentions a bridge, and what did it shorten?",
    "How many notes talk about the harbour and its ships?",
    "What did the engineers replace at the water works?",
    "Which season had twice the average rainfall in the hills?",
    "What did the committee approve for the school?",
    "When did the library extend its opening hours?",
    "Where did the museum lend its three paintings?",
    "What did farmers say about the apple harvest?",
)


def max_seq_len(prefix_tokens: int) -> int:
    return prefix_tokens + ROOM


async def _document(client: Any, which: int, tokens: int) -> str:
    """A document of about `tokens` tokens (by the server's tokenizer), distinct per
    `which` from its first words on."""
    n = 8
    per = len(await client.tokenize(long_text(which, n))) / n
    n = max(1, int(tokens / per))
    while len(await client.tokenize(long_text(which, n))) > tokens and n > 1:
        n -= 1
    return long_text(which, n).rsplit("\n", 1)[0]  # without mixed's own question


async def run(server: Any, b: Any) -> dict[str, Any]:
    """The scenario against `server` (`serve._Server`); `b.repeats` x 8 rounds."""
    client = server.client()
    tokens = b.prefix_tokens
    shared = await _document(client, 0, tokens)
    prompt_tokens = len(await client.tokenize(f"{shared}\nQuestion: {QUESTIONS[0]}"))

    async def ttft(prompt: str) -> tuple[float, int, int]:
        t0 = time.perf_counter()
        r = await client.generate(prompt, max_new_tokens=1)
        return (time.perf_counter() - t0) * 1e3, r.cached_tokens, r.input_tokens

    first, first_cached, _ = await ttft(f"{shared}\nQuestion: {QUESTIONS[0]}")
    cold: list[float] = []
    warm: list[float] = []
    cached: list[int] = []
    inputs: list[int] = []
    rounds = max(1, b.repeats) * len(QUESTIONS)
    for i in range(rounds):
        fresh = await _document(client, 1000 + i, tokens)
        q = QUESTIONS[i % len(QUESTIONS)]
        ms, _, _ = await ttft(f"{fresh}\nQuestion: {q} ({i})")
        cold.append(ms)
        ms, hit, n = await ttft(f"{shared}\nQuestion: {q} ({i})")
        warm.append(ms)
        cached.append(hit)
        inputs.append(n)
    return {
        "prompt_tokens": prompt_tokens,
        "rounds": rounds,
        "first_ms": first,
        "first_cached_tokens": first_cached,
        "uncached_p50_ms": percentile(cold, 50),
        "uncached_p90_ms": percentile(cold, 90),
        "cached_p50_ms": percentile(warm, 50),
        "cached_p90_ms": percentile(warm, 90),
        "cached_tokens_mean": sum(cached) / len(cached),
        "hit_rate": sum(1 for c in cached if c > 0) / len(cached),
        "cached_share": sum(cached) / max(1, sum(inputs)),
    }


def report_lines(result: dict[str, Any]) -> list[str]:
    if "error" in result:
        return [f"prefix cache: error: {result['error']}"]
    r = result["run"]
    ratio = r["cached_p50_ms"] / r["uncached_p50_ms"] if r["uncached_p50_ms"] else float("nan")
    verdict = "PASS" if ratio <= 0.2 else "MISS"
    return [
        f"prefix cache ({result.get('served', '')}): a {r['prompt_tokens']}-token prompt "
        f"whose document is shared, {r['rounds']} rounds: TTFT p50 "
        f"{r['cached_p50_ms']:.1f} ms (p90 {r['cached_p90_ms']:.1f}) against "
        f"{r['uncached_p50_ms']:.1f} ms (p90 {r['uncached_p90_ms']:.1f}) on a new document "
        f"= {ratio:.3f}x; hit rate {r['hit_rate']:.0%}, {r['cached_tokens_mean']:.0f} "
        f"tokens cached per request ({r['cached_share']:.0%} of prompt tokens)",
        f"target: shared-prefix TTFT <= 0.2x uncached: {ratio:.3f}x {verdict}",
    ]

"""Evaluation: perplexity on held-out text, size, and speed through the serving engine.

The recipe's ``evaluate`` stage, which measures the saved artifact and changes nothing.
Imports ``.data``, ``.stage`` and (inside ``decode_speed``) the engine.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from slimserve.compression.data import TextSource, load_text_file, pydoc_topics, token_chunks
from slimserve.compression.stage import StageConfig, StageContext, StageOutcome, StageSpec

_SPEED_PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


@dataclass(frozen=True, slots=True, kw_only=True)
class EvaluateConfig(StageConfig):
    seq_len: int = 256
    max_chunks: int = 32
    #: Tokens generated for the speed measurement (greedy, EOS ignored); 0 skips it.
    speed_tokens: int = 128
    #: Speed runs; the median is reported.
    speed_repeats: int = 3

    def validate(self) -> None:
        for name, low in (("seq_len", 8), ("max_chunks", 1), ("speed_tokens", 0)):
            if getattr(self, name) < low:
                raise ValueError(f"{name}={getattr(self, name)} must be >= {low}")
        if self.speed_repeats < 1:
            raise ValueError(f"speed_repeats={self.speed_repeats} must be >= 1")


def eval_source(path: Path | None) -> TextSource:
    return load_text_file(path) if path is not None else pydoc_topics("eval")


@torch.inference_mode()
def perplexity(model: Any, chunks: torch.Tensor) -> tuple[float, int]:
    """exp(mean next-token NLL) over (N, T) token chunks; returns (ppl, tokens scored)."""
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for row in chunks:
        ids = row.unsqueeze(0).to(device)
        logits = model(input_ids=ids).logits.float()  # (1, T, vocab)
        nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
        total += float(nll)
        count += ids.shape[1] - 1
    return math.exp(total / count), count


def served_perplexity(backend: Any, chunks: torch.Tensor) -> float:
    """Perplexity of the chunks as the serving backend computes it (its Score path).

    The backend may not run the artifact's weights as stored (llama.cpp runs a GGUF re-encode),
    so this is the quality users get; `perplexity` is the artifact's own."""
    total, count = 0.0, 0
    for row in chunks.tolist():
        total -= backend.score(row[:1], [row[1:]])[0]
        count += len(row) - 1
    return math.exp(total / count)


def decode_speed(
    model: Any, tokenizer: Any, config: EvaluateConfig, chunks: torch.Tensor | None = None
) -> dict[str, Any]:
    """Greedy decode tokens/s and time to first token through the serving engine, on the
    backend the server would choose; with `chunks`, also the perplexity that backend gives."""
    import tempfile

    from slimserve.engine.backends.select import build_backend
    from slimserve.engine.config import ModelConfig
    from slimserve.engine.scheduler import Engine, EngineConfig
    from slimserve.engine.types import GenerationRequest, SamplingParams, StopParams

    ids = tuple(tokenizer(_SPEED_PROMPT)["input_ids"])
    longest = len(ids) + config.speed_tokens + 8
    if chunks is not None:
        longest = max(longest, chunks.shape[1] + 1)
    with tempfile.TemporaryDirectory(prefix="slimserve-eval-") as tmp:
        tokenizer.save_pretrained(tmp)  # tokenizer.json: what a GGUF export needs
        backend = build_backend(
            model, ModelConfig(device="cpu", max_batch=1), longest, Path(tmp) / "tokenizer.json"
        )
    served = {} if chunks is None else {"served_perplexity": served_perplexity(backend, chunks)}
    engine = Engine(backend, tokenizer, EngineConfig())
    engine.start()
    tps, ttft = [], []
    try:
        for i in range(config.speed_repeats + 1):  # the first run warms up
            done = threading.Event()
            result: dict[str, Any] = {}

            def sink(
                ev: Any, result: dict[str, Any] = result, done: threading.Event = done
            ) -> None:
                if ev.finish is not None or ev.error is not None:
                    result["finish"] = ev.finish
                    result["error"] = ev.error
                    done.set()

            req = GenerationRequest(
                request_id=f"eval-{i}",
                prompt_ids=ids,
                sampling=SamplingParams(),
                stopping=StopParams(max_new_tokens=config.speed_tokens, ignore_eos=True),
            )
            engine.submit(req, sink)
            done.wait()
            if result["error"] is not None:
                raise result["error"]
            fin = result["finish"]
            if i == 0:
                continue
            tps.append((fin.generated_tokens - 1) / (fin.timings.decode_ms / 1e3))
            ttft.append(fin.timings.ttft_ms)
    finally:
        engine.shutdown()
    return {
        "decode_tokens_per_s": sorted(tps)[len(tps) // 2],
        "ttft_ms": sorted(ttft)[len(ttft) // 2],
        "backend": backend.name,
        "threads": torch.get_num_threads(),
        **served,
    }


def evaluate(
    model: Any,
    tokenizer: Any,
    config: EvaluateConfig,
    *,
    text: Path | None = None,
    model_bytes: int | None = None,
) -> dict[str, Any]:
    """Every metric a manifest records. `model_bytes`: size on disk, when known."""
    from slimserve.registry.artifact import count_parameters

    source = eval_source(text)
    chunks = token_chunks(tokenizer, source.text, config.seq_len, config.max_chunks)
    t0 = time.perf_counter()
    ppl, n = perplexity(model, chunks)
    out: dict[str, Any] = {
        "perplexity": ppl,
        "eval_tokens": n,
        "eval_text": source.name,
        "eval_text_sha256": source.digest,
        "eval_seconds": time.perf_counter() - t0,
        "parameters": count_parameters(model),
        "device": str(next(model.parameters()).device),
    }
    if model_bytes is not None:
        out["bytes"] = model_bytes
    if config.speed_tokens:
        out.update(decode_speed(model, tokenizer, config, chunks))
    return out


def run_evaluate(
    model: Any, tokenizer: Any, config: EvaluateConfig, ctx: StageContext
) -> StageOutcome:
    """The ``evaluate`` stage: every metric, on the run's eval text and the saved size."""
    metrics = evaluate(model, tokenizer, config, text=ctx.eval_text, model_bytes=ctx.model_bytes)
    return StageOutcome(model=model, metrics=metrics)


STAGE = StageSpec(name="evaluate", config=EvaluateConfig, run=run_evaluate, order=4, measures=True)

"""The ``speculate`` stage: how well the new version drafts for its parent.

A draft made by this toolkit (``recipes/draft.toml``) is worth what it saves its parent in
speculative decoding (``slimserve.engine.speculative``). This stage serves the parent on
the backend the server would pick, greedy at batch 1, once alone and once with the new
version drafting, on held-out prompts (the teacher text's held-out split when the run has
one, so the draft never trained on them), and records in the manifest the acceptance rate,
both speeds, the speed-up and whether every output was identical (it must be: greedy).

Measures the saved artifact and changes nothing. Imports ``.stage``, ``.teacher_data`` and
(inside the functions) the engine.
"""

from __future__ import annotations

import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch

from slimserve.compression.stage import (
    StageConfig,
    StageContext,
    StageOutcome,
    StageSpec,
    check_choice,
    check_int,
)
from slimserve.compression.teacher_data import TeacherTextConfig, encode_prompt

#: Prompts used when the run has no teacher text (a plain `compress` of a base model).
FALLBACK_PROMPTS = (
    "Explain how a hash map works, step by step.",
    "List ten facts about the planet Mars.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Give me a recipe for a simple tomato soup.",
    "Explain recursion with an example in Python.",
    "What are the main causes of inflation?",
    "Describe the water cycle to a ten-year-old.",
    "Write a product description for a reusable water bottle.",
)


@dataclass(frozen=True, slots=True, kw_only=True)
class SpeculateConfig(StageConfig):
    #: Held-out prompts generated from (each once alone, once with the draft).
    prompts: int = 8
    new_tokens: int = 96
    #: Tokens drafted per step (`serve --draft-tokens`).
    draft_tokens: int = 4
    #: How the llama.cpp backend stores the parent's weights (`serve --gguf-type`): the
    #: parent is usually served quantized ("q8_0" for an int8 production version).
    target_weights: str = "auto"

    def validate(self) -> None:
        check_int("prompts", self.prompts, minimum=1)
        check_int("new_tokens", self.new_tokens, minimum=2)
        check_int("draft_tokens", self.draft_tokens, minimum=1)
        check_choice("target_weights", self.target_weights, ("auto", "q8_0", "q4_1", "f16", "f32"))


def _prompts(tokenizer: Any, ctx: StageContext, n: int) -> list[tuple[int, ...]]:
    """Held-out teacher prompts (as the teacher saw them), else the fallback, chat-wrapped."""
    if ctx.teacher_text is not None:
        rows = ctx.teacher_text(TeacherTextConfig(split="heldout")).heldout
        if rows:
            return [row.prompt_ids for row in rows[:n]]
    return [tuple(encode_prompt(tokenizer, text)) for text in FALLBACK_PROMPTS[:n]]


def _generate(engine: Any, prompts: Sequence[tuple[int, ...]], new_tokens: int) -> list[Any]:
    """Greedy, one request at a time (batch 1); returns (token ids, finish) per prompt."""
    from slimserve.engine.types import GenerationRequest, Prompt, SamplingParams, StopParams

    out = []
    for i, ids in enumerate(prompts):
        done = threading.Event()
        got: list[int] = []
        end: list[Any] = []

        def sink(ev: Any, got: list[int] = got, end: list[Any] = end, done: Any = done) -> None:
            got.extend(ev.token_ids)
            if ev.finish is not None or ev.error is not None:
                end.append(ev)
                done.set()

        req = GenerationRequest(
            request_id=f"speculate-{i}",
            prompt=Prompt(ids=ids),
            sampling=SamplingParams(),
            stopping=StopParams(max_new_tokens=new_tokens, ignore_eos=True),
        )
        engine.submit(req, sink)
        done.wait()
        if end[0].error is not None:
            raise end[0].error
        out.append((got, end[0].finish))
    return out


def measure_speculation(
    draft: Any, target: Any, tokenizer: Any, prompts: Sequence[tuple[int, ...]], config: Any
) -> dict[str, Any]:
    """Serve `target` alone and with `draft` drafting (both in memory, same tokenizer) and
    return the figures the manifest records (see module docstring)."""
    from slimserve.engine.backends.base import SpeculativeBackend, can_speculate
    from slimserve.engine.backends.select import build_backend, plans_for, quiet_torch_beside
    from slimserve.engine.config import DraftConfig, ModelConfig
    from slimserve.engine.scheduler import Engine
    from slimserve.engine.speculative import ModelDrafter

    longest = max(map(len, prompts)) + config.new_tokens + config.draft_tokens + 2
    cfg = ModelConfig.of(device="cpu", max_batch=1, gguf_type=config.target_weights)
    with tempfile.TemporaryDirectory(prefix="slimserve-speculate-") as tmp:
        tokenizer.save_pretrained(tmp)  # tokenizer.json: what a GGUF export needs
        tok_json = Path(tmp) / "tokenizer.json"
        plan = plans_for(target, cfg, tok_json)[0][0]
        target_backend = build_backend(target, cfg, longest, tok_json, plan)
        draft_plans = [p for p in plans_for(draft, cfg, tok_json)[0] if p.backend == plan.backend]
        draft_backend = build_backend(
            draft, ModelConfig.of(device="cpu", max_batch=1), longest, tok_json, draft_plans[0]
        )
    if not (can_speculate(target_backend) and can_speculate(draft_backend)):
        raise ValueError(f"the {plan.backend} backend cannot verify drafts")
    drafter = ModelDrafter(cast("SpeculativeBackend", draft_backend), "draft")
    draft_config = DraftConfig(source="draft", tokens=config.draft_tokens)
    runs: dict[str, list[Any]] = {"plain": [], "draft": []}
    wall = {"plain": 0.0, "draft": 0.0}
    threads = torch.get_num_threads()
    quiet_torch_beside(plan)  # as the engine process does
    try:
        # Interleaved prompt by prompt, so a noisy neighbour slows both alike; the first
        # round (one short prompt) warms both up and is not counted.
        for i, ids in enumerate([prompts[0][:8], *prompts]):
            for name, d in (("plain", None), ("draft", drafter)):
                engine = Engine(target_backend, tokenizer, drafter=d, draft=draft_config)
                engine.start()
                try:
                    t0 = time.perf_counter()
                    (run,) = _generate(engine, [ids], config.new_tokens if i else 8)
                    if i:
                        wall[name] += time.perf_counter() - t0
                        runs[name].append(run)
                finally:
                    engine.shutdown()
    finally:
        torch.set_num_threads(threads)
    plain_tps = sum(len(ids) for ids, _ in runs["plain"]) / wall["plain"]
    draft_tps = sum(len(ids) for ids, _ in runs["draft"]) / wall["draft"]
    proposed = sum(f.timings.draft_proposed for _, f in runs["draft"])
    accepted = sum(f.timings.draft_accepted for _, f in runs["draft"])
    same = sum(a == b for (a, _), (b, _) in zip(runs["plain"], runs["draft"], strict=True))
    return {
        "draft_acceptance_rate": accepted / proposed if proposed else 0.0,
        "draft_speedup": draft_tps / plain_tps,
        "draft_target_tokens_per_s": plain_tps,
        "draft_speculative_tokens_per_s": draft_tps,
        "draft_identical_outputs": same / len(prompts),
        "draft_tokens": config.draft_tokens,
        "draft_prompts": len(prompts),
        "draft_target_plan": plan.key,
        "draft_threads": threads,
    }


def run_speculate(
    model: Any, tokenizer: Any, config: SpeculateConfig, ctx: StageContext
) -> StageOutcome:
    """The ``speculate`` stage: this version drafting for the run's parent."""
    prompts = _prompts(tokenizer, ctx, config.prompts)
    metrics = measure_speculation(model, ctx.load_parent(), tokenizer, prompts, config)
    return StageOutcome(model=model, metrics=metrics)


STAGE = StageSpec(
    name="speculate", config=SpeculateConfig, run=run_speculate, order=5, measures=True
)

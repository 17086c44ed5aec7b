"""`slimserve bench step`: where a decode step's milliseconds go, at batch 1 and 16.

    slimserve bench step [--model smollm2-135m-instruct@production] [--threads N] \\
        [--concurrency 1,16] [--draft ngram] [--new-tokens 128]

loads the model in this process on the plan `serve` would pick by default (qualification
off: the static choice), generates greedily from `slimserve.bench.serve.PROMPTS` with EOS
ignored, and prints per decode step the milliseconds spent proposing drafts, in the
model's forward pass, choosing tokens, emitting them (detokenization, stop checks, events)
and flushing, from `EngineStats.phase_s`, beside tokens/s; the prefill of arrivals (with
their first token) is shown per decode step too. With `--draft` it runs each
concurrency twice, without and with the drafter, interleaved.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from slimserve.bench.serve import PROMPTS
from slimserve.engine.types import PHASES


def _run(loaded: Any, prompts: list[str], new_tokens: int) -> float:
    """Generate from every prompt at once; returns the wall time in seconds."""
    from slimserve.engine.types import GenerationRequest, Prompt, SamplingParams, StopParams

    left = [len(prompts)]
    lock = threading.Lock()
    done = threading.Event()

    def sink(ev: Any) -> None:
        if ev.finish is not None or ev.error is not None:
            if ev.error is not None:
                print(f"error: {ev.error}")
            with lock:
                left[0] -= 1
                if not left[0]:
                    done.set()

    t0 = time.perf_counter()
    for i, text in enumerate(prompts):
        ids = tuple(loaded.tokenizer(text)["input_ids"])
        req = GenerationRequest(
            request_id=f"step-{i}",
            prompt=Prompt(ids=ids),
            sampling=SamplingParams(),
            stopping=StopParams(max_new_tokens=new_tokens, ignore_eos=True),
        )
        loaded.engine.submit(req, sink)
    done.wait()
    return time.perf_counter() - t0


def profile(loaded: Any, concurrency: int, new_tokens: int) -> dict[str, float]:
    """One run's figures: tokens/s, steps, and milliseconds per step in each phase."""
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(concurrency)]
    _run(loaded, prompts[:1], 8)  # warm-up
    before = loaded.engine.stats()
    wall = _run(loaded, prompts, new_tokens)
    after = loaded.engine.stats()
    steps = max(after.steps - before.steps, 1)
    tokens = after.generated_tokens - before.generated_tokens
    out = {"tok_s": tokens / wall, "steps": float(steps), "step_ms": wall * 1e3 / steps}
    for phase in PHASES:
        spent = after.phase_s.get(phase, 0.0) - before.phase_s.get(phase, 0.0)
        out[phase] = spent * 1e3 / steps
    proposed = after.draft_proposed - before.draft_proposed
    accepted = after.draft_accepted - before.draft_accepted
    out["acceptance"] = accepted / proposed if proposed else 0.0
    return out


def run_step_profile(
    registry_root: Path,
    model: str,
    *,
    threads: int,
    concurrency: list[int],
    new_tokens: int,
    draft: str | None = None,
    kv_layout: str = "auto",
    max_seq_len: int = 0,
) -> int:
    """Print the table (see module docstring); returns the exit code."""
    import torch

    from slimserve.engine.config import ModelConfig
    from slimserve.engine.loader import load, resolve_draft
    from slimserve.registry.store import Registry, parse_model_ref

    torch.set_num_threads(threads)
    registry = Registry(registry_root)
    name, ref = parse_model_ref(model)
    artifact = registry.get(name, ref)
    systems: dict[str, Any] = {}
    for label, spec in (("plain", None), ("draft", draft)):
        if label == "draft" and not spec:
            continue
        config = ModelConfig.of(
            device="cpu",
            max_batch=16,
            max_seq_len=max_seq_len,
            kv_layout=kv_layout,
            engine_process=False,
            qualify=False,
            draft=spec,
        )
        systems[label] = load(artifact, config, draft=resolve_draft(registry.root, config))
    info = systems["plain"].info
    print(f"{artifact.ref} on {info.kernels} [{info.plan}], {info.threads} threads "
          f"(torch {info.torch_threads}); ms per decode step:")  # fmt: skip
    head = "| system | conc | tok/s | steps | step ms | " + " | ".join(PHASES) + " | accepted |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    try:
        for c in concurrency:
            for label, loaded in systems.items():
                f = profile(loaded, c, new_tokens)
                phases = " | ".join(f"{f[ph]:.2f}" for ph in PHASES)
                print(
                    f"| {label} | {c} | {f['tok_s']:.1f} | {f['steps']:.0f} | {f['step_ms']:.2f}"
                    f" | {phases} | {f['acceptance']:.0%} |"
                )
        if "draft" in systems:
            print_policy(systems["draft"].engine)
    finally:
        for loaded in systems.values():
            loaded.engine.shutdown()
    print("other = step ms minus the phases: admission, expiry checks, the loop itself")
    return 0


def print_policy(engine: Any) -> None:
    """What the draft policy measured: the pass costs, and the acceptance a draft of k
    tokens needs on them to pay at batch 1 and at 16 (`spec_policy.break_even`)."""
    from slimserve.engine.spec_policy import break_even

    policy = getattr(engine, "policy", None)
    if policy is None:
        return
    costs = policy.costs
    print(f"forward pass by tokens in it: {costs.describe()}")
    for batch in (1, 16):
        needs = ", ".join(
            f"k={k}: {break_even(costs, k, batch):.2f}" for k in range(1, policy.max_tokens + 1)
        )
        print(f"acceptance a draft needs to pay at batch {batch} (free drafts): {needs}")
    print(
        f"adaptive policy: {policy.steps_drafted} steps drafted, {policy.steps_plain} plain; "
        f"acceptance {policy.acceptance:.2f}"
    )

"""Dev probe: LlamaBackend greedy decode speed, and agreement with transformers' generate().

    PYTHONPATH=. .venv/bin/python scripts/probe_llama_backend.py --model /tmp/probe/smol

First checks that the backend's greedy tokens equal `generate(do_sample=False)`'s (fp32).
Then prints, per (threads, dtype, weight_quant, weight layout, batch), the median over
`--repeats` runs of greedy tokens/s for `--new-tokens` tokens after a ~20-token prompt:
end to end (prefill + decode, aggregate over the batch) and over the decode steps only.
HF `generate()` fp32 at batch 1 is the baseline. Runs of the configurations (HF included)
are interleaved so that a noisy neighbour slows them alike.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from slimserve.engine.backends.llama import LlamaBackend, WeightQuant

PROMPT = "Here is a short story about a lighthouse keeper who finds a message in a bottle."
CHAT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True, slots=True, kw_only=True)
class Variant:
    dtype: str
    quant: WeightQuant
    packed: bool

    def label(self) -> str:
        layout = "int8 weights" if self.quant == "int8" else "packed" if self.packed else "dense"
        return f"backend {self.dtype} {layout}"


def greedy(
    backend: LlamaBackend, prompts: list[list[int]], new_tokens: int
) -> tuple[float, float, list[int]]:
    """Greedy-decode each prompt in its own slot, one batch. (e2e tok/s, decode tok/s, slot 0)."""
    slots = list(range(len(prompts)))
    start = time.perf_counter()
    last = [int(backend.prefill(s, p).argmax()) for s, p in zip(slots, prompts, strict=True)]
    decode_start = time.perf_counter()
    tokens = [last[0]]
    for _ in range(new_tokens - 1):
        last = backend.decode(slots, last).argmax(dim=-1).tolist()
        tokens.append(last[0])
    end = time.perf_counter()
    for s in slots:
        backend.release(s)
    n = len(prompts)
    return n * new_tokens / (end - start), n * (new_tokens - 1) / (end - decode_start), tokens


def hf_generate(
    model: Any, prompt: list[int], new_tokens: int, exact: bool
) -> tuple[float, list[int]]:
    """tok/s and tokens of `generate(do_sample=False)`; `exact` forbids stopping early."""
    ids = torch.tensor([prompt])
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens if exact else None,
        )
    elapsed = time.perf_counter() - start
    generated: list[int] = out[0, len(prompt) :].tolist()
    return len(generated) / elapsed, generated


def check_agreement(model: Any, prompt: list[int], n: int) -> None:
    _, expected = hf_generate(model, prompt, n, exact=False)
    backend = LlamaBackend.from_model(model, max_slots=1, max_seq_len=len(prompt) + n)
    ours = greedy(backend, [prompt], len(expected))[2]
    same = next((i for i, (a, b) in enumerate(zip(ours, expected, strict=True)) if a != b), None)
    verdict = "EQUAL" if same is None else f"DIFFER from token {same}"
    print(f"greedy {len(expected)} tokens after a {len(prompt)}-token chat prompt, fp32: {verdict}")


def probe(model: Any, prompt: list[int], variants: list[Variant], args: argparse.Namespace) -> None:
    """Time every variant (and HF generate at batch 1) per batch size, interleaved."""
    backends = {
        v.label(): LlamaBackend.from_model(
            model,
            max_slots=max(args.batches),
            max_seq_len=len(prompt) + args.new_tokens,
            dtype=DTYPES[v.dtype],
            weight_quant=v.quant,
            pack_weights=v.packed,
        )
        for v in variants
    }
    for backend in backends.values():
        greedy(backend, [prompt], 8)  # warm-up
    for batch in args.batches:
        # Same-length prompts that differ in their last token.
        prompts = [[*prompt[:-1], prompt[-1] + i] for i in range(batch)]
        runners: dict[str, Callable[[], tuple[float, float]]] = {
            label: functools.partial(_time_backend, backend, prompts, args.new_tokens)
            for label, backend in backends.items()
        }
        if batch == 1 and not args.skip_hf:
            runners["HF generate fp32 (eager)"] = functools.partial(
                _time_hf, model, prompt, args.new_tokens
            )
        runs: dict[str, list[tuple[float, float]]] = {label: [] for label in runners}
        for _, label in itertools.product(range(args.repeats), runners):
            runs[label].append(runners[label]())
        for label, rates in runs.items():
            e2e = statistics.median(r[0] for r in rates)
            dec = statistics.median(r[1] for r in rates)
            print(
                f"threads={torch.get_num_threads()} b={batch:2} {label:28}: "
                f"{e2e:6.1f} tok/s end-to-end, {dec:6.1f} decode-only",
                flush=True,
            )


def _time_backend(backend: LlamaBackend, prompts: list[list[int]], n: int) -> tuple[float, float]:
    e2e, dec, _ = greedy(backend, prompts, n)
    return e2e, dec


def _time_hf(model: Any, prompt: list[int], n: int) -> tuple[float, float]:
    rate = hf_generate(model, prompt, n, exact=True)[0]
    return rate, float("nan")  # generate() does not time its decode steps apart


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="/tmp/probe/smol")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    parser.add_argument("--quant", nargs="+", default=["none", "int8"], choices=["none", "int8"])
    parser.add_argument("--layouts", nargs="+", default=["packed"], choices=["packed", "dense"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--skip-check", action="store_true")
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    prompt: list[int] = tokenizer(PROMPT)["input_ids"]
    print(f"prompt {len(prompt)} tokens, {args.new_tokens} new tokens, median of {args.repeats}")
    if not args.skip_check:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": CHAT}], add_generation_prompt=True, tokenize=False
        )
        check_agreement(model, tokenizer(text, add_special_tokens=False)["input_ids"], 64)
    variants = [
        Variant(dtype=d, quant=q, packed=layout == "packed")
        for d, q, layout in itertools.product(args.dtypes, args.quant, args.layouts)
        if not (q == "int8" and layout == "dense")  # int8 has one layout
    ]
    for threads in args.threads:
        torch.set_num_threads(threads)
        probe(model, prompt, variants, args)


if __name__ == "__main__":
    main()

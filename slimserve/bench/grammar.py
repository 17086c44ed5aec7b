"""`slimserve bench grammar`: what structured output costs per token, beside the token pick.

    slimserve bench grammar [--model smollm2-135m-instruct@production] [--batch 16] \\
        [--repeats 5]

builds `slimserve.engine.structured.GrammarCompiler` on the model's tokenizer (no weights are
loaded) and, for three typical schemas (a verdict with an enum and a bounded array, a nested
record, and the $defs/$ref schema pydantic writes for OpenAI's structured-output example),
prints:

- compile time, cold (a compiler that has not seen the schema) and cached, each up to the
  first mask: what a request waits before its first constrained step;
- per token while walking a valid output (the schema's example, tokenized): filling the
  mask, checking one token (the greedy fast path), accepting the token, and writing -inf
  into a float32 logits row, beside the unconstrained pick (argmax over the same row) that
  every step pays anyway;
- per step for a batch of `--batch` sequences: masks filled one by one and in one parallel
  call, and the batch's logits masked;
- a speculative step's masks for a 4-token draft, in one call and token by token.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

VERDICT = {
    "type": "object",
    "properties": {
        "risk_level": {"enum": ["low", "medium", "high"]},
        "score": {"type": "number", "minimum": 0, "maximum": 1},
        "reasons": {"type": "array", "items": {"type": "string", "maxLength": 80},
                    "minItems": 1, "maxItems": 3},
        "flagged": {"type": "boolean"},
    },
    "required": ["risk_level", "score", "reasons", "flagged"],
}  # fmt: skip
RECORD = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "address": {
            "type": "object",
            "properties": {"street": {"type": "string"}, "city": {"type": "string"},
                           "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["street", "city", "zip"],
        },
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        "employed": {"type": "boolean"},
    },
    "required": ["name", "age", "address", "tags", "employed"],
}  # fmt: skip
STEPS = {
    "$defs": {"Step": {"type": "object", "title": "Step",
                       "properties": {"explanation": {"type": "string", "title": "Explanation"},
                                      "output": {"type": "string", "title": "Output"}},
                       "required": ["explanation", "output"], "additionalProperties": False}},
    "type": "object", "title": "MathReasoning",
    "properties": {"steps": {"type": "array", "items": {"$ref": "#/$defs/Step"}},
                   "final_answer": {"type": "string", "title": "Final Answer"}},
    "required": ["steps", "final_answer"], "additionalProperties": False,
}  # fmt: skip
#: name -> (schema, a valid output, as json.dumps writes it: properties in the schema's order,
#: which llguidance keeps).
SCHEMAS: dict[str, tuple[dict[str, Any], Any]] = {
    "verdict": (VERDICT, {"risk_level": "high", "score": 0.92,
                          "reasons": ["Amount is 14 times the card's median",
                                      "New merchant in a foreign country"],
                          "flagged": True}),
    "record": (RECORD, {"name": "Ada Lovelace", "age": 36,
                        "address": {"street": "12 St James's Square", "city": "London",
                                    "zip": "10001"},
                        "tags": ["mathematician", "writer"], "employed": False}),
    "steps ($ref)": (STEPS, {"steps": [
        {"explanation": "Start with the equation 8x + 7 = -23.", "output": "8x + 7 = -23"},
        {"explanation": "Subtract 7 from both sides.", "output": "8x = -30"},
        {"explanation": "Divide both sides by 8.", "output": "x = -3.75"}],
        "final_answer": "x = -3.75"}),
}  # fmt: skip
DRAFT = 4


def _us(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "mean": statistics.fmean(ordered) * 1e6,
        "p50": ordered[len(ordered) // 2] * 1e6,
        "p99": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1e6,
    }


def _timed(fn: Callable[..., Any], *args: Any) -> float:
    """Seconds `fn(*args)` took."""
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


class _Model:
    """What the bench needs of an artifact: its tokenizer.json, head width and EOS ids."""

    def __init__(self, registry: Path, ref: str) -> None:
        from tokenizers import Tokenizer

        from slimserve.engine.tokenizer import load_tokenizer
        from slimserve.registry.store import Registry, parse_model_ref

        artifact = Registry(registry).get(*parse_model_ref(ref))
        self.ref = artifact.ref
        self.tokenizer_json = artifact.path / "tokenizer.json"
        config = json.loads((artifact.path / "config.json").read_text())
        tok = load_tokenizer(artifact.path)
        self.vocab_size = max(int(config["vocab_size"]), len(tok))
        self.eos = [int(tok.eos_token_id)]
        self._backend = Tokenizer.from_file(str(self.tokenizer_json))

    def encode(self, text: str) -> list[int]:
        return list(self._backend.encode(text, add_special_tokens=False).ids)


def measure(registry: Path, ref: str, *, batch: int, repeats: int) -> dict[str, Any]:
    """Every figure of the module docstring, as a dict (times in µs unless named _ms)."""
    from slimserve.engine.structured import GrammarCompiler, GuidedSpec

    model = _Model(registry, ref)

    def new_compiler() -> GrammarCompiler:
        return GrammarCompiler.from_file(model.tokenizer_json, model.vocab_size, model.eos)

    out: dict[str, Any] = {"model": model.ref, "vocab_size": model.vocab_size}
    out["tokenizer_setup_ms"] = _timed(new_compiler) * 1e3
    specs = {k: GuidedSpec("json_schema", json.dumps(s)) for k, (s, _) in SCHEMAS.items()}
    out["compile_ms"] = _compile_ms(new_compiler, specs, repeats)
    compiler = new_compiler()
    grammars = {k: compiler.compile(spec) for k, spec in specs.items()}
    tokens = {k: [*model.encode(json.dumps(v)), model.eos[0]] for k, (_, v) in SCHEMAS.items()}
    out["per_token_us"] = _per_token(grammars, tokens, model.vocab_size, repeats)
    out["tokens_walked"] = repeats * sum(map(len, tokens.values()))
    out["batch"] = _batch(compiler, grammars, tokens, batch, repeats)
    out["draft"] = _draft(grammars["steps ($ref)"], tokens["steps ($ref)"], model.vocab_size)
    return out


def _compile_ms(new_compiler: Callable[[], Any], specs: dict[str, Any], repeats: int) -> Any:
    """Cold (a fresh compiler) and cached compile times up to the first mask, medians."""
    from slimserve.engine.structured import allocate_bitmask

    out = {}
    for name, spec in specs.items():
        cold, cached = [], []
        for _ in range(repeats):
            compiler = new_compiler()
            row = allocate_bitmask(1, compiler.vocab_size)
            cold.append(_timed(_first_mask, compiler, spec, row))
            cached.append(_timed(_first_mask, compiler, spec, row))
        out[name] = {
            "cold": statistics.median(cold) * 1e3,
            "cached": statistics.median(cached) * 1e3,
        }
    return out


def _first_mask(compiler: Any, spec: Any, row: Any) -> None:
    compiler.compile(spec).matcher().fill_bitmask(row)


def _per_token(
    grammars: dict[str, Any], tokens: dict[str, list[int]], vocab: int, repeats: int
) -> Any:
    """Mask, accept and apply per token along each schema's example, beside argmax."""
    import torch

    from slimserve.engine.structured import allocate_bitmask, apply_bitmask_

    row = allocate_bitmask(1, vocab)
    logits = torch.randn(vocab)
    fill, allows, accept, apply, pick = [], [], [], [], []
    for _ in range(repeats):
        for name, ids in tokens.items():
            m = grammars[name].matcher()
            for t in ids:
                fill.append(_timed(m.fill_bitmask, row))
                allows.append(_timed(m.allows, t))
                work = logits.clone().unsqueeze(0)
                apply.append(_timed(apply_bitmask_, work, row))
                pick.append(_timed(torch.argmax, logits))
                if not row[0, t // 32] >> (t % 32) & 1 or not m.accept(t):
                    raise RuntimeError(f"{name}: the grammar refused its own example at {t}")
                m.rollback(1)  # and again, timed
                accept.append(_timed(m.accept, t))
    return {"fill": _us(fill), "allows (greedy check)": _us(allows), "accept": _us(accept),
            "apply": _us(apply), "pick (no grammar)": _us(pick)}  # fmt: skip


def _batch(compiler: Any, grammars: dict[str, Any], tokens: dict[str, list[int]], batch: int,
           repeats: int) -> Any:  # fmt: skip
    """One step of `batch` sequences spread over the schemas and their outputs."""
    import torch

    from slimserve.engine.structured import allocate_bitmask, apply_bitmask_

    names = list(tokens)
    seqs = []
    for i in range(batch):
        ids = tokens[names[i % len(names)]]
        m = grammars[names[i % len(names)]].matcher()
        for t in ids[: i % (len(ids) - 1)]:
            m.accept(t)
        seqs.append(m)
    masks = allocate_bitmask(batch, compiler.vocab_size)
    rows = torch.randn(batch, compiler.vocab_size)
    n = repeats * 10

    def one_by_one() -> None:
        for i, m in enumerate(seqs):
            m.fill_bitmask(masks, i)

    return {
        "size": batch,
        "fill one by one": _us([_timed(one_by_one) for _ in range(n)]),
        "fill parallel": _us(
            [_timed(lambda: compiler.fill_bitmasks(seqs, masks)) for _ in range(n)]
        ),
        "apply": _us([_timed(lambda: apply_bitmask_(rows.clone(), masks)) for _ in range(n)]),
        "pick (no grammar)": _us([_timed(lambda: torch.argmax(rows, dim=-1)) for _ in range(n)]),
    }


def _draft(grammar: Any, ids: list[int], vocab: int) -> Any:
    """The masks a verify step needs for a DRAFT-token draft: one call, or token by token."""
    from slimserve.engine.structured import allocate_bitmask

    rows = allocate_bitmask(DRAFT + 1, vocab)
    one_call, stepwise = [], []
    for start in range(0, len(ids) - DRAFT - 1, 3):
        m = grammar.matcher()
        for t in ids[:start]:
            m.accept(t)
        draft = ids[start : start + DRAFT]
        one_call.append(_timed(m.fill_draft_bitmasks, draft, rows))

        def by_token(m: Any = m, d: list[int] = draft) -> None:
            for i, t in enumerate(d):
                m.fill_bitmask(rows, i)
                m.accept(t)
            m.fill_bitmask(rows, len(d))
            m.rollback(len(d))

        stepwise.append(_timed(by_token))
    return {"tokens": DRAFT, "one call": _us(one_call), "token by token": _us(stepwise)}


def markdown(r: dict[str, Any]) -> str:
    t = r["per_token_us"]
    lines = [
        f"model: {r['model']} (vocabulary {r['vocab_size']}); tokenizer setup "
        f"{r['tokenizer_setup_ms']:.0f} ms; {r['tokens_walked']} tokens walked",
        "",
        "| schema | compile cold ms | compile cached ms |",
        "| --- | --- | --- |",
        *(f"| {k} | {v['cold']:.2f} | {v['cached']:.3f} |" for k, v in r["compile_ms"].items()),
        "",
        "| per token (batch 1), µs | mean | p50 | p99 |",
        "| --- | --- | --- | --- |",
        *(f"| {k} | {v['mean']:.1f} | {v['p50']:.1f} | {v['p99']:.1f} |" for k, v in t.items()),
    ]
    masked = sum(t[k]["mean"] for k in ("fill", "apply", "accept"))
    checked = t["allows (greedy check)"]["mean"] + t["accept"]["mean"]
    lines += [
        "",
        f"grammar per token: {masked:.1f} µs masked (sampling, or a greedy pick the grammar "
        f"refused), {checked:.1f} µs when the greedy pick is allowed",
        "",
    ]
    b = r["batch"]
    lines += [
        f"| batch of {b['size']}, per step, µs | mean | p50 | p99 |",
        "| --- | --- | --- | --- |",
    ]
    lines += [f"| {k} | {v['mean']:.1f} | {v['p50']:.1f} | {v['p99']:.1f} |"
              for k, v in b.items() if k != "size"]  # fmt: skip
    d = r["draft"]
    lines += ["", f"| masks for a {d['tokens']}-token draft, µs | mean | p50 | p99 |",
              "| --- | --- | --- | --- |"]  # fmt: skip
    lines += [f"| {k} | {v['mean']:.1f} | {v['p50']:.1f} | {v['p99']:.1f} |"
              for k, v in d.items() if k != "tokens"]  # fmt: skip
    return "\n".join(lines)


def run(
    registry: Path, ref: str, *, batch: int, repeats: int, threads: int, json_out: Path | None
) -> int:
    import torch

    from slimserve.engine.machine import cpu_info

    torch.set_num_threads(threads)
    load = os.getloadavg()[0]
    result = measure(registry, ref, batch=batch, repeats=repeats)
    result.update(cpu=cpu_info().model, cores=os.cpu_count(), load_before=load,
                  load_after=os.getloadavg()[0], threads=threads)  # fmt: skip
    print(f"command: {' '.join(sys.argv)}")
    print(
        f"cpu: {result['cpu']} ({result['cores']} cores), torch threads {threads}, "
        f"load average {load:.2f} before, {result['load_after']:.2f} after"
    )
    print(markdown(result))
    if json_out is not None:
        json_out.write_text(json.dumps(result, indent=2))
    return 0

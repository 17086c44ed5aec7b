"""Evaluation: perplexity in and out of domain, agreement with the parent, size and speed.

The recipe's ``evaluate`` stage, which measures the saved artifact and changes nothing.
Every version is judged on two texts: the held-out split of the training source (in
domain; the pydoc ``eval`` split unless the run names one) and CPython's own ``LICENSE.txt``
(out of domain: legal prose that ships with every CPython and that no training path may use,
which ``check_evaluate`` enforces before any work). Each perplexity comes with the parent's
on the same text and the ratio, so a pruned version that forgets what it was not trained on
shows it. An instruct model (one with a chat template) is also compared with its parent on
held-out teacher generations: next-token top-1 agreement and mean KL(parent ‖ version) over
the generated positions. The version runs through the backend the server would choose
(``served_*`` figures and the agreement, when ``speed_tokens`` builds it) as well as its own
forward; the parent, the reference, runs its own float32 forward.

Metric keys: in-domain ones are plain (``perplexity``, ``parent_perplexity``,
``perplexity_ratio``, ``served_perplexity``, ``served_perplexity_ratio``, ``eval_text``,
``eval_text_sha256``, ``eval_tokens``); out-of-domain ones are the same with ``ood_`` in front;
agreement ones start with ``agreement_``.

Imports ``.data``, ``.errors``, ``.stage``; the engine inside ``served_backend`` and
``decode_speed``; ``.teacher_data`` inside ``run_evaluate``.
"""

from __future__ import annotations

import logging
import math
import platform
import sysconfig
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F  # noqa: N812  # torch's own convention

from slimserve.compression.data import (
    TextSource,
    load_text_file,
    pydoc_topics,
    text_source,
    token_chunks,
)
from slimserve.compression.errors import CompressionError
from slimserve.compression.stage import StageConfig, StageContext, StageOutcome, StageSpec

if TYPE_CHECKING:
    from slimserve.compression.teacher_data import TeacherRow, TeacherText

log = logging.getLogger(__name__)

_SPEED_PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
# Out-of-domain text is refused for training when any window this long of it is found there.
_OVERLAP_CHARS = 200

#: (row, start) -> (len(row) - start, vocab) float32 logits that predict row[start:].
LogitsFn = Callable[[Sequence[int], int], torch.Tensor]


@dataclass(frozen=True, slots=True, kw_only=True)
class EvaluateConfig(StageConfig):
    seq_len: int = 256
    max_chunks: int = 32
    #: Tokens generated for the speed measurement (greedy, EOS ignored); 0 skips it and the
    #: serving backend (no ``served_*`` figures; agreement then runs the version's forward).
    speed_tokens: int = 128
    #: Speed runs; the median is reported.
    speed_repeats: int = 3
    #: Held-out teacher generations compared with the parent (instruct models); 0 skips it.
    agreement_rows: int = 16
    #: Generated tokens compared per row (its first ones). The serving backend decodes them
    #: one at a time, as it serves: 16 x 32 positions take seconds on an idle CPU, minutes
    #: when other work crowds llama.cpp's threads; top-1 agreement near 0.95 is then known to
    #: about +-0.01.
    agreement_tokens: int = 32

    def validate(self) -> None:
        for name, low in (
            ("seq_len", 8),
            ("max_chunks", 1),
            ("speed_tokens", 0),
            ("speed_repeats", 1),
            ("agreement_rows", 0),
            ("agreement_tokens", 1),
        ):
            if getattr(self, name) < low:
                raise ValueError(f"{name}={getattr(self, name)} must be >= {low}")


def eval_source(path: Path | None) -> TextSource:
    return load_text_file(path) if path is not None else pydoc_topics("eval")


def ood_source() -> TextSource:
    """CPython's ``LICENSE.txt`` from the running interpreter's standard library.

    The name records the Python version (the text changes between releases), e.g.
    ``cpython:LICENSE.txt@3.11.7``.

    Raises:
        CompressionError: this install has no ``LICENSE.txt`` beside its standard library.
    """
    path = Path(sysconfig.get_path("stdlib")) / "LICENSE.txt"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CompressionError(
            f"no out-of-domain text: cannot read {path} ({exc}); evaluate with an interpreter "
            "whose standard library ships its LICENSE.txt"
        ) from exc
    return text_source(f"cpython:LICENSE.txt@{platform.python_version()}", text)


def check_unseen(ood: TextSource, train: TextSource) -> None:
    """Raise ValueError when ``train`` holds the start of any paragraph of ``ood`` (its first
    ``_OVERLAP_CHARS`` characters; paragraphs shorter than half that are too common to tell)."""
    for paragraph in ood.text.split("\n\n"):
        window = paragraph.strip()[:_OVERLAP_CHARS]
        if len(window) >= _OVERLAP_CHARS // 2 and window in train.text:
            raise ValueError(
                f"the training text {train.name} contains part of {ood.name}, the "
                "out-of-domain evaluation text; train on text without it"
            )


@torch.inference_mode()
def perplexity(model: Any, chunks: torch.Tensor) -> tuple[float, int]:
    """exp(mean next-token NLL) over (N, T) token chunks; returns (ppl, tokens scored)."""
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for row in chunks:
        ids = row.unsqueeze(0).to(device)
        logits = model(input_ids=ids).logits.float()  # (1, T, vocab)
        nll = F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
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


def model_logits(model: Any) -> LogitsFn:
    """A model's own forward as a `LogitsFn`: one pass over the whole row."""
    device = next(model.parameters()).device

    @torch.inference_mode()
    def logits(row: Sequence[int], start: int) -> torch.Tensor:
        ids = torch.tensor([list(row)], device=device)
        out: torch.Tensor = model(input_ids=ids).logits[0, start - 1 : -1]  # (G, vocab)
        return out.float().cpu()

    return logits


def backend_logits(backend: Any) -> LogitsFn:
    """A serving backend as a `LogitsFn`, the way it serves: prefill the prompt, then decode
    the generated tokens one by one (teacher-forced) in slot 0."""

    @torch.inference_mode()
    def logits(row: Sequence[int], start: int) -> torch.Tensor:
        out = [backend.prefill(0, list(row[:start])).float().cpu()]
        try:
            for token in row[start:-1]:
                out.append(backend.decode([0], [int(token)])[0].float().cpu())
        finally:
            backend.release(0)
        return torch.stack(out)  # (G, vocab)

    return logits


@dataclass(frozen=True, slots=True, kw_only=True)
class Agreement:
    """A version against its parent over the generated positions of some rows."""

    top1: float  # share of positions where both rank the same token first
    kl: float  # mean KL(parent ‖ version) per position, nats, at temperature 1
    positions: int
    rows: int


def agreement(
    parent: LogitsFn, version: LogitsFn, rows: Sequence[Sequence[int]], starts: Sequence[int]
) -> Agreement:
    """Top-1 agreement and mean KL(parent ‖ version) over the generated positions of `rows`.

    Row ``i`` is prompt + generation; generation starts at ``starts[i]``, so the positions
    compared are the predictions of ``rows[i][starts[i]:]``.

    Raises:
        ValueError: no rows, lengths that differ, or a start outside ``[1, len(row) - 1]``.
    """
    if not rows or len(rows) != len(starts):
        raise ValueError(f"{len(rows)} rows and {len(starts)} starts; give one start per row")
    same, kl, positions = 0, 0.0, 0
    for row, start in zip(rows, starts, strict=True):
        if not 1 <= start < len(row):
            raise ValueError(
                f"start {start} is outside [1, {len(row) - 1}] for a row of {len(row)}"
            )
        p_logp = F.log_softmax(parent(row, start), dim=-1)  # (G, vocab)
        q_logp = F.log_softmax(version(row, start), dim=-1)
        same += int((p_logp.argmax(-1) == q_logp.argmax(-1)).sum())
        kl += float(F.kl_div(q_logp, p_logp, log_target=True, reduction="sum"))
        positions += p_logp.shape[0]
    return Agreement(top1=same / positions, kl=kl / positions, positions=positions, rows=len(rows))


def teacher_rows(
    heldout: Sequence[TeacherRow], limit: int, tokens: int
) -> tuple[list[list[int]], list[int]]:
    """(rows, starts) of the first `limit` held-out teacher rows that generated something;
    each row is its ``prompt_ids`` then the first `tokens` of its ``generated_ids``
    (``teacher_data.TeacherRow``)."""
    kept = [r for r in heldout if r.generated_ids][:limit]
    rows = [[*r.prompt_ids, *r.generated_ids[:tokens]] for r in kept]
    return rows, [len(r.prompt_ids) for r in kept]


def is_instruct(tokenizer: Any) -> bool:
    """Whether the tokenizer carries a chat template (an instruct model's)."""
    return bool(getattr(tokenizer, "chat_template", None))


def served_backend(model: Any, tokenizer: Any, max_seq_len: int) -> Any:
    """The backend the server would choose for `model`, one slot of `max_seq_len` tokens."""
    from slimserve.engine.backends.select import build_backend
    from slimserve.engine.config import ModelConfig

    with tempfile.TemporaryDirectory(prefix="slimserve-eval-") as tmp:
        tokenizer.save_pretrained(tmp)  # tokenizer.json: what a GGUF export needs
        backend = build_backend(
            model,
            ModelConfig.of(device="cpu", max_batch=1),
            max_seq_len,
            Path(tmp) / "tokenizer.json",
        )
    return backend


def decode_speed(backend: Any, tokenizer: Any, config: EvaluateConfig) -> dict[str, Any]:
    """Greedy decode tokens/s and time to first token through the serving engine."""
    from slimserve.engine.scheduler import Engine
    from slimserve.engine.types import GenerationRequest, Prompt, SamplingParams, StopParams

    ids = tuple(tokenizer(_SPEED_PROMPT)["input_ids"])
    engine = Engine(backend, tokenizer)
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
                prompt=Prompt(ids=ids),
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
    }


@dataclass(frozen=True, slots=True, kw_only=True)
class Generations:
    """Held-out teacher generations: rows (prompt + generation), where each generation
    starts, and the dataset they come from (name and sha256)."""

    rows: list[list[int]]
    starts: list[int]
    source: str
    digest: str


def evaluate(
    model: Any,
    tokenizer: Any,
    config: EvaluateConfig,
    *,
    text: Path | None = None,
    model_bytes: int | None = None,
    parent: Any | None = None,
    generations: Generations | None = None,
) -> dict[str, Any]:
    """Every metric a manifest records (keys: see the module docstring).

    `model_bytes`: size on disk, when known. With a `parent` (a float32 reference model):
    its perplexity on both texts, the ratios and, with `generations`, the agreement.

    Raises:
        CompressionError: no out-of-domain text in this install (see `ood_source`).
        ValueError: a text shorter than one chunk, or bad `generations` (see `agreement`).
    """
    from slimserve.registry.artifact import count_parameters

    t0 = time.perf_counter()
    texts = {"": eval_source(text), "ood_": ood_source()}
    chunks = {
        k: token_chunks(tokenizer, s.text, config.seq_len, config.max_chunks)
        for k, s in texts.items()
    }
    out: dict[str, Any] = {}
    for key, source in texts.items():
        ppl, n = perplexity(model, chunks[key])
        out |= {
            f"{key}perplexity": ppl,
            f"{key}eval_tokens": n,
            f"{key}eval_text": source.name,
            f"{key}eval_text_sha256": source.digest,
        }
        if parent is not None:
            out[f"{key}parent_perplexity"] = perplexity(parent, chunks[key])[0]
    out |= {"parameters": count_parameters(model), "device": str(next(model.parameters()).device)}
    if model_bytes is not None:
        out["bytes"] = model_bytes
    if config.speed_tokens:
        longest = max([config.seq_len + 1, *(len(r) + 1 for r in _rows(generations))])
        backend = served_backend(model, tokenizer, longest + config.speed_tokens + 64)
        for key in texts:
            out[f"{key}served_perplexity"] = served_perplexity(backend, chunks[key])
        out |= _agreement(parent, backend_logits(backend), backend.name, generations)
        out |= decode_speed(backend, tokenizer, config)
    else:
        out |= _agreement(parent, model_logits(model), "torch", generations)
    out |= _ratios(out, texts)
    out["eval_seconds"] = time.perf_counter() - t0
    return out


def _rows(generations: Generations | None) -> list[list[int]]:
    return [] if generations is None else generations.rows


def _agreement(
    parent: Any, version: LogitsFn, forward: str, generations: Generations | None
) -> dict[str, Any]:
    if parent is None or generations is None or not generations.rows:
        return {}
    found = agreement(model_logits(parent), version, generations.rows, generations.starts)
    return {f"agreement_{k}": v for k, v in asdict(found).items()} | {
        "agreement_forward": forward,
        "agreement_data": generations.source,
        "agreement_data_sha256": generations.digest,
    }


def _ratios(out: dict[str, Any], texts: dict[str, TextSource]) -> dict[str, float]:
    ratios = {}
    for key in texts:
        base = out.get(f"{key}parent_perplexity")
        if base is None:
            continue
        for name in ("perplexity", "served_perplexity"):
            if f"{key}{name}" in out:
                ratios[f"{key}{name}_ratio"] = out[f"{key}{name}"] / base
    return ratios


def generations_of(data: TeacherText, config: EvaluateConfig) -> Generations:
    """`Generations` of a ``teacher_data.TeacherText``'s held-out rows, as many rows and
    tokens as `config` compares."""
    rows, starts = teacher_rows(data.heldout, config.agreement_rows, config.agreement_tokens)
    return Generations(rows=rows, starts=starts, source=data.artifact.ref, digest=data.digest)


def stage_generations(
    ctx: StageContext, tokenizer: Any, config: EvaluateConfig, parent: Any
) -> Generations | None:
    """The run's held-out teacher generations for an instruct model, or None (not an
    instruct model, agreement off, or a run that offers no teacher text). The parent
    generates them when the registry has none for it yet (once; kept in the registry)."""
    if not config.agreement_rows or not is_instruct(tokenizer) or ctx.teacher_text is None:
        return None
    from slimserve.compression.teacher_data import TeacherTextConfig

    # The held-out rows only: a full dataset when one is stored, else just those rows
    # (about a tenth of the prompts) are generated.
    data = ctx.teacher_text(
        TeacherTextConfig(split="heldout"), teacher=parent, progress=ctx.progress
    )
    return generations_of(data, config)


def run_evaluate(
    model: Any, tokenizer: Any, config: EvaluateConfig, ctx: StageContext
) -> StageOutcome:
    """The ``evaluate`` stage: every metric, against the parent, on the saved artifact."""
    parent = ctx.load_parent()
    metrics = evaluate(
        model,
        tokenizer,
        config,
        text=ctx.eval_text,
        model_bytes=ctx.model_bytes,
        parent=parent,
        generations=stage_generations(ctx, tokenizer, config, parent),
    )
    return StageOutcome(model=model, metrics=metrics)


def check_evaluate(config: EvaluateConfig, ctx: StageContext) -> None:
    """Before any work: the out-of-domain text exists and is not in the training text."""
    try:
        ood = ood_source()
    except CompressionError as exc:
        raise ValueError(str(exc)) from exc
    check_unseen(ood, ctx.train)


STAGE = StageSpec(
    name="evaluate",
    config=EvaluateConfig,
    run=run_evaluate,
    order=4,
    check=check_evaluate,
    measures=True,
)

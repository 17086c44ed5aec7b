"""Text the teacher writes itself, generated once and kept in the registry as a dataset.

A pruned student distilled only on one narrow text (the Python docs) forgets what the
parent knew elsewhere. Distilling on the parent's own answers to varied prompts carries
that knowledge over: ``prompts/teacher.jsonl`` ships a few hundred prompts (everyday
questions, instructions, stories, lists, numbers and dates, code, several registers), each
wrapped in the tokenizer's chat template when the model has one, answered by the teacher
through slimserve's own engine (continuous batching, one fixed sampling seed per prompt)
and published once in ``registry.datasets`` under the teacher's name. The manifest records
the teacher (ref and digest), the prompts' sha256, the sampling parameters, the token counts
and a key over all of them; a later run with the same key (a resume, a rerun, another
recipe) finds the dataset and never generates again.

Each prompt falls in ``train`` or ``heldout`` by a hash of its text, so the split stays put
when prompts are added; held-out rows let an evaluation measure agreement with the teacher
on answers no student trained on.

Imports the registry, the engine (inside ``generate_rows``), ``.progress`` and ``.training``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Protocol

import torch

from slimserve.compression.progress import Progress, ProgressEvent
from slimserve.compression.stage import check_float, check_int
from slimserve.compression.training import derive_seed
from slimserve.registry.store import Artifact, Registry, sha256_file

log = logging.getLogger(__name__)

#: Bumped when the stored layout or what the key covers changes.
FORMAT = 1
DATASET_TYPE = "teacher-text"
ROWS_FILE = "rows.safetensors"
PROMPTS_FILE = "prompts.jsonl"
Split = Literal["train", "heldout"]


@dataclass(frozen=True, slots=True, kw_only=True)
class TeacherTextConfig:
    """Which prompts, and how the teacher answers them.

    ``prompts``: the first N of the shipped set (0 = all; the file interleaves its
    categories, so any prefix is varied). ``heldout_fraction``: share of prompts kept out of
    training, by a hash of the prompt text. ``max_batch`` and ``backend`` decide only how
    fast the text is made (the torch ``llama`` backend gives the same tokens however
    requests are batched), so they stay out of the dataset's key. ``split="heldout"``: only
    the held-out prompts' rows, the same ones a full dataset holds (each row's seed is its
    prompt's index); what evaluation needs, a tenth of the cost when no full set exists yet.
    """

    prompts: int = 0
    max_new_tokens: int = 192
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 0
    seed: int = 0
    heldout_fraction: float = 0.1
    max_batch: int = 16
    backend: Literal["llama", "auto"] = "llama"
    split: Literal["all", "heldout"] = "all"

    def __post_init__(self) -> None:
        check_int("prompts", self.prompts, minimum=0)
        check_int("max_new_tokens", self.max_new_tokens, minimum=1)
        check_float("temperature", self.temperature, low=0.0, low_open=True)
        check_float("top_p", self.top_p, low=0.0, high=1.0, low_open=True)
        check_int("top_k", self.top_k, minimum=0)
        check_int("seed", self.seed, minimum=0)
        check_float("heldout_fraction", self.heldout_fraction, low=0.0, high=0.5)
        check_int("max_batch", self.max_batch, minimum=1)
        if self.backend not in ("llama", "auto"):
            raise ValueError(f"backend={self.backend!r} is not known; use 'llama' or 'auto'")
        if self.split not in ("all", "heldout"):
            raise ValueError(f"split={self.split!r} is not known; use 'all' or 'heldout'")

    def generation(self) -> dict[str, Any]:
        """The parameters that decide the text (part of the key)."""
        keys = ("max_new_tokens", "temperature", "top_p", "top_k", "seed", "heldout_fraction")
        return {k: getattr(self, k) for k in keys}


@dataclass(frozen=True, slots=True, kw_only=True)
class TeacherRow:
    """One prompt and the teacher's answer."""

    index: int  # position in the shipped prompt set
    prompt: str  # the prompt text, before the chat template
    prompt_ids: tuple[int, ...]  # what the teacher saw (chat template applied)
    generated_ids: tuple[int, ...]  # its sampled answer; ends in EOS when it stopped there
    seed: int  # the sampling seed of this row


@dataclass(frozen=True, slots=True)
class TeacherText:
    """A stored teacher-text dataset, read back and verified."""

    artifact: Artifact
    train: tuple[TeacherRow, ...]
    heldout: tuple[TeacherRow, ...]

    @property
    def digest(self) -> str:
        return self.artifact.digest

    def record(self) -> dict[str, Any]:
        """What a model's manifest says of the dataset it trained on."""
        d = self.artifact.manifest.dataset
        return {
            "dataset": self.artifact.ref,  # in registry.datasets
            "digest": self.artifact.digest,
            "teacher": d.get("teacher"),
            "sha256": d.get("sha256"),
            "prompts_sha256": d.get("prompts", {}).get("sha256"),
            "tokens": d.get("tokens"),
        }


class TeacherTextSource(Protocol):
    """What a recipe run offers stages (``StageContext.teacher_text``): the run's teacher
    text for a config, made on first use and read from the registry after. ``teacher``: the
    parent already loaded (saves loading it again when generation is needed)."""

    def __call__(
        self,
        config: TeacherTextConfig,
        *,
        teacher: Any = None,
        progress: Progress | None = None,
    ) -> TeacherText: ...


# ---- prompts ---------------------------------------------------------------------------------
def shipped_prompts() -> tuple[str, ...]:
    """Every prompt of ``slimserve/compression/prompts/teacher.jsonl``, in file order."""
    path = resources.files("slimserve.compression") / "prompts" / "teacher.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines()
    return tuple(json.loads(line)["text"] for line in lines if line.strip())


def select_prompts(config: TeacherTextConfig) -> tuple[str, ...]:
    """The prompts ``config`` asks for.

    Raises:
        ValueError: more prompts asked than the set holds.
    """
    every = shipped_prompts()
    if config.prompts > len(every):
        raise ValueError(
            f"prompts={config.prompts} is more than the {len(every)} shipped; use at most "
            f"{len(every)} (0 = all)"
        )
    return every[: config.prompts] if config.prompts else every


def wanted(prompts: Sequence[str], config: TeacherTextConfig) -> list[int]:
    """Indices of the prompts whose rows ``config`` asks for (all, or the held-out ones)."""
    if config.split == "all":
        return list(range(len(prompts)))
    return [i for i, p in enumerate(prompts) if split_of(p, config.heldout_fraction) == "heldout"]


def prompts_digest(prompts: Sequence[str]) -> str:
    """sha256 of the prompts, in order."""
    return hashlib.sha256(json.dumps(list(prompts), ensure_ascii=False).encode()).hexdigest()


def split_of(prompt: str, heldout_fraction: float) -> Split:
    """``heldout`` for about ``heldout_fraction`` of prompts, by a hash of the text."""
    bucket = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big") % 10_000
    return "heldout" if bucket < round(heldout_fraction * 10_000) else "train"


def dataset_key(teacher: Artifact, prompts: Sequence[str], config: TeacherTextConfig) -> str:
    """What makes two teacher texts the same: the teacher, the prompts, the generation."""
    raw = {
        "format": FORMAT,
        "type": DATASET_TYPE,
        "teacher": teacher.digest,
        "prompts": prompts_digest(prompts),
        "generation": config.generation(),
    }
    if config.split != "all":  # a full dataset keeps the key it always had
        raw["split"] = config.split
    return hashlib.sha256(json.dumps(raw, sort_keys=True).encode()).hexdigest()


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """The prompt in the tokenizer's chat template (with the assistant's turn opened) when
    it has one, else the plain text; the ids the teacher is given."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(tokenizer.encode(text, add_special_tokens=False))
    return list(tokenizer.encode(prompt, add_special_tokens=True))


# ---- generation ------------------------------------------------------------------------------
def generate_rows(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    config: TeacherTextConfig,
    progress: Progress | None = None,
    *,
    indices: Sequence[int] | None = None,
) -> list[TeacherRow]:
    """Answer every prompt (or those at ``indices``) with ``model`` through the serving
    engine's continuous batch.

    The row of prompt i samples with ``derive_seed(config.seed, "teacher", i)``, so each
    answer depends on its prompt and seed only. ``progress`` gets a ``"teacher text"`` event
    per answer.

    Raises:
        CompressionError: the engine failed a request.
    """
    from slimserve.engine.types import Event

    at = list(range(len(prompts))) if indices is None else list(indices)
    encoded = [encode_prompt(tokenizer, prompts[i]) for i in at]
    seeds = [derive_seed(config.seed, "teacher", i) for i in at]
    prompts = [prompts[i] for i in at]
    longest = max(len(ids) for ids in encoded) + config.max_new_tokens + 1
    engine = _engine(model, tokenizer, config, longest, len(prompts))
    finished: queue.Queue[tuple[int, Event]] = queue.Queue()
    tokens: list[list[int]] = [[] for _ in prompts]
    engine.start()
    try:
        for i, ids in enumerate(encoded):

            def sink(ev: Event, i: int = i) -> None:  # runs on the engine's thread
                tokens[i].extend(ev.token_ids)
                if ev.finish is not None or ev.error is not None:
                    finished.put((i, ev))

            engine.submit(_request(i, ids, seeds[i], config), sink)
        _wait(finished, len(prompts), progress)
    finally:
        engine.shutdown()
    return [
        TeacherRow(
            index=at[i],
            prompt=p,
            prompt_ids=tuple(encoded[i]),
            generated_ids=tuple(tokens[i]),
            seed=seeds[i],
        )
        for i, p in enumerate(prompts)
    ]


def _engine(model: Any, tokenizer: Any, config: TeacherTextConfig, longest: int, n: int) -> Any:
    """An in-process engine over ``model`` (as evaluation builds one), ``n`` requests deep."""
    import tempfile

    from slimserve.engine.backends.select import build_backend
    from slimserve.engine.config import EngineConfig, ModelConfig
    from slimserve.engine.scheduler import Engine

    on_cuda = next(model.parameters()).device.type == "cuda"
    cfg = ModelConfig.of(
        device="cuda" if on_cuda else "cpu",
        backend=config.backend,
        max_batch=min(config.max_batch, n),
    )
    with tempfile.TemporaryDirectory(prefix="slimserve-teacher-") as tmp:
        tokenizer.save_pretrained(tmp)  # tokenizer.json: what a GGUF export needs
        backend = build_backend(model, cfg, longest, Path(tmp) / "tokenizer.json")
    return Engine(backend, tokenizer, EngineConfig(max_queue=n))


def _request(i: int, ids: list[int], seed: int, config: TeacherTextConfig) -> Any:
    from slimserve.engine.types import GenerationRequest, Prompt, SamplingParams, StopParams

    sampling = SamplingParams(
        do_sample=True,
        temperature=config.temperature,
        top_k=config.top_k,
        top_p=config.top_p,
        seed=seed,
    )
    return GenerationRequest(
        request_id=f"teacher-{i}",
        prompt=Prompt(ids=tuple(ids)),
        sampling=sampling,
        stopping=StopParams(max_new_tokens=config.max_new_tokens),
    )


def _wait(finished: queue.Queue[tuple[int, Any]], n: int, progress: Progress | None) -> None:
    """Take ``n`` finishes off ``finished``, reporting each (on the caller's thread)."""
    from slimserve.compression.errors import CompressionError

    t0 = time.monotonic()
    for done in range(1, n + 1):
        i, ev = finished.get()
        if ev.error is not None:
            raise CompressionError(f"the teacher failed on prompt {i}: {ev.error}")
        if progress is not None:
            elapsed = time.monotonic() - t0
            progress(ProgressEvent(stage="teacher text", done=done, total=n, elapsed_s=elapsed))


# ---- the registry ----------------------------------------------------------------------------
def find_teacher_text(
    registry: Registry, teacher: Artifact, config: TeacherTextConfig
) -> Artifact | None:
    """The stored dataset of this teacher, prompts and generation, or None. For the held-out
    rows alone, a full dataset of the same prompts holds them too and is preferred."""
    prompts = select_prompts(config)
    keys = [dataset_key(teacher, prompts, config)]
    if config.split != "all":
        keys.insert(0, dataset_key(teacher, prompts, replace(config, split="all")))
    store = registry.datasets
    found: dict[str, Artifact] = {}
    for version in store.versions(teacher.name):
        art = store.get(teacher.name, str(version))
        key = art.manifest.dataset.get("key")
        if key in keys and key not in found:
            found[key] = art
    return next((found[k] for k in keys if k in found), None)


def teacher_text(
    registry: Registry,
    teacher: Artifact,
    config: TeacherTextConfig,
    *,
    model: Any = None,
    device: str = "cpu",
    progress: Progress | None = None,
) -> TeacherText:
    """The teacher's text for ``config``: read from ``registry.datasets`` when stored, else
    generated (with ``model``, or the teacher loaded on ``device``) and published first.

    Raises:
        IntegrityError: the stored dataset fails its checksums.
        ValueError: ``config`` asks for more prompts than the shipped set holds.
    """
    found = find_teacher_text(registry, teacher, config)
    if found is not None:
        log.info("teacher text %s reused (%s)", found.ref, found.digest[:12])
        return load_teacher_text(found)
    from transformers import AutoTokenizer

    from slimserve.registry.artifact import load_model

    prompts = select_prompts(config)
    indices = wanted(prompts, config)
    if not indices:
        raise ValueError(f"none of the {len(prompts)} prompts asked for is held out")
    tokenizer = AutoTokenizer.from_pretrained(teacher.path)
    if model is None:
        model, _ = load_model(teacher, device=device, dtype=torch.float32)
    t0 = time.perf_counter()
    rows = generate_rows(model, tokenizer, prompts, config, progress, indices=indices)
    seconds = time.perf_counter() - t0
    art = publish_teacher_text(
        registry, teacher, prompts, config, rows, tokenizer=tokenizer, seconds=seconds
    )
    log.info("teacher text %s published (%d rows, %.0f s)", art.ref, len(rows), seconds)
    return load_teacher_text(art)


def publish_teacher_text(
    registry: Registry,
    teacher: Artifact,
    prompts: Sequence[str],
    config: TeacherTextConfig,
    rows: Sequence[TeacherRow],
    *,
    tokenizer: Any,
    seconds: float,
) -> Artifact:
    """Write ``rows`` as the next version of ``registry.datasets``' ``teacher.name``."""
    from safetensors.torch import save_file

    splits = [split_of(r.prompt, config.heldout_fraction) for r in rows]
    store = registry.datasets
    with store.staging() as staged:
        save_file(_tensors(rows), str(staged / ROWS_FILE))
        with (staged / PROMPTS_FILE).open("w", encoding="utf-8") as f:
            for row, split in zip(rows, splits, strict=True):
                line = {"index": row.index, "text": row.prompt, "split": split, "seed": row.seed}
                f.write(json.dumps(line, ensure_ascii=False) + "\n")
        generated = sum(len(r.generated_ids) for r in rows)
        manifest = {
            "kind": "dataset",
            "dataset": {
                "type": DATASET_TYPE,
                "format": FORMAT,
                "key": dataset_key(teacher, prompts, config),
                "sha256": sha256_file(staged / ROWS_FILE),
                "teacher": {"ref": teacher.ref, "digest": teacher.digest},
                "prompts": {
                    "source": "slimserve/compression/prompts/teacher.jsonl",
                    "sha256": prompts_digest(prompts),
                    "count": len(prompts),
                    "rows": config.split,
                    "heldout": splits.count("heldout"),
                },
                "chat_template": bool(getattr(tokenizer, "chat_template", None)),
                "sampling": config.generation(),
                "generated_by": asdict(config) | {"seconds": round(seconds, 1)},
                "tokens": {
                    "prompt": sum(len(r.prompt_ids) for r in rows),
                    "generated": generated,
                },
                "stopped_at_eos": sum(
                    1 for r in rows if r.generated_ids and r.generated_ids[-1] == _eos(tokenizer)
                ),
            },
        }
        return store.publish(teacher.name, staged, manifest)


def load_teacher_text(art: Artifact, *, verify: bool = True) -> TeacherText:
    """Read a stored teacher-text dataset (checksums first).

    Raises:
        IntegrityError: a file is missing, altered or not listed.
        ValueError: the artifact is not a teacher-text dataset.
    """
    from safetensors.torch import load_file

    if art.manifest.dataset.get("type") != DATASET_TYPE:
        raise ValueError(f"{art.ref} is not a {DATASET_TYPE} dataset")
    if verify:
        art.verify()
    t = load_file(str(art.path / ROWS_FILE))
    lines = (art.path / PROMPTS_FILE).read_text(encoding="utf-8").splitlines()
    meta = [json.loads(line) for line in lines if line.strip()]
    p_off, g_off = t["prompt_offsets"].tolist(), t["generated_offsets"].tolist()
    p_ids, g_ids = t["prompt_ids"].tolist(), t["generated_ids"].tolist()
    out: dict[str, list[TeacherRow]] = {"train": [], "heldout": []}
    for r, m in enumerate(meta):
        row = TeacherRow(
            index=int(m["index"]),
            prompt=str(m["text"]),
            prompt_ids=tuple(p_ids[p_off[r] : p_off[r + 1]]),
            generated_ids=tuple(g_ids[g_off[r] : g_off[r + 1]]),
            seed=int(m["seed"]),
        )
        out[m["split"]].append(row)
    return TeacherText(artifact=art, train=tuple(out["train"]), heldout=tuple(out["heldout"]))


def _tensors(rows: Sequence[TeacherRow]) -> dict[str, torch.Tensor]:
    """Variable-length rows as flat int32 ids plus int64 offsets (row r: [off[r], off[r+1]))."""

    def flat(parts: list[tuple[int, ...]]) -> tuple[torch.Tensor, torch.Tensor]:
        lengths = torch.tensor([0] + [len(p) for p in parts], dtype=torch.long)
        ids = [i for p in parts for i in p]
        return torch.tensor(ids, dtype=torch.int32), lengths.cumsum(0)

    p_ids, p_off = flat([r.prompt_ids for r in rows])
    g_ids, g_off = flat([r.generated_ids for r in rows])
    return {
        "prompt_ids": p_ids,
        "prompt_offsets": p_off,
        "generated_ids": g_ids,
        "generated_offsets": g_off,
    }


def packed_chunks(rows: Sequence[TeacherRow], seq_len: int, max_chunks: int) -> torch.Tensor:
    """Rows (prompt then answer) joined end to end and cut into (N, seq_len) int64 chunks,
    N <= max_chunks; a trailing partial chunk is dropped.

    Raises:
        ValueError: fewer tokens than one chunk.
    """
    ids = [i for r in rows for i in (*r.prompt_ids, *r.generated_ids)]
    n = min(len(ids) // seq_len, max_chunks)
    if n == 0:
        raise ValueError(
            f"the teacher text holds {len(ids)} tokens, fewer than one chunk of "
            f"seq_len={seq_len}; ask for more prompts or new tokens"
        )
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def _eos(tokenizer: Any) -> int | None:
    eos = getattr(tokenizer, "eos_token_id", None)
    return int(eos) if eos is not None else None

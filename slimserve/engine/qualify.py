"""Qualification: a plan serves on a machine only after it ran there, correctly, elsewhere.

Each plan that is not a float32 torch forward (the reference) is tried first in a throwaway
process, on the shapes the engine will use: every slot decoding at once (`max_batch`), a
full Score group, a long prefill. Its next-token distributions on a fixed probe text are
held against the reference's: top-1 agreement (a pick the reference ranks within
`TIE_NATS` of its own best counts as agreeing, so near-ties on tiny or flat models do not
flip a verdict) and the perplexity ratio. Per-logit tolerances would be wrong: AMX and
plain-CPU kernels differ by up to ~1.5 on single logits and agree on the distribution.
The same process measures speed (decode at batch 1 and at `max_batch`, prefill), so `auto`
picks the fastest plan whose perplexity is within `EQUAL_QUALITY` of the reference. For a
llama.cpp plan it also races the threads of a single-sequence decode step (1, 2, 4, ... up
to all): the plan serves with the fewest that come within `DECODE_THREADS_SLACK` of the
fastest, which leaves the other cores to the server and its clients.

Verdicts are cached per machine (`machine.fingerprint()`: CPU, library versions, native
build), artifact and shape, in one JSON file beside the registry, so a restart repeats
nothing. A plan whose engine keeps crashing while it serves is marked bad in the same file.
Imports torch and engine modules only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import math
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from slimserve.engine.backends.select import (
    PLAN_DTYPES,
    PLAN_WEIGHTS,
    Plan,
    plan_allowed,
    quiet_torch_beside,
)
from slimserve.engine.config import ModelConfig
from slimserve.engine.machine import fingerprint_digest
from slimserve.engine.process import ChildSpec, describe_exit, mp_context

log = logging.getLogger(__name__)

#: Plain English of several registers, shipped with the code: the probe every plan reads.
PROBE = (
    "The committee met on Tuesday, 4 March, to review the budget. After a short debate, "
    "members agreed to fund the new library and to repair the bridge on Mill Street. "
    "Q: What is the capital of France? A: Paris. Q: How many days are in a week? A: Seven. "
    "def add(a, b):\n    return a + b\n"
    "Once upon a time, a small fox lived at the edge of a quiet forest, and every morning "
    "she walked to the river to watch the light on the water."
)
PROBE_TOKENS = 64
#: A reference log-probability within this many nats of its best counts as the same pick.
TIE_NATS = 0.05
#: Qualification: at least this top-1 agreement in every slot ...
MIN_AGREEMENT = 0.9
#: ... and at most this perplexity ratio against the reference.
MAX_PPL_RATIO = 1.05
#: `auto` races only plans this close to the reference's perplexity.
EQUAL_QUALITY = 1.01
SCORE_GROUP = 9
#: Each rate is the best of this many timed runs: a machine shared with other work slows
#: some runs, never speeds one up, so the best run is the least disturbed measurement.
TIMING_RUNS = 3
#: The status of a plan whose engine kept crashing by its own fault while it served.
CRASH_LOOP = "crash-loop"
#: A single-sequence decode runs on the fewest threads within this fraction of the fastest
#: count: a core it barely uses is worth more to the server beside it.
DECODE_THREADS_SLACK = 0.03


@dataclass(frozen=True, slots=True, kw_only=True)
class Verdict:
    plan: dict[str, Any]
    #: "ok", "wrong" (disagrees with the reference), "crashed", "failed" (an error) or
    #: "crash-loop" (kept crashing while serving).
    status: str
    reason: str = ""
    ppl_ratio: float = 1.0
    agreement: float = 1.0
    decode_tok_s: float = 0.0
    batch_tok_s: float = 0.0
    prefill_tok_s: float = 0.0
    measured_at: float = field(default_factory=time.time)
    #: llama.cpp: the threads a single-sequence decode serves on (0: not measured) ...
    decode_threads: int = 0
    #: ... chosen from these rates, tokens/s by thread count (str: a JSON key).
    decode_by_threads: dict[str, float] = field(default_factory=dict)
    #: Wall-clock time (epoch seconds) after which the verdict no longer holds and the plan
    #: is qualified again; None: it holds for this machine fingerprint (crash-loop verdicts
    #: expire, the others change only with the machine, libraries or artifact).
    expires_at: float | None = None

    @property
    def key(self) -> str:
        return Plan.from_dict(self.plan).key

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at

    def doubt(self, plan: Plan) -> str | None:
        """Why this cached verdict cannot be taken for `plan` as it stands (None: it can).
        An "ok" is held to the figures qualification demands, so a file edited to say
        "ok" cannot serve a plan whose probe never passed."""
        if Plan.from_dict(self.plan).key != plan.key or self.plan["backend"] != plan.backend:
            return "it is a verdict on another plan"
        if not self.ok or plan.trusted:
            return None
        figures = (self.ppl_ratio, self.agreement, self.decode_tok_s, self.batch_tok_s)
        if not all(map(math.isfinite, figures)):
            return "an ok with non-finite figures"
        if self.agreement < MIN_AGREEMENT or self.ppl_ratio > MAX_PPL_RATIO or self.speed <= 0:
            return "an ok whose figures fail qualification"
        return None

    @property
    def speed(self) -> float:
        """Geometric mean of the three rates: no one shape decides alone."""
        rates = [r for r in (self.decode_tok_s, self.batch_tok_s, self.prefill_tok_s) if r > 0]
        return math.exp(sum(map(math.log, rates)) / len(rates)) if rates else 0.0

    def summary(self) -> str:
        if not self.ok:
            return f"{self.status}: {self.reason}"
        threads = f" on {self.decode_threads} threads" if self.decode_threads else ""
        return (
            f"ok: ppl x{self.ppl_ratio:.4f}, agreement {self.agreement:.3f}, decode "
            f"{self.decode_tok_s:.1f} tok/s{threads}, batch {self.batch_tok_s:.1f} tok/s, "
            f"prefill {self.prefill_tok_s:.0f} tok/s"
        )

    @property
    def stale(self) -> bool:
        """A llama.cpp verdict cached before decode threads were measured: qualify again."""
        return self.ok and self.plan.get("backend") == "llamacpp" and not self.decode_threads


@dataclass(frozen=True, slots=True, kw_only=True)
class Selection:
    """What serves, what was measured, and why everything else does not serve."""

    plan: Plan
    refused: dict[str, str]
    measured: dict[str, float]
    verdicts: tuple[Verdict, ...] = ()


# ---- the cache ----------------------------------------------------------------------------
#: The cache file's layout version; a file of another layout is ignored (and replaced).
CACHE_FORMAT = 2
_NUMBER = {"type": "number"}
_RATE = {"type": "number", "minimum": 0}
_THREADS = {"type": "integer", "minimum": 0, "maximum": 4096}
_PLAN_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["backend", "weights", "dtype", "extra_buffers"],
    "properties": {
        # A built-in backend, or a plugin's import path: which plugins may run is the
        # configuration's to say (`select.plan_allowed`), never the file's.
        "backend": {
            "type": "string",
            "maxLength": 256,
            "pattern": r"^(llamacpp|llama|hf|[A-Za-z_][\w.]*:[A-Za-z_]\w*)$",
        },
        "weights": {"enum": [*PLAN_WEIGHTS]},
        "dtype": {"enum": [*PLAN_DTYPES]},
        "extra_buffers": {"type": "boolean"},
        "decode_threads": _THREADS,
    },
}
_VERDICT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["plan", "status"],
    "properties": {
        "plan": _PLAN_SCHEMA,
        "status": {"enum": ["ok", "wrong", "crashed", "failed", CRASH_LOOP]},
        "reason": {"type": "string", "maxLength": 4096},
        "ppl_ratio": _NUMBER,
        "agreement": _NUMBER,
        "decode_tok_s": _RATE,
        "batch_tok_s": _RATE,
        "prefill_tok_s": _RATE,
        "measured_at": _NUMBER,
        "decode_threads": _THREADS,
        "decode_by_threads": {"type": "object", "additionalProperties": _RATE},
        "expires_at": {"type": ["number", "null"]},
    },
}
#: The cache file, validated whole on every read (jsonschema): an invalid one is ignored.
CACHE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["format", "surveys", "verdicts"],
    "properties": {
        "format": {"const": CACHE_FORMAT},
        "surveys": {
            "type": "object",
            "additionalProperties": {
                "type": "object",
                "additionalProperties": False,
                "required": ["plans", "refused", "trusted"],
                "properties": {
                    "plans": {"type": "array", "maxItems": 256, "items": _PLAN_SCHEMA},
                    "refused": {"type": "object", "additionalProperties": {"type": "string"}},
                    "trusted": {"type": "object", "additionalProperties": _VERDICT_SCHEMA},
                },
            },
        },
        "verdicts": {"type": "object", "additionalProperties": _VERDICT_SCHEMA},
    },
}


def _empty() -> dict[str, Any]:
    return {"format": CACHE_FORMAT, "surveys": {}, "verdicts": {}}


def verdicts_path(registry_root: Path) -> Path:
    """Where a registry's qualification cache lives (the server's and the CLI's)."""
    return registry_root / ".qualify" / "verdicts.json"


class VerdictCache:
    """Surveys and verdicts in one JSON file, read and written under an exclusive lock.

    The file is data: it is validated against `CACHE_SCHEMA` on every read, and a file that
    fails (tampered, truncated, of another format) is ignored with one warning, its plans
    qualified again and the file rewritten. What it holds is checked again where it is used
    (`Qualifier.select`): a cached plan serves only if the configuration allows it, and an
    "ok" only if its figures pass the qualification thresholds.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._memory: dict[str, Any] = _empty()
        self._warned = False

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        if self.path is None:
            yield self._memory
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            lock = open(self.path.with_suffix(".lock"), "a+")  # noqa: SIM115
        except OSError as exc:
            log.warning(
                "qualification cache %s is not writable (%s): kept in memory", self.path, exc
            )
            self.path = None
            yield self._memory
            return
        with lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            data = self._load(self.path)
            before = json.dumps(data, sort_keys=True)
            yield data
            if json.dumps(data, sort_keys=True) != before:
                tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
                tmp.replace(self.path)

    def _load(self, path: Path) -> dict[str, Any]:
        import jsonschema

        if not path.is_file():
            return _empty()
        try:
            data = json.loads(path.read_bytes())
            jsonschema.validate(data, CACHE_SCHEMA)
        except (OSError, ValueError, RecursionError, jsonschema.ValidationError) as exc:
            why = exc.message if isinstance(exc, jsonschema.ValidationError) else str(exc)
            if not self._warned:
                log.warning(
                    "qualification cache %s is invalid (%s): ignored, plans are qualified "
                    "again and the file rewritten",
                    path,
                    why[:200],
                )
                self._warned = True
            return _empty()
        return data  # type: ignore[no-any-return]

    def read(self) -> dict[str, Any]:
        """The whole cache, `{"format", "surveys", "verdicts"}`, read once under the lock
        (another server may be writing)."""
        with self._locked() as data:
            return json.loads(json.dumps(data))  # type: ignore[no-any-return]

    def put_survey(self, key: str, survey: dict[str, Any]) -> None:
        with self._locked() as data:
            data["surveys"][key] = survey

    def put_verdict(self, key: str, verdict: dict[str, Any]) -> None:
        with self._locked() as data:
            data["verdicts"][key] = verdict

    def drop(self, keys: Iterable[str]) -> None:
        with self._locked() as data:
            for key in keys:
                data["verdicts"].pop(key, None)

    def clear(self, digest: str | None = None) -> int:
        """Forget surveys and verdicts (of one artifact's `digest`, or all); how many
        entries went. The next `serve` qualifies those plans again."""
        with self._locked() as data:
            gone = 0
            for part in ("surveys", "verdicts"):
                keep = {
                    k: v
                    for k, v in data[part].items()
                    if digest is not None and k.split("/")[1] != digest[:16]
                }
                gone += len(data[part]) - len(keep)
                data[part] = keep
            return gone


#: A plan whose qualification ran past the timeout: not a verdict on the plan (a loaded
#: machine can be that slow), so it does not serve now and is not cached.
TIMED_OUT = "timed-out"


def _prefix(digest: str, config: ModelConfig, threads: int) -> str:
    cache = config.cache
    shape = f"b{cache.max_batch}-s{cache.max_seq_len}-kv{cache.kv_cache_mb}-t{threads}"
    if cache.kv_layout != "unified":  # verdicts made before the choice existed stay valid
        shape += f"-{cache.kv_layout}"
    return f"{fingerprint_digest()}/{digest[:16]}/{shape}"


# ---- the server's side --------------------------------------------------------------------
class Qualifier:
    """Chooses each artifact's plan on this machine, qualifying in throwaway processes."""

    def __init__(self, cache: VerdictCache, *, timeout_s: float = 1200.0) -> None:
        self.cache = cache
        self.timeout_s = timeout_s

    def select(self, spec: ChildSpec, digest: str) -> Selection:
        config = spec.config
        prefix = _prefix(digest, config, spec.threads)
        survey_key = (
            f"{prefix}/survey/{config.load.backend}/{config.load.gguf_type}/{config.load.dtype}/"
            + ",".join(config.load.backend_plugins)
        )
        known = self.cache.read()
        survey = known["surveys"].get(survey_key)
        if survey is None:
            survey = _run_child(spec, None, self.timeout_s)
            if "error" in survey:
                from slimserve.engine.ipc import error_from_wire

                raise error_from_wire(survey["error"])
            self.cache.put_survey(survey_key, survey)
        plans = _allowed(survey["plans"], config)
        refused: dict[str, str] = dict(survey["refused"])
        verdicts: list[Verdict] = []
        for plan in plans:
            key = f"{prefix}/{plan.key}"
            verdict = self._cached(known["verdicts"].get(key), plan, survey["trusted"])
            if verdict is None:
                verdict = self._qualify(spec, plan, key)
            verdicts.append(verdict)
            log.info("%s %s: %s", spec.ref, plan.key, verdict.summary())
        return choose(plans, verdicts, refused, config)

    def _cached(
        self, raw: dict[str, Any] | None, plan: Plan, trusted: dict[str, Any]
    ) -> Verdict | None:
        """The cached verdict on `plan` if it still holds; None: qualify it now."""
        if raw is None and plan.trusted:
            raw = trusted.get(plan.key) or asdict(
                Verdict(plan=plan.to_dict(), status="ok", reason="reference")
            )
        if raw is None:
            return None
        verdict = Verdict(**raw)
        if verdict.expired(time.time()):
            log.info("%s: the verdict %r expired; qualifying it again", plan.key, verdict.status)
            return None
        if verdict.stale:
            log.info(
                "%s: cached before decode threads were measured; qualifying it again", plan.key
            )
            return None
        doubt = verdict.doubt(plan)
        if doubt is not None:
            log.warning("qualification cache: %s holds %s; qualifying it again", plan.key, doubt)
            return None
        return verdict

    def _qualify(self, spec: ChildSpec, plan: Plan, key: str) -> Verdict:
        if plan.trusted:
            verdict = Verdict(plan=plan.to_dict(), status="ok", reason="reference")
        else:
            log.info("qualifying %s for %s on this machine", plan.key, spec.ref)
            verdict = Verdict(**_run_child(spec, plan, self.timeout_s))
        if verdict.status != TIMED_OUT:  # a busy machine says nothing of the plan
            self.cache.put_verdict(key, asdict(verdict))
        return verdict

    def mark_bad(self, spec: ChildSpec, digest: str, plan: Plan, reason: str) -> None:
        """Keep `plan` from serving this artifact on this machine for the configuration's
        `restart.crash_verdict_ttl_s`."""
        config = spec.config
        verdict = Verdict(
            plan=plan.to_dict(),
            status=CRASH_LOOP,
            reason=reason,
            expires_at=time.time() + config.restart.crash_verdict_ttl_s,
        )
        self.cache.put_verdict(
            f"{_prefix(digest, config, spec.threads)}/{plan.key}", asdict(verdict)
        )


def _allowed(cached: list[dict[str, Any]], config: ModelConfig) -> list[Plan]:
    """The surveyed plans the configuration allows: a plugin serves only when the command
    line or configuration names it, whatever the cache file says."""
    plans = []
    for d in cached:
        plan = Plan.from_dict(d)
        why = plan_allowed(plan, config)
        if why is None:
            plans.append(plan)
        else:
            log.warning("qualification cache: ignoring the cached plan %s (%s)", plan.key, why)
    return plans


def choose(
    plans: list[Plan], verdicts: list[Verdict], refused: dict[str, str], config: ModelConfig
) -> Selection:
    """The fastest qualified plan at equal quality; a pinned backend races only its own."""
    refused = dict(refused)
    ok = [v for v in verdicts if v.ok]
    for v in verdicts:
        if not v.ok:
            refused[v.key] = v.summary()
    if not ok:
        raise ValueError(f"no plan qualified on this machine: {refused}")
    plugins = [v for v in ok if Plan.from_dict(v.plan).backend in config.load.backend_plugins]
    equal = [v for v in ok if v.ppl_ratio <= EQUAL_QUALITY] or [min(ok, key=lambda v: v.ppl_ratio)]
    measured = [v for v in equal if v.speed > 0]
    best = max(measured, key=lambda v: v.speed) if measured else equal[0]
    if plugins:  # a plugin the operator named, and that qualified, is what they asked for
        best = plugins[0]
    for v in ok:
        if v is not best:
            worse = v.ppl_ratio > EQUAL_QUALITY
            refused[v.key] = ("worse: " if worse else "slower: ") + v.summary()
    surveyed = next((p for p in plans if p.key == best.key), None)
    if surveyed is None:
        raise ValueError(f"the qualified plan {best.key} is not one of the plans surveyed")
    chosen = dataclasses.replace(surveyed, decode_threads=best.decode_threads)
    figures = {
        "decode_tokens_per_s": best.decode_tok_s,
        "batch_tokens_per_s": best.batch_tok_s,
        "prefill_tokens_per_s": best.prefill_tok_s,
        "probe_perplexity_ratio": best.ppl_ratio,
        "probe_top1_agreement": best.agreement,
    }
    if best.decode_threads:
        # What serves: an operator's --decode-threads over the measured count.
        figures["decode_threads"] = float(config.load.decode_threads or best.decode_threads)
        for n, rate in best.decode_by_threads.items():
            figures[f"decode_tokens_per_s_{n}_threads"] = rate
    return Selection(plan=chosen, refused=refused, measured=figures, verdicts=tuple(verdicts))


def _run_child(spec: ChildSpec, plan: Plan | None, timeout_s: float) -> dict[str, Any]:
    """Survey (plan None) or qualify one plan in a throwaway process; a death is a verdict."""
    ctx = mp_context()
    conn, child_conn = ctx.Pipe(duplex=False)
    proc = ctx.Process(
        target=_child, args=(child_conn, spec, plan.to_dict() if plan else None), daemon=True
    )
    proc.start()
    child_conn.close()
    result: dict[str, Any] | None = None
    if conn.poll(timeout_s):
        with contextlib.suppress(EOFError, OSError):
            result = json.loads(conn.recv_bytes())
    proc.join(10)
    timed_out = proc.is_alive()
    if timed_out:
        proc.kill()
        proc.join(5)
    if result is not None:
        return result
    how = f"timed out ({timeout_s} s)" if timed_out else describe_exit(proc.exitcode)
    if plan is None:
        from slimserve.engine.errors import LoadFailed
        from slimserve.engine.ipc import error_to_wire

        return {"error": error_to_wire(LoadFailed(f"{spec.ref}: the survey process {how}"))}
    status = TIMED_OUT if timed_out else "crashed"
    return asdict(Verdict(plan=plan.to_dict(), status=status, reason=how))


# ---- the throwaway process ----------------------------------------------------------------
def _child(conn: Connection, spec: ChildSpec, plan_d: dict[str, Any] | None) -> None:
    import torch

    from slimserve.engine.ipc import error_to_wire

    logging.basicConfig(level=spec.log_level)
    if spec.threads:
        torch.set_num_threads(spec.threads)
    try:
        result = _survey(spec) if plan_d is None else _qualify(spec, Plan.from_dict(plan_d))
    except BaseException as exc:  # a Python error is a verdict too
        if plan_d is None:
            result = {"error": error_to_wire(exc)}
        else:
            reason = f"{type(exc).__name__}: {exc}"
            result = asdict(Verdict(plan=plan_d, status="failed", reason=reason))
    conn.send_bytes(json.dumps(result).encode())


def _load(spec: ChildSpec) -> tuple[Any, Any, ModelConfig, int, Path]:
    from slimserve.engine.errors import IntegrityFailure
    from slimserve.engine.loader import context_length, resolve_device, resolve_dtype
    from slimserve.registry.artifact import load_model
    from slimserve.registry.errors import IntegrityError
    from slimserve.registry.store import Registry

    config = spec.config
    artifact = Registry(Path(spec.registry)).get(spec.name, str(spec.version))
    device = resolve_device(config.load.device)
    dtype = resolve_dtype(config.load.dtype, device)
    try:
        model, tokenizer = load_model(artifact, device=device, dtype=dtype)
    except IntegrityError as exc:
        raise IntegrityFailure(str(exc)) from exc
    return model, tokenizer, config, context_length(model, config.cache, dtype), artifact.path


def _survey(spec: ChildSpec) -> dict[str, Any]:
    from slimserve.engine.backends.select import build_backend, plans_for

    model, tokenizer, config, max_seq_len, path = _load(spec)
    plans, refused = plans_for(model, config, path / "tokenizer.json")
    trusted = {}
    reference = next((p for p in plans if p.trusted), None)
    if reference is not None and reference.backend == "llama":  # eager is never raced
        ids, ref = _reference(model, tokenizer)
        backend = build_backend(model, config, max_seq_len, path / "tokenizer.json", reference)
        trusted[reference.key] = asdict(_probe(reference, backend, ids, ref))
    return {"plans": [p.to_dict() for p in plans], "refused": refused, "trusted": trusted}


def _qualify(spec: ChildSpec, plan: Plan) -> dict[str, Any]:
    from slimserve.engine.backends.select import build_backend

    model, tokenizer, config, max_seq_len, path = _load(spec)
    ids, ref = _reference(model, tokenizer)
    backend = build_backend(model, config, max_seq_len, path / "tokenizer.json", plan)
    del model
    quiet_torch_beside(plan)  # as the engine serves it, else llama.cpp is measured too slow
    return asdict(_probe(plan, backend, ids, ref))


def _reference(model: Any, tokenizer: Any) -> tuple[list[int], Any]:
    """Probe token ids and the reference's log-probabilities at each position, (T, vocab)."""
    import torch

    ids = list(tokenizer(PROBE)["input_ids"])[:PROBE_TOKENS]
    with torch.no_grad():
        logits = model(torch.tensor([ids], device=next(model.parameters()).device)).logits[0]
    return ids, torch.log_softmax(logits.double().cpu(), dim=-1)


def _probe(plan: Plan, backend: Any, ids: list[int], ref: Any) -> Verdict:
    """Run the engine's shapes on `backend` and hold its output against `ref`."""
    import torch

    slots, t = backend.max_slots, len(ids)
    # Every slot decodes the probe at once: the multi-slot shape that crashed on some CPUs.
    rows: list[list[torch.Tensor]] = [[backend.prefill(s, ids[:1])] for s in range(slots)]
    for pos in range(1, t - 1):
        out = backend.decode(list(range(slots)), [ids[pos]] * slots)
        for s in range(slots):
            rows[s].append(out[s])
    for s in range(slots):
        backend.release(s)
    target = torch.tensor(ids[1:t])
    r = ref[: t - 1]
    nll_ref = float(-r.gather(1, target[:, None]).mean())
    agreement, ratio = 1.0, 0.0
    for s in range(slots):
        cand = torch.log_softmax(torch.stack(rows[s]).double(), dim=-1)
        nll = float(-cand.gather(1, target[:, None]).mean())
        ratio = max(ratio, math.exp(nll - nll_ref))
        picked = r.gather(1, cand.argmax(-1, keepdim=True))[:, 0]
        agree = float((picked >= r.max(-1).values - TIE_NATS).double().mean())
        agreement = min(agreement, agree)
    # A full Score group: the true continuation among distractors, one batched pass.
    half = t // 2
    vocab = backend.vocab_size
    conts = [ids[half : half + 2]] + [
        [(ids[half] + k) % vocab, ids[half + 1]] for k in range(1, SCORE_GROUP)
    ]
    got = backend.score(ids[:half], conts)[0]
    want = float(ref[half - 1, ids[half]] + ref[half, ids[half + 1]])
    score_error = abs(got - want)
    # A long prefill, timed.
    n = max(1, min(backend.max_seq_len - 1, 512))
    long = (ids * (n // t + 1))[:n]
    prefill = 0.0
    for _ in range(TIMING_RUNS):
        _sync(backend)
        t0 = time.perf_counter()
        backend.prefill(0, long)
        _sync(backend)
        prefill = max(prefill, n / (time.perf_counter() - t0))
        backend.release(0)
    decode_threads, by_threads = 0, dict[int, float]()
    if plan.backend == "llamacpp":
        decode_threads, by_threads = _race_decode_threads(backend, ids)
        backend.set_decode_threads(decode_threads)
    runs = [_speed(backend, ids) for _ in range(TIMING_RUNS)]
    decode, batch = max(r[0] for r in runs), max(r[1] for r in runs)
    status, reason = "ok", ""
    if not all(map(math.isfinite, (ratio, agreement, got))):
        status, reason = "wrong", "non-finite output"
    elif agreement < MIN_AGREEMENT or ratio > MAX_PPL_RATIO or score_error > 0.5:
        status = "wrong"
        reason = (
            f"disagrees with the float32 reference: top-1 agreement {agreement:.3f} "
            f"(need {MIN_AGREEMENT}), perplexity x{ratio:.3f} (at most {MAX_PPL_RATIO}), "
            f"score error {score_error:.3f} nats"
        )
    return Verdict(
        plan=plan.to_dict(),
        status=status,
        reason=reason,
        ppl_ratio=ratio,
        agreement=agreement,
        decode_tok_s=decode,
        batch_tok_s=batch,
        prefill_tok_s=prefill,
        decode_threads=decode_threads,
        decode_by_threads={str(n): rate for n, rate in by_threads.items()},
    )


def thread_counts(threads: int) -> list[int]:
    """The decode thread counts raced on `threads`: 1, 2, 4, ... below it, and it."""
    counts = {threads}
    n = 1
    while n < threads:
        counts.add(n)
        n *= 2
    return sorted(counts)


def fewest_fast_threads(rates: dict[int, float]) -> int:
    """The fewest threads whose rate is within `DECODE_THREADS_SLACK` of the best."""
    best = max(rates.values())
    return min(n for n, rate in rates.items() if rate >= (1 - DECODE_THREADS_SLACK) * best)


def _race_decode_threads(backend: Any, ids: list[int]) -> tuple[int, dict[int, float]]:
    """Single-sequence decode tokens/s at each of `thread_counts`, the best of
    `TIMING_RUNS` each, the counts interleaved so a neighbour's burst slows each alike;
    and the count to serve with (`fewest_fast_threads`)."""
    rates: dict[int, float] = {}
    for _ in range(TIMING_RUNS):
        for n in thread_counts(backend.phase_threads.threads):
            backend.set_decode_threads(n)
            rates[n] = max(rates.get(n, 0.0), _single_decode(backend, ids))
    return fewest_fast_threads(rates), rates


def _single_decode(backend: Any, ids: list[int]) -> float:
    """Tokens/s of one slot decoding alone, greedy-shaped (slot 0 is left empty)."""
    start, steps = ids[:16], 32
    steps = max(1, min(steps, backend.max_seq_len - len(start) - 1))
    backend.prefill(0, start)
    _sync(backend)
    t0 = time.perf_counter()
    for i in range(steps):
        backend.decode([0], [ids[i % len(ids)]])
    _sync(backend)
    rate = steps / (time.perf_counter() - t0)
    backend.release(0)
    return float(rate)


def _speed(backend: Any, ids: list[int]) -> tuple[float, float]:
    """Greedy-shaped decode rates: one slot, then every slot; tokens/s."""
    start, steps = ids[:16], 32
    steps = max(1, min(steps, backend.max_seq_len - len(start) - 1))
    decode = _single_decode(backend, ids)
    slots = list(range(backend.max_slots))
    for s in slots:
        backend.prefill(s, start)
    _sync(backend)
    t0 = time.perf_counter()
    for i in range(min(8, steps)):
        backend.decode(slots, [ids[i]] * len(slots))
    _sync(backend)
    batch = min(8, steps) * len(slots) / (time.perf_counter() - t0)
    for s in slots:
        backend.release(s)
    return decode, batch


def _sync(backend: Any) -> None:
    """Wait for the backend's device. CUDA work is queued, not done, when a call returns:
    a rate timed without waiting would measure how fast kernels are launched."""
    import torch

    device = torch.device(str(getattr(backend, "device", "cpu")))
    if device.type == "cuda":
        torch.cuda.synchronize(device)

"""Loading one model in this process: artifact → weights on a device → backend → engine.

The engine process (`slimserve.engine.process`) calls `load` for the model it serves; so do
in-process callers (evaluate, benchmarks, tests that wrap a backend): a `LocalModel`, the
scheduler and the tokenizer in this process. `LoadedModel` is what the server holds: the
artifact and an engine it calls without blocking (`EngineLike`: a `frontend.Frontend` in
this process, or a supervised engine process); never a tokenizer or weights.
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import os
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

from slimserve.engine.backends.select import (
    Plan,
    build_backend,
    open_model,
    plans_for,
    quiet_torch_beside,
)
from slimserve.engine.config import NGRAM, CacheConfig, ModelConfig
from slimserve.engine.errors import IntegrityFailure, LoadFailed
from slimserve.engine.tokenizer import token_bytes_bound
from slimserve.engine.types import (
    BackendInfo,
    EngineInfo,
    EngineStats,
    GenerationRequest,
    Prompt,
    SamplingParams,
    ScoreRequest,
    ScoreResult,
    StopParams,
    TokenizeResult,
    TokenLogprob,
)
from slimserve.registry.errors import IntegrityError, RegistryError
from slimserve.registry.store import Artifact, Registry, parse_model_ref

if TYPE_CHECKING:  # torch and the scheduler load in `load`: the server process imports
    # this module for LoadedModel and holds no weights, so it never imports torch.
    import torch

    from slimserve.engine.backends.base import Backend
    from slimserve.engine.scheduler import Engine, EngineHooks, Sink
    from slimserve.engine.speculative import Drafter

log = logging.getLogger(__name__)

#: Wraps a freshly built backend (tests inject slow or failing devices through it).
BackendHook = Callable[["Backend"], "Backend"]
_CONTEXT_CAP = 4096


def resolve_device(name: str) -> torch.device:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name} requested but CUDA is not available")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    import torch

    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


class EngineLike(Protocol):
    """What the server calls on a model's engine, in this process or in its own. Every call
    returns at once: text work and forward passes happen on the engine's threads."""

    #: Times the engine was restarted after dying (0 for one in this process).
    restarts: int

    @property
    def info(self) -> EngineInfo: ...

    @property
    def serving(self) -> bool:
        """Whether it takes work now (False while restarting or after its loop failed)."""
        ...

    def submit(self, req: GenerationRequest, sink: Sink) -> HandleLike: ...

    def score(self, req: ScoreRequest) -> concurrent.futures.Future[ScoreResult]: ...

    def prompt_logprobs(
        self, prompt: Prompt, top_n: int = 0, deadline: float | None = None, limit: int = 0
    ) -> concurrent.futures.Future[list[TokenLogprob]]: ...

    def tokenize(
        self, prompt: Prompt, limit: int = 0, *, tokens: bool = False
    ) -> concurrent.futures.Future[TokenizeResult]: ...

    def stats(self) -> EngineStats: ...

    def shutdown(self, timeout: float = 10.0) -> None: ...


class HandleLike(Protocol):
    request_id: str

    def cancel(self) -> None: ...


@dataclass(frozen=True, slots=True)
class LoadedModel:
    """One served version, as the server holds it: its artifact and its engine."""

    artifact: Artifact
    engine: EngineLike
    loaded_at: float

    @property
    def name(self) -> str:
        return self.artifact.name

    @property
    def ref(self) -> str:
        return self.artifact.ref

    @property
    def info(self) -> EngineInfo:
        """How it is served now (a restarted engine process may serve by another plan)."""
        return self.engine.info

    @property
    def backend(self) -> BackendInfo:
        return self.engine.info.backend

    @property
    def device(self) -> torch.device:
        import torch

        return torch.device(self.engine.info.device)

    @property
    def dtype(self) -> torch.dtype:
        import torch

        return getattr(torch, self.engine.info.dtype)  # type: ignore[no-any-return]

    @property
    def max_context(self) -> int:
        return self.engine.info.max_context

    @property
    def max_token_bytes(self) -> int:
        """Input bytes one token stands for at most (`tokenizer.token_bytes_bound`)."""
        return self.engine.info.max_token_bytes


@dataclass(frozen=True, slots=True)
class LocalModel:
    """A model loaded in this process: the scheduler (token ids in, events out) and the
    tokenizer. `frontend.Frontend.of(local)` serves it to text callers."""

    artifact: Artifact
    tokenizer: Any
    engine: Engine

    @property
    def info(self) -> EngineInfo:
        return self.engine.info


_MIN_CONTEXT = 256


def context_length(model: Any, config: CacheConfig, dtype: torch.dtype) -> int:
    """Tokens per sequence: as configured, else the most the KV-cache budget allows.

    Raises:
        ValueError: the configured batch and context do not fit `kv_cache_mb`.
    """
    from slimserve.engine.spec import kv_bytes_per_token

    model_limit = int(getattr(model.config, "max_position_embeddings", 0) or _CONTEXT_CAP)
    per_token = kv_bytes_per_token(model.config, dtype)
    budget = config.kv_budget_bytes()
    if config.max_seq_len:
        need = per_token * config.max_seq_len * config.max_batch
        if need > budget:
            raise ValueError(
                f"KV cache for max_batch={config.max_batch} x max_seq_len={config.max_seq_len} "
                f"needs {need / 2**20:.0f} MiB > kv_cache_mb={budget // 2**20}; raise "
                "--kv-cache-mb or lower --max-batch/--max-seq-len"
            )
        return config.max_seq_len
    fit = budget // (per_token * config.max_batch)
    if fit < _MIN_CONTEXT:
        raise ValueError(
            f"kv_cache_mb={budget // 2**20} leaves {fit} tokens per sequence for "
            f"max_batch={config.max_batch}; raise --kv-cache-mb or lower --max-batch"
        )
    return int(min(model_limit, _CONTEXT_CAP, fit))


def load(
    artifact: Artifact,
    config: ModelConfig,
    backend_hook: BackendHook | None = None,
    *,
    plan: Plan | None = None,
    refused: dict[str, str] | None = None,
    hooks: EngineHooks | None = None,
    draft: Artifact | None = None,
) -> LocalModel:
    """Verify, load, build the backend, start the engine in this process and warm it up;
    `hooks` hear (on the worker thread) each step's end and the loop's death. With
    `config.draft.source` a model, `draft` is its artifact (`resolve_draft`).

    Raises:
        IntegrityFailure: a file fails its checksum.
        LoadFailed: the files verify but do not make a model this server can run.
    """
    import torch

    from slimserve.engine.scheduler import Engine

    device = resolve_device(config.load.device)
    dtype = resolve_dtype(config.load.dtype, device)
    forward_threads = configured_threads()
    torch.set_num_threads(forward_threads)  # an earlier llama.cpp load may have lowered it
    try:
        model, tokenizer = open_model(artifact, config, plan, device=device, dtype=dtype)
        max_seq_len = context_length(model, config.cache, dtype)
        if plan is None:
            plans, refused = plans_for(model, config, artifact.path / "tokenizer.json")
            plan = plans[0]
        backend = build_backend(model, config, max_seq_len, artifact.path / "tokenizer.json", plan)
        eos = model.generation_config.eos_token_id if model.generation_config else None
        eos_ids = frozenset(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    except IntegrityError as exc:
        raise IntegrityFailure(str(exc)) from exc
    except (RegistryError, torch.OutOfMemoryError):
        raise
    except Exception as exc:
        why = f"{type(exc).__name__}: {exc}"
        raise LoadFailed(f"{artifact.ref} could not be loaded: {why}") from exc
    del model  # the backend holds its own copy of the weights (torch tensors or llama.cpp)
    drafter = _drafter(config, artifact, draft, plan=plan, backend=backend, max_seq_len=max_seq_len)
    _return_freed_memory()
    quiet_torch_beside(plan)
    if backend_hook is not None:
        backend = backend_hook(backend)
    info = EngineInfo(
        backend=BackendInfo(
            name=backend.name,
            max_slots=backend.max_slots,
            max_seq_len=backend.max_seq_len,
            vocab_size=backend.vocab_size,
            kv_bytes=backend.kv_bytes_per_slot(),
        ),
        plan=plan.key,
        kernels=describe_plan(plan) + _kv_layout_words(backend),
        device=str(backend.device),
        dtype=plan.dtype if plan.backend != "hf" else str(dtype).removeprefix("torch."),
        max_context=max_seq_len,
        threads=forward_threads,
        pid=os.getpid(),
        in_process=True,
        eos_token_ids=tuple(sorted(eos_ids)),
        refused=dict(refused or {}),
        draft=drafter.name if drafter is not None else "",
        draft_tokens=config.draft.tokens if drafter is not None else 0,
        torch_threads=torch.get_num_threads(),
        max_token_bytes=token_bytes_bound(tokenizer),
        has_chat_template=bool(getattr(tokenizer, "chat_template", None)),
        max_score_tokens=config.engine.max_score_tokens,
    )
    engine = Engine(
        backend,
        cast(Any, tokenizer),
        config.engine,
        info=info,
        drafter=drafter,
        draft=config.draft,
        eos_token_ids=eos_ids,
        hooks=hooks,
    )
    engine.start()
    loaded = LocalModel(artifact=artifact, tokenizer=tokenizer, engine=engine)
    if config.load.warmup:
        warm_up(loaded)
    log.info("serving %s with %s on %s/%s", artifact.ref, info.kernels, device, info.dtype)
    return loaded


@functools.cache
def configured_threads() -> int:
    """Threads for the forward pass: torch's count when this process first loaded a model
    (what `serve --threads` set), before any llama.cpp load lowered torch's own pool."""
    import torch

    return torch.get_num_threads()


def resolve_draft(registry_root: Path, config: ModelConfig) -> Artifact | None:
    """The draft model's artifact when `config.draft` names one (None for none or ngram).

    Raises:
        RegistryError: no such model or version.
    """
    if config.draft.model is None:
        return None
    name, ref = parse_model_ref(config.draft.model)
    return Registry(registry_root).get(name, ref)


def _drafter(
    config: ModelConfig,
    target: Artifact,
    draft: Artifact | None,
    *,
    plan: Plan,
    backend: Backend,
    max_seq_len: int,
) -> Drafter | None:
    """The drafter `config.draft` asks for, its model loaded like the target's.

    Raises:
        LoadFailed: the target's backend cannot verify drafts, the draft model is missing,
            does not share the target's tokenizer, or cannot be loaded.
    """
    from slimserve.engine.backends.base import can_speculate
    from slimserve.engine.speculative import ModelDrafter, NgramDrafter

    if config.draft.source is None:
        return None
    if not can_speculate(backend):
        raise LoadFailed(f"{target.ref}'s backend {backend.name} cannot verify drafts")
    if config.draft.source == NGRAM:
        return NgramDrafter()
    if draft is None:
        raise LoadFailed(f"draft model {config.draft.source} was not resolved in the registry")
    mine, theirs = (a.files.get("tokenizer.json", {}).get("sha256") for a in (target, draft))
    if mine is None or mine != theirs:
        raise LoadFailed(
            f"draft {draft.ref} does not share {target.ref}'s tokenizer (tokenizer.json differs)"
        )
    try:
        import torch

        device = torch.device(str(backend.device))
        model, _ = open_model(draft, config, plan, device=device, dtype=torch.float32)
        tokenizer_json = draft.path / "tokenizer.json"
        plans, _ = plans_for(model, config, tokenizer_json)
        # The draft runs on the target's kind of backend (same threads, same kernels).
        same = [p for p in plans if p.backend == plan.backend] or plans
        draft_backend = build_backend(model, config, max_seq_len, tokenizer_json, same[0])
    except IntegrityError as exc:
        raise IntegrityFailure(str(exc)) from exc
    except Exception as exc:
        why = f"{type(exc).__name__}: {exc}"
        raise LoadFailed(f"draft {draft.ref} could not be loaded: {why}") from exc
    if not can_speculate(draft_backend) or draft_backend.vocab_size != backend.vocab_size:
        raise LoadFailed(f"draft {draft.ref} cannot draft for {target.ref}: vocabulary differs")
    return ModelDrafter(draft_backend, draft.ref)  # type: ignore[arg-type]


def describe_plan(plan: Plan) -> str:
    """A plan in words, as `slimserve models` shows it."""
    if plan.backend == "llamacpp":
        return f"llama.cpp {plan.weights}, extra buffers {'on' if plan.extra_buffers else 'off'}"
    if plan.backend == "llama":
        return f"torch Llama {plan.dtype}" + (" int8 weights" if plan.weights == "int8" else "")
    if plan.backend == "hf":
        return f"transformers eager {plan.dtype}"
    return f"plugin {plan.backend}"


def _return_freed_memory() -> None:
    """Hand the loading's freed heap back to the OS (glibc keeps it otherwise: ~300 MB of
    resident memory after converting SmolLM2 for llama.cpp). A no-op without glibc."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def warm_up(model: LocalModel) -> None:
    """One short generation and one score, so the first real request pays no first-call cost."""
    done = threading.Event()
    ids = tuple(model.tokenizer("Hello")["input_ids"]) or (0,)
    req = GenerationRequest(
        request_id=f"warmup-{uuid.uuid4().hex[:8]}",
        prompt=Prompt(ids=ids),
        sampling=SamplingParams(),
        stopping=StopParams(max_new_tokens=4, ignore_eos=True),
    )
    model.engine.submit(req, lambda ev: done.set() if ev.finish or ev.error else None)
    done.wait(120)
    model.engine.score(list(ids), [[ids[-1]]]).result(120)


def _kv_layout_words(backend: Any) -> str:
    """ ", KV cache split per stream" or ", KV cache unified" for a llama.cpp backend."""
    layout = getattr(backend, "kv_layout", None)
    if layout is None:
        return ""
    return ", KV cache split per stream" if layout == "split" else ", KV cache unified"

"""Loaded models: registry artifact → weights on a device → backend → running engine."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch

from slimserve.engine.backends.base import Backend
from slimserve.engine.backends.hf import HFBackend, kv_bytes_per_token
from slimserve.engine.config import ModelConfig
from slimserve.engine.errors import (
    EngineError,
    IntegrityFailure,
    InvalidRequest,
    NotReady,
    UnknownModel,
)
from slimserve.engine.scheduler import Engine, EngineConfig
from slimserve.engine.types import GenerationRequest, SamplingParams, StopParams
from slimserve.registry.artifact import load_model
from slimserve.registry.errors import IntegrityError, RegistryError
from slimserve.registry.errors import ModelNotFound as RegistryNotFound
from slimserve.registry.store import Artifact, Registry, validate_alias

log = logging.getLogger(__name__)

#: Wraps a freshly built backend (tests inject slow or failing devices through it).
BackendHook = Callable[[Backend], Backend]


class LoadFailed(EngineError):
    """A version passed its checksums but could not be loaded (FAILED_PRECONDITION)."""


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_CONTEXT_CAP = 4096


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name} requested but CUDA is not available")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


@dataclass(frozen=True, slots=True)
class LoadedModel:
    artifact: Artifact
    tokenizer: Any
    engine: Engine
    backend: Backend
    device: torch.device
    dtype: torch.dtype
    max_context: int
    loaded_at: float

    @property
    def name(self) -> str:
        return self.artifact.name

    @property
    def ref(self) -> str:
        return self.artifact.ref


def torchao_scheme(model: Any) -> str | None:
    """The torchao config type a model was quantized with (e.g. "Int8WeightOnlyConfig")."""
    qc = getattr(model.config, "quantization_config", None)
    if qc is None:
        return None
    if isinstance(qc, dict):
        if qc.get("quant_method") != "torchao":
            return None
        qt = qc.get("quant_type")
        if isinstance(qt, dict):
            inner = qt.get("default", qt)
            return str(inner.get("_type")) if isinstance(inner, dict) else str(inner)
        return str(qt)
    if str(getattr(getattr(qc, "quant_method", ""), "value", "")) != "torchao":
        return None
    return type(getattr(qc, "quant_type", None)).__name__


class _DequantizedStateDict(Mapping[str, torch.Tensor]):
    """A model's state dict with torchao tensors dequantized on access, one at a time,
    so building a backend never holds a second full-precision copy of the weights."""

    def __init__(self, model: Any) -> None:
        self._sd = model.state_dict()

    def __getitem__(self, key: str) -> torch.Tensor:
        v = self._sd[key]
        if type(v) in (torch.Tensor, torch.nn.Parameter):
            return v  # type: ignore[no-any-return]
        return v.dequantize().to(torch.float32)  # type: ignore[no-any-return]

    def __iter__(self) -> Iterator[str]:
        return iter(self._sd)

    def __len__(self) -> int:
        return len(self._sd)


_MIN_CONTEXT = 256


def context_length(model: Any, config: ModelConfig, dtype: torch.dtype) -> int:
    """Tokens per sequence: as configured, else the most the KV-cache budget allows.

    Raises:
        ValueError: the configured batch and context do not fit `kv_cache_mb`.
    """
    model_limit = int(getattr(model.config, "max_position_embeddings", 0) or _CONTEXT_CAP)
    per_token = kv_bytes_per_token(model.config, dtype)
    budget = config.kv_cache_mb * 2**20
    if config.max_seq_len:
        need = per_token * config.max_seq_len * config.max_batch
        if need > budget:
            raise ValueError(
                f"KV cache for max_batch={config.max_batch} x max_seq_len={config.max_seq_len} "
                f"needs {need / 2**20:.0f} MiB > kv_cache_mb={config.kv_cache_mb}; raise "
                "--kv-cache-mb or lower --max-batch/--max-seq-len"
            )
        return config.max_seq_len
    fit = budget // (per_token * config.max_batch)
    if fit < _MIN_CONTEXT:
        raise ValueError(
            f"kv_cache_mb={config.kv_cache_mb} leaves {fit} tokens per sequence for "
            f"max_batch={config.max_batch}; raise --kv-cache-mb or lower --max-batch"
        )
    return int(min(model_limit, _CONTEXT_CAP, fit))


def build_backend(
    model: Any, config: ModelConfig, max_seq_len: int, tokenizer_json: Path | None = None
) -> Backend:
    """The fastest backend that supports this model, or the eager one.

    "auto" on CPU is llama.cpp when llama-cpp-python is installed and the model is a Llama
    whose weights export to GGUF; else the static-cache Llama forward in torch; else eager.
    """
    from slimserve.engine.backends import llama, llamacpp

    param = next(model.parameters())
    dtype = torch.float32 if param.dtype == torch.int8 else param.dtype
    reason = llama.unsupported_reason(model.config)
    scheme = torchao_scheme(model)
    if config.backend == "llamacpp" or (
        config.backend == "auto" and param.device.type == "cpu" and llamacpp.available()
    ):
        weight_type = config.gguf_type
        if weight_type == "auto":
            int8 = scheme == "Int8WeightOnlyConfig"
            weight_type = "q8_0" if int8 else "f32" if dtype == torch.float32 else "f16"
        why = _llamacpp_unsupported(model, reason, scheme, tokenizer_json, weight_type)
        if why is None:
            assert tokenizer_json is not None
            return llamacpp.LlamaCppBackend(
                model.config,
                _DequantizedStateDict(model),
                tokenizer_json,
                max_slots=config.max_batch,
                max_seq_len=max_seq_len,
                threads=torch.get_num_threads(),  # what `serve --threads` set
                weight_type=weight_type,
            )
        if config.backend == "llamacpp":
            raise ValueError(f"backend 'llamacpp' cannot serve this model: {why}")
        log.info("not using llama.cpp: %s", why)
    if reason is None and dtype not in (torch.float32, torch.bfloat16):
        reason = f"dtype {dtype} (float32 or bfloat16 only)"
    if reason is None and scheme not in (None, "Int8WeightOnlyConfig"):
        reason = f"torchao {scheme} runs on torchao's own kernels"
    if config.backend == "llama" and reason is not None:
        raise ValueError(f"backend 'llama' cannot serve this model: {reason}")
    if config.backend in ("auto", "llama") and reason is None:
        if scheme == "Int8WeightOnlyConfig":
            # Per-row int8 dequantizes exactly to q * scale; the backend re-derives the same
            # int8 values and runs them on aten._weight_int8pack_mm.
            return llama.LlamaBackend(
                model.config,
                _DequantizedStateDict(model),
                max_slots=config.max_batch,
                max_seq_len=max_seq_len,
                dtype=dtype,
                device=param.device,
                weight_quant="int8",
            )
        return llama.LlamaBackend.from_model(
            model,
            max_slots=config.max_batch,
            max_seq_len=max_seq_len,
            dtype=dtype,
            device=param.device,
        )
    if reason is not None:
        log.info("using the eager backend: %s", reason)
    return HFBackend(model, max_slots=config.max_batch, max_seq_len=max_seq_len)


def _llamacpp_unsupported(
    model: Any,
    reason: str | None,
    scheme: str | None,
    tokenizer_json: Path | None,
    weight_type: str,
) -> str | None:
    from slimserve.engine.backends import llama, llamacpp

    if not llamacpp.available():
        return "llama-cpp-python is not installed (pip install 'slimserve[llamacpp]')"
    if next(model.parameters()).device.type != "cpu":
        return "llama.cpp serves on the CPU only here"
    if reason is not None:
        return reason
    if scheme not in (None, "Int8WeightOnlyConfig"):
        return f"torchao {scheme} has no GGUF equivalent"
    if tokenizer_json is None or not tokenizer_json.is_file():
        return "the artifact has no tokenizer.json"
    cfg = model.config
    n_heads = int(cfg.num_attention_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads)
    dims = (int(cfg.hidden_size), int(cfg.intermediate_size), n_heads * head_dim)
    # Quantized GGUF blocks hold 32 weights of a row: a pruned width like 1229 does not split.
    if weight_type in ("q8_0", "q4_1") and any(d % 32 for d in dims):
        return (
            f"{weight_type} needs hidden, intermediate and attention widths that are multiples "
            f"of 32, and this model has {dims}"
        )
    rope = llama._rope_parameters(cfg)
    if rope["rope_type"] != "default":
        return f"rope type {rope['rope_type']!r} is not exported to GGUF yet"
    return None


def load(
    artifact: Artifact, config: ModelConfig, backend_hook: BackendHook | None = None
) -> LoadedModel:
    """Verify, load, build the backend, start the engine and warm it up.

    Raises:
        IntegrityFailure: a file fails its checksum.
        LoadFailed: the files verify but do not make a model this server can run.
    """
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    try:
        model, tokenizer = load_model(artifact, device=device, dtype=dtype)
        max_seq_len = context_length(model, config, dtype)
        backend = build_backend(model, config, max_seq_len, artifact.path / "tokenizer.json")
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
    _return_freed_memory()
    if backend_hook is not None:
        backend = backend_hook(backend)
    engine = Engine(
        backend,
        cast(Any, tokenizer),
        EngineConfig(max_queue=config.max_queue, eos_token_ids=eos_ids),
    )
    engine.start()
    loaded = LoadedModel(
        artifact=artifact,
        tokenizer=tokenizer,
        engine=engine,
        backend=backend,
        device=device,
        dtype=dtype,
        max_context=max_seq_len,
        loaded_at=time.time(),
    )
    if config.warmup:
        warm_up(loaded)
    log.info("serving %s with backend %s on %s/%s", artifact.ref, backend.name, device, dtype)
    return loaded


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


def warm_up(model: LoadedModel) -> None:
    """One short generation and one score, so the first real request pays no first-call cost."""
    done = threading.Event()
    ids = tuple(model.tokenizer("Hello")["input_ids"]) or (0,)
    req = GenerationRequest(
        request_id=f"warmup-{uuid.uuid4().hex[:8]}",
        prompt_ids=ids,
        sampling=SamplingParams(),
        stopping=StopParams(max_new_tokens=4, ignore_eos=True),
    )
    model.engine.submit(req, lambda ev: done.set() if ev.finish or ev.error else None)
    done.wait(120)
    model.engine.score(list(ids), [[ids[-1]]]).result(120)


class ModelManager:
    """The models this server holds; resolves request refs to a loaded version."""

    def __init__(
        self,
        registry: Registry,
        config: ModelConfig,
        *,
        retire_grace_s: float = 60.0,
        backend_hook: BackendHook | None = None,
    ) -> None:
        self.registry = registry
        self.config = config
        #: Seconds a swapped-out version keeps running for its in-flight requests.
        self.retire_grace_s = retire_grace_s
        self.backend_hook = backend_hook
        self._models: dict[str, LoadedModel] = {}
        self._default: str | None = None
        self._lock = threading.Lock()
        #: True while the server loads its configured models (requests get UNAVAILABLE).
        self.loading = False

    def load(self, name: str, ref: str = "", *, make_default: bool = False) -> LoadedModel:
        """Load a version beside the current one, then swap (blocking; not on the loop).

        In-flight requests finish on the version they started with; a load that fails
        leaves the current version serving. Loading the version already served is a no-op.
        """
        _check_ref(ref)
        try:
            artifact = self.registry.get(name, ref)
        except RegistryNotFound as exc:
            raise UnknownModel(str(exc)) from exc
        except IntegrityError as exc:
            raise IntegrityFailure(str(exc)) from exc
        except RegistryError as exc:
            raise InvalidRequest("model", str(exc)) from exc
        with self._lock:
            current = self._models.get(name)
            if current is not None and current.artifact.digest == artifact.digest:
                if make_default:
                    self._default = name
                return current  # already serving this exact version
        loaded = load(artifact, self.config, self.backend_hook)
        with self._lock:
            old = self._models.get(name)
            self._models[name] = loaded
            if make_default or self._default is None:
                self._default = name
        if old is not None:
            threading.Thread(target=_retire, args=(old, self.retire_grace_s), daemon=True).start()
        log.info("%s now serves %s", name, loaded.ref)
        return loaded

    def unload(self, name: str) -> None:
        with self._lock:
            old = self._models.pop(name, None)
            if old is None:
                raise UnknownModel(f"model {name!r} is not loaded")
            if self._default == name:
                self._default = next(iter(self._models), None)
        _retire(old, self.retire_grace_s)

    def get(self, name: str = "", ref: str = "") -> LoadedModel:
        """The loaded model a request names; `ref` must resolve to the loaded version."""
        with self._lock:
            key = name or self._default
            loaded = self._models.get(key) if key else None
            loaded_names = sorted(self._models)
        if loaded is None and self.loading:
            raise NotReady("models are still loading; retry shortly")
        if loaded is None:
            what = f"model {name!r} is not loaded" if name else "no default model is loaded"
            raise UnknownModel(f"{what} (loaded: {', '.join(loaded_names) or 'none'})")
        if ref and ref != str(loaded.artifact.version):
            if ref.isdigit():
                raise UnknownModel(
                    f"{loaded.name} version {ref} is not loaded (serving {loaded.ref})"
                )
            try:
                validate_alias(ref) if ref != "latest" else None
                version = self.registry.resolve(loaded.name, ref)
            except (RegistryNotFound, RegistryError) as exc:
                raise UnknownModel(str(exc)) from exc
            if version != loaded.artifact.version:
                raise UnknownModel(
                    f"{loaded.name}@{ref} is version {version}, which is not loaded "
                    f"(serving {loaded.ref})"
                )
        return loaded

    def all(self) -> list[LoadedModel]:
        with self._lock:
            return list(self._models.values())

    @property
    def default_name(self) -> str | None:
        return self._default

    def shutdown(self) -> None:
        with self._lock:
            models = list(self._models.values())
            self._models.clear()
        for m in models:
            m.engine.shutdown()


def _check_ref(ref: str) -> None:
    if ref in ("", "latest") or (ref.isascii() and ref.isdigit()):
        return
    try:
        validate_alias(ref)
    except RegistryError as exc:
        raise InvalidRequest("ref", str(exc)) from exc


def _retire(model: LoadedModel, grace_s: float = 60.0) -> None:
    """Let in-flight requests finish on the old version, then stop its engine."""
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        stats = model.engine.stats()
        if stats.running == 0 and stats.queued == 0:
            break
        time.sleep(0.05)
    model.engine.shutdown()
    log.info("retired %s", model.ref)

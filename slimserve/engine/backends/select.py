"""The ways a loaded model can be served (`Plan`s), and building the backend for one.

A plan names a backend, its weight format and its kernels: llama.cpp with a GGUF type and
its extra (repacked, AMX) weight buffers on or off, the static-cache Llama forward in
float32, bfloat16 or int8, the eager Hugging Face forward, or a backend plugin named by
import path. `plans_for` lists what an artifact allows on this machine, with the reason for
each refusal; which of them serves is decided by measurement (`slimserve.engine.qualify`).
`build_backend(..., plan=None)` keeps the static choice for in-process callers (evaluate,
benchmarks).

`open_model` reads what a plan needs: for a llama.cpp plan, the artifact's safetensors one
tensor at a time (`registry.artifact.ArtifactWeights`) and the `tokenizers` tokenizer, so
the engine process imports neither transformers nor torchao; for a torch plan, the
transformers model. Imports engine and registry modules only; torch when a function runs.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

from slimserve.engine.config import GgufWeights, ModelConfig
from slimserve.engine.machine import cpu_info, llamacpp_build_problem
from slimserve.registry.artifact import ArtifactWeights

if TYPE_CHECKING:
    import torch

    from slimserve.engine.backends.base import Backend
    from slimserve.registry.store import Artifact

log = logging.getLogger(__name__)


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


class _DequantizedStateDict(Mapping[str, "torch.Tensor"]):
    """A model's state dict with torchao tensors dequantized on access, one at a time,
    so building a backend never holds a second full-precision copy of the weights."""

    def __init__(self, model: Any) -> None:
        self._sd = model.state_dict()

    def __getitem__(self, key: str) -> torch.Tensor:
        import torch

        v = self._sd[key]
        if type(v) in (torch.Tensor, torch.nn.Parameter):
            return v  # type: ignore[no-any-return]
        return v.dequantize().to(torch.float32)  # type: ignore[no-any-return]

    def __contains__(self, key: object) -> bool:
        return key in self._sd  # without dequantizing

    def __iter__(self) -> Iterator[str]:
        return iter(self._sd)

    def __len__(self) -> int:
        return len(self._sd)


#: Every value a plan's `weights` and `dtype` can take (a cached plan is held to them).
PLAN_WEIGHTS = (*(w for w in get_args(GgufWeights) if w != "auto"), "int8", "none")
PLAN_DTYPES = ("float32", "bfloat16", "float16")
BUILTIN_BACKENDS = ("llamacpp", "llama", "hf")


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    """One way to serve an artifact."""

    #: "llamacpp", "llama" (torch static cache), "hf" (eager), or "module:factory", a plugin
    #: called as factory(model, config, max_seq_len, tokenizer_json) -> Backend.
    backend: str
    #: llama.cpp: the GGUF type of linear weights; llama: "int8" or "none".
    weights: str = "none"
    #: The torch dtype of weights and activations ("float32" or "bfloat16").
    dtype: str = "float32"
    #: llama.cpp: repacked / AMX weight buffers (the fast kernels this CPU qualifies for).
    extra_buffers: bool = False
    #: llama.cpp: threads of a one-token pass, measured fastest at qualification (0: not
    #: measured, all threads). Not part of `key`: a measurement of the plan, not another plan.
    decode_threads: int = 0

    @property
    def key(self) -> str:
        if self.backend == "llamacpp":
            return f"llamacpp/{self.weights}/extra-{'on' if self.extra_buffers else 'off'}"
        if self.backend == "llama":
            return f"llama/{self.dtype}" + ("/int8" if self.weights == "int8" else "")
        return f"{self.backend}/{self.dtype}"

    @property
    def trusted(self) -> bool:
        """The float32 torch forwards are the reference every other plan is checked against."""
        return self.backend in ("llama", "hf") and self.dtype == "float32"

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> Plan:
        return cls(
            backend=str(d["backend"]),
            weights=str(d.get("weights", "none")),
            dtype=str(d.get("dtype", "float32")),
            extra_buffers=bool(d.get("extra_buffers", False)),
            decode_threads=int(str(d.get("decode_threads", 0))),
        )


def plan_allowed(plan: Plan, config: ModelConfig) -> str | None:
    """Why `config` does not allow `plan` (None: it does). Code runs only by the
    configuration's word: a plugin plan must be one of `config.load.backend_plugins`, a
    built-in one of the backends `config.load.backend` names."""
    load = config.load
    if plan.backend not in BUILTIN_BACKENDS:
        if plan.backend not in load.backend_plugins:
            return f"the plugin {plan.backend!r} is not among the configured backend plugins"
        return None
    if load.backend not in ("auto", plan.backend):
        return f"the configured backend is {load.backend}"
    if plan.weights not in PLAN_WEIGHTS or plan.dtype not in PLAN_DTYPES:
        return f"unknown weights {plan.weights!r} or dtype {plan.dtype!r}"
    return None


def _gguf_weights(config: ModelConfig, scheme: str | None, dtype: str) -> str:
    if config.load.gguf_type != "auto":
        return config.load.gguf_type
    if scheme == "Int8WeightOnlyConfig":
        return "q8_0"
    return "f32" if dtype == "float32" else "f16"


def _dtype_and_device(model: Any) -> tuple[str, str]:
    """The weights' dtype ("float32" for torchao int8, whose values dequantize to it) and
    device type, of a transformers model or of `ArtifactWeights` (read on the CPU)."""
    if isinstance(model, ArtifactWeights):
        return model.dtype, "cpu"
    param = next(model.parameters())
    dtype = str(param.dtype).removeprefix("torch.")
    return ("float32" if dtype == "int8" else dtype), param.device.type


def plans_for(
    model: Any, config: ModelConfig, tokenizer_json: Path | None
) -> tuple[list[Plan], dict[str, str]]:
    """The plans this model can be served with here, in the static order of preference, and
    why each other backend is refused (backend or plan key -> reason)."""
    from slimserve.engine import spec

    dtype, device = _dtype_and_device(model)
    scheme = torchao_scheme(model)
    llama_reason = spec.unsupported_reason(model.config)
    plans: list[Plan] = []
    refused: dict[str, str] = {}
    for factory in config.load.backend_plugins:
        plans.append(Plan(backend=factory, dtype=dtype))
    if config.load.backend in ("auto", "llamacpp"):
        weights = _gguf_weights(config, scheme, dtype)
        why = _llamacpp_unsupported(model.config, device=device, reason=llama_reason,
                                    scheme=scheme, tokenizer_json=tokenizer_json,
                                    weight_type=weights)  # fmt: skip
        if why is None:
            plans += [
                Plan(backend="llamacpp", weights=weights, extra_buffers=x) for x in (True, False)
            ]
        else:
            refused["llamacpp"] = why
    if config.load.backend in ("auto", "llama"):
        why = llama_reason
        if why is None and dtype not in ("float32", "bfloat16"):
            why = f"dtype torch.{dtype} (float32 or bfloat16 only)"
        if why is None and scheme not in (None, "Int8WeightOnlyConfig"):
            why = f"torchao {scheme} runs on torchao's own kernels"
        if why is None:
            weights = "int8" if scheme == "Int8WeightOnlyConfig" else "none"
            plans.append(Plan(backend="llama", weights=weights, dtype=dtype))
            if config.load.dtype == "auto" and dtype == "float32" and device == "cpu":
                if weights != "none":
                    refused["llama/bfloat16"] = "int8 weights run as int8 (llama/float32/int8)"
                elif cpu_info().has_native_bf16:
                    plans.append(Plan(backend="llama", dtype="bfloat16"))
                else:
                    refused["llama/bfloat16"] = "this CPU has no native bfloat16 (AVX512-BF16/AMX)"
        else:
            refused["llama"] = why
    if config.load.backend in ("auto", "hf"):
        plans.append(Plan(backend="hf", dtype=dtype))
    if not plans:
        raise ValueError(f"backend {config.load.backend!r} cannot serve this model: {refused}")
    return plans, refused


def quiet_torch_beside(plan: Plan) -> None:
    """Drop torch's intra-op pool and numpy's BLAS (OpenBLAS) to one thread when `plan`
    runs the forward in llama.cpp: torch and numpy only pick tokens then, and their
    spinning workers would slow llama.cpp's on the same cores (the engine, qualification
    and the speculate stage all run plans so). OpenBLAS reads OPENBLAS_NUM_THREADS only
    when it loads, before this process forked from its forkserver: threadpoolctl sets the
    count at run time instead."""
    if plan.backend == "llamacpp":
        import torch
        from threadpoolctl import ThreadpoolController  # type: ignore[import-untyped]

        torch.set_num_threads(1)
        ThreadpoolController().limit(limits=1, user_api="blas")


def build_backend(
    model: Any,
    config: ModelConfig,
    max_seq_len: int,
    tokenizer_json: Path | None = None,
    plan: Plan | None = None,
) -> Backend:
    """The backend for `plan`; without one, the first plan `plans_for` lists.

    Raises:
        ValueError: the model cannot be served by the configured backend or the plan.
    """
    if plan is None:
        plans, refused = plans_for(model, config, tokenizer_json)
        for key, why in refused.items():
            log.info("not using %s: %s", key, why)
        plan = plans[0]
    return _build(plan, model, config, max_seq_len, tokenizer_json)


def _build(
    plan: Plan, model: Any, config: ModelConfig, max_seq_len: int, tokenizer_json: Path | None
) -> Backend:
    refused = plan_allowed(plan, config)
    if refused is not None:  # never import a path the configuration did not name
        raise ValueError(f"plan {plan.key}: {refused}")
    import torch

    from slimserve.engine.backends import llama, llamacpp
    from slimserve.engine.backends.hf import HFBackend

    if plan.backend == "llamacpp":
        if tokenizer_json is None:
            raise ValueError("llama.cpp needs the artifact's tokenizer.json")
        return llamacpp.LlamaCppBackend(
            model.config,
            model if isinstance(model, ArtifactWeights) else _DequantizedStateDict(model),
            tokenizer_json,
            max_slots=config.cache.max_batch,
            max_seq_len=max_seq_len,
            threads=torch.get_num_threads(),  # what `serve --threads` set
            decode_threads=min(
                config.load.decode_threads or plan.decode_threads, torch.get_num_threads()
            ),
            threadpool=config.load.ggml_threadpool,
            weight_type=plan.weights,  # type: ignore[arg-type]
            extra_buffers=plan.extra_buffers,
            kv_pool_bytes=config.cache.kv_pool_bytes(),
            kv_layout=config.cache.kv_layout,
        )
    if isinstance(model, ArtifactWeights):
        raise ValueError(f"plan {plan.key} needs the model loaded by transformers (open_model)")
    param = next(model.parameters())
    if plan.backend == "llama":
        dtype = getattr(torch, plan.dtype)
        if plan.weights == "int8":
            # Per-row int8 dequantizes exactly to q * scale; the backend re-derives the same
            # int8 values and runs them on aten._weight_int8pack_mm.
            return llama.LlamaBackend(
                model.config,
                _DequantizedStateDict(model),
                max_slots=config.cache.max_batch,
                max_seq_len=max_seq_len,
                dtype=dtype,
                device=param.device,
                weight_quant="int8",
            )
        return llama.LlamaBackend.from_model(
            model, max_slots=config.cache.max_batch, max_seq_len=max_seq_len, dtype=dtype,
            device=param.device,
        )  # fmt: skip
    if plan.backend == "hf":
        return HFBackend(model, max_slots=config.cache.max_batch, max_seq_len=max_seq_len)
    module, _, attr = plan.backend.partition(":")
    factory = getattr(importlib.import_module(module), attr)
    backend: Backend = factory(model, config, max_seq_len, tokenizer_json)
    return backend


def _llamacpp_unsupported(
    config: Any,
    *,
    device: str,
    reason: str | None,
    scheme: str | None,
    tokenizer_json: Path | None,
    weight_type: str,
) -> str | None:
    from slimserve.engine.backends import llamacpp

    if not llamacpp.available():
        return "llama-cpp-python is not installed (pip install 'slimserve[llamacpp]')"
    build = llamacpp_build_problem()
    if build is not None:
        return build
    if device != "cpu":
        return "llama.cpp serves on the CPU only here"
    if reason is not None:
        return reason
    if scheme not in (None, "Int8WeightOnlyConfig"):
        return f"torchao {scheme} has no GGUF equivalent"
    if tokenizer_json is None or not tokenizer_json.is_file():
        return "the artifact has no tokenizer.json"
    from slimserve.engine import spec

    # Quantized GGUF blocks hold 32 weights of a row: a pruned width like 1229 does not split.
    return spec.gguf_unsupported_reason(config, weight_type)


def open_model(
    artifact: Artifact,
    config: ModelConfig,
    plan: Plan | None,
    *,
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[Any, Any]:
    """Verify `artifact`, then (model, tokenizer) to build `plan`'s backend from (None: the
    static choice): `ArtifactWeights` and `slimserve.engine.tokenizer`'s tokenizer when a
    llama.cpp plan serves and the files allow it, else transformers' model and tokenizer.
    Loads a target and a draft model alike.

    Raises:
        IntegrityError: a file fails its checksum.
    """
    from slimserve.registry.artifact import load_model

    verified = False
    if plan is None or plan.backend == "llamacpp":
        artifact.verify()
        verified = True
        opened = _open_weights(artifact, config, plan, device, dtype)
        if opened is not None:
            return opened
    return load_model(artifact, device=device, dtype=dtype, verify=not verified)


def _open_weights(
    artifact: Artifact, config: ModelConfig, plan: Plan | None, device: Any, dtype: Any
) -> tuple[Any, Any] | None:
    from slimserve.engine.tokenizer import Tokenizer, load_tokenizer

    why = None if device.type == "cpu" else f"device {device}"
    why = why or Tokenizer.unsupported_reason(artifact.path)
    weights = None
    if why is None:
        try:
            weights = ArtifactWeights(artifact, dtype=str(dtype).removeprefix("torch."))
        except ValueError as exc:
            why = str(exc)
    if weights is not None and plan is None:
        first = plans_for(weights, config, artifact.path / "tokenizer.json")[0][0]
        if first.backend != "llamacpp":
            why = f"the static choice is {first.key}"
    if why is not None:
        if weights is not None:
            weights.close()
        log.info("%s: loading through transformers (%s)", artifact.ref, why)
        return None
    return weights, load_tokenizer(artifact.path)

"""Which backend serves a loaded model: llama.cpp, the static-cache Llama forward, or eager."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from slimserve.engine import spec
from slimserve.engine.backends.base import Backend
from slimserve.engine.backends.hf import HFBackend
from slimserve.engine.config import ModelConfig

log = logging.getLogger(__name__)


#: Wraps a freshly built backend (tests inject slow or failing devices through it).
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
    reason = spec.unsupported_reason(model.config)
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
    from slimserve.engine.backends import llamacpp

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
    # Quantized GGUF blocks hold 32 weights of a row: a pruned width like 1229 does not split.
    return spec.gguf_unsupported_reason(model.config, weight_type)

"""Write a Llama artifact's weights as a GGUF file for llama.cpp, with the `gguf` package.

This is the bridge to the llama.cpp CPU backend (`slimserve.engine.backends.llamacpp`): the server
verifies a published artifact's checksums, loads its safetensors, and converts them here into
a private file that only llama.cpp reads. No GGUF from outside the registry is ever served.

Written by hand because nothing on PyPI converts an in-memory state dict: llama.cpp's
`convert_hf_to_gguf.py` ships only in its source tree and reads model directories. What it
does that matters is reproduced: tensor names, the q/k row permutation (llama.cpp applies
rotary embeddings to interleaved pairs, Hugging Face to split halves), and the metadata keys
llama.cpp needs to load a Llama model. The tokenizer is written only so the file loads:
slimserve tokenizes with the artifact's own tokenizer and hands llama.cpp token ids.

Weight types (`GgufType`):
- "q8_0": int8 in blocks of 32 with one scale each. Near-lossless for float weights, and an
  exact re-encode of weights that came from a Q8_0 or 4-bit GGUF file.
- "q4_1": 4-bit in blocks of 32 with a scale and a minimum: an exact re-encode of weights that
  came from a Q4_1 file (the default model), lossy for anything else.
- "f16", "f32": unquantized.
Norms are always float32; the token embedding is Q8_0 for the 4-bit types.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

log = logging.getLogger(__name__)

GgufType = Literal["q8_0", "q4_1", "f16", "f32"]
GGUF_TYPES: tuple[GgufType, ...] = ("q8_0", "q4_1", "f16", "f32")


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Hugging Face's split-half rotary layout -> llama.cpp's interleaved one (rows of q/k)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def export_gguf(
    config: Any,
    state_dict: Mapping[str, torch.Tensor],
    tokenizer_json: Path,
    path: Path,
    weight_type: GgufType = "q8_0",
    *,
    name: str = "slimserve",
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write `path` (a llama-architecture GGUF) from a `LlamaForCausalLM` state dict.

    Args:
        config: the model's `LlamaConfig` (see `backends.llama.unsupported_reason`).
        state_dict: float weights under Hugging Face names (torchao tensors dequantized).
        tokenizer_json: the artifact's `tokenizer.json` (a byte-level BPE).
        weight_type: how linear weights are stored (see the module docstring).
        progress: called with (tensors written, tensors in all).

    Raises:
        ValueError: not a Llama config, not a BPE tokenizer, or an unknown weight type.
    """
    import gguf

    from slimserve.engine.spec import LlamaShape, gguf_unsupported_reason

    if weight_type not in GGUF_TYPES:
        raise ValueError(f"weight type {weight_type!r} is not one of {GGUF_TYPES}")
    reason = gguf_unsupported_reason(config, weight_type)
    if reason is not None:
        raise ValueError(f"cannot export to GGUF: {reason}")
    shape = LlamaShape.from_config(config)
    q = gguf.GGMLQuantizationType
    linear_type = {"q8_0": q.Q8_0, "q4_1": q.Q4_1, "f16": q.F16, "f32": q.F32}[weight_type]
    embed_type = {"q8_0": q.Q8_0, "q4_1": q.Q8_0, "f16": q.F16, "f32": q.F32}[weight_type]

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name)
    writer.add_context_length(int(getattr(config, "max_position_embeddings", 2048)))
    writer.add_embedding_length(shape.hidden_size)
    writer.add_block_count(shape.n_layers)
    writer.add_feed_forward_length(shape.intermediate_size)
    writer.add_head_count(shape.n_heads)
    writer.add_head_count_kv(shape.n_kv_heads)
    writer.add_key_length(shape.head_dim)
    writer.add_value_length(shape.head_dim)
    writer.add_rope_dimension_count(shape.head_dim)
    writer.add_rope_freq_base(shape.rope_theta)
    writer.add_layer_norm_rms_eps(shape.rms_norm_eps)
    writer.add_vocab_size(shape.vocab_size)
    writer.add_file_type(
        {"q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
         "f16": gguf.LlamaFileType.MOSTLY_F16, "f32": gguf.LlamaFileType.ALL_F32}[weight_type]
    )  # fmt: skip
    _add_tokenizer(writer, tokenizer_json, shape.vocab_size)
    plan = _tensor_plan(shape, state_dict, linear_type, embed_type)
    missing = [hf for _, hf, _, _ in plan if hf not in state_dict]
    if missing:
        raise ValueError(f"state_dict has no {missing[0]!r}; expected LlamaForCausalLM names")
    shapes = _shapes(shape)
    # The header lists every tensor's shape and size first; then each tensor is read,
    # converted and written on its own, so the peak is one tensor, not the model.
    for gguf_name, hf_name, _, kind in plan:
        info = _stored_info(shapes[_tail(hf_name)], kind)
        writer.add_tensor_info(gguf_name, info[0], info[1], info[2], raw_dtype=info[3])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for done, (_, hf_name, heads, kind) in enumerate(plan, 1):
        data = state_dict[hf_name].detach().to("cpu", torch.float32).numpy()
        rows = shapes[_tail(hf_name)]
        if data.shape != rows:
            raise ValueError(f"{hf_name} has shape {data.shape}; the config says {rows}")
        writer.write_tensor_data(_stored(_permute(data, heads) if heads else data, kind))
        del data
        if progress is not None:
            progress(done, len(plan))
    writer.close()
    log.info("wrote %s (%s, %.0f MB)", path, weight_type, path.stat().st_size / 1e6)
    return path


def _tensor_plan(
    shape: Any, state_dict: Mapping[str, Any], linear_type: Any, embed_type: Any
) -> list[tuple[str, str, int, Any]]:
    """(GGUF name, Hugging Face name, heads to permute q/k rows by (0: none), storage type)
    of every tensor, in the order they are written."""
    import gguf

    q = gguf.GGMLQuantizationType
    plan: list[tuple[str, str, int, Any]] = [
        ("token_embd.weight", "model.embed_tokens.weight", 0, embed_type),
        ("output_norm.weight", "model.norm.weight", 0, q.F32),
    ]
    if not shape.tie_word_embeddings and "lm_head.weight" in state_dict:
        plan.append(("output.weight", "lm_head.weight", 0, embed_type))
    for i in range(shape.n_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        plan += [
            (b + "attn_norm.weight", p + "input_layernorm.weight", 0, q.F32),
            (b + "attn_q.weight", p + "self_attn.q_proj.weight", shape.n_heads, linear_type),
            (b + "attn_k.weight", p + "self_attn.k_proj.weight", shape.n_kv_heads, linear_type),
            (b + "attn_v.weight", p + "self_attn.v_proj.weight", 0, linear_type),
            (b + "attn_output.weight", p + "self_attn.o_proj.weight", 0, linear_type),
            (b + "ffn_norm.weight", p + "post_attention_layernorm.weight", 0, q.F32),
            (b + "ffn_gate.weight", p + "mlp.gate_proj.weight", 0, linear_type),
            (b + "ffn_up.weight", p + "mlp.up_proj.weight", 0, linear_type),
            (b + "ffn_down.weight", p + "mlp.down_proj.weight", 0, linear_type),
        ]
    return plan


def _tail(hf_name: str) -> str:
    """ "model.layers.3.mlp.up_proj.weight" -> "mlp.up_proj.weight"; "lm_head.weight" kept."""
    name = hf_name.removeprefix("model.")
    return name.split(".", 2)[2] if name.startswith("layers.") else name


def _shapes(shape: Any) -> dict[str, tuple[int, ...]]:
    """Each weight's (rows, columns) by its name's tail, from the config's dimensions."""
    hidden, q_width = shape.hidden_size, shape.n_heads * shape.head_dim
    kv_width, inter = shape.n_kv_heads * shape.head_dim, shape.intermediate_size
    return {
        "embed_tokens.weight": (shape.vocab_size, hidden),
        "lm_head.weight": (shape.vocab_size, hidden),
        "norm.weight": (hidden,),
        "input_layernorm.weight": (hidden,),
        "post_attention_layernorm.weight": (hidden,),
        "self_attn.q_proj.weight": (q_width, hidden),
        "self_attn.k_proj.weight": (kv_width, hidden),
        "self_attn.v_proj.weight": (kv_width, hidden),
        "self_attn.o_proj.weight": (hidden, q_width),
        "mlp.gate_proj.weight": (inter, hidden),
        "mlp.up_proj.weight": (inter, hidden),
        "mlp.down_proj.weight": (hidden, inter),
    }


def _stored_info(shape: tuple[int, ...], kind: Any) -> tuple[tuple[int, ...], Any, int, Any]:
    """(shape, numpy dtype, bytes, raw type) as `GGUFWriter.add_tensor` records a tensor
    of `shape` stored as `kind`, so the header is the one it would write."""
    import gguf

    q = gguf.GGMLQuantizationType
    if kind in (q.F32, q.F16):
        dtype = np.dtype(np.float32 if kind == q.F32 else np.float16)
        return shape, dtype, int(np.prod(shape)) * dtype.itemsize, None
    stored = gguf.quants.quant_shape_to_byte_shape(shape, kind)
    return stored, np.dtype(np.uint8), int(np.prod(stored)), kind


def _stored(data: np.ndarray, kind: Any) -> np.ndarray:
    """`data` (float32) as GGUF stores `kind`: cast, or quantized to bytes."""
    import gguf

    q = gguf.GGMLQuantizationType
    if kind in (q.F32, q.F16):
        return data.astype(np.float32 if kind == q.F32 else np.float16)
    return gguf.quants.quantize(data, kind)


def _add_tokenizer(writer: Any, tokenizer_json: Path, vocab_size: int) -> None:
    """A byte-level BPE vocabulary, enough for llama.cpp to load the file."""
    import gguf

    spec = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise ValueError(f"only BPE tokenizers export to GGUF, not {model.get('type')!r}")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for text, i in model["vocab"].items():
        if i < vocab_size:
            tokens[i], types[i] = text, gguf.TokenType.NORMAL
    for added in spec.get("added_tokens", []):
        i = added["id"]
        if i < vocab_size:
            tokens[i] = added["content"]
            special = added.get("special")
            types[i] = gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)

"""A Llama forward written directly in torch, over a static slot-addressed KV cache.

`LlamaBackend` implements `slimserve.engine.backends.base.Backend` for Llama-architecture models
(`model_type == "llama"`: RMSNorm, rotary embeddings, grouped-query attention, SiLU-gated MLP)
in the manner of gpt-fast: weights are plain tensors, the forward is a handful of functions,
and no `transformers` code runs per step. q/k/v and gate/up projections are fused into one
matmul each. The cache is preallocated per layer as `(max_slots, n_kv_heads, max_seq_len,
head_dim)`; a decode step writes one position per slot, each slot at its own length, and a
mask lets each row attend only to its own slot's valid positions.

On CPU the linear weights are prepacked for oneDNN (`pack_weights`), which is what makes
bfloat16 pay off here; `weight_quant="int8"` stores decoder weights as int8 with per-channel
scales, which is a little faster than packed bfloat16 at batch 1 and much slower at batch 16
(measured on SmolLM2-135M, see `scripts/probe_llama_backend.py`).

Construct from a loaded `LlamaForCausalLM` with `LlamaBackend.from_model(model, ...)`, or from
its config and state dict with `LlamaBackend(config, state_dict, ...)`. `supports(config)` says
whether a Hugging Face config can use this backend; `unsupported_reason(config)` says why not.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F  # noqa: N812

from slimserve.engine.backends.base import (
    Feed,
    ScorePlan,
    check_copy_prefix,
    check_decode,
    check_extend,
    check_feeds,
    check_ids,
    check_slot,
    check_truncate,
    prompt_logprobs_from,
)
from slimserve.engine.spec import LlamaShape
from slimserve.engine.types import TokenLogprob

if TYPE_CHECKING:
    from torch import nn

WeightQuant = Literal["none", "int8"]

_DTYPES = (torch.float32, torch.bfloat16)

# (layer index, q (B, H, T, D), k (B, Hkv, T, D), v (B, Hkv, T, D)) -> (B, T, H * D)
_Attention = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _inv_freq(shape: LlamaShape) -> torch.Tensor:
    """Rotary inverse frequencies (head_dim // 2,), float32, computed as transformers does."""
    dim = shape.head_dim
    inv = 1.0 / (shape.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    rope = shape.rope
    if rope["rope_type"] == "linear":
        return inv / float(rope["factor"])
    if rope["rope_type"] == "llama3":
        factor = float(rope["factor"])
        low, high = float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
        old_len = float(rope["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old_len / low, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, smoothed, scaled)
    return inv


def _rope_tables(shape: LlamaShape, max_seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for every position, each (max_seq_len, head_dim), float32."""
    positions = torch.arange(max_seq_len, dtype=torch.float32)
    freqs = torch.outer(positions, _inv_freq(shape))  # (S, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (S, D)
    return emb.cos(), emb.sin()


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, T, heads, D) by cos/sin (B, T, 1, D), half-split layout as in transformers."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether oneDNN can prepack weights of `dtype` on `device`."""
    if device.type != "cpu" or not torch._C._has_mkldnn:
        return False
    return dtype == torch.float32 or bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


class _Linear:
    """y = x @ W.T for x (..., in), with W stored one of three ways.

    - "dense": a plain tensor, `F.linear`.
    - "packed": prepacked into oneDNN's blocked layout (CPU). Same numbers as dense (to
      float rounding). Decode on SmolLM2-135M, one thread: bf16 ~1.5x faster at batch 1
      and 16; fp32 unchanged at batch 1, ~1.5x at batch 16.
    - "int8": int8 weights with one scale per output channel, `aten._weight_int8pack_mm`
      on bfloat16 activations whatever the model dtype (its float32 CPU kernel is a slow
      reference path, ~10x slower).
    """

    __slots__ = ("kind", "scales", "weight")

    def __init__(
        self, weight: torch.Tensor, *, dtype: torch.dtype, quant: WeightQuant, pack_batch: int
    ) -> None:
        """`pack_batch` > 0 prepacks for about that many rows per call; 0 keeps W dense."""
        self.scales: torch.Tensor | None = None
        if quant == "int8":
            w = weight.float()
            scales = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0  # (out,)
            self.kind = "int8"
            self.weight = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
            self.scales = scales.to(torch.bfloat16)  # the kernel wants the activation dtype
        elif pack_batch > 0:
            self.kind = "packed"
            dense = weight.to(dtype).contiguous()
            self.weight = torch.ops.mkldnn._reorder_linear_weight(dense, pack_batch)
        else:
            self.kind = "dense"
            self.weight = weight.to(dtype).contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "dense":
            return F.linear(x, self.weight)
        if self.kind == "packed":
            out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(
                x, self.weight, None, "none", [], ""
            )
            return out
        assert self.scales is not None
        flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)  # (B * T, in)
        out = torch.ops.aten._weight_int8pack_mm(flat, self.weight, self.scales)
        return out.to(x.dtype).view(*x.shape[:-1], out.shape[-1])  # (B, T, out)


@dataclass(slots=True, kw_only=True)
class _Layer:
    attn_norm: torch.Tensor
    wqkv: _Linear  # (H + 2 * Hkv) * D outputs
    wo: _Linear
    mlp_norm: torch.Tensor
    w_gate_up: _Linear  # 2 * intermediate outputs
    w_down: _Linear


class LlamaBackend:
    """Llama forward passes over a static, slot-addressed KV cache (see module docstring)."""

    name = "llama-static-cache"

    def __init__(
        self,
        config: Any,
        state_dict: Mapping[str, torch.Tensor],
        *,
        max_slots: int,
        max_seq_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        weight_quant: WeightQuant = "none",
        pack_weights: bool = True,
    ) -> None:
        """Copy (fusing, casting, optionally quantizing) the weights and allocate the cache.

        Args:
            config: a `LlamaConfig` (see `supports`).
            state_dict: `LlamaForCausalLM.state_dict()` names (`model.layers.0...`, `lm_head`).
            max_slots: sequences that can hold a cache at once.
            max_seq_len: tokens (prompt + generated) one slot holds.
            dtype: float32 or bfloat16, for weights, activations and the cache.
            device: where weights and cache live.
            weight_quant: "int8" stores every decoder-layer linear weight as int8 with one
                scale per output channel; embedding and lm_head stay in `dtype`.
            pack_weights: on CPU, prepack the other linear weights (lm_head included) into
                oneDNN's layout: faster, and the lm_head then no longer shares memory with a
                tied embedding. False keeps plain tensors. Ignored where oneDNN cannot pack.

        Raises:
            ValueError: unsupported config, dtype, quantization or sizes; missing weights.
        """
        if max_slots < 1 or max_seq_len < 1:
            raise ValueError(
                f"max_slots ({max_slots}) and max_seq_len ({max_seq_len}) must be >= 1"
            )
        if dtype not in _DTYPES:
            raise ValueError(f"dtype {dtype} is not supported; use torch.float32 or torch.bfloat16")
        if weight_quant not in ("none", "int8"):
            raise ValueError(f"weight_quant {weight_quant!r} is not one of 'none', 'int8'")
        self.shape = LlamaShape.from_config(config)
        self.max_slots = max_slots
        self.max_seq_len = max_seq_len
        self.vocab_size = self.shape.vocab_size
        self.device = torch.device(device)
        self.dtype = dtype
        self.weight_quant: WeightQuant = weight_quant
        pack = pack_weights and _can_pack(self.device, dtype)
        self._load_weights(state_dict, pack_batch=max_slots if pack else 0)
        cos, sin = _rope_tables(self.shape, max_seq_len)
        self._cos = cos.to(self.device, dtype)  # (S, D)
        self._sin = sin.to(self.device, dtype)
        self._arange = torch.arange(max_seq_len, device=self.device)
        s = self.shape
        cache_shape = (s.n_layers, max_slots, s.n_kv_heads, max_seq_len, s.head_dim)
        self._k_cache = torch.zeros(cache_shape, dtype=dtype, device=self.device)
        self._v_cache = torch.zeros(cache_shape, dtype=dtype, device=self.device)
        self._lengths = [0] * max_slots  # tokens cached per slot; 0 = free

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        *,
        max_slots: int,
        max_seq_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        weight_quant: WeightQuant = "none",
        pack_weights: bool = True,
    ) -> LlamaBackend:
        """Build from a loaded `LlamaForCausalLM` (its `config` and `state_dict()`)."""
        return cls(
            model.config,
            model.state_dict(),
            max_slots=max_slots,
            max_seq_len=max_seq_len,
            dtype=dtype,
            device=device,
            weight_quant=weight_quant,
            pack_weights=pack_weights,
        )

    def _load_weights(self, sd: Mapping[str, torch.Tensor], *, pack_batch: int) -> None:
        def get(name: str) -> torch.Tensor:
            if name not in sd:
                raise ValueError(f"state_dict has no {name!r}; expected LlamaForCausalLM names")
            return sd[name].detach().to(self.device)

        def norm(name: str) -> torch.Tensor:
            return get(name).to(self.dtype).contiguous()

        def linear(*names: str) -> _Linear:
            weight = torch.cat([get(n) for n in names]) if len(names) > 1 else get(names[0])
            return _Linear(weight, dtype=self.dtype, quant=self.weight_quant, pack_batch=pack_batch)

        self._embed = norm("model.embed_tokens.weight")  # (vocab, hidden)
        tied = self.shape.tie_word_embeddings or "lm_head.weight" not in sd
        head = self._embed if tied else get("lm_head.weight")
        self._lm_head = _Linear(head, dtype=self.dtype, quant="none", pack_batch=pack_batch)
        self._final_norm = norm("model.norm.weight")
        self._layers: list[_Layer] = []
        for i in range(self.shape.n_layers):
            p = f"model.layers.{i}."
            attn, mlp = p + "self_attn.", p + "mlp."
            layer = _Layer(
                attn_norm=norm(p + "input_layernorm.weight"),
                wqkv=linear(attn + "q_proj.weight", attn + "k_proj.weight", attn + "v_proj.weight"),
                wo=linear(attn + "o_proj.weight"),
                mlp_norm=norm(p + "post_attention_layernorm.weight"),
                w_gate_up=linear(mlp + "gate_proj.weight", mlp + "up_proj.weight"),
                w_down=linear(mlp + "down_proj.weight"),
            )
            self._layers.append(layer)

    # ---------------------------------------------------------------- forward pieces

    def _rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), weight, self.shape.rms_norm_eps)

    def _forward(
        self, tokens: torch.Tensor, positions: torch.Tensor, attention: _Attention
    ) -> torch.Tensor:
        """Run the decoder stack on tokens (B, T) at positions (B, T); returns (B, T, hidden)."""
        s = self.shape
        b, t = tokens.shape
        n_qk = (s.n_heads + s.n_kv_heads) * s.head_dim
        cos = self._cos[positions].unsqueeze(2)  # (B, T, 1, D)
        sin = self._sin[positions].unsqueeze(2)
        x = F.embedding(tokens, self._embed)  # (B, T, hidden)
        for i, layer in enumerate(self._layers):
            qkv = layer.wqkv(self._rms_norm(x, layer.attn_norm))  # (B, T, (H + 2Hkv) * D)
            qk = qkv[..., :n_qk].view(b, t, s.n_heads + s.n_kv_heads, s.head_dim)
            qk = _apply_rope(qk, cos, sin)  # (B, T, H + Hkv, D)
            q = qk[:, :, : s.n_heads].transpose(1, 2)  # (B, H, T, D)
            k = qk[:, :, s.n_heads :].transpose(1, 2)  # (B, Hkv, T, D)
            v = qkv[..., n_qk:].view(b, t, s.n_kv_heads, s.head_dim).transpose(1, 2)
            x = x + layer.wo(attention(i, q, k, v))
            gate, up = layer.w_gate_up(self._rms_norm(x, layer.mlp_norm)).chunk(2, dim=-1)
            x = x + layer.w_down(F.silu(gate) * up)
        return self._rms_norm(x, self._final_norm)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, hidden) -> float32 logits (N, vocab)."""
        return self._lm_head(hidden).float()

    @staticmethod
    def _causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal attention within the given tokens; returns (B, T, H * D)."""
        b, _, t, _ = q.shape
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return out.transpose(1, 2).reshape(b, t, -1)  # (B, T, H * D)

    # ---------------------------------------------------------------- Backend protocol

    def prefill(self, slot: int, token_ids: list[int]) -> torch.Tensor:
        """Start `slot` afresh with `token_ids`; float32 logits of the last position, (vocab,).

        Raises:
            ValueError: bad slot, empty or too long prompt, token id out of range.
        """
        self._check_slot(slot)
        t = len(token_ids)
        if not 0 < t <= self.max_seq_len:
            raise ValueError(f"prompt has {t} tokens; need 1..max_seq_len ({self.max_seq_len})")
        self._check_ids(token_ids)
        self._lengths[slot] = 0

        def attention(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            self._k_cache[i, slot, :, :t] = k[0]  # (Hkv, T, D)
            self._v_cache[i, slot, :, :t] = v[0]
            return self._causal_attention(q, k, v)

        with torch.inference_mode():
            tokens = torch.tensor([token_ids], device=self.device)  # (1, T)
            hidden = self._forward(tokens, self._arange[:t].unsqueeze(0), attention)
            logits = self._logits(hidden[0, -1:])  # (1, vocab)
        self._lengths[slot] = t
        return logits[0]

    def decode(self, slots: list[int], token_ids: list[int]) -> torch.Tensor:
        """Append one token to each slot and run one step; float32 logits (len(slots), vocab).

        Raises:
            ValueError: mismatched lengths, repeated, free or full slots, bad token id.
        """
        check_decode(slots, token_ids, self._lengths, self.max_seq_len, self.vocab_size)
        with torch.inference_mode():
            logits = self._decode_step(slots, token_ids)
        for slot in slots:
            self._lengths[slot] += 1
        return logits

    def _decode_step(self, slots: list[int], token_ids: list[int]) -> torch.Tensor:
        s = self.shape
        b, rep = len(slots), s.n_heads // s.n_kv_heads
        lengths = [self._lengths[slot] for slot in slots]
        span = max(lengths) + 1  # cache positions any row may attend to
        pos = torch.tensor(lengths, device=self.device)  # (B,) where the new token goes
        rows = torch.tensor(slots, device=self.device)  # (B,)
        mask = (self._arange[:span] <= pos[:, None]).view(b, 1, 1, span)
        # The usual case, slots first..first+B-1 in order: attend through views, no gather.
        first = slots[0]
        contiguous = slots == list(range(first, first + b))

        def attention(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            k_cache, v_cache = self._k_cache[i], self._v_cache[i]
            k_cache[rows, :, pos] = k[:, :, 0]  # (B, Hkv, D)
            v_cache[rows, :, pos] = v[:, :, 0]
            if contiguous:
                keys = k_cache[first : first + b, :, :span]  # (B, Hkv, span, D)
                values = v_cache[first : first + b, :, :span]
            else:
                keys = k_cache[:, :, :span].index_select(0, rows)
                values = v_cache[:, :, :span].index_select(0, rows)
            # One query per row: the query heads sharing a kv head act as its query rows.
            q = q.reshape(b, s.n_kv_heads, rep, s.head_dim)  # (B, Hkv, rep, D)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
            return out.reshape(b, 1, s.n_heads * s.head_dim)  # (B, 1, H * D)

        tokens = torch.tensor(token_ids, device=self.device).view(b, 1)
        hidden = self._forward(tokens, pos.view(b, 1), attention)
        return self._logits(hidden[:, 0])

    def extend(self, slots: list[int], token_ids: list[list[int]]) -> list[torch.Tensor]:
        """Append several tokens to each slot (a speculative step's verification); returns
        each slot's float32 logits at every appended position, (T_i, vocab).

        One forward per slot: drafts are a handful of tokens, and rows of unequal lengths
        would need padding and a ragged mask for little gain on these backends.

        Raises:
            ValueError: as `decode`, or tokens that do not fit a slot.
        """
        check_extend(slots, token_ids, self._lengths, self.max_seq_len, self.vocab_size)
        out = []
        with torch.inference_mode():
            for slot, toks in zip(slots, token_ids, strict=True):
                out.append(self._extend_one(slot, toks))
                self._lengths[slot] += len(toks)
        return out

    #: `BatchingBackend.max_step_tokens`: a chunk is a pass of its own here.
    max_step_tokens = 2048

    def forward(self, feeds: list[Feed]) -> torch.Tensor:
        """`BatchingBackend.forward`: the single-token feeds of started sequences in one
        decode step, each prompt chunk in a pass of its own (its logits at the last
        position only)."""
        check_feeds(feeds, self._lengths, self.max_seq_len, self.vocab_size)
        rows: dict[int, torch.Tensor] = {}
        steps = [i for i, f in enumerate(feeds) if len(f.tokens) == 1 and self._lengths[f.slot]]
        with torch.inference_mode():
            if steps:
                slots = [feeds[i].slot for i in steps]
                logits = self._decode_step(slots, [feeds[i].tokens[0] for i in steps])
                for i, row in zip(steps, logits, strict=True):
                    rows[i] = row
                for slot in slots:
                    self._lengths[slot] += 1
            for i, f in enumerate(feeds):
                if i not in rows:
                    rows[i] = self._extend_one(f.slot, f.tokens, last_only=True)[-1]
                    self._lengths[f.slot] += len(f.tokens)
        wanted = [rows[i] for i, f in enumerate(feeds) if f.logits]
        return torch.stack(wanted) if wanted else torch.empty(0, self.vocab_size)

    def _extend_one(self, slot: int, token_ids: list[int], last_only: bool = False) -> torch.Tensor:
        start, t = self._lengths[slot], len(token_ids)
        end = start + t
        positions = self._arange[start:end]  # (T,)
        # Query i (at start + i) sees cache positions 0..start + i.
        mask = (self._arange[:end][None, :] <= positions[:, None]).view(1, 1, t, end)

        def attention(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            self._k_cache[i, slot, :, start:end] = k[0]  # (Hkv, T, D)
            self._v_cache[i, slot, :, start:end] = v[0]
            keys = self._k_cache[i, slot : slot + 1, :, :end]  # (1, Hkv, end, D)
            values = self._v_cache[i, slot : slot + 1, :, :end]
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)
            return out.transpose(1, 2).reshape(1, t, -1)  # (1, T, H * D)

        tokens = torch.tensor([token_ids], device=self.device)  # (1, T)
        hidden = self._forward(tokens, positions[None], attention)
        return self._logits(hidden[0, -1:] if last_only else hidden[0])  # (T or 1, vocab)

    def truncate(self, slot: int, length: int) -> None:
        """Keep the first `length` cached tokens of `slot` (later positions are masked)."""
        check_truncate(slot, length, self._lengths)
        self._lengths[slot] = length

    def copy_prefix(self, src: int, dst: int, length: int) -> None:
        """`PrefixBackend.copy_prefix`: `src`'s first `length` rows of every layer's K and V."""
        check_copy_prefix(src, dst, length, self._lengths)
        self._k_cache[:, dst, :, :length] = self._k_cache[:, src, :, :length]
        self._v_cache[:, dst, :, :length] = self._v_cache[:, src, :, :length]
        self._lengths[dst] = length

    def release(self, slot: int) -> None:
        """Forget `slot`'s cache (the memory stays allocated for the next prefill)."""
        self._check_slot(slot)
        self._lengths[slot] = 0

    def score(self, prompt_ids: list[int], continuations: list[list[int]]) -> list[float]:
        """Sum of log-probabilities of each continuation's tokens after `prompt_ids`.

        One batched forward over the right-padded `prompt + continuation` rows, no cache.
        An empty continuation scores 0.0.

        Raises:
            ValueError: empty prompt, a row longer than max_seq_len, token id out of range.
        """
        return self.score_batch([(prompt_ids, continuations)])[0]

    def score_batch(self, jobs: list[tuple[list[int], list[list[int]]]]) -> list[list[float]]:
        """`score` for several prompts at once: every row of every job in one forward."""
        plan = ScorePlan.of(jobs, self._check_ids)
        rows = plan.rows
        if not rows:
            return [[0.0] * len(c) for _, c in jobs]
        longest = max(map(len, rows))
        if longest + 1 > self.max_seq_len:
            raise ValueError(f"prompt + continuation has {longest + 1} tokens > {self.max_seq_len}")
        padded = [row + [0] * (longest - len(row)) for row in rows]  # causal: padding is inert

        def attention(_i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return self._causal_attention(q, k, v)

        with torch.inference_mode():
            tokens = torch.tensor(padded, device=self.device)  # (N, T)
            positions = self._arange[:longest].expand(len(padded), longest)
            hidden = self._forward(tokens, positions, attention)  # (N, T, hidden)
            # (M, 4): row, position, target, continuation per scored token
            index = torch.tensor(plan.tokens, device=self.device, dtype=torch.long)
            picked = hidden[index[:, 0], index[:, 1]]  # (M, hidden)
            logprobs = torch.log_softmax(self._logits(picked), dim=-1)  # (M, vocab)
            per_token = logprobs.gather(1, index[:, 2:3])[:, 0].double()  # (M,)
            sums = per_token.new_zeros(plan.n_continuations).index_add_(0, index[:, 3], per_token)
        return ScorePlan.by_job([float(x) for x in sums.cpu()], jobs)

    def prompt_logprobs(self, prompt_ids: list[int], top_n: int) -> list[TokenLogprob]:
        self._check_ids(prompt_ids)
        t = len(prompt_ids)
        if not 0 < t <= self.max_seq_len:
            raise ValueError(f"prompt has {t} tokens; need 1..max_seq_len ({self.max_seq_len})")

        def attention(_i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return self._causal_attention(q, k, v)

        with torch.inference_mode():
            tokens = torch.tensor([prompt_ids], device=self.device)  # (1, T)
            hidden = self._forward(tokens, self._arange[:t][None], attention)[0]  # (T, hidden)
            return prompt_logprobs_from(
                lambda a, b: self._logits(hidden[a:b]), prompt_ids[1:], top_n
            )

    def kv_bytes_per_slot(self) -> int:
        """Bytes of K and V cache one slot occupies (allocated up front) at max_seq_len."""
        s = self.shape
        per_layer = 2 * s.n_kv_heads * self.max_seq_len * s.head_dim
        return s.n_layers * per_layer * self._k_cache.element_size()

    # ---------------------------------------------------------------- checks

    def _check_slot(self, slot: int) -> None:
        check_slot(slot, self.max_slots)

    def _check_ids(self, token_ids: list[int]) -> None:
        check_ids(token_ids, self.vocab_size)

"""LlamaBackend against transformers' own LlamaForCausalLM on tiny seeded models."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from slimserve.engine.backends.llama import LlamaBackend
from slimserve.engine.spec import LlamaShape, supports

VOCAB = 128
ATOL = 1e-4  # fp32 against transformers' eager fp32 forward


def _tiny_config(**overrides: object) -> LlamaConfig:
    fields: dict[str, object] = {
        "vocab_size": VOCAB,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": None,
        "pad_token_id": 0,
    }
    fields.update(overrides)
    return LlamaConfig(**fields)


def _tiny_model(config: LlamaConfig) -> LlamaForCausalLM:
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    # Norm weights start at 1: perturb them so a misplaced norm shows up in the logits.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    return model


MODELS = {
    # GQA with untied lm_head.
    "gqa-untied": {},
    # A pruned-style model: head_dim * heads (4 * 24 = 96) != hidden_size (64), tied head.
    "head-dim-tied": {"head_dim": 24, "tie_word_embeddings": True},
    # Llama 3 rope scaling.
    "llama3-rope": {
        "rope_parameters": {
            "rope_type": "llama3",
            "rope_theta": 50000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        }
    },
}


@pytest.fixture(scope="module", params=list(MODELS))
def model(request: pytest.FixtureRequest) -> LlamaForCausalLM:
    return _tiny_model(_tiny_config(**MODELS[request.param]))


@pytest.fixture(scope="module")
def plain_model() -> LlamaForCausalLM:
    return _tiny_model(_tiny_config())


def _backend(model: LlamaForCausalLM, **kwargs: object) -> LlamaBackend:
    options: dict[str, object] = {"max_slots": 4, "max_seq_len": 64}
    options.update(kwargs)
    return LlamaBackend.from_model(model, **options)  # type: ignore[arg-type]


def _hf_logits(model: LlamaForCausalLM, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()  # (T, vocab)


def _ids(n: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n,), generator=gen).tolist()


def test_prefill_matches_transformers(model: LlamaForCausalLM) -> None:
    backend = _backend(model)
    for n in (1, 7, 30):
        ids = _ids(n, seed=n)
        logits = backend.prefill(0, ids)
        assert logits.shape == (VOCAB,)
        assert logits.dtype == torch.float32
        torch.testing.assert_close(logits, _hf_logits(model, ids)[-1], atol=ATOL, rtol=0)


@pytest.mark.parametrize("pack_weights", [True, False], ids=["packed", "dense"])
def test_decode_matches_full_sequence_logits(model: LlamaForCausalLM, pack_weights: bool) -> None:
    backend = _backend(model, pack_weights=pack_weights)
    ids = _ids(24, seed=1)
    reference = _hf_logits(model, ids)
    backend.prefill(2, ids[:5])
    for pos in range(5, len(ids)):
        logits = backend.decode([2], [ids[pos]])
        torch.testing.assert_close(logits[0], reference[pos], atol=ATOL, rtol=0)


def _decode_alone(model: LlamaForCausalLM, prompt: list[int], steps: list[int]) -> torch.Tensor:
    backend = _backend(model)
    backend.prefill(0, prompt)
    return torch.stack([backend.decode([0], [tok])[0] for tok in steps])  # (steps, vocab)


@pytest.mark.parametrize("slots", [[0, 1], [3, 1]], ids=["contiguous", "gathered"])
def test_batched_decode_of_different_lengths_matches_each_alone(
    model: LlamaForCausalLM, slots: list[int]
) -> None:
    prompts, steps = [_ids(3, seed=10), _ids(11, seed=11)], [_ids(6, seed=12), _ids(6, seed=13)]
    backend = _backend(model)
    for slot, prompt in zip(slots, prompts, strict=True):
        backend.prefill(slot, prompt)
    batched = torch.stack([backend.decode(slots, [s[j] for s in steps]) for j in range(6)])
    for row, (prompt, step) in enumerate(zip(prompts, steps, strict=True)):
        alone = _decode_alone(model, prompt, step)
        torch.testing.assert_close(batched[:, row], alone, atol=ATOL, rtol=0)


def test_released_slot_is_reused_without_stale_cache(plain_model: LlamaForCausalLM) -> None:
    backend = _backend(plain_model)
    backend.prefill(1, _ids(20, seed=20))
    for tok in _ids(5, seed=21):
        backend.decode([1], [tok])
    backend.release(1)
    with pytest.raises(ValueError, match="free"):
        backend.decode([1], [5])
    prompt, steps = _ids(4, seed=22), _ids(5, seed=23)
    backend.prefill(1, prompt)
    reused = torch.stack([backend.decode([1], [tok])[0] for tok in steps])
    torch.testing.assert_close(reused, _decode_alone(plain_model, prompt, steps), atol=ATOL, rtol=0)


def test_score_matches_transformers_log_softmax(model: LlamaForCausalLM) -> None:
    backend = _backend(model)
    prompt = _ids(6, seed=30)
    continuations = [_ids(1, seed=31), _ids(5, seed=32), [], _ids(3, seed=33)]
    backend.prefill(0, prompt)  # score must leave this slot's cache alone
    scores = backend.score(prompt, continuations)
    for cont, score in zip(continuations, scores, strict=True):
        logprobs = torch.log_softmax(_hf_logits(model, prompt + cont), dim=-1)
        expected = sum(float(logprobs[len(prompt) - 1 + j, tok]) for j, tok in enumerate(cont))
        assert score == pytest.approx(expected, abs=1e-4)
    step = _ids(1, seed=34)
    torch.testing.assert_close(
        backend.decode([0], step)[0], _hf_logits(model, prompt + step)[-1], atol=ATOL, rtol=0
    )


def test_greedy_generation_matches_transformers_generate(model: LlamaForCausalLM) -> None:
    prompt = _ids(8, seed=40)
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False,
            max_new_tokens=20,
        )
    expected = out[0, len(prompt) :].tolist()
    backend = _backend(model)
    generated = [int(backend.prefill(0, prompt).argmax())]
    while len(generated) < 20:
        generated.append(int(backend.decode([0], generated[-1:])[0].argmax()))
    assert generated == expected


# Measured max |logit - fp32 logit| on this model (logits span about +-0.5): int8 0.0036,
# bf16 0.0027, both 0.0045. On SmolLM2-135M: 1.6 / 0.8 / 1.7, top-1 agreement 94 / 95 / 92 %.
@pytest.mark.parametrize(
    ("options", "atol"),
    [
        ({"weight_quant": "int8"}, 0.012),
        ({"dtype": torch.bfloat16}, 0.012),
        ({"dtype": torch.bfloat16, "weight_quant": "int8"}, 0.015),
    ],
    ids=["int8-fp32", "bf16", "int8-bf16"],
)
def test_reduced_precision_logits_stay_close(
    plain_model: LlamaForCausalLM, options: dict[str, object], atol: float
) -> None:
    ids = _ids(16, seed=50)
    reference = _hf_logits(plain_model, ids)
    backend = _backend(plain_model, **options)
    logits = [backend.prefill(0, ids[:8])]
    logits += [backend.decode([0], [tok])[0] for tok in ids[8:]]
    torch.testing.assert_close(torch.stack(logits), reference[7:], atol=atol, rtol=0)


def test_supports_and_refusals() -> None:
    assert supports(_tiny_config())
    assert not supports(_tiny_config(attention_bias=True))
    assert not supports(_tiny_config(mlp_bias=True))
    assert not supports(_tiny_config(rope_parameters={"rope_type": "yarn", "factor": 2.0}))
    with pytest.raises(ValueError, match="yarn"):
        LlamaBackend(
            _tiny_config(rope_parameters={"rope_type": "yarn", "factor": 2.0}),
            {},
            max_slots=1,
            max_seq_len=8,
        )


def test_limits_are_enforced(plain_model: LlamaForCausalLM) -> None:
    backend = _backend(plain_model, max_slots=2, max_seq_len=8)
    assert backend.kv_bytes_per_slot() == 2 * 2 * 2 * 8 * 16 * 4  # K+V, layers, kv heads, S, D
    with pytest.raises(ValueError, match="max_seq_len"):
        backend.prefill(0, _ids(9, seed=60))
    with pytest.raises(ValueError, match="out of range"):
        backend.prefill(2, [1])
    backend.prefill(0, _ids(7, seed=61))
    backend.decode([0], [3])
    with pytest.raises(ValueError, match="full"):
        backend.decode([0], [3])
    with pytest.raises(ValueError, match="dtype"):
        _backend(plain_model, dtype=torch.float16)


def test_legacy_rope_theta_is_read() -> None:
    legacy = SimpleNamespace(
        model_type="llama",
        num_hidden_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=96,
        vocab_size=VOCAB,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling=None,
    )
    shape = LlamaShape.from_config(legacy)
    assert (shape.rope_theta, shape.head_dim, shape.tie_word_embeddings) == (500000.0, 16, False)
    legacy.rope_scaling = {"type": "dynamic", "factor": 2.0}
    assert not supports(legacy)


def test_score_batch_equals_scoring_each_job_alone() -> None:
    from slimserve.engine.backends.llama import LlamaBackend
    from tests.helpers import tiny_model

    model = tiny_model(128, seed=3)
    backend = LlamaBackend.from_model(model, max_slots=1, max_seq_len=64)
    jobs = [([1, 5, 9], [[4], [7, 8]]), ([3, 3, 3, 3, 3, 3, 2], [[11, 12, 13]]), ([6], [[1]])]
    batched = backend.score_batch(jobs)
    alone = [backend.score(p, c) for p, c in jobs]
    assert [len(b) for b in batched] == [2, 1, 1]
    for b, a in zip(batched, alone, strict=True):
        assert b == pytest.approx(a, abs=1e-4)

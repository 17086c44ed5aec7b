"""Structured pruning on a tiny seeded Llama, and the offline text it calibrates on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from slimserve.compression.data import (
    load_text_file,
    pydoc_topic_keys,
    pydoc_topics,
    token_chunks,
)
from slimserve.compression.prune import PruneConfig, kept_channels, prune_

HEADS, KV_HEADS, HEAD_DIM, INTERMEDIATE, VOCAB = 4, 2, 16, 128, 128


@pytest.fixture
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HEADS * HEAD_DIM,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=2,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    model.train(False)  # eval mode; transformers' eval() is untyped
    return model


@pytest.fixture
def calibration() -> torch.Tensor:
    return torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(1))


def _config(**overrides: object) -> PruneConfig:
    base: dict[str, object] = {
        "mlp_ratio": 0.25,
        "head_ratio": 0.5,
        "importance": "activation",
        "calibration_samples": 4,
        "seq_len": 16,
    }
    return PruneConfig.from_dict(base | overrides)


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out: torch.Tensor = model(input_ids=ids).logits
    return out


def test_shapes_and_config_follow_the_ratios(
    model: LlamaForCausalLM, calibration: torch.Tensor
) -> None:
    report = prune_(model, _config(), calibration)

    assert model.config.intermediate_size == 96  # 128 - 25%
    assert model.config.num_attention_heads == 2  # 1 of 2 query heads per kv group
    assert model.config.num_key_value_heads == KV_HEADS
    assert model.config.head_dim == HEAD_DIM
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        assert attn.q_proj.weight.shape == (2 * HEAD_DIM, 64)
        assert attn.o_proj.weight.shape == (64, 2 * HEAD_DIM)
        assert attn.k_proj.weight.shape == (KV_HEADS * HEAD_DIM, 64)
        assert mlp.gate_proj.weight.shape == mlp.up_proj.weight.shape == (96, 64)
        assert mlp.down_proj.weight.shape == (64, 96)
    assert report.params_after < report.params_before
    assert report.params_after == sum(p.numel() for p in model.parameters())
    assert report.intermediate_size == (128, 96)
    assert report.num_attention_heads == (4, 2)
    assert [r.kept_channels for r in report.layers] == [96, 96]


def test_head_pruning_keeps_every_kv_group_consistent(
    model: LlamaForCausalLM, calibration: torch.Tensor
) -> None:
    report = prune_(model, _config(mlp_ratio=0.0), calibration)

    group = HEADS // KV_HEADS
    for layer in report.layers:
        kept_groups = [h // group for h in layer.kept_heads]
        assert kept_groups == [0, 1]  # one query head left in each kv group, in order
    for layer in model.model.layers:
        assert layer.self_attn.num_key_value_groups == 1
    assert _logits(model, calibration).shape == (4, 16, VOCAB)


def test_kv_head_pruning_removes_whole_groups(
    model: LlamaForCausalLM, calibration: torch.Tensor
) -> None:
    report = prune_(model, _config(head_ratio=0.0, kv_head_ratio=0.5), calibration)

    assert model.config.num_key_value_heads == 1
    assert model.config.num_attention_heads == 2
    for layer in report.layers:
        (g,) = layer.kept_kv_heads
        assert layer.kept_heads == (2 * g, 2 * g + 1)
    assert torch.isfinite(_logits(model, calibration)).all()


def test_reload_gives_the_same_logits(
    model: LlamaForCausalLM, calibration: torch.Tensor, tmp_path: Path
) -> None:
    prune_(model, _config(), calibration)
    model.save_pretrained(tmp_path)

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    reloaded.train(False)

    torch.testing.assert_close(_logits(reloaded, calibration), _logits(model, calibration))


def test_a_ratio_that_removes_every_head_is_refused_untouched(
    model: LlamaForCausalLM, calibration: torch.Tensor
) -> None:
    before = {k: v.clone() for k, v in model.state_dict().items()}

    with pytest.raises(ValueError, match="would remove all 2 query heads"):
        prune_(model, _config(head_ratio=0.75), calibration)  # 1.5 of 2 rounds up to 2

    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("importance", ["magnitude", "activation", "taylor", "random"])
def test_each_importance_prunes_and_runs(
    model: LlamaForCausalLM, calibration: torch.Tensor, importance: str
) -> None:
    model.requires_grad_(False)
    report = prune_(model, _config(importance=importance), calibration)

    assert report.intermediate_size == (128, 96)
    assert torch.isfinite(_logits(model, calibration)).all()
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())


def _deep_model(layers: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HEADS * HEAD_DIM,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=layers,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    model.train(False)
    return model


def test_depth_pruning_removes_the_layer_that_changes_nothing(
    calibration: torch.Tensor, tmp_path: Path
) -> None:
    model = _deep_model(4)
    idle = model.model.layers[2]
    with torch.no_grad():  # layer 2 now adds nothing to the residual stream: influence 0
        idle.self_attn.o_proj.weight.zero_()
        idle.mlp.down_proj.weight.zero_()
    before = _logits(model, calibration)

    report = prune_(model, _config(mlp_ratio=0.0, head_ratio=0.0, layers_removed=1), calibration)

    assert report.num_hidden_layers == (4, 3)
    assert [r.source_layer for r in report.layers] == [0, 1, 3]
    assert report.layer_influence[2] == pytest.approx(0.0, abs=1e-6)
    assert min(report.layer_influence[i] for i in (0, 1, 3)) > 0.01
    assert model.config.num_hidden_layers == 3
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2]
    # Removing a layer that added nothing leaves the function unchanged.
    torch.testing.assert_close(_logits(model, calibration), before)

    # The KV cache is addressed by the renumbered layers: cached decoding equals no-cache.
    ids = calibration[:1, :8]
    with torch.no_grad():
        cached = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True)
        plain = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, plain)

    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    reloaded.train(False)
    assert reloaded.config.num_hidden_layers == 3
    torch.testing.assert_close(_logits(reloaded, calibration), before)


def test_depth_and_width_together(calibration: torch.Tensor) -> None:
    model = _deep_model(4)
    report = prune_(model, _config(importance="magnitude", layers_removed=2), calibration)

    assert report.num_hidden_layers == (4, 2)
    assert report.intermediate_size == (128, 96)
    assert len(report.layers) == 2 == len(model.model.layers)
    assert report.params_after == sum(p.numel() for p in model.parameters())
    assert torch.isfinite(_logits(model, calibration)).all()


def test_removing_every_layer_is_refused_untouched(calibration: torch.Tensor) -> None:
    model = _deep_model(2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="would remove all 2 layers"):
        prune_(model, _config(layers_removed=2), calibration)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="layers_removed=1 needs calibration"):
        prune_(model, _config(importance="random", layers_removed=1), None)
    assert len(model.model.layers) == 2


def test_calibrated_importance_needs_calibration(model: LlamaForCausalLM) -> None:
    with pytest.raises(ValueError, match="needs calibration"):
        prune_(model, _config(importance="taylor"), None)
    with pytest.raises(ValueError, match="calibration has shape"):
        prune_(model, _config(calibration_samples=8), torch.zeros(4, 16, dtype=torch.long))


def test_random_importance_is_seeded(calibration: torch.Tensor) -> None:
    """The same seed keeps the same channels; another seed, or another importance, keeps
    others (so neither the seed nor `importance="random"` is ignored)."""

    def kept(importance: str, seed: int) -> torch.Tensor:
        torch.manual_seed(0)  # the same weights every time
        tiny = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=VOCAB,
                hidden_size=64,
                intermediate_size=INTERMEDIATE,
                num_hidden_layers=1,
                num_attention_heads=HEADS,
                num_key_value_heads=KV_HEADS,
            )
        )
        prune_(tiny, _config(importance=importance, seed=seed), None)
        return tiny.model.layers[0].mlp.down_proj.weight.clone()

    first = kept("random", 7)
    torch.testing.assert_close(kept("random", 7), first)
    assert first.shape[1] < INTERMEDIATE  # it did prune
    assert not torch.equal(kept("random", 8), first)
    assert not torch.equal(kept("magnitude", 7), first)


@pytest.mark.parametrize(
    ("ratio", "n", "multiple", "kept"),
    [
        (0.2, 1536, 32, 1216),  # 1228.8 wanted: 38.4 blocks -> 38 (not 1229, which q8_0 refuses)
        (0.5, 1536, 32, 768),
        (0.2, 1536, 1, 1229),  # version 1's count
        (0.99, 1536, 32, 32),  # never 0
        (0.005, 1000, 32, 992),  # never more than the width (1000 is not a multiple)
        (0.0, 1000, 32, 1000),  # nothing asked: untouched
        (0.25, 16, 32, 12),  # narrower than one multiple: the count alone
    ],
)
def test_kept_channels_round_to_the_nearest_multiple(
    ratio: float, n: int, multiple: int, kept: int
) -> None:
    assert kept_channels(ratio, n, multiple) == kept


def test_pruned_widths_are_multiples_and_the_model_reloads(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=200, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=True,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    model.train(False)
    calibration = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(1))
    report = prune_(model, _config(mlp_ratio=0.3, head_ratio=0.0), calibration)
    # 0.7 * 200 = 140 wanted; nearest multiple of 32 is 128 (4.375 blocks -> 4).
    assert report.intermediate_size == (200, 128)
    assert report.intermediate_requested == 140.0
    assert report.channel_multiple == 32
    assert all(layer.mlp.down_proj.in_features == 128 for layer in model.model.layers)
    assert [r.kept_channels for r in report.layers] == [128, 128]
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(2))
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    reloaded.train(False)
    torch.testing.assert_close(_logits(reloaded, ids), _logits(model, ids))


def test_a_version_1_table_keeps_its_old_rounding() -> None:
    old = PruneConfig.from_dict({"version": 1, "mlp_ratio": 0.2})
    assert old.version == 2
    assert old.channel_multiple == 1


def test_config_round_trips_and_rejects_unknown_keys() -> None:
    config = _config(kv_head_ratio=0.5, seed=3)
    assert PruneConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match=r"unknown PruneConfig keys \['mlp_ration'\]"):
        PruneConfig.from_dict({"mlp_ration": 0.2})


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"mlp_ratio": 1.0}, "mlp_ratio=1.0 is outside"),
        ({"head_ratio": -0.1}, "head_ratio=-0.1 is outside"),
        ({"mlp_ratio": "0.2"}, "mlp_ratio='0.2' must be a number"),
        ({"importance": "l1"}, "importance='l1' is not known"),
        ({"seq_len": 1}, "seq_len=1 must be an integer >= 2"),
        ({"version": 3}, "version=3 is not supported"),
        ({"channel_multiple": 0}, "channel_multiple=0 must be an integer >= 1"),
        ({"mlp_ratio": 0.0, "head_ratio": 0.0}, "nothing to prune"),
        ({"layers_removed": -1}, "layers_removed=-1 must be an integer >= 0"),
        ({"layers_removed": 1.5}, "layers_removed=1.5 must be an integer >= 0"),
    ],
)
def test_config_validation_names_the_field(overrides: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _config(**overrides)


def test_pydoc_split_is_disjoint_and_deterministic() -> None:
    train, held_out = pydoc_topic_keys("train"), pydoc_topic_keys("eval")

    assert not set(train) & set(held_out)
    assert 0.03 < len(held_out) / (len(train) + len(held_out)) < 0.2
    assert pydoc_topics("eval") == pydoc_topics("eval")
    source = pydoc_topics("eval")
    assert source.name.startswith("pydoc_data.topics:eval@3.")
    assert source.digest != pydoc_topics("train").digest


class _ByteTokenizer:
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode())


def test_token_chunks_are_fixed_length_and_capped() -> None:
    chunks = token_chunks(_ByteTokenizer(), "abcdefghij" * 10, seq_len=8, max_chunks=5)
    assert chunks.shape == (5, 8)
    assert chunks.dtype == torch.long
    assert bytes(chunks[0].tolist()) == b"abcdefgh"
    assert token_chunks(_ByteTokenizer(), "x" * 20, seq_len=8, max_chunks=5).shape == (2, 8)
    with pytest.raises(ValueError, match="fewer than one chunk"):
        token_chunks(_ByteTokenizer(), "short", seq_len=8, max_chunks=5)


def test_user_text_files(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("plain text")
    (tmp_path / "b.jsonl").write_text('{"text": "one"}\n\n{"text": "two"}\n')
    (tmp_path / "c.jsonl").write_text('{"body": "x"}\n')

    assert load_text_file(tmp_path / "a.txt").text == "plain text"
    b = load_text_file(tmp_path / "b.jsonl")
    assert (b.name, b.text) == ("file:b.jsonl", "one\n\ntwo")
    with pytest.raises(ValueError, match=r"c\.jsonl:1: expected an object"):
        load_text_file(tmp_path / "c.jsonl")
    with pytest.raises(ValueError, match=r"suffix '\.csv'"):
        load_text_file(tmp_path / "d.csv")

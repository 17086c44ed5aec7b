"""GGUF export: names, shapes, the q/k permutation, and quantized values, read back with gguf."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from slimserve.engine.backends.gguf_export import _permute, export_gguf
from tests.helpers import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, Path]:
    tok = tiny_tokenizer()
    model = tiny_model(len(tok))
    out = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(out)
    return model, out / "tokenizer.json"


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    return (
        w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def test_f32_export_holds_every_weight_exactly(tiny: tuple[object, Path], tmp_path: Path) -> None:
    from gguf import GGUFReader

    model, tokenizer_json = tiny
    sd = model.state_dict()  # type: ignore[attr-defined]
    cfg = model.config  # type: ignore[attr-defined]
    path = export_gguf(cfg, sd, tokenizer_json, tmp_path / "m.gguf", "f32")
    reader = GGUFReader(path)
    tensors = {t.name: np.asarray(t.data) for t in reader.tensors}
    assert len(tensors) == 2 + 9 * cfg.num_hidden_layers  # tied: no output.weight
    assert np.array_equal(tensors["token_embd.weight"], sd["model.embed_tokens.weight"].numpy())
    q = tensors["blk.1.attn_q.weight"]
    k = tensors["blk.1.attn_k.weight"]
    assert not np.array_equal(q, sd["model.layers.1.self_attn.q_proj.weight"].numpy())
    assert np.array_equal(_unpermute(q, cfg.num_attention_heads),
                          sd["model.layers.1.self_attn.q_proj.weight"].numpy())  # fmt: skip
    assert np.array_equal(_unpermute(k, cfg.num_key_value_heads),
                          sd["model.layers.1.self_attn.k_proj.weight"].numpy())  # fmt: skip
    assert np.array_equal(tensors["blk.0.ffn_down.weight"],
                          sd["model.layers.0.mlp.down_proj.weight"].numpy())  # fmt: skip
    fields = reader.fields
    assert bytes(fields["general.architecture"].parts[-1]).decode() == "llama"
    assert int(fields["llama.attention.head_count_kv"].parts[-1][0]) == cfg.num_key_value_heads
    assert len(fields["tokenizer.ggml.tokens"].data) == cfg.vocab_size


def test_permutation_is_a_row_reordering_per_head() -> None:
    w = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)  # 2 heads of head_dim 4
    p = _permute(w, 2)
    assert sorted(map(tuple, p)) == sorted(map(tuple, w))
    assert np.array_equal(p[:4], w[[0, 2, 1, 3]])  # halves interleaved within each head


def test_q8_0_export_is_within_half_a_step_of_its_block_scale(
    tiny: tuple[object, Path], tmp_path: Path
) -> None:
    from gguf import GGUFReader
    from gguf.quants import dequantize

    model, tokenizer_json = tiny
    sd = model.state_dict()  # type: ignore[attr-defined]
    path = export_gguf(model.config, sd, tokenizer_json, tmp_path / "m.gguf", "q8_0")  # type: ignore[attr-defined]
    t = next(t for t in GGUFReader(path).tensors if t.name == "blk.0.ffn_up.weight")
    assert t.tensor_type.name == "Q8_0"
    got = dequantize(np.asarray(t.data), t.tensor_type).reshape(128, 64)
    want = sd["model.layers.0.mlp.up_proj.weight"].numpy()
    step = np.abs(want).reshape(-1, 32).max(axis=1) / 127  # one scale per block of 32
    # Half a step, plus what storing each block's scale as float16 adds (127 x 2^-11 steps).
    assert (np.abs(got - want).reshape(-1, 32).max(axis=1) <= step * (0.5 + 127 / 2048)).all()


def test_bad_inputs_are_refused(tiny: tuple[object, Path], tmp_path: Path) -> None:
    model, tokenizer_json = tiny
    sd = dict(model.state_dict())  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="weight type"):
        export_gguf(model.config, sd, tokenizer_json, tmp_path / "a.gguf", "q2")  # type: ignore[arg-type,attr-defined]
    del sd["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match="up_proj"):
        export_gguf(model.config, sd, tokenizer_json, tmp_path / "b.gguf", "f32")  # type: ignore[attr-defined]
    wordpiece = tmp_path / "tokenizer.json"
    wordpiece.write_text('{"model": {"type": "WordPiece", "vocab": {}}}')
    with pytest.raises(ValueError, match="BPE"):
        export_gguf(model.config, model.state_dict(), wordpiece, tmp_path / "c.gguf", "f32")  # type: ignore[attr-defined]
    assert torch.is_tensor(next(iter(model.state_dict().values())))  # type: ignore[attr-defined]

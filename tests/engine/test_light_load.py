"""Serving a llama.cpp plan from the artifact's files without transformers: the weights read
one tensor at a time (`ArtifactWeights`), the export streamed, the same GGUF bytes."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from slimserve.engine.backends.gguf_export import export_gguf
from slimserve.engine.backends.select import Plan, _DequantizedStateDict, open_model, plans_for
from slimserve.engine.config import ModelConfig
from slimserve.registry.artifact import ArtifactWeights, load_model
from slimserve.registry.store import Artifact, Registry
from tests.helpers import publish_tiny


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny@1 (float32) and tiny-int8@1 (torchao int8 weight-only, as `quantize` writes)."""
    from slimserve.compression.quantize import QuantizeConfig, quantize
    from slimserve.registry.artifact import publish_model

    root = tmp_path_factory.mktemp("light")
    art = publish_tiny(root, "tiny")
    model, tok = load_model(art)
    qmodel, record = quantize(model, tok, QuantizeConfig(scheme="int8-weight-only"))
    publish_model(Registry(root), "tiny-int8", qmodel, tok, quantization=record)
    return root


def _artifact(root: Path, name: str) -> Artifact:
    return Registry(root).get(name, "1")


@pytest.mark.parametrize("name", ["tiny", "tiny-int8"])
def test_weights_read_alone_equal_transformers_dequantized(registry: Path, name: str) -> None:
    art = _artifact(registry, name)
    model, _ = load_model(art)
    theirs = _DequantizedStateDict(model)
    with ArtifactWeights(art, dtype="float32") as ours:
        assert set(ours) <= set(theirs)
        assert set(theirs) - set(ours) <= {"lm_head.weight"}  # tied: stored once
        for key in ours:
            assert torch.equal(ours[key], theirs[key]), key
        assert ours.config.num_hidden_layers == model.config.num_hidden_layers
        assert ours.generation_config.eos_token_id == model.generation_config.eos_token_id
        plans, refused = plans_for(ours, ModelConfig.of(), art.path / "tokenizer.json")
        assert (plans, refused) == plans_for(model, ModelConfig.of(), art.path / "tokenizer.json")


@pytest.mark.parametrize(("name", "weight_type"), [("tiny", "f32"), ("tiny-int8", "q8_0")])
def test_streamed_export_is_byte_identical_either_way(
    registry: Path, name: str, weight_type: Any, tmp_path: Path
) -> None:
    art = _artifact(registry, name)
    model, _ = load_model(art)
    tok = art.path / "tokenizer.json"
    sd = _DequantizedStateDict(model)
    a = export_gguf(model.config, sd, tok, tmp_path / "a.gguf", weight_type)
    with ArtifactWeights(art, dtype="float32") as w:
        b = export_gguf(w.config, w, tok, tmp_path / "b.gguf", weight_type)
    digest = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (a, b)]
    assert digest[0] == digest[1]


def test_streamed_export_writes_what_gguf_reads_back(registry: Path, tmp_path: Path) -> None:
    from gguf import GGUFReader

    art = _artifact(registry, "tiny")
    with ArtifactWeights(art) as w:
        path = export_gguf(w.config, w, art.path / "tokenizer.json", tmp_path / "m.gguf", "f32")
        tensors = {t.name: t for t in GGUFReader(path).tensors}
        embed = w["model.embed_tokens.weight"].numpy()
        assert tensors["token_embd.weight"].data.tobytes() == embed.tobytes()
        down = w["model.layers.1.mlp.down_proj.weight"].numpy()
        assert tensors["blk.1.ffn_down.weight"].data.tobytes() == down.tobytes()


def test_unknown_torchao_types_are_left_to_transformers(registry: Path, tmp_path: Path) -> None:
    from slimserve.registry.artifact import _index

    meta = {"w.weight": json.dumps({"_type": "Int4Tensor", "_tensor_data_names": ["qdata"]})}
    with pytest.raises(ValueError, match="Int4Tensor"):
        _index("model.safetensors", {"w._weight_qdata"}, meta)


def test_open_model_reads_files_for_llamacpp_and_transformers_for_torch(registry: Path) -> None:
    art = _artifact(registry, "tiny-int8")
    cpu = torch.device("cpu")
    light, tok = open_model(art, ModelConfig.of(), None, device=cpu, dtype=torch.float32)
    assert isinstance(light, ArtifactWeights)
    assert type(tok).__module__ == "slimserve.engine.tokenizer"
    light.close()
    full, _ = open_model(
        art,
        ModelConfig.of(),
        Plan(backend="llama", weights="int8"),
        device=cpu,
        dtype=torch.float32,
    )
    assert isinstance(full, torch.nn.Module)


_CHILD = """
import sys, torch
from pathlib import Path
from slimserve.engine.backends.select import build_backend, open_model, plans_for
from slimserve.engine.config import ModelConfig
from slimserve.engine.scheduler import Engine
from slimserve.registry.store import Registry
art = Registry(Path(sys.argv[1])).get("tiny-int8", "1")
config = ModelConfig.of(max_batch=2, max_seq_len=64)
model, tok = open_model(art, config, None, device=torch.device("cpu"), dtype=torch.float32)
plan = plans_for(model, config, art.path / "tokenizer.json")[0][0]
backend = build_backend(model, config, 64, art.path / "tokenizer.json", plan)
ids = tok("hello world")["input_ids"]
logits = backend.prefill(0, ids)
print(plan.backend, int(logits.argmax()), tok.decode(ids),
      sorted({m.split(".")[0] for m in sys.modules} & {"transformers", "torchao"}))
"""


def test_a_llamacpp_plan_loads_without_transformers(registry: Path) -> None:
    """In a fresh interpreter (the engine process's situation): open, build, prefill."""
    pytest.importorskip("llama_cpp")
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(registry)],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    ).stdout.split()
    assert out[0] == "llamacpp"
    assert out[-1] == "[]", out  # neither transformers nor torchao was imported


_LOADER_CHILD = """
import sys
from pathlib import Path
from slimserve.engine.config import ModelConfig
from slimserve.engine.loader import load
from slimserve.registry.store import Registry
art = Registry(Path(sys.argv[1])).get("tiny-int8", "1")
config = ModelConfig.of(device="cpu", backend="llamacpp", max_batch=2, max_seq_len=64)
m = load(art, config)
print(m.info.plan, sorted({n.split(".")[0] for n in sys.modules} & {"transformers", "torchao"}))
m.engine.shutdown()
"""


def test_the_engine_loader_serves_llamacpp_without_transformers(registry: Path) -> None:
    pytest.importorskip("llama_cpp")
    out = subprocess.run(
        [sys.executable, "-c", _LOADER_CHILD, str(registry)],
        capture_output=True, text=True, check=True, timeout=300,
    ).stdout.split()  # fmt: skip
    assert out[0].startswith("llamacpp/") and out[-1] == "[]", out


def test_the_server_imports_neither_torch_nor_transformers() -> None:
    code = (
        "import sys, slimserve.server.app; "
        "print(sorted({'torch', 'transformers'} & {m.split('.')[0] for m in sys.modules}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    ).stdout.split()
    assert out[-1] == "[]", out

"""The int4 recipe on CUDA: recipes/int4.toml publishes a version whose every decoder
projection is torchao's tile-packed int4, and the server serves it on the GPU (PyTorch's
tinygemm kernel), close to the float32 parent. The CPU refuses the recipe before any work
(tests/compression/test_recipe.py)."""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from pathlib import Path

import pytest

from slimserve.clients import Client
from tests.cuda.conftest import Served, start_server
from tests.cuda.reference import TIE_NATS, Reference, margins

pytestmark = pytest.mark.cuda

REPO = Path(__file__).resolve().parents[2]
#: SmolLM2-135M: 30 layers x (q, k, v, o, gate, up, down).
LINEARS = 30 * 7
#: int4 loses more than bfloat16: greedy picks the parent's at half the positions at least
#: (a model gone wrong picks it at almost none), perplexity at most twice the parent's.
MIN_AGREEMENT = 0.5
MAX_PPL_RATIO = 2.0


def test_int4_recipe_publishes_and_serves_on_cuda(
    default_registry: Path, record_property: Callable[[str, object], None]
) -> None:
    from slimserve.compression.recipe import CompressJob, compress, load_recipe
    from slimserve.registry.store import Registry

    registry = Registry(default_registry)
    parent = registry.get("smollm2-135m-instruct", "1")
    recipe = load_recipe(
        REPO / "recipes" / "int4.toml",
        ["evaluate.agreement_rows=0", "evaluate.max_chunks=8", "evaluate.speed_tokens=16",
         "evaluate.speed_repeats=1"],
    )  # fmt: skip
    art = compress(
        registry,
        CompressJob(recipe=recipe, parent=parent, to_name="smollm2-int4-test", device="cuda"),
    )
    q = art.manifest.quantization
    assert q["scheme"] == "int4-weight-only" and q["quantized_linears"] == f"{LINEARS} of {LINEARS}"
    header = _safetensors_metadata(art.path)
    assert sum("Int4TilePackedTo4dTensor" in v for v in header.values()) == LINEARS
    ppl_ratio = art.manifest.metrics["perplexity_ratio"]
    record_property("int4_perplexity_ratio", round(ppl_ratio, 4))
    assert ppl_ratio <= MAX_PPL_RATIO

    served = Served(default_registry, art.ref, Reference.load(default_registry, parent.ref))
    server = start_server(served, "cuda", "auto")
    try:
        with Client(server.target, retries=0, timeout=120) as c:
            info = c.model_info()
            assert info.device.startswith("cuda") and info.quantization.startswith("int4")
            assert info.plan == "hf/bfloat16", info.plan  # torchao's own kernels, eager
            gaps: list[float] = []
            for prompt in ("The capital of France is", "Water boils at"):
                prompt_ids = c.tokenize(prompt)
                got = c.generate(prompt, max_new_tokens=16, ignore_eos=True, token_ids=True)
                gaps += margins(served.reference, prompt_ids, got.token_ids)
            agreement = sum(g <= TIE_NATS for g in gaps) / len(gaps)
            record_property("int4_greedy_agreement_with_fp32", round(agreement, 4))
            record_property("int4_greedy_mean_margin_nats", round(statistics.mean(gaps), 4))
            assert agreement >= MIN_AGREEMENT
            scores = c.score("The capital of France is", [" Paris", " London"]).scores
            assert all(s.logprob < 0 for s in scores)
    finally:
        server.stop()


def _safetensors_metadata(path: Path) -> dict[str, str]:
    """Every safetensors file's `__metadata__` (where torchao records its tensor types)."""
    import struct

    out: dict[str, str] = {}
    for f in sorted(path.glob("*.safetensors")):
        with f.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            out |= json.loads(fh.read(n)).get("__metadata__", {})
    return out

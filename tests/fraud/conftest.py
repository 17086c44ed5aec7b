"""What the fraud tests share: simulations built once per session (they are pure data), and
per module a real tiny gRPC server with fraud-sized sequences and a file of payments.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from slimserve.fraud import PROMPT_FORMAT, Simulation, run_simulation, write_transactions
from slimserve.fraud.simulate import simulate
from tests.helpers import ServerThread, tiny_model, tiny_tokenizer

# (customers, days, seed)
SMALL = (120, 21, 1)
TRAIN = (400, 30, 101)
TEST = (400, 30, 202)


@pytest.fixture(scope="session")
def small() -> Simulation:
    return run_simulation(*SMALL)


@pytest.fixture(scope="session")
def train() -> Simulation:
    return run_simulation(*TRAIN)


@pytest.fixture(scope="session")
def held_out() -> Simulation:
    return run_simulation(*TEST)


# Three bad lines appended to a valid file: an unparseable amount, an unparseable
# timestamp, an unknown channel.
_BAD_LINES = (
    "bad-amount,2026-01-02T10:00:00+00:00,C1,T1,abc,EUR,5411,online,NL,0",
    "bad-time,yesterday,C1,T1,12.50,EUR,5411,online,NL,0",
    "bad-channel,2026-01-02T11:00:00+00:00,C1,T1,12.50,EUR,5411,mail_order,NL,0",
)


@pytest.fixture(scope="module")
def fraud_server(
    tmp_path_factory: pytest.TempPathFactory, one_torch_thread: None
) -> Iterator[ServerThread]:
    """Tiny models ``tiny``, ``tiny-b`` and ``tiny-old``, with room for 320-token sequences.

    The tiny byte-level tokenizer spends 45-110 tokens on a fraud prompt (SmolLM2 ~40); an
    explanation's question adds its own sentence to that, beyond the shared ``tiny_server``'s
    128-token cap.
    """
    from slimserve.engine.config import ModelConfig
    from slimserve.registry.artifact import publish_model
    from slimserve.registry.store import Registry
    from slimserve.server.config import Limits, ServerConfig

    root = tmp_path_factory.mktemp("fraud-registry")
    tok = tiny_tokenizer()
    # tiny-b records the prompt format this client writes; tiny-old an earlier one.
    formats = {"tiny": None, "tiny-b": PROMPT_FORMAT, "tiny-old": PROMPT_FORMAT - 1}
    for seed, (name, fmt) in enumerate(formats.items()):
        model = tiny_model(len(tok), seed=seed, max_position_embeddings=512)
        model.generation_config.eos_token_id = tok.eos_token_id
        metrics = None if fmt is None else {"prompt_format": float(fmt)}
        publish_model(Registry(root), name, model, tok, source={"kind": "test"}, metrics=metrics)
    config = ServerConfig(
        registry=root,
        models=tuple(formats),
        port=0,
        # The torch backend: its scores are bit-identical however requests are batched, which
        # test_scores_do_not_depend_on_concurrency_or_file_order asserts. llama.cpp's differ in
        # the 4th significant digit with batch composition (see the llama.cpp backend's tests).
        model=ModelConfig.of(device="cpu", max_batch=4, max_seq_len=640, backend="llama"),
        limits=Limits(max_new_tokens=200, default_max_new_tokens=16),
        grace_s=2.0,
    )
    server = ServerThread(config).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def payments(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small labelled CSV with frauds of every scenario, then three bad lines."""
    path = tmp_path_factory.mktemp("fraud-data") / "payments.csv"
    rows = simulate(12, 3, seed=7)
    assert any(r.is_fraud for r in rows)
    write_transactions(path, rows)
    with path.open("a", encoding="utf-8") as f:
        f.write("\n".join(_BAD_LINES) + "\n")
    return path

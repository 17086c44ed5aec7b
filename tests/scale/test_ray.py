"""slimserve on a real local Ray cluster, started here with 2 CPUs: a Ray Serve application
with two replicas behind Serve's HTTP ingress (the openai SDK as the client), a replica
killed under load and replaced by Serve while no request is lost (the SDK retries 5xx), and
a file of 2,000 payments scored over two Ray workers, giving exactly the single-machine
scores. One cluster for the module: starting Ray costs seconds."""

from __future__ import annotations

import csv
import io
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from slimserve.clients import Client
from slimserve.engine.config import ModelConfig
from slimserve.fraud.scorer import ScoreOptions, score_file
from slimserve.server.config import Limits, ServerConfig
from tests.e2e.test_serve_processes import free_port
from tests.helpers import ServerThread, publish_tiny

ray = pytest.importorskip("ray", reason="the ray extra is not installed (scripts/setup)")
serve = pytest.importorskip("ray.serve")
pytestmark = [
    pytest.mark.slow,  # a Ray cluster and five engine processes: ~90 s on 2 vCPUs
    # Ray's own modules warn about their deprecations on import and shutdown; ours do not.
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

ROWS = 2000


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024**2)
    try:
        yield
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ray-registry")
    publish_tiny(root, "tiny", max_position_embeddings=512)
    return root


def _config(registry: Path) -> ServerConfig:
    # The torch backend, its engine on one thread; 320 tokens hold a fraud prompt.
    return ServerConfig(
        registry=registry,
        models=("tiny",),
        port=0,
        threads=1,
        model=ModelConfig.of(device="cpu", max_batch=4, max_seq_len=320, backend="llama"),
        limits=Limits(max_new_tokens=64, default_max_new_tokens=16),
        grace_s=2.0,
    )


def _complete(client: Any, prompt: str) -> tuple[str, str]:
    raw = client.completions.with_raw_response.create(
        model="tiny", prompt=prompt, max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
    )
    return raw.parse().choices[0].text, raw.headers["x-slimserve-replica"]


def test_two_replicas_serve_and_a_killed_one_is_replaced_losing_nothing(
    cluster: None, registry: Path
) -> None:
    from openai import OpenAI

    from slimserve.scale.serve_app import Scaling, run

    port = free_port()
    run(_config(registry), Scaling(replicas=2, max_ongoing=6, cpus=0.5), http_port=port)
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=8)
    # Both replicas answer, the same greedy text as each other.
    answers = [_complete(client, "the quick brown") for _ in range(16)]
    assert len({text for text, _ in answers}) == 1
    replicas = {replica for _, replica in answers}
    assert len(replicas) == 2, answers
    assert client.models.list().data[0].id == "tiny"

    # Load from three callers while one replica is killed: every request answers.
    stop = threading.Event()
    results: list[tuple[float, Any]] = []

    def caller(n: int) -> None:
        while not stop.is_set():
            try:
                results.append((time.monotonic(), _complete(client, f"hello {n}")))
            except Exception as exc:
                results.append((time.monotonic(), exc))

    callers = [threading.Thread(target=caller, args=(n,)) for n in range(3)]
    for t in callers:
        t.start()
    time.sleep(1.0)
    victim = sorted(replicas)[0]
    (name,) = [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith("SERVE_REPLICA::") and a["name"].endswith(f"#{victim}")
    ]
    ray.kill(ray.get_actor(name, namespace="serve"))  # Serve keeps its actors there
    t_kill = time.monotonic()
    deadline = t_kill + 120
    replaced: set[str] = set()
    while time.monotonic() < deadline:  # Serve starts a new replica in its place
        seen = {r[1] for t, r in results[-20:] if t > t_kill and isinstance(r, tuple)}
        replaced = seen - replicas
        if replaced:
            break
        time.sleep(0.5)
    time.sleep(1.0)
    stop.set()
    for t in callers:
        t.join(60)
    failures = [r for _, r in results if isinstance(r, Exception)]
    assert not failures, failures[:3]
    assert replaced, "no new replica answered after the kill"
    after = [r for t, r in results if t > t_kill]
    assert victim not in {replica for _, replica in after[len(after) // 2 :]}
    serve.delete("slimserve")


def _payments(tmp: Path) -> Path:
    from slimserve.fraud.simulate import write_simulation

    full = tmp / "all.csv"
    write_simulation(full, 150, 30, 5)
    lines = full.read_text().splitlines(keepends=True)
    assert len(lines) > ROWS
    path = tmp / "payments.csv"
    path.write_text("".join(lines[: ROWS + 1]))  # the header and 2,000 rows
    return path


def _score_columns(text: str) -> list[tuple[str, ...]]:
    """Every output row but its latency (the one column that is a measurement)."""
    return [
        tuple(v for k, v in row.items() if k != "latency_ms")
        for row in csv.DictReader(io.StringIO(text))
    ]


def test_batch_scoring_over_two_ray_workers_gives_the_single_machine_scores(
    cluster: None, registry: Path, tmp_path: Path
) -> None:
    from slimserve.scale.batch import RayScorer

    path = _payments(tmp_path)
    options = ScoreOptions(model="tiny", concurrency=1)
    single = io.StringIO()
    server = ServerThread(_config(registry)).start()
    try:
        with Client(server.target) as client:
            alone = score_file(path, client, options, out=single, log=io.StringIO())
    finally:
        server.stop()

    spread = io.StringIO()
    with RayScorer(_config(registry), 2, cpus=1) as scorer:
        assert len(scorer.workers) == 2
        over_ray = score_file(path, None, options, out=spread, log=io.StringIO(), scorer=scorer)

    assert len(over_ray.scored) == len(alone.scored) == ROWS and not over_ray.failed
    assert single.getvalue().splitlines()[0] == spread.getvalue().splitlines()[0]  # columns
    assert _score_columns(spread.getvalue()) == _score_columns(single.getvalue())
    print(
        f"rows/s: single machine {ROWS / alone.scoring_s:.0f}, "
        f"2 Ray workers {ROWS / over_ray.scoring_s:.0f}"
    )

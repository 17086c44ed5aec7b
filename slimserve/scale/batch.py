"""Fraud scoring of a file across a Ray cluster, one engine per worker.

The driver reads and validates the file and renders every prompt (a payment's features come
from the payments before it, so they need the whole file in time order: cheap next to the
model); `RayScorer` then sends the prompts in chunks to `ScoringWorker` actors, each a
slimserve server on its own node's loopback (its engine in a process of its own, as
`slimserve serve` runs it), scored there through the same client calls the single-machine
scorer makes. Results come back in prompt order, and `slimserve.fraud.scorer.score_file`
writes the same output file and audit columns as on one machine.

Every worker opens the model from `config.registry`: a registry or an exported version
directory that each node can read (a shared volume), as replicas share one registry.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from typing import Any

import ray
from ray.util import ActorPool

from slimserve.clients import Client, ClientError, ModelInfo, ScoreResult
from slimserve.fraud.scorer import score_prompts
from slimserve.server.app import build_server
from slimserve.server.config import ServerConfig

#: Prompts per task: large enough that a task's overhead (~1 ms) is small next to its Score
#: calls, small enough that workers finish together.
CHUNK_MIN, CHUNK_MAX = 16, 512


class ScoringWorker:
    """A slimserve server on 127.0.0.1 in this actor's process, and a client to it."""

    def __init__(self, config: ServerConfig) -> None:
        import torch

        torch.set_num_threads(config.threads or max(1, int(torch.get_num_threads())))
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._server, port = self._call(build_server(config))
        self._call(self._ready())
        self._client = Client(f"127.0.0.1:{port}", timeout=600)

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    async def _ready(self) -> None:
        await asyncio.shield(self._server.ready)

    def model_info(self, model: str) -> ModelInfo:
        return self._client.model_info(model)

    def score(
        self, prompts: list[str], model: str, concurrency: int
    ) -> list[ScoreResult | ClientError]:
        return score_prompts(self._client, prompts, model, concurrency=concurrency)

    def stop(self) -> None:
        self._client.close()
        self._call(self._server.stop(5.0))
        self._loop.call_soon_threadsafe(self._loop.stop)


class RayScorer:
    """A `PromptScorer` over `workers` engines on the connected Ray cluster (`ray.init`
    first); each worker reserves `cpus` CPUs. Use as a context manager: the workers stop."""

    def __init__(self, config: ServerConfig, workers: int, *, cpus: float = 1.0) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        actor: Any = ray.remote(num_cpus=cpus)(ScoringWorker)
        #: Actor handles (Ray's own types do not follow the methods through `.remote`).
        self.workers: list[Any] = [actor.remote(config) for _ in range(workers)]
        # Every worker loaded (a failure to load surfaces here, not mid-run).
        ray.get([w.model_info.remote("") for w in self.workers])

    def model_info(self, model: str) -> ModelInfo:
        info: ModelInfo = ray.get(self.workers[0].model_info.remote(model))
        return info

    def score_prompts(
        self, prompts: Sequence[str], model: str, *, concurrency: int
    ) -> list[ScoreResult | ClientError]:
        """Chunks of prompts to whichever worker is free; results in prompt order."""
        size = max(CHUNK_MIN, min(CHUNK_MAX, len(prompts) // (4 * len(self.workers)) or 1))
        chunks = [list(prompts[i : i + size]) for i in range(0, len(prompts), size)]
        pool = ActorPool(self.workers)
        results: list[ScoreResult | ClientError] = []
        for part in pool.map(lambda w, c: w.score.remote(c, model, concurrency), chunks):
            results.extend(part)
        return results

    def close(self) -> None:
        ray.get([w.stop.remote() for w in self.workers])
        for w in self.workers:
            ray.kill(w)

    def __enter__(self) -> RayScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

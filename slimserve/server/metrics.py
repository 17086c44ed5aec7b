"""Prometheus metrics, per model and version, on their own registry (no global state).

Histograms: time to first token, inter-token latency, queue time, end-to-end latency, and
the phases each request crossed (door parse, chat template, tokenize, queue, admit,
prefill, the first token's hops, render), so a user sees where the milliseconds went.
Gauges (each engine's `Occupancy` after its latest step, which an engine process sends with
that step's events: a scrape never waits on an engine): running and queued requests, free
KV-cache slots, and the llm-d / Gateway API Inference Extension model-server gauges under
vLLM's names (`VLLM_GAUGES`, docs/scale-out.md). Counters: prompt and generated tokens, RPCs
by method and status code, and HTTP-door requests by route and status (one counter per door,
so neither door's codes change the other's labels).
"""

from __future__ import annotations

import hmac
import socket
import threading
from collections.abc import Iterator
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Histogram, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from slimserve.engine.errors import NotReady

if TYPE_CHECKING:
    from slimserve.engine.loader import LoadedModel
    from slimserve.engine.manager import ModelManager
    from slimserve.engine.types import Finish, Occupancy

_LABELS = ("model", "version")
#: The model-server protocol's gauges, named as vLLM names them (what an endpoint picker
#: scrapes by default), labelled `model_name` as vLLM labels them. `gpu_cache_usage_perc` is
#: the older vLLM name of `kv_cache_usage_perc`, still the default of older pickers.
VLLM_WAITING = "vllm:num_requests_waiting"
VLLM_RUNNING = "vllm:num_requests_running"
VLLM_KV_USAGE = "vllm:kv_cache_usage_perc"
VLLM_KV_USAGE_OLD = "vllm:gpu_cache_usage_perc"
VLLM_GAUGES = (VLLM_WAITING, VLLM_RUNNING, VLLM_KV_USAGE, VLLM_KV_USAGE_OLD)
# Seconds; TTFT and end-to-end on CPU range from milliseconds to tens of seconds.
_VLLM = ("model_name",)
_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TOKEN_GAP = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)
# Seconds; a phase takes from tens of microseconds (parse) to seconds (a long prefill).
_PHASE = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
          1, 2.5, 5, 10, 30)  # fmt: skip
#: `Timings` field -> the phase label of `slimserve_request_phase_seconds`.
PHASES = {
    "parse_ms": "parse",
    "template_ms": "template",
    "tokenize_ms": "tokenize",
    "queue_ms": "queue",
    "admit_ms": "admit",
    "prefill_ms": "prefill",
    "first_token_out_ms": "first_token_out",
    "render_ms": "render",
}


class _EngineCollector(Collector):
    def __init__(self, models: ModelManager) -> None:
        self._models = models

    def collect(self) -> Iterator[GaugeMetricFamily]:
        running = GaugeMetricFamily(
            "slimserve_requests_running", "Sequences in the running batch.", labels=_LABELS
        )
        queued = GaugeMetricFamily(
            "slimserve_requests_queued", "Requests waiting for a batch slot.", labels=_LABELS
        )
        free = GaugeMetricFamily(
            "slimserve_slots_free", "KV-cache slots not held by a sequence.", labels=_LABELS
        )
        vllm = (
            GaugeMetricFamily(VLLM_WAITING, "Requests waiting for a batch slot.", labels=_VLLM),
            GaugeMetricFamily(VLLM_RUNNING, "Requests in the running batch.", labels=_VLLM),
            GaugeMetricFamily(
                VLLM_KV_USAGE, "KV-cache cells in use over cells available, 0..1.", labels=_VLLM
            ),
            GaugeMetricFamily(
                VLLM_KV_USAGE_OLD, f"The older name of {VLLM_KV_USAGE} (CPU here).", labels=_VLLM
            ),
        )
        by_name: dict[str, list[Occupancy]] = {}
        for model in self._models.all():
            try:
                now = model.engine.occupancy()
            except NotReady:
                continue  # restarting: no figure rather than a stale one
            labels = [model.name, str(model.artifact.version)]
            running.add_metric(labels, now.running)
            queued.add_metric(labels, now.waiting)
            free.add_metric(labels, now.free_slots)
            by_name.setdefault(model.name, []).append(now)
        for name, versions in by_name.items():
            # vLLM's series are per model name: versions served side by side add up.
            used, cells = sum(o.kv_cells_used for o in versions), sum(o.kv_cells for o in versions)
            usage = min(1.0, used / cells) if cells else 0.0
            waiting, busy = sum(o.waiting for o in versions), sum(o.running for o in versions)
            for family, value in zip(vllm, (waiting, busy, usage, usage), strict=True):
                family.add_metric([name], value)
        yield from (running, queued, free, *vllm)


class Metrics:
    """The server's metrics; `serve` exposes them over HTTP for Prometheus to scrape."""

    def __init__(self, models: ModelManager) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram(
            "slimserve_time_to_first_token_seconds",
            "Arrival to first generated token.",
            _LABELS,
            buckets=_LATENCY,
            registry=r,
        )
        self.inter_token = Histogram(
            "slimserve_inter_token_latency_seconds",
            "Gap between consecutive generated tokens of one request.",
            _LABELS,
            buckets=_TOKEN_GAP,
            registry=r,
        )
        self.queue = Histogram(
            "slimserve_queue_time_seconds",
            "Arrival to admission into the running batch.",
            _LABELS,
            buckets=_LATENCY,
            registry=r,
        )
        self.e2e = Histogram(
            "slimserve_request_duration_seconds",
            "Handler start to the last response, for completed requests.",
            (*_LABELS, "method"),
            buckets=_LATENCY,
            registry=r,
        )
        self.phase = Histogram(
            "slimserve_request_phase_seconds",
            "Time a generation spent in each phase: parse (the door), template and tokenize "
            "(the engine process), queue, admit and prefill (the scheduler), first_token_out "
            "(the first token's hops between door and engine), render (the door).",
            (*_LABELS, "phase"),
            buckets=_PHASE,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "slimserve_prompt_tokens", "Prompt tokens processed.", _LABELS, registry=r
        )
        self.generated_tokens = Counter(
            "slimserve_generated_tokens", "Tokens generated.", _LABELS, registry=r
        )
        self.cached_tokens = Counter(
            "slimserve_prompt_cached_tokens",
            "Prompt tokens whose KV came from the prefix cache instead of a prefill.",
            _LABELS,
            registry=r,
        )
        self.rpcs = Counter(
            "slimserve_rpcs", "RPCs handled, by method and status code.", ("method", "code"),
            registry=r,
        )  # fmt: skip
        self.http_requests = Counter(
            "slimserve_http_requests",
            "Requests to the OpenAI-compatible HTTP door, by route and HTTP status.",
            ("route", "status"),
            registry=r,
        )
        r.register(_EngineCollector(models))
        self._http: Any = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None

    @staticmethod
    def _labels(model: LoadedModel) -> tuple[str, str]:
        return model.name, str(model.artifact.version)

    def token_gap(self, model: LoadedModel, seconds: float) -> None:
        self.inter_token.labels(*self._labels(model)).observe(seconds)

    def finished(self, model: LoadedModel, finish: Finish, method: str, seconds: float) -> None:
        """A generation ended (any stop reason): engine timings and token counts."""
        labels = self._labels(model)
        t = finish.timings
        self.queue.labels(*labels).observe(t.queue_ms / 1e3)
        if finish.generated_tokens:
            self.ttft.labels(*labels).observe(t.ttft_ms / 1e3)
        self.e2e.labels(*labels, method).observe(seconds)
        self.prompt_tokens.labels(*labels).inc(finish.input_tokens)
        self.generated_tokens.labels(*labels).inc(finish.generated_tokens)
        self.cached_tokens.labels(*labels).inc(finish.cached_tokens)
        for name, phase in PHASES.items():
            ms = getattr(t, name)
            if ms > 0 or name in ("queue_ms", "prefill_ms"):  # 0 elsewhere: not on this path
                self.phase.labels(*labels, phase).observe(ms / 1e3)

    def scored(self, model: LoadedModel, prompt_tokens: int, seconds: float) -> None:
        labels = self._labels(model)
        self.e2e.labels(*labels, "Score").observe(seconds)
        self.prompt_tokens.labels(*labels).inc(prompt_tokens)

    def rpc(self, method: str, code: str) -> None:
        self.rpcs.labels(method, code).inc()

    def http(self, route: str, status: int) -> None:
        """One request to the HTTP door (the gRPC door counts in `rpcs`)."""
        self.http_requests.labels(route, str(status)).inc()

    def serve(self, host: str, port: int, *, token: str | None = None) -> int:
        """Start the HTTP exporter on a daemon thread; returns the bound port. With `token`,
        a scrape must send `Authorization: Bearer <token>` (401 otherwise)."""
        app = make_wsgi_app(self.registry)
        if token is not None:
            app = _bearer(app, token)
        server = make_server(
            host.strip("[]"), port, app, _Exporter6 if ":" in host else _Exporter, _Quiet
        )
        self._http = server
        self._thread = threading.Thread(
            target=server.serve_forever, name="slimserve-metrics", daemon=True
        )
        self._thread.start()
        self.port = int(server.server_port)
        return self.port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class _Exporter(ThreadingMixIn, WSGIServer):
    """prometheus_client's own exporter is a threading wsgiref server too; this one lets
    `serve` put the token check in front of its WSGI app."""

    daemon_threads = True


class _Exporter6(_Exporter):
    address_family = socket.AF_INET6


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # no line per scrape on stderr


def _bearer(app: Any, token: str) -> Any:
    """`app` for callers presenting the bearer `token` only (compared in constant time)."""
    expected = f"Bearer {token}".encode()

    def checked(environ: dict[str, Any], start_response: Any) -> Any:
        sent = environ.get("HTTP_AUTHORIZATION", "").encode("latin-1")
        if hmac.compare_digest(sent, expected):
            return app(environ, start_response)
        start_response(
            "401 Unauthorized",
            [("Content-Type", "text/plain"), ("WWW-Authenticate", 'Bearer realm="metrics"')],
        )
        return [b"a bearer token is required (--metrics-token-file)\n"]

    return checked

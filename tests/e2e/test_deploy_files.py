"""deploy/ against the server it deploys: no cluster here, so every file is parsed, and each
server it describes is started with the file's own arguments (only the model directory, the
listening address and the port numbers swapped for this machine's) to check that its ports,
probes and metric names are the ones the server actually serves."""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from slimserve.cli import build_parser, serve_config
from slimserve.clients import Client, NotFound
from slimserve.server.metrics import VLLM_GAUGES
from tests.cli.test_cli import run_cli
from tests.e2e.test_serve_processes import free_port

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def _docs(name: str) -> list[dict[str, Any]]:
    with (DEPLOY / name).open() as f:
        return [d for d in yaml.safe_load_all(f) if d]


def _one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = [d for d in docs if d["kind"] == kind]
    return found


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every entry under `root` with its size, mtime and mode: what read-only must keep."""
    return {
        p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns, p.stat().st_mode)
        for p in sorted(root.rglob("*"))
    }


@pytest.fixture(scope="module")
def model_dir(tiny_registry: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """An exported version, as the storage initializer leaves it at /mnt/models; served
    read-only: nothing in it is written, created or touched by the servers started on it."""
    out = tmp_path_factory.mktemp("mnt") / "models"
    done = run_cli("registry", "export", "tiny@1", str(out), "--registry", str(tiny_registry))
    assert done.returncode == 0, done.stderr
    before = _snapshot(out)
    yield out
    assert _snapshot(out) == before


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One SLIMSERVE_HOME for the module: the second server reuses the first's verdicts."""
    return tmp_path_factory.mktemp("home")


class Pod:
    """One container of a deploy file, run here as the file says, with its ports remapped."""

    def __init__(self, container: dict[str, Any], model_dir: Path, name: str, home: Path) -> None:
        self.container = container
        self.ports: dict[int, int] = {}
        args = [str(a) for a in container["args"]]
        flag_values = dict(itertools.pairwise(args))
        for flag in ("--port", "--http-port", "--metrics-port"):
            self.ports[int(flag_values[flag])] = free_port()
        swap = {flag_values["--model-dir"]: str(model_dir), "0.0.0.0": "127.0.0.1"}
        swap |= {str(k): str(v) for k, v in self.ports.items()}
        self.args = [swap.get(a, a).replace("{{.Name}}", name) for a in args]
        self.log = home / "server.log"
        #: The gRPC port the file declares (the test sets it from the file).
        self.container_grpc = 0
        env = {**os.environ, "SLIMSERVE_HOME": str(home)}
        env |= {e["name"]: str(home / "state") for e in container.get("env", [])}
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "slimserve.cli", "--log-format", "json", *self.args],
                stdout=out, stderr=subprocess.STDOUT, env=env,
            )  # fmt: skip

    def port(self, declared: int | str) -> int:
        return self.ports[int(declared)]

    def probe(self, name: str) -> tuple[int, str]:
        get = self.container[name]["httpGet"]
        return _get(f"http://127.0.0.1:{self.port(get['port'])}{get['path']}")

    def wait_ready(self, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            try:
                if self.probe("readinessProbe")[0] == 200:
                    return
            except OSError:
                pass
            assert time.monotonic() < deadline, "never ready: " + self.log.read_text()[-3000:]
            time.sleep(0.25)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture
def start(model_dir: Path, home: Path) -> Iterator[Any]:
    pods: list[Pod] = []

    def make(container: dict[str, Any], name: str) -> Pod:
        pod = Pod(container, model_dir, name, home)
        pods.append(pod)
        pod.wait_ready()
        return pod

    yield make
    for pod in pods:
        pod.stop()


def _check_serves(pod: Pod, name: str, http_port: int, metrics_port: int) -> set[str]:
    """The probes answer, the HTTP door lists the model, gRPC is SERVING, and /metrics has
    every llm-d gauge for it; returns the metric families served."""
    assert pod.probe("livenessProbe")[0] == 200
    assert pod.probe("startupProbe")[0] == 200
    status, body = _get(f"http://127.0.0.1:{pod.port(http_port)}/v1/models")
    assert status == 200 and [m["id"] for m in json.loads(body)["data"]] == [name]
    with Client(f"127.0.0.1:{pod.port(pod.container_grpc)}", retries=0, timeout=10) as c:
        assert c.health() == "SERVING" and c.model_info(name).ref == f"{name}@1"
        assert c.generate("hello", model=name, max_new_tokens=3).text
        with pytest.raises(NotFound):  # a version directory has no aliases
            c.generate("hello", model=f"{name}@production", max_new_tokens=1)
    status, text = _get(f"http://127.0.0.1:{pod.port(metrics_port)}/metrics")
    assert status == 200
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for gauge in VLLM_GAUGES:
        assert families[gauge].type == "gauge"
        assert [s.labels for s in families[gauge].samples] == [{"model_name": name}]
    return set(families)


@pytest.mark.slow  # a server started as the manifest says
def test_kserve_runtime_serves_what_its_ports_and_probes_name(start: Any) -> None:
    runtime = _one(_docs("kserve/servingruntime.yaml"), "ServingRuntime")
    isvc = _one(_docs("kserve/inferenceservice.yaml"), "InferenceService")
    assert runtime["apiVersion"] == "serving.kserve.io/v1alpha1"
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"] in [
        {k: f[k] for k in ("name", "version")} for f in runtime["spec"]["supportedModelFormats"]
    ]
    (container,) = runtime["spec"]["containers"]
    assert container["name"] == "kserve-container"
    (port,) = container["ports"]  # serverless mode routes exactly one
    http = port["containerPort"]
    args = [str(a) for a in container["args"]]
    assert args[args.index("--http-port") + 1] == str(http)
    assert args[args.index("--model-dir") + 1] == "/mnt/models"  # the storage initializer's
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["port"] == http
    notes = runtime["spec"]["annotations"]
    metrics = int(notes["prometheus.kserve.io/port"])
    assert args[args.index("--metrics-port") + 1] == str(metrics)

    pod = start(container, isvc["metadata"]["name"])
    pod.container_grpc = int(args[args.index("--port") + 1])
    _check_serves(pod, isvc["metadata"]["name"], http, metrics)
    status, _ = _get(f"http://127.0.0.1:{pod.port(metrics)}{notes['prometheus.kserve.io/path']}")
    assert status == 200


@pytest.mark.slow  # a server started as the manifest says
def test_llmd_pool_routes_to_the_door_and_reads_gauges_the_server_exports(start: Any) -> None:
    docs = _docs("llm-d/inferencepool.yaml")
    deployment, pool = _one(docs, "Deployment"), _one(docs, "InferencePool")
    route = _one(docs, "HTTPRoute")
    (values,) = _docs("llm-d/epp-values.yaml")
    assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pool["spec"]["selector"]["matchLabels"] == labels
    assert values["inferencePool"]["modelServers"]["matchLabels"] == labels
    (backend,) = route["spec"]["rules"][0]["backendRefs"]
    assert (backend["kind"], backend["name"]) == ("InferencePool", pool["metadata"]["name"])
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert pool["spec"]["targetPorts"] == [{"number": ports["http"]}]
    assert values["inferencePool"]["targetPorts"] == pool["spec"]["targetPorts"]
    args = [str(a) for a in container["args"]]
    for flag, port in (("--http-port", "http"), ("--port", "grpc"), ("--metrics-port", "metrics")):
        assert args[args.index(flag) + 1] == str(ports[port])
    flags = values["inferenceExtension"]["flags"]
    assert flags["model-server-metrics-port"] == ports["metrics"]
    name = args[args.index("--name") + 1]

    pod = start(container, name)
    pod.container_grpc = ports["grpc"]
    served = _check_serves(pod, name, ports["http"], ports["metrics"])
    wanted = [v for k, v in flags.items() if k.endswith("-metric") and v]
    assert wanted and set(wanted) <= served
    path = flags["model-server-metrics-path"]
    assert _get(f"http://127.0.0.1:{pod.port(ports['metrics'])}{path}")[0] == 200


def test_dockerfile_runs_setup_and_its_command_is_a_valid_serve(model_dir: Path) -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^RUN scripts/setup\b", text, re.M)
    assert re.search(r"SLIMSERVE_EXTRAS=server\b", text)
    lines = re.sub(r"\\\n\s*", " ", text)
    entry = json.loads(_instruction(lines, "ENTRYPOINT"))
    cmd = json.loads(_instruction(lines, "CMD"))
    assert entry[0] == "slimserve"
    assert cmd[cmd.index("--model-dir") + 1] == "/mnt/models"
    here = [str(model_dir) if a == "/mnt/models" else a for a in cmd]
    config = serve_config(build_parser().parse_args([*entry[1:], *here]))
    exposed = {int(p) for p in _instruction(text, "EXPOSE").split()}
    assert exposed == {config.port, config.http_port, config.metrics_port}
    assert config.host == "0.0.0.0"
    runtime = _one(_docs("kserve/servingruntime.yaml"), "ServingRuntime")
    (container,) = runtime["spec"]["containers"]
    assert {p["containerPort"] for p in container["ports"]} <= exposed


def _instruction(text: str, name: str) -> str:
    found = re.search(rf"^{name} (.*)$", text, re.M)
    assert found is not None, f"no {name} in deploy/Dockerfile"
    return found.group(1)

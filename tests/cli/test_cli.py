"""The `slimserve` command on a real registry and server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from slimserve.compression.errors import ImportFailed
from slimserve.compression.importer import classify, import_model
from slimserve.registry.store import Registry
from tests.helpers import ServerThread, tiny_model, tiny_tokenizer


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "slimserve.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )


def test_registry_list_json_show_verify_alias(tiny_registry: Path) -> None:
    reg = ["--registry", str(tiny_registry)]
    out = run_cli("registry", "list", "--json", *reg)
    assert out.returncode == 0, out.stderr
    (row,) = json.loads(out.stdout)
    for key in ("name", "version", "aliases", "parent", "recipe", "digest", "created_at"):
        assert key in row
    assert (row["name"], row["version"]) == ("tiny", 1)
    assert run_cli("registry", "verify", "tiny@1", *reg).returncode == 0
    show = json.loads(run_cli("registry", "show", "tiny@1", *reg).stdout)
    assert show["files"]["model.safetensors"]["sha256"]
    bad = run_cli("registry", "show", "tiny@7", *reg)
    assert bad.returncode == 2 and "no version 7" in bad.stderr


def test_import_hf_directory_then_alias(tmp_path: Path) -> None:
    tok = tiny_tokenizer()
    src = tmp_path / "hf"
    tiny_model(len(tok)).save_pretrained(src)
    tok.save_pretrained(src)
    reg = ["--registry", str(tmp_path / "reg")]
    out = run_cli("import", str(src), "--name", "imported", *reg)
    assert out.returncode == 0, out.stderr
    art = Registry(tmp_path / "reg").get("imported")
    assert art.manifest["source"]["kind"] == "hf_dir"
    assert run_cli("registry", "alias", "imported", "1", "production", *reg).returncode == 0
    assert Registry(tmp_path / "reg").resolve("imported", "production") == 1
    assert run_cli("import", str(src), "--name", "imported", *reg).returncode == 0  # @2
    again = run_cli("import", str(src), "--name", "imported", "--if-missing", *reg)
    assert again.returncode == 0, again.stderr
    assert "imported@1 already imported" in again.stdout and "2 version(s)" in again.stdout
    assert Registry(tmp_path / "reg").versions("imported") == [1, 2]


def test_import_refuses_pickled_weights_and_bad_sources(tmp_path: Path) -> None:
    src = tmp_path / "pickled"
    src.mkdir()
    (src / "config.json").write_text("{}")
    (src / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ImportFailed, match="pickled weights are never loaded"):
        import_model(Registry(tmp_path / "reg"), src, "x")
    with pytest.raises(ImportFailed, match="does not exist"):
        classify(str(tmp_path / "missing.gguf"))
    assert classify("HuggingFaceTB/SmolLM2-135M-Instruct").kind == "hub"
    with pytest.raises(ImportFailed):
        classify("not a hub id")


def test_generate_models_score_health_against_a_server(tiny_server: ServerThread) -> None:
    t = ["--target", tiny_server.target]
    out = run_cli("generate", "hello", "--stream", "--max-new-tokens", "5", *t)
    assert out.returncode == 0, out.stderr
    assert "tiny@1" in out.stderr
    models = json.loads(run_cli("models", "--json", *t).stdout)
    assert models[0]["name"] == "tiny"
    assert run_cli("health", *t).stdout.strip() == "SERVING"
    score = run_cli("score", "the quick", " brown", " fox", *t)
    assert score.returncode == 0 and "' brown'" in score.stdout
    bad = run_cli("generate", "hello", "--model", "nope", *t)
    assert bad.returncode == 2 and "NOT_FOUND" in bad.stderr


@pytest.mark.slow
def test_sigterm_shuts_down_gracefully(tiny_registry: Path, tmp_path: Path) -> None:
    import signal
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "slimserve.cli", "serve", "--model", "tiny", "--port", str(port),
         "--registry", str(tiny_registry), "--max-batch", "2", "--max-seq-len", "64"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    with proc:
        try:
            # Qualification runs first (throwaway processes): slow on a loaded machine.
            wait = run_cli("health", "--target", f"127.0.0.1:{port}", "--wait", "300")
            assert wait.stdout.strip() == "SERVING", wait.stderr
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=60)
        finally:
            proc.kill()
    assert proc.returncode == 0
    assert "shutting down" in out

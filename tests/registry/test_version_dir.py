"""One version as a directory of its own: `registry export REF DIR` writes it (same digest,
verified), `serve --model-dir DIR [--name NAME]` takes it (tests/e2e/test_deploy_files.py serves one
read-only, as KServe and llm-d would), and a tampered copy is refused with the file named."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from slimserve.cli import UsageError, build_parser, serve_config
from slimserve.registry.errors import IntegrityError, ModelNotFound, RegistryError
from slimserve.registry.store import MANIFEST, Registry, export_version
from tests.cli.test_cli import run_cli


@pytest.fixture(scope="module")
def exported(tiny_registry: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export") / "tiny-1"
    result = run_cli("registry", "export", "tiny@1", str(out), "--registry", str(tiny_registry))
    assert result.returncode == 0, result.stderr
    assert "exported tiny@1" in result.stdout and "verified" in result.stdout
    return out


def test_export_keeps_the_digest_and_opens_as_a_read_only_registry(
    tiny_registry: Path, exported: Path, tmp_path: Path
) -> None:
    source = Registry(tiny_registry).get("tiny", "1")
    single = Registry(exported)
    assert single.version_dir and not Registry(tiny_registry).version_dir
    assert single.names() == ["tiny"] and single.versions("tiny") == [1]
    copy = single.get("tiny")
    assert copy.digest == source.digest and copy.path == exported
    copy.verify()
    renamed = single.get("fraud-scorer", "latest")  # answers to the name it is served as
    assert renamed.ref == "fraud-scorer@1" and renamed.digest == source.digest
    assert single.aliases("tiny") == {}
    with pytest.raises(ModelNotFound, match="no alias 'production'"):
        single.get("tiny", "production")
    with pytest.raises(ModelNotFound, match="no version 2"):
        single.get("tiny", "2")
    for write in (
        lambda: single.set_alias("tiny", "production", 1),
        lambda: single.staging().__enter__(),
    ):
        with pytest.raises(RegistryError, match="read-only"):
            write()
    assert all(not os.access(p, os.W_OK) or os.geteuid() == 0 for p in exported.iterdir())
    assert {p.stat().st_mode & 0o777 for p in exported.iterdir()} == {0o444}

    with pytest.raises(FileExistsError, match="not an empty directory"):
        export_version(source, exported)
    refused = run_cli(
        "registry", "export", "tiny@1", str(exported), "--registry", str(tiny_registry)
    )
    assert refused.returncode == 2 and "not an empty directory" in refused.stderr


def test_export_refuses_a_tampered_source(tiny_registry: Path, tmp_path: Path) -> None:
    root = tmp_path / "reg"
    shutil.copytree(tiny_registry / "tiny", root / "tiny")
    weights = root / "tiny" / "1" / "model.safetensors"
    weights.chmod(0o644)
    with weights.open("r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 1]))
    with pytest.raises(IntegrityError, match=r"model\.safetensors fails its sha256"):
        export_version(Registry(root).get("tiny"), tmp_path / "out")
    assert not (tmp_path / "out" / MANIFEST).exists()


def test_serve_refuses_a_tampered_copy_naming_the_file(exported: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(exported, copy)
    (copy / "tokenizer.json").chmod(0o644)
    with (copy / "tokenizer.json").open("a") as f:
        f.write(" ")
    env = {**os.environ, "SLIMSERVE_HOME": str(tmp_path / "home")}
    out = run_cli("serve", "--model-dir", str(copy), "--name", "fraud", "--port", "0", env=env)
    assert out.returncode != 0
    assert "tokenizer.json" in out.stderr and "has" in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--model-dir", "{nowhere}"], "not a version directory"),
        (["--model-dir", "{exported}", "--model", "tiny"], "leave out --model"),
        (["--model-dir", "{exported}", "--name", "Bad Name"], "invalid model name"),
        (["--model-dir", "{exported}", "--draft", "tiny@1"], "a draft model needs"),
        (["--model", "tiny", "--name", "x"], "--name names the model of --model-dir"),
        ([], "serve needs --model"),
    ],
)
def test_serve_model_dir_flags_are_checked(
    exported: Path, tmp_path: Path, argv: list[str], needle: str
) -> None:
    args = [a.format(nowhere=tmp_path, exported=exported) for a in argv]
    with pytest.raises(UsageError, match=re.escape(needle)):
        serve_config(build_parser().parse_args(["serve", *args]))


def test_serve_model_dir_config(
    exported: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SLIMSERVE_HOME", str(tmp_path))
    config = serve_config(build_parser().parse_args(["serve", "--model-dir", str(exported)]))
    assert config.registry == exported.resolve() and config.models == ("tiny",)
    assert config.qualify_cache == tmp_path / "qualify" / "verdicts.json"

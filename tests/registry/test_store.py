from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from slimserve.registry.errors import IntegrityError, InvalidName, ModelNotFound
from slimserve.registry.store import Registry, describe, parse_model_ref


def _publish(registry: Registry, name: str, payload: bytes = b"weights") -> int:
    with registry.staging() as staged:
        (staged / "model.safetensors").write_bytes(payload)
        (staged / "config.json").write_text("{}")
        return registry.publish(name, staged, {"parent": None, "dtype": "float32"}).version


def test_versions_are_sequential_and_immutable(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    assert _publish(reg, "m") == 1
    assert _publish(reg, "m", b"other") == 2
    assert reg.versions("m") == [1, 2]
    art = reg.get("m", "1")
    assert art.manifest["version"] == 1
    assert art.files["model.safetensors"]["size"] == len(b"weights")
    # Read-only for everyone (root ignores the bits, but tools and people see them).
    assert (art.path / "model.safetensors").stat().st_mode & 0o222 == 0
    # Nothing is left in staging after publishing.
    assert list((tmp_path / ".staging").iterdir()) == []


def test_resolve_numbers_aliases_latest(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    _publish(reg, "m")
    _publish(reg, "m")
    reg.set_alias("m", "production", 1)
    assert reg.resolve("m", "") == 2
    assert reg.resolve("m", "latest") == 2
    assert reg.resolve("m", "production") == 1
    reg.set_alias("m", "production", 2)
    assert reg.resolve("m", "production") == 2
    assert reg.aliases_of("m", 2) == ["production"]
    with pytest.raises(ModelNotFound, match="no version 7"):
        reg.resolve("m", "7")
    with pytest.raises(ModelNotFound, match="no alias 'staging'"):
        reg.resolve("m", "staging")
    with pytest.raises(ModelNotFound, match="no model named"):
        reg.resolve("other", "")
    with pytest.raises(ModelNotFound):
        reg.set_alias("m", "staging", 9)


@pytest.mark.parametrize("bad", ["../evil", "a/b", "/abs", "..", "A", "", "x" * 65, "a..b"])
def test_bad_names_are_refused(tmp_path: Path, bad: str) -> None:
    reg = Registry(tmp_path)
    with pytest.raises(InvalidName):
        reg.versions(bad)
    with pytest.raises(InvalidName):
        parse_model_ref(f"{bad}@1")


@pytest.mark.parametrize("bad", ["../x", "Prod", "1abc", "latest", "a/b", ""])
def test_bad_aliases_are_refused(tmp_path: Path, bad: str) -> None:
    reg = Registry(tmp_path)
    _publish(reg, "m")
    with pytest.raises(InvalidName):
        reg.set_alias("m", bad, 1)


def test_verify_detects_tampering_truncation_and_extra_files(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    _publish(reg, "m", b"0123456789")
    art = reg.get("m")
    art.verify()
    target = art.path / "model.safetensors"
    os.chmod(target, 0o644)
    target.write_bytes(b"0123456780")  # same size, different bytes
    with pytest.raises(IntegrityError, match=r"model\.safetensors fails its sha256"):
        art.verify()
    target.write_bytes(b"012")
    with pytest.raises(IntegrityError, match="has 3 bytes"):
        art.verify()
    target.write_bytes(b"0123456789")
    art.verify()
    os.chmod(art.path, 0o755)
    (art.path / "extra.bin").write_bytes(b"pickle?")
    with pytest.raises(IntegrityError, match=r"extra\.bin is not in the manifest"):
        art.verify()


def test_symlink_leading_outside_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    reg = Registry(tmp_path / "reg")
    _publish(Registry(outside), "m")
    (tmp_path / "reg").mkdir(exist_ok=True)
    os.symlink(outside / "m", tmp_path / "reg" / "m")
    with pytest.raises(InvalidName, match="outside the registry"):
        reg.get("m")


def test_publish_refuses_symlinked_files(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    secret = tmp_path / "secret"
    secret.write_text("x")
    with reg.staging() as staged, pytest.raises(IntegrityError, match="symbolic link"):
        os.symlink(secret, staged / "model.safetensors")
        reg.publish("m", staged, {})
    assert reg.versions("m") == []


def test_list_json_fields(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    _publish(reg, "m")
    reg.set_alias("m", "production", 1)
    row = describe(reg.get("m"), reg.aliases_of("m", 1))
    for key in ("name", "version", "aliases", "parent", "recipe", "digest", "created_at"):
        assert key in row
    assert row["aliases"] == ["production"]
    assert len(row["digest"]) == 64
    json.dumps(row)


def test_a_half_written_staging_dir_is_never_a_version(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    _publish(reg, "m")
    # Simulate a crash mid-publish: files in staging, never renamed.
    crashed = tmp_path / ".staging" / "crashed"
    crashed.mkdir(parents=True)
    (crashed / "model.safetensors").write_bytes(b"partial")
    assert reg.versions("m") == [1]
    assert [a.ref for a in reg.artifacts()] == ["m@1"]


def test_datasets_live_beside_models_and_are_never_listed_as_models(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    _publish(reg, "m")
    with reg.datasets.staging() as staged:
        (staged / "rows.safetensors").write_bytes(b"rows")
        ds = reg.datasets.publish("m", staged, {"kind": "dataset", "dataset": {"type": "x"}})
    assert ds.path == tmp_path / ".datasets" / "m" / "1"
    assert ds.manifest.kind == "dataset" and ds.manifest.dataset == {"type": "x"}
    assert reg.get("m").manifest.kind == "model"  # manifests without a kind are models
    assert reg.get("m").manifest.dataset == {}
    assert reg.names() == ["m"] and reg.versions("m") == [1]
    assert [a.ref for a in reg.artifacts()] == ["m@1"]
    ds.verify()
    os.chmod(ds.path / "rows.safetensors", 0o644)
    (ds.path / "rows.safetensors").write_bytes(b"ROWS")
    with pytest.raises(IntegrityError, match=r"rows\.safetensors fails its sha256"):
        reg.datasets.get("m", "1").verify()

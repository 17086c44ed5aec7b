"""A model registry on a filesystem: immutable, versioned, checksummed artifacts.

Layout::

    <root>/<name>/<version>/manifest.json + model files   (read-only once published)
    <root>/<name>/aliases.json                             {"production": 3, ...}
    <root>/.staging/<random>/                              work in progress, never listed
    <root>/.datasets/<name>/<version>/                     datasets (`Registry.datasets`)

Datasets a run derives (text a teacher generated, say) are stored once, with the same
immutability and checksums as models, in a registry of their own under ``.datasets``: the
leading dot keeps them out of `names()`, so nothing that lists or serves models sees them.
Their manifests say ``"kind": "dataset"``.

A version becomes visible by one `rename` of a complete, fsynced staging directory, so a
crash at any moment leaves either no new version or a whole one. Every write that moves
state (version numbers, aliases) happens under an exclusive `flock` on `<root>/<name>/.lock`.

A *version directory* (one version's `manifest.json` and files, as `export_version` writes
it, and as a storage initializer or a shared volume provides it) opens as a registry of its
own: one version, no aliases, read-only, answering to whatever model name it is served as
(`slimserve serve --model-dir DIR --name NAME`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimserve.registry.errors import IntegrityError, InvalidName, ModelNotFound, RegistryError
from slimserve.registry.manifest import Manifest

MANIFEST = "manifest.json"
ALIASES = "aliases.json"
MANIFEST_FORMAT = 1
DATASETS = ".datasets"

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
# Aliases start with a letter so they can never be mistaken for a version number.
_ALIAS_RE = re.compile(r"^[a-z][a-z0-9-]{0,63}$")
_CHUNK = 1 << 20


def validate_name(name: str) -> str:
    """Return `name` if it is a legal model name, else raise `InvalidName`."""
    if not _NAME_RE.fullmatch(name) or ".." in name:
        raise InvalidName(
            f"invalid model name {name!r}: use 1-64 characters of a-z, 0-9, '.', '_', '-', "
            "starting with a letter or digit, without '..'"
        )
    return name


def validate_alias(alias: str) -> str:
    """Return `alias` if it is a legal alias, else raise `InvalidName`."""
    if not _ALIAS_RE.fullmatch(alias) or alias == "latest":
        raise InvalidName(
            f"invalid alias {alias!r}: use 1-64 characters of a-z, 0-9, '-', starting with a "
            "letter ('latest' is reserved)"
        )
    return alias


def is_version_number(ref: str) -> bool:
    """Whether `ref` names a version by number: ASCII digits only. `str.isdigit` alone
    would take "²" or "٣", which `int` then refuses or reads as another number."""
    return ref.isascii() and ref.isdigit()


def parse_model_ref(text: str) -> tuple[str, str]:
    """Split ``name[@ref]`` into (name, ref); ref is '' when absent.

    Raises:
        InvalidName: the name, or a ref that is neither a version number nor an alias.
    """
    name, _, ref = text.partition("@")
    validate_name(name)
    if ref and not is_version_number(ref) and ref != "latest":
        try:
            validate_alias(ref)
        except InvalidName:
            raise InvalidName(
                f"invalid ref {ref!r} in {text!r}: a version number (ASCII digits), "
                "'latest' or an alias (a-z, 0-9, '-', starting with a letter)"
            ) from None
    return name, ref


def sha256_file(path: Path) -> str:
    """The hex SHA-256 of the file at `path`, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def fsync_path(path: Path) -> None:
    """Flush a file's data, or a directory's entries, to disk.

    A rename is durable only once the directory holding it is synced; the registry and the
    training checkpoints both publish that way.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json_atomic(path: Path, data: Any) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_path(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@dataclass(frozen=True, slots=True)
class Artifact:
    """One published version: where it lives and what its manifest says."""

    name: str
    version: int
    path: Path
    manifest: Manifest
    #: sha256 of manifest.json's bytes: the artifact's identity.
    digest: str

    def __post_init__(self) -> None:
        if not isinstance(self.manifest, Manifest):  # a plain dict from a caller
            object.__setattr__(self, "manifest", Manifest(self.manifest))

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def files(self) -> Mapping[str, Mapping[str, Any]]:
        return self.manifest.files

    def verify(self) -> None:
        """Check every file's size and sha256 against the manifest.

        Raises:
            IntegrityError: naming the first file that is missing, differs, or is not listed.
        """
        listed = set(self.files)
        for rel, meta in self.files.items():
            path = self.path / rel
            if not path.is_file() or path.is_symlink():
                raise IntegrityError(f"{self.ref}: file {rel} is missing")
            size = path.stat().st_size
            if size != meta["size"]:
                raise IntegrityError(
                    f"{self.ref}: file {rel} has {size} bytes, manifest says {meta['size']}"
                )
            if sha256_file(path) != meta["sha256"]:
                raise IntegrityError(f"{self.ref}: file {rel} fails its sha256 checksum")
        for path in self.path.rglob("*"):
            rel = path.relative_to(self.path).as_posix()
            if path.is_file() and rel != MANIFEST and rel not in listed:
                raise IntegrityError(f"{self.ref}: file {rel} is not in the manifest")


class Registry:
    """A directory of named, versioned artifacts. Safe for concurrent processes."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).expanduser()
        #: `root` is a version directory (it holds a manifest): one version, read-only.
        self.version_dir = (self.root / MANIFEST).is_file()

    @property
    def datasets(self) -> Registry:
        """The registry of datasets kept beside this one's models (``<root>/.datasets``).

        Same layout, publishing and verification; its names are usually the name of the
        model a dataset came from, and its versions one per distinct dataset.
        """
        return Registry(self.root / DATASETS)

    # ---- reading ------------------------------------------------------------------------
    def names(self) -> list[str]:
        if self.version_dir:
            return [str(self._own_manifest()[1]["name"])]
        if not self.root.is_dir():
            return []
        return sorted(
            p.name for p in self.root.iterdir() if p.is_dir() and _NAME_RE.fullmatch(p.name)
        )

    def versions(self, name: str) -> list[int]:
        if self.version_dir:
            validate_name(name)
            return [int(self._own_manifest()[1]["version"])]
        base = self._name_dir(name)
        if not base.is_dir():
            return []
        return sorted(
            int(p.name) for p in base.iterdir() if is_version_number(p.name) and p.is_dir()
        )

    def aliases(self, name: str) -> dict[str, int]:
        if self.version_dir:
            return {}
        path = self._name_dir(name) / ALIASES
        if not path.is_file():
            return {}
        try:
            data = json.loads(path.read_text())
            return {validate_alias(str(k)): int(v) for k, v in data.items()}
        except (ValueError, TypeError, AttributeError) as exc:  # InvalidName is a ValueError
            raise IntegrityError(f"{name}: {ALIASES} is not a map of aliases to versions") from exc

    def resolve(self, name: str, ref: str = "") -> int:
        """The version that `ref` (number, alias, 'latest' or '') names.

        Raises:
            ModelNotFound: unknown name, version or alias.
        """
        versions = self.versions(name)
        if not versions:
            raise ModelNotFound(f"no model named {name!r} in registry {self.root}")
        if ref in ("", "latest"):
            return versions[-1]
        if is_version_number(ref):
            if int(ref) not in versions:
                raise ModelNotFound(
                    f"{name} has no version {ref} (versions: {', '.join(map(str, versions))})"
                )
            return int(ref)
        validate_alias(ref)
        aliases = self.aliases(name)
        if ref not in aliases:
            known = ", ".join(sorted(aliases)) or "none"
            raise ModelNotFound(f"{name} has no alias {ref!r} (aliases: {known})")
        return aliases[ref]

    def get(self, name: str, ref: str = "") -> Artifact:
        """Open one version (without verifying checksums: call `Artifact.verify`)."""
        version = self.resolve(name, ref)
        if self.version_dir:
            path = self.root
            raw, manifest = self._own_manifest()
        else:
            path = self._name_dir(name) / str(version)
            self._check_inside(path)
            manifest_path = path / MANIFEST
            if not manifest_path.is_file():
                raise IntegrityError(f"{name}@{version}: {MANIFEST} is missing")
            raw = manifest_path.read_bytes()
            try:
                manifest = json.loads(raw)
            except ValueError as exc:
                raise IntegrityError(f"{name}@{version}: {MANIFEST} is not valid JSON") from exc
        return Artifact(
            name=name,
            version=version,
            path=path,
            manifest=Manifest(manifest),
            digest=hashlib.sha256(raw).hexdigest(),
        )

    def artifacts(self) -> list[Artifact]:
        return [self.get(n, str(v)) for n in self.names() for v in self.versions(n)]

    # ---- writing ------------------------------------------------------------------------
    @contextlib.contextmanager
    def staging(self) -> Iterator[Path]:
        """A scratch directory on the registry's filesystem; removed unless published."""
        self._check_writable()
        base = self.root / ".staging"
        base.mkdir(parents=True, exist_ok=True)
        path = Path(tempfile.mkdtemp(dir=base))
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def publish(self, name: str, staged: Path, manifest: Mapping[str, Any]) -> Artifact:
        """Checksum `staged`, write its manifest, and make it `name`'s next version.

        `manifest` holds everything but name, version, created_at, files and format,
        which this method fills in. `staged` must come from `staging()`; it is moved.
        """
        validate_name(name)
        self._check_writable()
        staged = Path(staged)
        if staged.parent != self.root / ".staging":
            raise ValueError(f"{staged} is not a staging directory of {self.root}")
        files: dict[str, dict[str, Any]] = {}
        for path in sorted(staged.rglob("*")):
            if path.is_symlink():
                raise IntegrityError(f"refusing to publish a symbolic link: {path.name}")
            if path.is_file():
                rel = path.relative_to(staged).as_posix()
                files[rel] = {"sha256": sha256_file(path), "size": path.stat().st_size}
                with path.open("rb") as f:
                    os.fsync(f.fileno())
        base = self._name_dir(name)
        base.mkdir(parents=True, exist_ok=True)
        with self._lock(name):
            versions = self.versions(name)
            version = (versions[-1] + 1) if versions else 1
            full = {
                **manifest,
                "format": MANIFEST_FORMAT,
                "name": name,
                "version": version,
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "files": files,
            }
            _write_json_atomic(staged / MANIFEST, full)
            for path in staged.rglob("*"):
                if path.is_file():
                    path.chmod(0o444)
            staged.chmod(0o755)  # mkdtemp made it private
            fsync_path(staged)
            target = base / str(version)
            os.rename(staged, target)
            fsync_path(base)
        return self.get(name, str(version))

    def set_alias(self, name: str, alias: str, version: int) -> None:
        """Point `alias` at `version` (atomically replaces any previous target)."""
        self._check_writable()
        validate_alias(alias)
        if version not in self.versions(name):
            raise ModelNotFound(f"{name} has no version {version}")
        with self._lock(name):
            aliases = self.aliases(name)
            aliases[alias] = version
            _write_json_atomic(self._name_dir(name) / ALIASES, aliases)

    def remove_alias(self, name: str, alias: str) -> None:
        self._check_writable()
        validate_alias(alias)
        with self._lock(name):
            aliases = self.aliases(name)
            if alias not in aliases:
                raise ModelNotFound(f"{name} has no alias {alias!r}")
            del aliases[alias]
            _write_json_atomic(self._name_dir(name) / ALIASES, aliases)

    def aliases_of(self, name: str, version: int) -> list[str]:
        return sorted(a for a, v in self.aliases(name).items() if v == version)

    # ---- helpers ------------------------------------------------------------------------
    def _own_manifest(self) -> tuple[bytes, dict[str, Any]]:
        """A version directory's manifest: its bytes (the digest) and its fields."""
        raw = (self.root / MANIFEST).read_bytes()
        try:
            manifest = json.loads(raw)
            int(manifest["version"])
            validate_name(str(manifest["name"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise IntegrityError(
                f"{self.root / MANIFEST} is not a version's manifest: {exc!r}"
            ) from None
        return raw, manifest

    def _check_writable(self) -> None:
        if self.version_dir:
            raise RegistryError(
                f"{self.root} is one exported version (it holds {MANIFEST}), served read-only; "
                "publish and alias in a registry root instead"
            )

    def _name_dir(self, name: str) -> Path:
        path = self.root / validate_name(name)
        self._check_inside(path)
        return path

    def _check_inside(self, path: Path) -> None:
        # A symlink inside the registry must not lead out of it.
        root = self.root.resolve()
        if path.exists() and not path.resolve().is_relative_to(root):
            raise InvalidName(f"{path} resolves outside the registry {root}")

    @contextlib.contextmanager
    def _lock(self, name: str) -> Iterator[None]:
        lock_path = self._name_dir(name) / ".lock"
        with lock_path.open("a") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def export_version(artifact: Artifact, target: Path) -> Artifact:
    """Write `artifact` to `target` as a version directory (its files and its manifest,
    byte for byte, so the copy keeps the digest), for a storage bucket, a volume or
    `serve --model-dir`. The source is verified first and the copy after; the manifest is
    written last, so an interrupted export holds no manifest and nothing serves it.

    Raises:
        IntegrityError: the source, or the copy, fails its checksums.
        FileExistsError: `target` exists and is not an empty directory.
    """
    artifact.verify()
    target = Path(target)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise FileExistsError(f"{target} exists and is not an empty directory")
    target.mkdir(parents=True, exist_ok=True)
    for rel in sorted(artifact.files):
        dst = target / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(artifact.path / rel, dst)
        with dst.open("rb") as f:
            os.fsync(f.fileno())
        dst.chmod(0o444)
    staged = target / f".{MANIFEST}.tmp"
    staged.write_bytes((artifact.path / MANIFEST).read_bytes())
    with staged.open("rb") as f:
        os.fsync(f.fileno())
    staged.chmod(0o444)
    os.replace(staged, target / MANIFEST)
    fsync_path(target)
    copy = Registry(target).get(artifact.name)
    copy.verify()
    return copy


def describe(artifact: Artifact, aliases: list[str]) -> dict[str, Any]:
    """The summary `registry list --json` prints for one version."""
    m = artifact.manifest
    return {
        "name": artifact.name,
        "version": artifact.version,
        "ref": artifact.ref,
        "aliases": aliases,
        "parent": m.parent,
        "source": m.source_uri or None,
        "recipe": {"name": m.recipe_name} if m.recipe else None,
        "digest": artifact.digest,
        "created_at": m.created_at,
        "dtype": m.dtype,
        "quantization": m.quantization_scheme,
        "parameters": m.get("parameters"),
        "bytes": sum(int(f["size"]) for f in m.files.values()),
        "metrics": dict(m.metrics),
    }

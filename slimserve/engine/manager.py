"""The models one server holds: load beside, swap, retire, resolve a request's ref.

A name may serve several versions at once (Triton's version policy): a parent beside its
compressed child, each answering `name@version` (or an alias naming it). A bare `name` gets
the name's default version: the first loaded, or the latest one loaded as a swap. Loading a
version as a swap (the default) retires the name's other versions once their in-flight
requests finish; loading it `beside` keeps them serving.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from slimserve.engine.config import ModelConfig
from slimserve.engine.errors import (
    IntegrityFailure,
    InvalidRequest,
    NotReady,
    UnknownModel,
)
from slimserve.engine.frontend import Frontend
from slimserve.engine.launch import launch
from slimserve.engine.loader import BackendHook, LoadedModel, load
from slimserve.engine.qualify import Qualifier, VerdictCache, verdicts_path
from slimserve.registry.errors import IntegrityError, RegistryError
from slimserve.registry.errors import ModelNotFound as RegistryNotFound
from slimserve.registry.store import Artifact, Registry, is_version_number, validate_alias

log = logging.getLogger(__name__)


class ModelManager:
    """The models this server holds; resolves request refs to a loaded version."""

    def __init__(
        self,
        registry: Registry,
        config: ModelConfig,
        *,
        retire_grace_s: float = 60.0,
        backend_hook: BackendHook | None = None,
        on_health: Callable[[str, bool], None] | None = None,
        verdicts: Path | None = None,
    ) -> None:
        """`on_health(name, serving)` hears every change of a model's state (loaded,
        engine died, restarted, unloaded); `verdicts` is the qualification cache file
        (default: `.qualify/verdicts.json` in the registry)."""
        self.registry = registry
        self.config = config
        self.on_health = on_health
        cache = verdicts if verdicts is not None else verdicts_path(registry.root)
        self.qualifier = Qualifier(VerdictCache(cache))
        #: Seconds a swapped-out version keeps running for its in-flight requests.
        self.retire_grace_s = retire_grace_s
        self.backend_hook = backend_hook
        #: name -> version -> the loaded version.
        self._models: dict[str, dict[int, LoadedModel]] = {}
        #: name -> the version a request for the bare name gets.
        self._versions: dict[str, int] = {}
        self._default: str | None = None
        self._lock = threading.Lock()
        #: True while the server loads its configured models (requests get UNAVAILABLE).
        self.loading = False

    def load(
        self, name: str, ref: str = "", *, make_default: bool = False, beside: bool = False
    ) -> LoadedModel:
        """Load a version, then make it the name's default (blocking; not on the loop).

        Without `beside` it replaces the name's other versions: in-flight requests finish
        on the version they started with, then those retire. With `beside` the others keep
        serving (each by `name@version`), and the name's default stays as it was unless the
        name had none. A load that fails leaves everything serving as before; loading a
        version already served only changes the defaults.
        """
        _check_ref(ref)
        try:
            artifact = self.registry.get(name, ref)
        except RegistryNotFound as exc:
            raise UnknownModel(str(exc)) from exc
        except IntegrityError as exc:
            raise IntegrityFailure(str(exc)) from exc
        except RegistryError as exc:
            raise InvalidRequest("model", str(exc)) from exc
        version = artifact.version
        with self._lock:
            current = self._models.get(name, {}).get(version)
            if current is not None and current.artifact.digest == artifact.digest:
                self._set_defaults(name, version, make_default, beside)
                return current  # already serving this exact version
        loaded = self._load(artifact)
        with self._lock:
            versions = self._models.setdefault(name, {})
            old = [] if beside else [m for v, m in versions.items() if v != version]
            replaced = versions.get(version)
            versions[version] = loaded
            for m in old:
                versions.pop(m.artifact.version)
            self._set_defaults(name, version, make_default, beside)
        for m in [*old, *([replaced] if replaced else [])]:
            threading.Thread(target=_retire, args=(m, self.retire_grace_s), daemon=True).start()
        log.info("%s now serves %s", name, loaded.ref)
        self._health(name, True)
        return loaded

    def _set_defaults(self, name: str, version: int, make_default: bool, beside: bool) -> None:
        if not beside or name not in self._versions:
            self._versions[name] = version
        if make_default or self._default is None:
            self._default = name

    def _load(self, artifact: Artifact) -> LoadedModel:
        if self.backend_hook is not None or not self.config.load.engine_process:
            from slimserve.engine.scheduler import EngineHooks  # torch: only in process

            # A dead loop turns the model NOT_SERVING, as a dead engine process does.
            hooks = EngineHooks(on_failure=lambda _exc: self._health(artifact.name, False))
            local = load(artifact, self.config, self.backend_hook, hooks=hooks)
            return LoadedModel(artifact=artifact, engine=Frontend.of(local), loaded_at=time.time())

        def on_state(serving: bool) -> None:
            with self._lock:
                current = self._models.get(artifact.name, {}).get(artifact.version)
            if current is not None and current.artifact.digest == artifact.digest:
                self._health(artifact.name, self.serving(artifact.name))

        return launch(
            artifact,
            self.registry.root,
            self.config,
            self.qualifier,
            on_state=on_state,
        )

    def _health(self, name: str, serving: bool) -> None:
        if self.on_health is not None:
            try:
                self.on_health(name, serving)
            except Exception:
                log.exception("health listener failed")

    def serving(self, name: str) -> bool:
        """Whether `name`'s default version is loaded and its engine is up."""
        with self._lock:
            version = self._versions.get(name)
            model = self._models.get(name, {}).get(version) if version is not None else None
        return model is not None and model.engine.serving

    def unload(self, name: str, ref: str = "") -> None:
        """Unload every version of `name`, or the one `ref` names (then the name's default
        moves to the latest version left)."""
        with self._lock:
            versions = self._models.get(name)
            if not versions:
                raise UnknownModel(f"model {name!r} is not loaded")
            if ref:
                version = self._version_of(name, ref, versions)
                gone = [versions.pop(version)]
            else:
                gone = list(versions.values())
                versions.clear()
            if not versions:
                del self._models[name]
                self._versions.pop(name, None)
                if self._default == name:
                    self._default = next(iter(self._models), None)
            elif self._versions.get(name) not in versions:
                self._versions[name] = max(versions)
        self._health(name, self.serving(name))
        for model in gone:
            _retire(model, self.retire_grace_s)

    def get(self, name: str = "", ref: str = "") -> LoadedModel:
        """The loaded version a request names: the name's default, or the version `ref` is
        (a number, an alias or "latest") when it is loaded."""
        with self._lock:
            key = name or self._default
            versions = dict(self._models.get(key, {})) if key else {}
            default = self._versions.get(key) if key else None
            loaded_names = sorted(self._models)
        if not versions and self.loading:
            raise NotReady("models are still loading; retry shortly")
        if not versions or key is None or default is None:
            what = f"model {name!r} is not loaded" if name else "no default model is loaded"
            raise UnknownModel(f"{what} (loaded: {', '.join(loaded_names) or 'none'})")
        if not ref:
            return versions[default]
        return versions[self._version_of(key, ref, versions)]

    def _version_of(self, name: str, ref: str, versions: dict[int, LoadedModel]) -> int:
        """The loaded version `ref` names; UnknownModel when it names none that is loaded."""
        serving = ", ".join(f"{name}@{v}" for v in sorted(versions))
        if is_version_number(ref):
            if int(ref) not in versions:
                raise UnknownModel(f"{name} version {ref} is not loaded (serving {serving})")
            return int(ref)
        try:
            validate_alias(ref) if ref != "latest" else None
            version = self.registry.resolve(name, ref)
        except (RegistryNotFound, RegistryError) as exc:
            raise UnknownModel(str(exc)) from exc
        if version not in versions:
            raise UnknownModel(
                f"{name}@{ref} is version {version}, which is not loaded (serving {serving})"
            )
        return version

    def versions(self, name: str) -> list[LoadedModel]:
        """The loaded versions of `name`, oldest first."""
        with self._lock:
            return [m for _, m in sorted(self._models.get(name, {}).items())]

    def is_default(self, model: LoadedModel) -> bool:
        """Whether a bare request for the server (no name) gets `model`."""
        with self._lock:
            return (
                model.name == self._default
                and self._versions.get(model.name) == model.artifact.version
            )

    def all(self) -> list[LoadedModel]:
        with self._lock:
            return [m for versions in self._models.values() for m in versions.values()]

    @property
    def default_name(self) -> str | None:
        return self._default

    def shutdown(self) -> None:
        with self._lock:
            models = [m for versions in self._models.values() for m in versions.values()]
            self._models.clear()
            self._versions.clear()
        for m in models:
            m.engine.shutdown()


def _check_ref(ref: str) -> None:
    if ref in ("", "latest") or is_version_number(ref):
        return
    try:
        validate_alias(ref)
    except RegistryError as exc:
        raise InvalidRequest("ref", str(exc)) from exc


def _retire(model: LoadedModel, grace_s: float = 60.0) -> None:
    """Let in-flight requests finish on the old version, then stop its engine."""
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            stats = model.engine.stats()
        except NotReady:
            break  # its engine process is gone: nothing left to finish
        if stats.running == 0 and stats.queued == 0:
            break
        time.sleep(0.05)
    model.engine.shutdown()
    log.info("retired %s", model.ref)

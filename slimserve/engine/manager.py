"""The models one server holds: load beside, swap, retire, resolve a request's ref."""

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
from slimserve.engine.launch import launch
from slimserve.engine.loader import BackendHook, LoadedModel, load
from slimserve.engine.qualify import Qualifier, VerdictCache, verdicts_path
from slimserve.engine.supervisor import RestartPolicy
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
        self.qualifier = Qualifier(VerdictCache(cache), crash_ttl_s=config.crash_verdict_ttl_s)
        self.policy = RestartPolicy(
            backoff_s=config.restart_backoff_s,
            max_backoff_s=max(30.0, config.restart_backoff_s),
            max_crashes=config.max_crashes,
            crash_window_s=config.crash_window_s,
            step_timeout_s=config.engine_step_timeout_s,
        )
        #: Seconds a swapped-out version keeps running for its in-flight requests.
        self.retire_grace_s = retire_grace_s
        self.backend_hook = backend_hook
        self._models: dict[str, LoadedModel] = {}
        self._default: str | None = None
        self._lock = threading.Lock()
        #: True while the server loads its configured models (requests get UNAVAILABLE).
        self.loading = False

    def load(self, name: str, ref: str = "", *, make_default: bool = False) -> LoadedModel:
        """Load a version beside the current one, then swap (blocking; not on the loop).

        In-flight requests finish on the version they started with; a load that fails
        leaves the current version serving. Loading the version already served is a no-op.
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
        with self._lock:
            current = self._models.get(name)
            if current is not None and current.artifact.digest == artifact.digest:
                if make_default:
                    self._default = name
                return current  # already serving this exact version
        loaded = self._load(artifact)
        with self._lock:
            old = self._models.get(name)
            self._models[name] = loaded
            if make_default or self._default is None:
                self._default = name
        if old is not None:
            threading.Thread(target=_retire, args=(old, self.retire_grace_s), daemon=True).start()
        log.info("%s now serves %s", name, loaded.ref)
        self._health(name, True)
        return loaded

    def _load(self, artifact: Artifact) -> LoadedModel:
        if self.backend_hook is not None or not self.config.engine_process:
            # A dead loop turns the model NOT_SERVING, as a dead engine process does.
            return load(
                artifact,
                self.config,
                self.backend_hook,
                on_failure=lambda _exc: self._health(artifact.name, False),
            )

        def on_state(serving: bool) -> None:
            with self._lock:
                current = self._models.get(artifact.name)
            if current is not None and current.artifact.digest == artifact.digest:
                self._health(artifact.name, serving)

        return launch(
            artifact,
            self.registry.root,
            self.config,
            self.qualifier,
            policy=self.policy,
            on_state=on_state,
        )

    def _health(self, name: str, serving: bool) -> None:
        if self.on_health is not None:
            try:
                self.on_health(name, serving)
            except Exception:
                log.exception("health listener failed")

    def serving(self, name: str) -> bool:
        """Whether `name` is loaded and its engine is up."""
        with self._lock:
            model = self._models.get(name)
        if model is None:
            return False
        return model.engine.serving

    def unload(self, name: str) -> None:
        with self._lock:
            old = self._models.pop(name, None)
            if old is None:
                raise UnknownModel(f"model {name!r} is not loaded")
            if self._default == name:
                self._default = next(iter(self._models), None)
        self._health(name, False)
        _retire(old, self.retire_grace_s)

    def get(self, name: str = "", ref: str = "") -> LoadedModel:
        """The loaded model a request names; `ref` must resolve to the loaded version."""
        with self._lock:
            key = name or self._default
            loaded = self._models.get(key) if key else None
            loaded_names = sorted(self._models)
        if loaded is None and self.loading:
            raise NotReady("models are still loading; retry shortly")
        if loaded is None:
            what = f"model {name!r} is not loaded" if name else "no default model is loaded"
            raise UnknownModel(f"{what} (loaded: {', '.join(loaded_names) or 'none'})")
        if ref and ref != str(loaded.artifact.version):
            if is_version_number(ref):
                raise UnknownModel(
                    f"{loaded.name} version {ref} is not loaded (serving {loaded.ref})"
                )
            try:
                validate_alias(ref) if ref != "latest" else None
                version = self.registry.resolve(loaded.name, ref)
            except (RegistryNotFound, RegistryError) as exc:
                raise UnknownModel(str(exc)) from exc
            if version != loaded.artifact.version:
                raise UnknownModel(
                    f"{loaded.name}@{ref} is version {version}, which is not loaded "
                    f"(serving {loaded.ref})"
                )
        return loaded

    def all(self) -> list[LoadedModel]:
        with self._lock:
            return list(self._models.values())

    @property
    def default_name(self) -> str | None:
        return self._default

    def shutdown(self) -> None:
        with self._lock:
            models = list(self._models.values())
            self._models.clear()
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

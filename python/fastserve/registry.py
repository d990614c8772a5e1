"""Which model versions serve, how an edit of the repository changes that, and their states.

Each model folder's ``config.yaml`` says which versions are loaded (its version policy)
and which one is primary. Applying a model folder (at start-up, on a watched edit, or on an
admin call) goes in this order:

1. parse and validate the config, pick the versions;
2. load and warm up, in a thread, every version that is new or whose files or serving
   settings changed (unchanged versions keep their sessions);
3. switch: one assignment replaces the model's ``Route``, so a request sees either the
   old set of versions or the new one, never a mixture;
4. retire what is no longer served: wait until no request holds it (``inflight``), drain
   its batcher, free its sessions.

If anything in 1 or 2 fails, nothing that serves changes: the new sessions are dropped, the
problem is logged, counted, and shown as the ``reason`` in the repository index. Applies of
one model are serialized; a burst of edits during an apply is applied once more after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fastserve import repository
from fastserve.config import (
    MODEL_CONFIG_FILE,
    ModelConfig,
    load_model_config,
    replace_file,
    write_primary,
)
from fastserve.errors import ChangeRefused, FastServeError, ModelNotFound, ModelNotReady
from fastserve.model import ModelState, ServedModel
from fastserve.monitoring.metrics import Metrics
from fastserve.repository import MODEL_FILE, ModelSource

log = logging.getLogger("fastserve.registry")

_RETIRE_POLL_S = 0.005
UNLOADED_REASON = "unloaded through the repository API"


@dataclass(frozen=True)
class Route:
    """What answers one model's requests: replaced whole, never changed in place."""

    primary: ServedModel
    versions: Mapping[str, ServedModel]
    config: ModelConfig
    """The model's config as last applied (shadow, review and gate settings come from it)."""
    shadow: ServedModel | None = None
    """The version mirrored to, when the config names one (also in ``versions``)."""


@dataclass
class ModelStatus:
    """One row of the repository index."""

    name: str
    version: str
    state: ModelState
    reason: str = ""
    primary: bool = False

    def as_index_entry(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "state": self.state.value,
            "reason": self.reason,
            "primary": self.primary,
        }


@dataclass
class _Loaded:
    model: ServedModel
    fingerprint: tuple[tuple[str, int, int, int], ...]
    settings: dict[str, Any]


@dataclass
class _Entry:
    """The registry's bookkeeping for one model name."""

    name: str
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    loaded: dict[str, _Loaded] = field(default_factory=dict)
    states: dict[str, tuple[ModelState, str]] = field(default_factory=dict)
    """Versions loading, unloading or failed (version -> state, reason)."""
    problem: str = ""
    """Why the last change was not applied ("" when it was)."""
    primaries: list[str] = field(default_factory=list)
    """Primaries served in this process, oldest first (rollback goes back along it)."""
    unloaded: bool = False
    """Unloaded through the API: file edits are not applied until it is loaded again."""
    task: asyncio.Task[None] | None = None
    dirty: bool = False


class Registry:
    def __init__(
        self,
        root: Path,
        *,
        metrics: Metrics | None = None,
        retire_timeout_s: float = 30.0,
        monitoring: bool = True,
    ) -> None:
        self.root = root
        self.monitoring = monitoring
        """Loaded versions feed their drift sketches (``--no-monitoring``: not)."""
        self.metrics = metrics or Metrics()
        self.retire_timeout_s = retire_timeout_s
        self._routes: dict[str, Route] = {}
        """The hot path's view: model name -> what serves it."""
        self._entries: dict[str, _Entry] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- serving (hot path) -------------------------------------------------------------

    def get(self, name: str, version: str | None = None) -> ServedModel:
        """The model version answering ``name`` (and ``version`` when given).

        Unknown model or version: ModelNotFound (404); known but not serving: ModelNotReady.
        """
        route = self._routes.get(name)
        if route is None:
            entry = self._entries.get(name)
            if entry is None:
                raise ModelNotFound(name, version)
            raise ModelNotReady(name, version, why=self._why_not_serving(entry))
        if version is None:
            return route.primary
        model = route.versions.get(version)
        if model is None:
            raise ModelNotFound(name, version)
        return model

    def route(self, name: str) -> Route | None:
        """What serves ``name`` now (None: nothing)."""
        return self._routes.get(name)

    def versions(self, name: str) -> list[str]:
        """The loaded versions of ``name``, oldest first."""
        route = self._routes.get(name)
        return [] if route is None else sorted(route.versions, key=int)

    def known(self) -> set[str]:
        """Names of the models this registry knows (serving or not)."""
        return set(self._entries)

    def models(self) -> list[ServedModel]:
        """Every loaded model version."""
        return [
            route.versions[v]
            for _, route in sorted(self._routes.items())
            for v in sorted(route.versions, key=int)
        ]

    @property
    def all_ready(self) -> bool:
        """Every model that should serve does (a model unloaded on purpose does not count)."""
        wanted = [e for e in self._entries.values() if not e.unloaded]
        return bool(self._entries) and all(e.name in self._routes for e in wanted)

    def index(self) -> list[ModelStatus]:
        """The repository index: each model version with its state and reason."""
        return [row for name in sorted(self._entries) for row in self._rows(self._entries[name])]

    def _rows(self, entry: _Entry) -> list[ModelStatus]:
        route = self._routes.get(entry.name)
        versions = set(entry.loaded) | set(entry.states)
        rows = []
        for version in sorted(versions, key=int):
            state, reason = entry.states.get(version, (ModelState.READY, ""))
            is_primary = route is not None and route.primary.version == version
            if state is ModelState.READY and entry.problem:
                reason = f"serving; the last change was not applied: {entry.problem}"
            rows.append(ModelStatus(entry.name, version, state, reason, is_primary))
        if not versions:
            rows.append(ModelStatus(entry.name, "", ModelState.UNAVAILABLE, entry.problem))
        return rows

    def _why_not_serving(self, entry: _Entry) -> str:
        if any(state is ModelState.LOADING for state, _ in entry.states.values()):
            return "loading"
        return "unloaded" if entry.unloaded else "unavailable"

    # -- life cycle ---------------------------------------------------------------------

    async def load_all(self) -> None:
        """Apply every model folder of the repository (at start-up)."""
        self._loop = asyncio.get_running_loop()
        sources, skipped = repository.scan(self.root)
        for name, reason in skipped.items():
            log.warning("repository: skipping folder %r: %s", name, reason)
        for source in sources:
            self._entry(source.name)
        for source in sources:
            # a failure is logged and recorded by apply; the other models still load
            with contextlib.suppress(FastServeError):
                await self.apply(source.name)

    async def stop_all(self) -> None:
        entries = list(self._entries.values())
        for entry in entries:
            if entry.task is not None:
                entry.task.cancel()
        await asyncio.gather(
            *(e.task for e in entries if e.task is not None), return_exceptions=True
        )
        self._routes.clear()
        models = [loaded.model for e in entries for loaded in e.loaded.values()]
        for entry in entries:
            entry.loaded.clear()
        await asyncio.gather(*(model.stop() for model in models))

    def changed(self, names: Iterable[str]) -> None:
        """Folders of the repository changed (from the watcher): apply them in the
        background, each once more if it changes again while being applied."""
        for name in names:
            if not repository.is_model_name(name):
                continue
            if name not in self._entries and repository.find(self.root, name) is None:
                continue  # not a model folder (yet): nothing to apply or to remove
            entry = self._entry(name)
            if entry.task is not None and not entry.task.done():
                entry.dirty = True
            else:
                entry.task = asyncio.get_running_loop().create_task(self._apply_changes(entry))

    def resync(self) -> None:
        """Apply every model folder and every known model again (unchanged ones cost a
        config parse): catches edits a watcher could not see."""
        sources, _ = repository.scan(self.root)
        self.changed({s.name for s in sources} | set(self._entries))

    async def _apply_changes(self, entry: _Entry) -> None:
        while True:
            entry.dirty = False
            if not entry.unloaded:
                try:
                    await self.apply(entry.name)
                except FastServeError:
                    pass  # recorded by apply; the model serves as before
                except Exception:
                    log.exception("model %s: unexpected error applying a change", entry.name)
            if not entry.dirty:
                return

    # -- admin actions ------------------------------------------------------------------

    async def load(self, name: str) -> Route:
        """Load (or reload) ``name`` from the repository now; raise why not."""
        self._entry_if_model(name).unloaded = False
        return await self.apply(name)

    async def unload(self, name: str) -> None:
        """Stop serving every version of ``name`` until it is loaded again."""
        entry = self._entries.get(name)
        if entry is None:
            raise ModelNotFound(name)
        async with entry.lock:
            entry.unloaded = True
            entry.problem = UNLOADED_REASON
            self._routes.pop(name, None)
            retired = [loaded.model for loaded in entry.loaded.values()]
            entry.loaded = {}
            await self._retire(entry, retired)
            entry.states = {v: s for v, s in entry.states.items() if s[0] is ModelState.LOADING}
            self.metrics.swap(name, "unload")
            self._publish(entry)
        log.info("model %s: unloaded", name)

    async def set_primary(self, name: str, version: str, *, drop_shadow: bool = False) -> Route:
        """Make ``version`` primary by editing the model's config file (with
        ``drop_shadow``, also removing its shadow section), then apply it.

        If it cannot be applied, the file is put back as it was and nothing changes.
        """
        source = self._source(name)
        if version not in source.versions():
            raise ChangeRefused(name, f"there is no version {version} with a {MODEL_FILE}")
        previous_text = write_primary(source.config_path, int(version), drop_shadow=drop_shadow)
        entry = self._entry(name)
        entry.unloaded = False
        try:
            return await self.apply(name)
        except FastServeError:
            replace_file(source.config_path, previous_text)
            raise

    async def rollback(self, name: str) -> Route:
        """Make the version that was primary before the current one primary again."""
        source = self._source(name)
        entry = self._entry(name)
        route = self._routes.get(name)
        if route is None:
            raise ModelNotReady(name, why=self._why_not_serving(entry))
        current = route.primary.version
        available = source.versions()
        history = [v for v in entry.primaries[:-1] if v != current and v in available]
        if history:
            target = history[-1]
        else:
            older = [v for v in available if int(v) < int(current)]
            if not older:
                raise ChangeRefused(name, f"no version older than {current} to roll back to")
            target = older[-1]
        result = await self.set_primary(name, target)
        # a rollback steps back along the history instead of adding to it
        kept = entry.primaries[:-1]
        while kept and kept[-1] != target:
            kept.pop()
        entry.primaries = kept or [target]
        return result

    # -- applying a model folder --------------------------------------------------------

    async def apply(self, name: str) -> Route:
        """Make what serves ``name`` match its folder; raise ChangeRefused (nothing
        changed) or ModelNotFound (no such folder: whatever served it is unloaded)."""
        entry = self._entry_if_model(name, allow_known=True)
        async with entry.lock:
            return await self._apply_locked(entry)

    async def _apply_locked(self, entry: _Entry) -> Route:
        name = entry.name
        source = repository.find(self.root, name)
        if source is None:
            await self._remove(entry)
            raise ModelNotFound(name)
        try:
            config = load_model_config(source.config_path, f"{name}/{MODEL_CONFIG_FILE}")
        except FastServeError as exc:
            raise self._refuse(entry, str(exc)) from None
        available = [int(v) for v in source.versions()]
        wanted = config.version_policy.select(available)
        if config.primary is not None:
            if config.primary not in available:
                raise self._refuse(
                    entry,
                    f"primary version {config.primary} has no folder with a {MODEL_FILE}",
                )
            wanted = sorted({*wanted, config.primary})
        shadow = None if config.shadow is None else config.shadow.version
        if shadow is not None and shadow not in available:
            raise self._refuse(entry, f"shadow version {shadow} has no folder with a {MODEL_FILE}")
        candidates = [v for v in wanted if v != shadow]
        if not candidates:
            what = "no version folder" if not available else "the version policy selects none"
            if shadow is not None and wanted:
                what = "the version policy selects only the shadow version (set primary)"
            raise self._refuse(entry, f"{what} (found versions: {available or 'none'})")
        primary = str(config.primary or candidates[-1])
        if shadow is not None:
            wanted = sorted({*wanted, shadow})
        # A shadow runs on worker threads, never on the event loop: a slow or hanging
        # shadow must not hold up the primary's requests.
        shadow_config = config.model_copy(update={"execution": "threads"})
        configs = {str(v): shadow_config if v == shadow else config for v in wanted}

        keep: dict[str, _Loaded] = {}
        to_load: list[tuple[str, Any]] = []
        for version in map(str, wanted):
            fingerprint = source.fingerprint(version)
            current = entry.loaded.get(version)
            settings = configs[version].serving_settings()
            if current and current.fingerprint == fingerprint and current.settings == settings:
                keep[version] = current
            else:
                to_load.append((version, fingerprint))
        serving = self._routes.get(name)
        if (
            not to_load
            and keep.keys() == entry.loaded.keys()
            and serving is not None
            and serving.primary.version == primary
            and (serving.shadow and serving.shadow.version) == (shadow and str(shadow))
        ):
            if serving.config != config:  # review or gate settings: no session changes
                serving = self._routes[name] = replace(serving, config=config)
            if entry.problem or entry.states:
                entry.problem = ""
                entry.states = {}  # only failures of earlier attempts can be left here
                self._publish(entry)
            return serving

        started = time.perf_counter()
        fresh = await self._load_versions(entry, source, to_load, configs)
        loop = asyncio.get_running_loop()
        for loaded in fresh.values():
            loaded.model.start(loop, monitoring=self.monitoring)
        new = {**keep, **fresh}
        retired = [old.model for v, old in entry.loaded.items() if new.get(v) is not old]
        route = Route(
            new[primary].model,
            {v: loaded.model for v, loaded in new.items()},
            config,
            None if shadow is None else new[str(shadow)].model,
        )
        # the switch: from here on every request resolves to the new set of versions
        self._routes[name] = route
        entry.loaded = new
        entry.problem = ""
        entry.states = {v: (ModelState.UNLOADING, "") for v in _retiring(retired, new)}
        if not entry.primaries or entry.primaries[-1] != primary:
            entry.primaries.append(primary)
        self._publish(entry)
        await self._retire(entry, retired)
        entry.states = {}
        self.metrics.swap(name, "success")
        self._publish(entry)
        log.info(
            "model %s: serving version %s (loaded: %s; %s in %.0f ms)",
            name,
            primary,
            ", ".join(sorted(new, key=int)),
            "loaded " + ", ".join(v for v, _ in to_load) if to_load else "no new sessions",
            (time.perf_counter() - started) * 1000,
        )
        return route

    async def _load_versions(
        self,
        entry: _Entry,
        source: ModelSource,
        to_load: list[tuple[str, Any]],
        configs: Mapping[str, ModelConfig],
    ) -> dict[str, _Loaded]:
        """Load ``to_load`` one after the other (all or none: on a failure the ones
        already loaded are dropped, and the error names the version that failed)."""
        fresh: dict[str, _Loaded] = {}
        for version, _ in to_load:
            entry.states[version] = (ModelState.LOADING, "")
        self._publish(entry)
        for version, fingerprint in to_load:
            try:
                config = configs[version]
                model = await asyncio.to_thread(
                    ServedModel.load, entry.name, version, source.model_file(version), config
                )
            except FastServeError as exc:
                await asyncio.gather(*(loaded.model.stop() for loaded in fresh.values()))
                entry.states = {version: (ModelState.UNAVAILABLE, str(exc))}
                raise self._refuse(entry, f"version {version}: {exc}") from None
            fresh[version] = _Loaded(model, fingerprint, config.serving_settings())
        return fresh

    def _refuse(self, entry: _Entry, problem: str) -> ChangeRefused:
        """Record why a change was not applied (nothing serving changes); the error to raise."""
        entry.states = {v: s for v, s in entry.states.items() if s[0] is ModelState.UNAVAILABLE}
        entry.problem = problem
        self.metrics.swap(entry.name, "failure")
        self._publish(entry)
        serving = self._routes.get(entry.name)
        still = f"; version {serving.primary.version} keeps serving" if serving else ""
        log.error("model %s: change not applied: %s%s", entry.name, problem, still)
        return ChangeRefused(entry.name, problem)

    async def _retire(self, entry: _Entry, models: list[ServedModel]) -> None:
        """Wait until no request holds each model (bounded), then drain and free it."""

        async def retire(model: ServedModel) -> None:
            deadline = time.monotonic() + self.retire_timeout_s
            # Polled so that the hot path pays one decrement per request, nothing more.
            while model.inflight and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(_RETIRE_POLL_S)
            if model.inflight:
                log.warning(
                    "model %s: unloading with %d request(s) still running",
                    model.label,
                    model.inflight,
                )
            await model.stop()

        await asyncio.gather(*(retire(model) for model in models))

    async def _remove(self, entry: _Entry) -> None:
        """The folder is gone: unload everything and forget the model."""
        self._routes.pop(entry.name, None)
        retired = [loaded.model for loaded in entry.loaded.values()]
        entry.loaded = {}
        await self._retire(entry, retired)
        self._entries.pop(entry.name, None)
        self.metrics.forget(entry.name)
        if retired:
            self.metrics.swap(entry.name, "removed")
            log.info("model %s: removed from the repository, unloaded", entry.name)

    # -- helpers ------------------------------------------------------------------------

    def _entry(self, name: str) -> _Entry:
        entry = self._entries.get(name)
        if entry is None:
            entry = self._entries[name] = _Entry(name)
        return entry

    def _entry_if_model(self, name: str, *, allow_known: bool = False) -> _Entry:
        """The entry of ``name`` if it is a model folder (or, with ``allow_known``, a
        model this registry knows); ModelNotFound otherwise. Creates no entry for names
        that are not model folders, so clients cannot grow the registry."""
        if (allow_known and name in self._entries) or repository.find(self.root, name):
            return self._entry(name)
        raise ModelNotFound(name)

    def _source(self, name: str) -> ModelSource:
        source = repository.find(self.root, name)
        if source is None:
            raise ModelNotFound(name)
        return source

    def _publish(self, entry: _Entry) -> None:
        counts = {state: 0 for state in ModelState}
        for row in self._rows(entry):
            if row.version:
                counts[row.state] += 1
        self.metrics.model_states(entry.name, counts, failed=bool(entry.problem))


def _retiring(retired: list[ServedModel], new: Mapping[str, _Loaded]) -> list[str]:
    """Versions that stop serving (a version reloaded in place keeps serving)."""
    return [model.version for model in retired if model.version not in new]

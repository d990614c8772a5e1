"""Which model versions serve, and their states.

At start-up each model folder of the repository is loaded at its latest version. A model
that fails to load is reported UNAVAILABLE with its reason and does not stop the others.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

from fastserve.config import load_model_config
from fastserve.errors import FastServeError, ModelNotFound, ModelNotReady
from fastserve.model import ModelState, ServedModel
from fastserve.repository import scan

log = logging.getLogger("fastserve.registry")


@dataclass
class ModelStatus:
    name: str
    version: str | None
    state: ModelState
    reason: str = ""


class Registry:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._models: dict[str, ServedModel] = {}
        self._status: dict[str, ModelStatus] = {}

    async def load_all(self) -> None:
        """Load the latest version of every model folder (sessions built off the event loop)."""
        loop = asyncio.get_running_loop()
        sources, skipped = scan(self.root)
        for name, reason in skipped.items():
            log.warning("repository: skipping folder %r: %s", name, reason)
        for source in sources:
            self._status[source.name] = ModelStatus(source.name, None, ModelState.LOADING)
        for source in sources:
            versions = source.versions()
            if not versions:
                self._fail(source.name, None, "no version folder with a model.onnx")
                continue
            version = versions[-1]
            try:
                config = load_model_config(source.config_path)
                model = await asyncio.to_thread(
                    ServedModel.load, source.name, version, source.model_file(version), config
                )
            except FastServeError as exc:
                self._fail(source.name, version, str(exc))
                continue
            model.start(loop)
            self._models[source.name] = model
            self._status[source.name] = ModelStatus(source.name, version, ModelState.READY)

    def _fail(self, name: str, version: str | None, reason: str) -> None:
        log.error("model %s: %s", name, reason)
        self._status[name] = ModelStatus(name, version, ModelState.UNAVAILABLE, reason)

    async def stop_all(self) -> None:
        models = list(self._models.values())
        await asyncio.gather(*(model.stop() for model in models))

    def get(self, name: str, version: str | None = None) -> ServedModel:
        """The model answering ``name`` (and ``version`` when given); 404 or 503 otherwise."""
        model = self._models.get(name)
        if model is None:
            status = self._status.get(name)
            if status is None:
                raise ModelNotFound(name, version)
            raise ModelNotReady(name, version, why=status.state.value.lower())
        if version is not None and version != model.version:
            raise ModelNotFound(name, version)
        return model

    def versions(self, name: str) -> list[str]:
        model = self._models.get(name)
        return [] if model is None else [model.version]

    def models(self) -> list[ServedModel]:
        return list(self._models.values())

    def statuses(self) -> list[ModelStatus]:
        return list(self._status.values())

    @property
    def all_ready(self) -> bool:
        return bool(self._status) and all(
            s.state is ModelState.READY for s in self._status.values()
        )

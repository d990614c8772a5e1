"""A served model version: its config, backend sessions, signature and batcher."""

from __future__ import annotations

import asyncio
import enum
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastserve.backends.onnxruntime import CPU, OnnxRuntimeSession
from fastserve.batching import Execution, ModelBatcher
from fastserve.config import ModelConfig
from fastserve.errors import ModelLoadError
from fastserve.monitoring.drift import DriftMonitor, load_drift_monitor
from fastserve.preprocessing import ImagePreprocessor, PipelineMismatch
from fastserve.profiling import REFERENCE_FILE
from fastserve.protocol import ModelSignature
from fastserve.schema import SCHEMA_FILE, InputSchema, load_input_schema
from fastserve.stats import RequestStats, model_statistics

log = logging.getLogger("fastserve.model")

PLATFORM = "onnxruntime_onnx"


class ModelState(str, enum.Enum):
    """A model version's state as the repository index reports it (kept by the registry)."""

    READY = "READY"
    LOADING = "LOADING"
    UNLOADING = "UNLOADING"
    UNAVAILABLE = "UNAVAILABLE"


def _short(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def resolve_execution(config: ModelConfig, provider: str) -> Execution:
    """``auto``: the event loop for one CPU instance; threads for a GPU or several instances."""
    if config.execution != "auto":
        return config.execution
    if config.instance_count == 1 and provider == CPU:
        return "event_loop"
    return "threads"


@dataclass(eq=False)  # a loaded version is itself, not equal to a copy of its fields
class ServedModel:
    name: str
    version: str
    config: ModelConfig
    signature: ModelSignature
    sessions: list[OnnxRuntimeSession]
    batcher: ModelBatcher
    schema: InputSchema | None = None
    """The version's value schema (its ``schema.yaml``), compiled."""
    drift: DriftMonitor | None = None
    """Live inputs against the version's ``reference.json``."""
    preprocess: ImagePreprocessor | None = None
    """The config's image pipeline, checked against the model's input."""
    request_stats: RequestStats = field(default_factory=RequestStats)
    inflight: int = 0
    """Requests holding this version between choosing it and answering (event loop only)."""

    @property
    def label(self) -> str:
        return f"{self.name}:{self.version}"

    @property
    def provider(self) -> str:
        return self.sessions[0].provider

    @classmethod
    def load(cls, name: str, version: str, model_file: Path, config: ModelConfig) -> ServedModel:
        """Create the sessions (one per instance), check and warm them up. Blocking."""
        sessions = [
            OnnxRuntimeSession.load(model_file, config.onnxruntime, name=name, version=version)
            for _ in range(config.instance_count)
        ]
        signature = sessions[0].signature
        schema = None
        schema_file = model_file.parent / SCHEMA_FILE
        if schema_file.exists():
            try:
                schema = load_input_schema(schema_file, signature)
            except Exception as exc:  # pandera's own errors too: a bad file refuses the load
                problem = _short(f"{exc.__class__.__name__}: {exc}")
                raise ModelLoadError(name, version, f"{SCHEMA_FILE}: {problem}") from None
        if config.warmup:
            for session in sessions:
                try:
                    session.warmup(config.batching.max_batch_size)
                except Exception as exc:
                    raise ModelLoadError(name, version, f"warm-up failed: {exc}") from None
        preprocess = None
        if config.preprocessing.image is not None:
            try:
                preprocess = ImagePreprocessor.for_model(config.preprocessing.image, signature)
            except PipelineMismatch as exc:
                raise ModelLoadError(name, version, f"preprocessing.image: {exc}") from None
        drift = None
        reference_file = model_file.parent / REFERENCE_FILE
        if config.drift.enabled and reference_file.exists():
            try:
                drift = load_drift_monitor(reference_file, signature, schema, config)
            except Exception as exc:  # a bad file refuses the load, as a bad schema does
                problem = _short(f"{exc.__class__.__name__}: {exc}")
                raise ModelLoadError(name, version, f"{REFERENCE_FILE}: {problem}") from None
        execution = resolve_execution(config, sessions[0].provider)
        batcher = ModelBatcher(
            f"{name}:{version}", config.batching, [s.run for s in sessions], execution
        )
        log.info(
            "model %s:%s loaded: %d instance(s), max batch %d, batches run on %s",
            name,
            version,
            len(sessions),
            config.batching.max_batch_size,
            "the event loop" if execution == "event_loop" else "worker threads",
        )
        return cls(name, version, config, signature, sessions, batcher, schema, drift, preprocess)

    def start(self, loop: asyncio.AbstractEventLoop, *, monitoring: bool = True) -> None:
        """Start the batcher; with ``monitoring``, each batch feeds the drift sketches."""
        if monitoring and self.drift is not None:
            self.batcher.observer = self.drift.observe_batch
        self.batcher.start(loop)

    async def stop(self) -> None:
        """Drain the batcher, then free the sessions."""
        await self.batcher.stop()
        for session in self.sessions:
            session.close()

    def statistics(self) -> dict[str, Any]:
        return model_statistics(
            self.name,
            self.version,
            self.request_stats,
            self.batcher.batch_sizes,
            self.batcher.core_stats(),
            self.batcher.queue_depth,
        )

    def metadata(self, versions: list[str]) -> dict[str, Any]:
        return {
            "name": self.name,
            "versions": versions,
            "platform": PLATFORM,
            "inputs": [spec.as_metadata() for spec in self.signature.inputs],
            "outputs": [spec.as_metadata() for spec in self.signature.outputs],
        }

"""A served model version: its config, backend sessions, signature and batcher."""

from __future__ import annotations

import asyncio
import enum
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastserve import _core
from fastserve.backends.onnxruntime import CPU, OnnxRuntimeSession
from fastserve.batching import Execution, ModelBatcher
from fastserve.config import ModelConfig
from fastserve.errors import ModelLoadError
from fastserve.monitoring.drift import DriftMonitor, load_drift_monitor
from fastserve.preprocessing import (
    ImagePreprocessor,
    PipelineMismatch,
    SequencePreprocessor,
    TabularPreprocessor,
)
from fastserve.profiling import REFERENCE_FILE, ReferenceProfile
from fastserve.protocol import ModelSignature
from fastserve.schema import SCHEMA_FILE, InputSchema, load_input_schema, load_pipeline_schema
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


def _schema(
    name: str, version: str, path: Path, signature: ModelSignature, config: ModelConfig
) -> InputSchema | None:
    """The version's compiled ``schema.yaml``: of the input its columns are, or, behind a
    tabular pipeline, of the raw features the pipeline takes."""
    if not path.exists():
        return None
    pipeline = config.preprocessing.tabular
    try:
        if pipeline is None:
            return load_input_schema(path, signature)
        index = next((i for i, s in enumerate(signature.inputs) if s.name == pipeline.input), -1)
        return load_pipeline_schema(path, index, pipeline.input)
    except Exception as exc:  # pandera's own errors too: a bad file refuses the load
        problem = _short(f"{exc.__class__.__name__}: {exc}")
        raise ModelLoadError(name, version, f"{SCHEMA_FILE}: {problem}") from None


def _transforms(
    preprocess: ImagePreprocessor | None, accepts: ModelSignature
) -> dict[int, Any] | None:
    """By request input index, the batcher transforms of the version's image pipeline."""
    if preprocess is None:
        return None
    index = next(i for i, s in enumerate(accepts.inputs) if s.name == preprocess.input)
    return {index: preprocess.transform()}


def _json_plan(accepts: ModelSignature, max_batch_size: int) -> _core.JsonRequestPlan | None:
    """The native reading of the version's plain JSON requests (``_core.JsonRequestPlan``),
    when its inputs are all FP32 or FP64 and no pipeline stands between a request and them."""
    if not all(spec.datatype in ("FP32", "FP64") for spec in accepts.inputs):
        return None
    inputs = [(spec.name, spec.datatype, list(spec.shape)) for spec in accepts.inputs]
    try:
        return _core.JsonRequestPlan(inputs, max_batch_size)
    except ValueError:  # (a name past the decoder's bounds: the decoder refuses it)
        return None


def _reference(name: str, version: str, path: Path) -> ReferenceProfile | None:
    """The version's ``reference.json``, when it has one; a bad file refuses the load."""
    if not path.exists():
        return None
    try:
        return ReferenceProfile.model_validate_json(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        problem = _short(f"{exc.__class__.__name__}: {exc}")
        raise ModelLoadError(name, version, f"{REFERENCE_FILE}: {problem}") from None


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
    tabular: TabularPreprocessor | None = None
    """The config's tabular pipeline; with one, ``schema`` checks its raw numeric features."""
    sequence: SequencePreprocessor | None = None
    """The config's sequence pipeline: the batcher pads its inputs and writes the mask."""
    json_plan: _core.JsonRequestPlan | None = None
    """Reads a plain JSON request straight into the batcher's arrays (``prepare_planned``);
    None when a pipeline takes the requests, or an input is not FP32 or FP64."""

    @property
    def raw_input(self) -> tuple[str, str] | None:
        """(input, datatype) a request may send raw for the batcher to transform."""
        return (self.preprocess.input, "UINT8") if self.preprocess is not None else None

    @property
    def accepts(self) -> ModelSignature:
        """What a request may send: the model's inputs, or a sequence pipeline's view of
        them (no mask, free lengths)."""
        return self.sequence.accepts if self.sequence is not None else self.signature

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
        folder = model_file.parent
        pipelines = config.preprocessing
        sequence = None
        if pipelines.sequence is not None:
            try:
                sequence = SequencePreprocessor.for_model(pipelines.sequence, signature)
            except PipelineMismatch as exc:
                raise ModelLoadError(name, version, f"preprocessing.sequence: {exc}") from None
        accepts = sequence.accepts if sequence is not None else signature
        schema = _schema(name, version, folder / SCHEMA_FILE, accepts, config)
        if config.warmup:
            for session in sessions:
                try:
                    session.warmup(config.batching.max_batch_size)
                except Exception as exc:
                    raise ModelLoadError(name, version, f"warm-up failed: {exc}") from None
        reference_file = folder / REFERENCE_FILE
        preprocess = tabular = None
        try:
            if pipelines.image is not None:
                preprocess = ImagePreprocessor.for_model(pipelines.image, signature)
        except PipelineMismatch as exc:
            raise ModelLoadError(name, version, f"preprocessing.image: {exc}") from None
        if pipelines.tabular is not None:
            reference = _reference(name, version, reference_file)
            try:
                tabular = TabularPreprocessor.for_model(
                    pipelines.tabular,
                    accepts,
                    reference,
                    schema.compiled.feature_names if schema is not None else None,
                )
            except PipelineMismatch as exc:
                raise ModelLoadError(name, version, f"preprocessing.tabular: {exc}") from None
        drift = None
        if tabular is not None:
            # the reference describes the raw features, the batches the model's columns
            log.info("model %s:%s: input drift is not measured behind a tabular pipeline",
                     name, version)  # fmt: skip
        elif config.drift.enabled and reference_file.exists():
            try:
                drift = load_drift_monitor(reference_file, accepts, schema, config)
            except Exception as exc:  # a bad file refuses the load, as a bad schema does
                problem = _short(f"{exc.__class__.__name__}: {exc}")
                raise ModelLoadError(name, version, f"{REFERENCE_FILE}: {problem}") from None
        execution = resolve_execution(config, sessions[0].provider)
        batcher = ModelBatcher(
            f"{name}:{version}",
            config.batching,
            [s.run for s in sessions],
            execution,
            ragged=sequence.ragged if sequence is not None else None,
            transforms=_transforms(preprocess, accepts),
            input_order=sequence.order if sequence is not None else None,
        )
        log.info(
            "model %s:%s loaded: %d instance(s), max batch %d, batches run on %s",
            name,
            version,
            len(sessions),
            config.batching.max_batch_size,
            "the event loop" if execution == "event_loop" else "worker threads",
        )
        plain = preprocess is None and tabular is None and sequence is None
        json_plan = _json_plan(accepts, config.batching.max_batch_size) if plain else None
        return cls(name, version, config, signature, sessions, batcher, schema, drift,
                   preprocess, tabular, sequence, json_plan)  # fmt: skip

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
            "inputs": [spec.as_metadata() for spec in self.accepts.inputs],
            "outputs": [spec.as_metadata() for spec in self.signature.outputs],
        }

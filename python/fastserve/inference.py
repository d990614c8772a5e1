"""From a decoded request to the arrays the batcher takes: one path for every caller.

The HTTP handler and ``fastserve batch`` both call ``prepare``, so online and offline
predictions go through the same pipelines, feature packing, shape and type validation and
value schema: what one accepts, the other accepts, and they cannot drift apart.

The one shortcut: a plain request (JSON, Triton's binary extension or msgpack) that the
version's ``JsonRequestPlan`` reads (every input FP32 or FP64, no pipeline; see
``ServedModel.json_plan``) is decoded and checked against the signature natively, and
``prepare_planned`` does the rest. The plan takes only what the decoder and
``validate_inputs`` would accept, reading it the same (``tests/test_json_plan.py`` holds it
to that); anything else goes the whole way, which explains what is wrong with it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy.typing as npt

from fastserve.errors import InvalidRequest, SchemaViolation
from fastserve.model import ServedModel
from fastserve.monitoring.metrics import Metrics
from fastserve.protocol import InferenceRequest
from fastserve.validation import pack_features, validate_inputs, validate_outputs

__all__ = ["Prepared", "check_values", "prepare", "prepare_planned", "request_options"]

log = logging.getLogger("fastserve.inference")


@dataclass(slots=True)
class Prepared:
    """A request ready for the batcher."""

    request: InferenceRequest
    """The request after the pipelines (what its outputs and id are read from)."""
    arrays: list[npt.NDArray[Any]]
    """The model's inputs, C-contiguous, in signature order."""
    priority: int
    timeout_us: int
    preprocessed: int
    """``perf_counter_ns`` when the pipelines were done (validation starts)."""
    preprocess_ns: int | None
    """Time in the pipelines; None when none ran."""


async def prepare(
    model: ServedModel, inference: InferenceRequest, metrics: Metrics, decoded: int
) -> Prepared:
    """Run ``inference`` (decoded at ``perf_counter_ns`` ``decoded``) through ``model``'s
    pipelines and every check. Raises ``InvalidRequest`` (or ``SchemaViolation``) for a
    request the model does not take."""
    preprocessed = decoded
    preprocess_ns = None  # the stage is observed when a pipeline ran
    if model.preprocess is not None:
        raw = inference
        inference = await model.preprocess.apply(raw)
        if inference is not raw:
            preprocessed = time.perf_counter_ns()
            preprocess_ns = preprocessed - decoded
    features = None  # what the value schema checks, when not the model's input itself
    if model.tabular is not None:
        raw = inference
        inference, features = model.tabular.apply(raw)
        if inference is not raw:
            preprocessed = time.perf_counter_ns()
            preprocess_ns = preprocessed - decoded  # both pipelines, when both ran
    elif model.schema is not None:
        inference = pack_features(inference, model.schema, model.accepts)
    arrays = validate_inputs(
        inference,
        model.accepts,
        max_batch_size=model.config.batching.max_batch_size,
        raw=model.raw_input,
    )
    validate_outputs(inference, model.signature)
    schema = model.schema
    if schema is not None and model.config.validation != "off":
        values = arrays[schema.input_index] if features is None else features
        check_values(model, values, metrics)
    priority, timeout_us = request_options(inference, model)
    return Prepared(inference, arrays, priority, timeout_us, preprocessed, preprocess_ns)


def prepare_planned(
    model: ServedModel,
    arrays: list[npt.NDArray[Any]],
    request_id: str | None,
    binary_output: bool,
    metrics: Metrics,
    decoded: int,
) -> Prepared:
    """``prepare`` for a request that ``model.json_plan`` decoded into ``arrays`` (already
    checked against the signature; no parameters but ``binary_data_output``, every output):
    the value schema is left. Its ``Prepared.request`` carries the id and that parameter."""
    schema = model.schema
    if schema is not None and model.config.validation != "off":
        check_values(model, arrays[schema.input_index], metrics)
    priority = model.config.batching.priority_index(0)
    parameters = {"binary_data_output": True} if binary_output else {}
    request = InferenceRequest([], request_id, parameters=parameters)
    return Prepared(request, arrays, priority, -1, decoded, None)


def request_options(request: InferenceRequest, model: ServedModel) -> tuple[int, int]:
    """The core priority level and queue timeout (µs, -1: default) of a request."""
    params = request.parameters
    batching = model.config.batching
    priority = params.get("priority", 0)
    if type(priority) is not int or not 0 <= priority <= batching.priority_levels:
        raise InvalidRequest(
            f"parameter 'priority' must be an integer in 0..{batching.priority_levels}"
        )
    timeout = params.get("timeout", -1)
    if timeout != -1 and (type(timeout) is not int or not 0 < timeout <= 3_600_000_000):
        raise InvalidRequest("parameter 'timeout' must be a positive integer (microseconds)")
    return batching.priority_index(priority), timeout


def check_values(model: ServedModel, values: Any, metrics: Metrics) -> None:
    """The version's value schema on ``values`` (the features, [rows, columns]): reject
    (400) or warn (count and log) on a failure."""
    schema = model.schema
    assert schema is not None
    failures = schema.compiled.check(values)
    model.request_stats.validated[bool(failures)] += 1  # exported by ServingCollector
    if not failures:
        return
    for failure in failures:
        metrics.validation_failed(model.name, model.version, failure.feature, failure.check)
    docs = [f.as_doc() for f in failures]
    if model.config.validation == "reject":
        raise SchemaViolation(model.label, docs)
    log.warning("model %s: input values fail its schema (served): %s", model.label, docs[:3])

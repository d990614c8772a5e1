"""The onnxruntime backend: one ``InferenceSession`` per model instance.

Loading is defensive because model files come from an operator's folder that may be
half-written, corrupt or hostile: the ONNX graph is parsed and checked here (external
data confined to the model folder, tensor types the batcher can carry, a dynamic batch
dimension) before onnxruntime sees it, and every failure becomes a short
``ModelLoadError`` that never names an absolute filesystem path.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort

from fastserve.config import OnnxRuntimeConfig
from fastserve.errors import InferenceFailed, ModelLoadError
from fastserve.protocol import DATATYPE_TO_NUMPY, ModelSignature, TensorSpec

__all__ = ["BatchRunError", "OnnxRuntimeSession", "cuda_device_available"]

logger = logging.getLogger("fastserve.backends.onnxruntime")

CPU: Final = "CPUExecutionProvider"
CUDA: Final = "CUDAExecutionProvider"

# ONNX TensorProto element type name -> V2 datatype. Everything else (bfloat16, float8,
# complex, int4 ...) has no numpy dtype the batcher can carry.
_ONNX_TO_DATATYPE: Final[dict[str, str]] = {
    "FLOAT": "FP32",
    "DOUBLE": "FP64",
    "FLOAT16": "FP16",
    "INT8": "INT8",
    "INT16": "INT16",
    "INT32": "INT32",
    "INT64": "INT64",
    "UINT8": "UINT8",
    "UINT16": "UINT16",
    "UINT32": "UINT32",
    "UINT64": "UINT64",
    "BOOL": "BOOL",
    "STRING": "BYTES",
}

_OPTIMIZATION_LEVELS: Final[dict[str, ort.GraphOptimizationLevel]] = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}

# onnxruntime's severity levels: 0 verbose, 1 info, 2 warning, 3 error, 4 fatal.
_ORT_LOG_ERRORS_ONLY: Final = 3

_MAX_PROBLEM_CHARS: Final = 400
# onnxruntime's messages carry its error code prefix, the model path and C++ source
# locations with function signatures: none of it helps an operator.
_ORT_NOISE: Final = (
    re.compile(r"\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*"),
    re.compile(r"Load model from .*? failed:\s*"),
    re.compile(r"\S+\.(?:cc|cpp|cu|h):\d+\s+(?:[\w:~<>]+\([^)]*\)\s*)?"),
)
_ABSOLUTE_PATH = re.compile(r"(?<![\w.~-])(?:/[^\s'\"/:,;()\[\]]+){2,}/?|\b[A-Za-z]:\\[^\s'\",;]+")


_Fail = Callable[[str], ModelLoadError]
"""Builds the ModelLoadError of the model being loaded from a problem description."""


class BatchRunError(InferenceFailed, RuntimeError):
    """onnxruntime failed on a batch, or returned outputs that do not match its rows."""


def cuda_device_available() -> bool:
    """True when fastserve's native core was built with CUDA and sees a device.

    The native module is optional at import time (a source checkout may not have built
    it yet): without it there is no CUDA as far as fastserve is concerned.
    """
    try:
        core = importlib.import_module("fastserve._core")
    except ImportError:
        return False
    try:
        return bool(core.cuda_available())
    except Exception:  # a broken native build must not take model loading down with it
        logger.exception("fastserve._core.cuda_available() failed; assuming no CUDA")
        return False


class OnnxRuntimeSession:
    """An onnxruntime session serving one instance of one model version.

    Create it with :meth:`load`. ``run`` is safe to call from a worker thread:
    onnxruntime releases the GIL for the whole computation.
    """

    def __init__(
        self,
        session: ort.InferenceSession,
        signature: ModelSignature,
        *,
        name: str,
        version: str,
        provider: str,
    ) -> None:
        self._session: ort.InferenceSession | None = session
        self._signature = signature
        self._input_names = [spec.name for spec in signature.inputs]
        self.name = name
        self.version = version
        self.provider = provider
        """The onnxruntime execution provider serving the model (``CPUExecutionProvider``...)."""

    # -- loading -------------------------------------------------------------------------

    @classmethod
    def load(
        cls, model_path: Path, config: OnnxRuntimeConfig, *, name: str, version: str
    ) -> OnnxRuntimeSession:
        """Check and load ``model_path``; raise ModelLoadError with a path-free message."""

        def fail(problem: str) -> ModelLoadError:
            return ModelLoadError(name, version, _scrub(problem, model_path))

        model_path = Path(model_path)
        model = _read_model(model_path, fail)
        _check_external_data(model, model_path.parent, fail)
        inputs, outputs = _graph_signature(model, fail)
        del model  # the graph can be large; onnxruntime reads the file itself

        providers = _choose_providers(config.execution_provider, fail)
        try:
            session = ort.InferenceSession(
                os.fspath(model_path),
                sess_options=_session_options(config),
                providers=providers,
                # onnxruntime's fallback prints to stdout and silently retries elsewhere;
                # the provider choice is ours, and a failure must be an error.
                enable_fallback=0,
            )
        except Exception as exc:
            raise fail(f"onnxruntime could not load the model: {_ort_message(exc)}") from None

        signature = _match_session(session, inputs, outputs, fail)
        active = list(session.get_providers())
        provider = active[0] if active else CPU
        if config.execution_provider in ("cuda", "auto") and CUDA in providers and provider != CUDA:
            if config.execution_provider == "cuda":
                raise fail(f"CUDA was requested but onnxruntime runs the model on {provider}")
            logger.warning(
                "model %s:%s: CUDA looked available but onnxruntime chose %s",
                name,
                version,
                provider,
            )
        logger.info(
            "model %s:%s is served by onnxruntime %s (%s)", name, version, ort.__version__, provider
        )
        return cls(session, signature, name=name, version=version, provider=provider)

    # -- serving -------------------------------------------------------------------------

    @property
    def signature(self) -> ModelSignature:
        """Inputs and outputs with V2 datatypes; -1 marks dynamic dims (the first always)."""
        return self._signature

    def run(self, inputs: Sequence[npt.NDArray[Any]]) -> list[npt.NDArray[Any]]:
        """Run one batch. ``inputs`` and the result follow the signature's order.

        Every output has the batch's rows as its first dimension.
        """
        session = self._session
        if session is None:
            raise BatchRunError(f"model {self.name}:{self.version} is closed")
        if len(inputs) != len(self._input_names):
            raise BatchRunError(
                f"model {self.name}:{self.version} takes {len(self._input_names)} inputs, "
                f"got {len(inputs)}"
            )
        rows = {int(arr.shape[0]) if arr.ndim else -1 for arr in inputs}
        if len(rows) != 1 or -1 in rows:
            raise BatchRunError(
                f"model {self.name}:{self.version}: inputs of one batch must share their "
                f"first dimension, got shapes {[tuple(a.shape) for a in inputs]}"
            )
        (n_rows,) = rows
        feed = dict(zip(self._input_names, inputs, strict=True))
        try:
            results = session.run(None, feed)
        except Exception as exc:
            raise BatchRunError(
                f"onnxruntime failed on a batch of {n_rows} rows for model "
                f"{self.name}:{self.version}: {_scrub(_ort_message(exc))}"
            ) from exc

        outputs: list[npt.NDArray[Any]] = []
        for spec, value in zip(self._signature.outputs, results, strict=True):
            if not isinstance(value, np.ndarray):
                raise BatchRunError(
                    f"model {self.name}:{self.version}: output '{spec.name}' is a "
                    f"{type(value).__name__}, not a tensor"
                )
            if value.ndim == 0 or value.shape[0] != n_rows:
                raise BatchRunError(
                    f"model {self.name}:{self.version}: output '{spec.name}' has shape "
                    f"{tuple(value.shape)} for a batch of {n_rows} rows; every output must "
                    "have one row per input row"
                )
            outputs.append(value)
        return outputs

    def warmup(self, max_batch_size: int) -> None:
        """Run generated inputs at 1 row and at ``max_batch_size`` rows.

        The first runs pay for memory arenas, kernel selection and (on CUDA) autotuning;
        doing them here keeps that cost out of the first requests.
        """
        rng = np.random.default_rng(0)
        for rows in sorted({1, max(1, max_batch_size)}):
            batch = [_example_input(spec, rows, rng) for spec in self._signature.inputs]
            try:
                self.run(batch)
            except BatchRunError as exc:
                raise ModelLoadError(
                    self.name, self.version, f"warmup at {rows} rows failed: {exc}"
                ) from None

    def close(self) -> None:
        """Drop the session so onnxruntime frees its memory; ``run`` fails afterwards."""
        self._session = None

    def __repr__(self) -> str:
        return f"OnnxRuntimeSession({self.name}:{self.version}, provider={self.provider})"


# -- load-time checks ------------------------------------------------------------------------


def _read_model(model_path: Path, fail: _Fail) -> onnx.ModelProto:
    if not model_path.exists():
        raise fail(f"model file '{model_path.name}' does not exist")
    if not model_path.is_file():
        raise fail(f"'{model_path.name}' is not a regular file")
    try:
        size = model_path.stat().st_size
    except OSError as exc:
        raise fail(f"cannot read '{model_path.name}': {exc.strerror}") from None
    if size == 0:
        raise fail(f"model file '{model_path.name}' is empty")
    try:
        model = onnx.load(os.fspath(model_path), load_external_data=False)
    except OSError as exc:
        raise fail(f"cannot read '{model_path.name}': {exc.strerror}") from None
    except Exception:
        raise fail(
            f"'{model_path.name}' is not a valid ONNX model (truncated or corrupt protobuf)"
        ) from None
    if not model.HasField("graph") or not model.graph.output:
        raise fail(f"'{model_path.name}' is not a valid ONNX model (no graph or no outputs)")
    return model


def _graph_tensors(graph: onnx.GraphProto, where: str) -> Iterator[tuple[str, onnx.TensorProto]]:
    """Every tensor stored in ``graph`` and its subgraphs, with a human name for each."""
    for tensor in graph.initializer:
        yield f"initializer '{tensor.name}'", tensor
    for sparse in graph.sparse_initializer:
        yield f"sparse initializer '{sparse.values.name}'", sparse.values
        yield f"sparse initializer '{sparse.values.name}' (indices)", sparse.indices
    for node in graph.node:
        label = f"{where}node '{node.name or node.op_type}'"
        for attr in node.attribute:
            if attr.HasField("t"):
                yield f"{label} attribute '{attr.name}'", attr.t
            for tensor in attr.tensors:
                yield f"{label} attribute '{attr.name}'", tensor
            if attr.HasField("sparse_tensor"):
                yield f"{label} attribute '{attr.name}'", attr.sparse_tensor.values
                yield f"{label} attribute '{attr.name}'", attr.sparse_tensor.indices
            if attr.HasField("g"):
                yield from _graph_tensors(attr.g, f"{label} subgraph: ")
            for sub in attr.graphs:
                yield from _graph_tensors(sub, f"{label} subgraph: ")


def _check_external_data(model: onnx.ModelProto, model_dir: Path, fail: _Fail) -> None:
    """Refuse external data that is not a regular file inside the model's folder.

    A crafted model could otherwise make onnxruntime read any file the server can read
    (``/etc/...``, ``../other_model``, a symlink planted in the folder).
    """
    tensors = list(_graph_tensors(model.graph, ""))
    for function in model.functions:
        for node in function.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    tensors.append((f"function '{function.name}' constant", attr.t))
    base: Path | None = None
    for what, tensor in tensors:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        entries = {entry.key: entry.value for entry in tensor.external_data}
        location = entries.get("location", "")
        if not location:
            raise fail(f"{what} uses external data but names no file")
        if _is_absolute(location):
            raise fail(
                f"{what} refers to external data by an absolute path; external data must be "
                "a file inside the model folder"
            )
        if ".." in PurePosixPath(location.replace("\\", "/")).parts:
            raise fail(
                f"{what} refers to external data outside the model folder ('..' in its "
                "location); external data must be a file inside the model folder"
            )
        if base is None:
            base = model_dir.resolve()
        target = (model_dir / location).resolve()
        if not target.is_relative_to(base):
            raise fail(
                f"{what} refers to external data outside the model folder (through a "
                "symlink); external data must be a file inside the model folder"
            )
        if not target.is_file():
            raise fail(f"{what} refers to an external data file that does not exist")


def _is_absolute(location: str) -> bool:
    return (
        location.startswith(("/", "\\"))
        or PurePosixPath(location).is_absolute()
        or PureWindowsPath(location).is_absolute()
        or bool(PureWindowsPath(location).drive)
    )


def _tensor_spec(
    value: onnx.ValueInfoProto, kind: str, fail: _Fail
) -> tuple[TensorSpec, bool | None]:
    """The V2 spec of a graph input/output, and whether its first dim is dynamic.

    The flag is None when the rank is unknown.
    """
    type_kind = value.type.WhichOneof("value")
    if type_kind != "tensor_type":
        what = (type_kind or "untyped").replace("_type", "")
        raise fail(
            f"{kind} '{value.name}' is a {what}, not a tensor; only tensor {kind}s are "
            "supported (for scikit-learn classifiers convert with zipmap disabled)"
        )
    tensor_type = value.type.tensor_type
    onnx_name = onnx.TensorProto.DataType.Name(tensor_type.elem_type)
    datatype = _ONNX_TO_DATATYPE.get(onnx_name)
    if datatype is None:
        raise fail(f"{kind} '{value.name}' has element type {onnx_name}, which is not supported")
    if datatype == "BYTES":
        raise fail(
            f"{kind} '{value.name}' is a string tensor: BYTES/string {kind}s are not supported"
        )
    if not tensor_type.HasField("shape"):
        return TensorSpec(value.name, datatype, (-1,)), None
    dims: list[int] = []
    for dim in tensor_type.shape.dim:
        which = dim.WhichOneof("value")
        dims.append(dim.dim_value if which == "dim_value" and dim.dim_value >= 0 else -1)
    first_dynamic = bool(dims) and dims[0] == -1
    if dims:
        dims[0] = -1
    return TensorSpec(value.name, datatype, tuple(dims)), first_dynamic


def _graph_signature(
    model: onnx.ModelProto, fail: _Fail
) -> tuple[dict[str, TensorSpec], dict[str, TensorSpec]]:
    # Before IR 4 every initializer was also listed as an input; those are not fed.
    initializers = {tensor.name for tensor in model.graph.initializer}
    inputs: dict[str, TensorSpec] = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        spec, first_dynamic = _tensor_spec(value, "input", fail)
        if first_dynamic is None:
            raise fail(
                f"input '{value.name}' declares no shape; batching needs a dynamic first "
                "(batch) dimension"
            )
        if not spec.shape:
            raise fail(
                f"input '{value.name}' is a scalar; batching needs a dynamic first (batch) "
                "dimension"
            )
        if not first_dynamic:
            fixed = value.type.tensor_type.shape.dim[0].dim_value
            raise fail(
                f"input '{value.name}' has a fixed first dimension of {fixed}; batching "
                "needs a dynamic first (batch) dimension (re-export the model with a "
                "symbolic batch axis)"
            )
        inputs[value.name] = spec
    if not inputs:
        raise fail("the model has no inputs")
    outputs: dict[str, TensorSpec] = {}
    for value in model.graph.output:
        spec, _ = _tensor_spec(value, "output", fail)
        if not spec.shape:
            raise fail(f"output '{value.name}' is a scalar; every output needs a batch dimension")
        outputs[value.name] = spec
    return inputs, outputs


def _match_session(
    session: ort.InferenceSession,
    inputs: dict[str, TensorSpec],
    outputs: dict[str, TensorSpec],
    fail: _Fail,
) -> ModelSignature:
    """The signature in the order onnxruntime feeds and returns tensors."""
    try:
        ordered_in = tuple(inputs[node.name] for node in session.get_inputs())
        ordered_out = tuple(outputs[node.name] for node in session.get_outputs())
    except KeyError as exc:
        raise fail(f"onnxruntime reports a tensor {exc} that the graph does not declare") from None
    if len(ordered_in) != len(inputs):
        missing = sorted(set(inputs) - {spec.name for spec in ordered_in})
        raise fail(f"onnxruntime does not list the graph inputs {missing}")
    return ModelSignature(inputs=ordered_in, outputs=ordered_out)


def _choose_providers(requested: str, fail: _Fail) -> list[str]:
    if requested == "cpu":
        return [CPU]
    ort_has_cuda = CUDA in ort.get_available_providers()
    device = cuda_device_available() if ort_has_cuda else False
    if ort_has_cuda and device:
        return [CUDA, CPU]
    if requested == "cuda":
        if not ort_has_cuda:
            why = "this onnxruntime build has no CUDAExecutionProvider"
        else:
            why = "no CUDA device is available (fastserve's native core sees none)"
        raise fail(f"execution_provider 'cuda' was requested but {why}")
    return [CPU]


def _session_options(config: OnnxRuntimeConfig) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = config.intra_op_threads
    options.inter_op_num_threads = config.inter_op_threads
    options.graph_optimization_level = _OPTIMIZATION_LEVELS[config.graph_optimization]
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # fastserve logs what matters itself; onnxruntime's warnings (provider assignment,
    # unused initializers) would otherwise go straight to stderr.
    options.log_severity_level = _ORT_LOG_ERRORS_ONLY
    return options


def _ort_message(exc: BaseException) -> str:
    text = str(exc)
    for pattern in _ORT_NOISE:
        text = pattern.sub("", text)
    return " ".join(text.split())


def _scrub(text: str, model_path: Path | None = None) -> str:
    """``text`` without filesystem paths, shortened: error messages reach clients and logs."""
    if model_path is not None:
        for path in {model_path, model_path.absolute()}:
            text = text.replace(os.fspath(path), model_path.name)
            text = text.replace(os.fspath(path.parent), "<model folder>")
    text = _ABSOLUTE_PATH.sub("<path>", text).strip()
    if len(text) > _MAX_PROBLEM_CHARS:
        text = text[: _MAX_PROBLEM_CHARS - 3] + "..."
    return text


def _example_input(spec: TensorSpec, rows: int, rng: np.random.Generator) -> npt.NDArray[Any]:
    """Deterministic values of a plausible range for the datatype; dynamic dims are 1."""
    shape = (rows, *(dim if dim > 0 else 1 for dim in spec.shape[1:]))
    dtype = DATATYPE_TO_NUMPY[spec.datatype]
    if dtype == np.bool_:
        return rng.random(shape) < 0.5
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    # Small non-negative integers stay valid as indices, ids and category codes.
    return rng.integers(0, 2, size=shape).astype(dtype)

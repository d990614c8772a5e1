"""Where a batch job's requests go: a model loaded in this process, or a running server.

Both take a V2 request's inputs and return the model's outputs, and both refuse a request
the model does not take with ``Refused`` (what an online client gets as a 400), which the
job answers by narrowing down to the rows at fault. Anything else (the model failing, the
server gone) is ``JobError``: the job stops and keeps what it has committed.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, Protocol

import msgpack
import numpy as np
import numpy.typing as npt
import orjson

from fastserve.errors import FastServeError, InvalidRequest, SchemaViolation
from fastserve.http.codecs import (
    HEADER_LENGTH,
    MSGPACK_CONTENT_TYPE,
    OCTET_STREAM,
    tensor_bytes,
    tensor_from_bytes,
)
from fastserve.offline.columns import Kind, feature_kinds
from fastserve.protocol import InferenceRequest, InputTensor, TensorSpec

__all__ = ["JobError", "LocalModel", "Predictor", "Refused", "RemoteModel", "Wire"]

log = logging.getLogger("fastserve.batch")

Wire = Literal["msgpack", "binary"]
_RETRIES: Final = 8
"""Attempts of a request the server answers 503 (overloaded, swapping) before the job stops."""
_MAX_BACKOFF_S: Final = 5.0


class Refused(Exception):
    """The model does not take this request (HTTP 400): its message is the reason."""


class JobError(Exception):
    """The job cannot go on (the message says why); committed chunks are kept."""


class Predictor(Protocol):
    name: str
    version: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    request_rows: int
    """Most rows one request may carry."""
    in_flight: int
    """Requests to keep in flight at once."""
    where: str
    """Where it runs, for the log: the repository or the URL."""
    feature_kinds: dict[str, Kind]
    """The kinds of the features the model is known to take by name (none over HTTP)."""

    async def predict(self, inputs: list[InputTensor]) -> list[npt.NDArray[Any]]:
        """The outputs (in ``outputs`` order) for ``inputs``; ``Refused`` or ``JobError``."""
        ...

    def pack(self, inputs: list[InputTensor]) -> list[InputTensor]:
        """A whole chunk's inputs as the requests will carry them."""
        ...


def schema_reason(message: str, failures: list[dict[str, Any]] | None) -> str:
    """A refusal as a reject reason: the message, and each failed check's first value."""
    if not failures:
        return message
    parts = []
    for failure in failures[:5]:
        values = failure.get("values") or []
        shown = f" (value {values[0]!r})" if values else ""
        parts.append(f"{failure.get('feature')}: {failure.get('check')}{shown}")
    return "fails the schema: " + "; ".join(parts)


# -- in process ----------------------------------------------------------------------------


class LocalModel:
    """A repository's model version, loaded here: the online path without HTTP (the same
    pipelines, validation and value schema through ``fastserve.inference.prepare``, then the
    native batcher). Only the batch size differs: offline calls the model ``batch_rows``
    rows at a time (a model that takes any number of rows gives each row the same answer;
    see README)."""

    def __init__(self, repository: Path, name: str, version: str, batch_rows: int) -> None:
        self.repository = repository
        self.name = name
        self.version = version
        self.batch_rows = batch_rows
        self.where = str(repository)
        self._model: Any = None
        self._metrics: Any = None

    async def __aenter__(self) -> LocalModel:
        from fastserve import repository as repo
        from fastserve.config import load_model_config
        from fastserve.model import ServedModel
        from fastserve.monitoring.metrics import Metrics

        source = repo.find(self.repository, self.name)
        if source is None:
            raise JobError(f"{self.repository} has no model '{self.name}'")
        if self.version not in source.versions():
            raise JobError(f"model '{self.name}' has no version {self.version}")
        try:
            config = load_model_config(source.config_path)
            if self.batch_rows > 1:
                rows = self.batch_rows
                batching = config.batching.model_copy(
                    update={"max_batch_size": rows, "preferred_batch_sizes": (rows,)}
                )
                config = config.model_copy(update={"batching": batching})
            model = await asyncio.to_thread(
                ServedModel.load, self.name, self.version, source.model_file(self.version), config
            )
        except FastServeError as exc:
            raise JobError(str(exc)) from None
        fixed = [s.name for s in model.accepts.inputs if s.shape and s.shape[0] != -1]
        if fixed and self.batch_rows > 1:
            await model.stop()
            raise JobError(
                f"model '{self.name}' takes a fixed number of rows in {', '.join(fixed)}: "
                "run with --batch-size 1"
            )
        model.start(asyncio.get_running_loop(), monitoring=False)
        self._model = model
        self._metrics = Metrics()
        log.info("model %s loaded from %s, on %s", model.label, self.repository, model.provider)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._model is not None:
            await self._model.stop()

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self._model.accepts.inputs  # type: ignore[no-any-return]

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return self._model.signature.outputs  # type: ignore[no-any-return]

    @property
    def request_rows(self) -> int:
        return max(self.batch_rows, 1)

    in_flight = 1
    """One request at a time, each its own batch: which rows share a model call is then a
    function of the file alone, so a resumed job (or a second run) gets the very same bits
    even from a model whose kernels differ by batch size (onnxruntime's linear classifier
    computes a batch of one row by another path than a batch of two)."""

    @property
    def feature_kinds(self) -> dict[str, Kind]:
        model = self._model
        kinds = feature_kinds(model.config.model_dump(mode="json"))
        if model.schema is not None:
            for name in model.schema.compiled.feature_names:
                kinds.setdefault(name, "number")
        return kinds

    def pack(self, inputs: list[InputTensor]) -> list[InputTensor]:
        """Features sent by name, packed into the model's tensor once for the whole chunk
        by the function an online request's go through (``pack_features``, row by row the
        same), rather than once a request. A chunk it refuses goes by name, request by
        request, so that the refusal is narrowed down to its rows."""
        from fastserve.validation import pack_features

        model = self._model
        if model.schema is None or model.tabular is not None:
            return inputs
        try:
            return pack_features(InferenceRequest(inputs), model.schema, model.accepts).inputs
        except InvalidRequest:
            return inputs

    async def predict(self, inputs: list[InputTensor]) -> list[npt.NDArray[Any]]:
        from fastserve.inference import prepare

        model = self._model
        try:
            prepared = await prepare(
                model, InferenceRequest(inputs), self._metrics, time.perf_counter_ns()
            )
            # a full request is released by its size; a smaller one (a chunk's last, or a
            # piece of a refused one) would wait out the queue delay for rows that never come
            rows = int(prepared.arrays[0].shape[0])
            completion = await model.batcher.infer(
                prepared.arrays,
                priority=prepared.priority,
                timeout_us=prepared.timeout_us,
                last=rows < self.request_rows,
            )
        except SchemaViolation as exc:
            raise Refused(schema_reason(str(exc), exc.failures)) from None
        except InvalidRequest as exc:
            raise Refused(str(exc)) from None
        except FastServeError as exc:
            raise JobError(f"model {model.label}: {exc}") from None
        return list(completion.outputs)


# -- over HTTP -----------------------------------------------------------------------------


@dataclass
class _Answer:
    status: int
    body: bytes
    headers: Any


class RemoteModel:
    """A model on a running V2 server. ``version`` None: the version the server routes the
    first request to, then that version explicitly (a swap mid-job does not mix versions)."""

    def __init__(
        self,
        url: str,
        name: str,
        version: str | None,
        *,
        wire: Wire,
        in_flight: int,
        request_rows: int | None,
        timeout_s: float,
    ) -> None:
        self.url = url.rstrip("/")
        self.name = name
        self.version = version or ""
        self.where = self.url
        self.wire = wire
        self.in_flight = in_flight
        self._timeout_s = timeout_s
        self._session: Any = None
        self.inputs: tuple[TensorSpec, ...] = ()
        self.outputs: tuple[TensorSpec, ...] = ()
        self.request_rows = request_rows or 0
        self.feature_kinds: dict[str, Kind] = {}
        self._pinning = asyncio.Lock()

    async def __aenter__(self) -> RemoteModel:
        import aiohttp

        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self._timeout_s),
            connector=aiohttp.TCPConnector(limit=self.in_flight),
        )
        try:
            meta = await self._get_json(self._model_path())
            self.inputs = tuple(_spec(s) for s in meta.get("inputs", []))
            self.outputs = tuple(_spec(s) for s in meta.get("outputs", []))
            if not self.inputs or not self.outputs:
                raise JobError(f"{self.url}: model '{self.name}' metadata names no inputs/outputs")
            await self._read_config()
        except BaseException:
            await self._session.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._session.close()

    def pack(self, inputs: list[InputTensor]) -> list[InputTensor]:
        return inputs  # the server packs features sent by name

    def _model_path(self) -> str:
        path = f"/v2/models/{self.name}"
        return f"{path}/versions/{self.version}" if self.version else path

    async def _get_json(self, path: str) -> dict[str, Any]:
        answer = await self._call("GET", path)
        if answer.status == 404:
            raise JobError(f"{self.url}: no model '{self.name}' ({_error_of(answer)})")
        if answer.status != 200:
            raise JobError(f"{self.url}{path}: HTTP {answer.status}: {_error_of(answer)}")
        try:
            doc = orjson.loads(answer.body)
        except orjson.JSONDecodeError:
            raise JobError(f"{self.url}{path}: the answer is not JSON") from None
        if not isinstance(doc, dict):
            raise JobError(f"{self.url}{path}: the answer is not a JSON object")
        return doc

    async def _read_config(self) -> None:
        """From the model's config (if the server has the endpoint): the max batch size
        (rows a request; else 64) and a fastserve pipeline's feature kinds."""
        try:
            config = await self._get_json(self._model_path() + "/config")
        except JobError:
            config = {}
        if not self.request_rows:
            size = config.get("max_batch_size")
            self.request_rows = size if isinstance(size, int) and size > 0 else 64
        try:
            self.feature_kinds = feature_kinds(config)
        except (AttributeError, KeyError, TypeError):
            self.feature_kinds = {}  # not a fastserve config: the values tell

    async def _call(
        self, method: str, path: str, body: bytes | None = None, headers: Any = None
    ) -> _Answer:
        import aiohttp

        try:
            async with self._session.request(
                method, self.url + path, data=body, headers=headers
            ) as response:
                return _Answer(response.status, await response.read(), response.headers)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise JobError(f"{self.url}: {exc.__class__.__name__}: {exc}") from None

    async def predict(self, inputs: list[InputTensor]) -> list[npt.NDArray[Any]]:
        if not self.version:
            async with self._pinning:  # the first answer names the version all others ask for
                unpinned = not self.version  # (another request may have pinned it meanwhile)
                if unpinned:
                    return await self._predict(inputs)
        return await self._predict(inputs)

    async def _predict(self, inputs: list[InputTensor]) -> list[npt.NDArray[Any]]:
        body, headers = self._encode(inputs)
        for attempt in range(_RETRIES):
            answer = await self._call("POST", self._model_path() + "/infer", body, headers)
            if answer.status == 200:
                return self._decode(answer)
            if answer.status == 400:
                raise Refused(_refusal(answer))
            if answer.status != 503:
                raise JobError(f"{self.url}: HTTP {answer.status}: {_error_of(answer)}")
            wait = _retry_after(answer, attempt)
            log.warning("server busy (%s); retrying in %.1f s", _error_of(answer), wait)
            await asyncio.sleep(wait)
        raise JobError(f"{self.url}: still unavailable after {_RETRIES} attempts")

    def _encode(self, inputs: list[InputTensor]) -> tuple[bytes, dict[str, str]]:
        if self.wire == "msgpack":
            doc = {
                "inputs": [
                    {
                        "name": t.name,
                        "datatype": t.datatype,
                        "shape": list(t.shape),
                        "data": _msgpack_data(t),
                    }
                    for t in inputs
                ]
            }
            headers = {"Content-Type": MSGPACK_CONTENT_TYPE, "Accept": MSGPACK_CONTENT_TYPE}
            return msgpack.packb(doc), headers
        blobs = [tensor_bytes(t.data, t.datatype) for t in inputs]
        header = orjson.dumps(
            {
                "inputs": [
                    {
                        "name": t.name,
                        "datatype": t.datatype,
                        "shape": list(t.shape),
                        "parameters": {"binary_data_size": len(blob)},
                    }
                    for t, blob in zip(inputs, blobs, strict=True)
                ],
                "outputs": [
                    {"name": s.name, "parameters": {"binary_data": True}} for s in self.outputs
                ],
            }
        )
        headers = {"Content-Type": OCTET_STREAM, HEADER_LENGTH: str(len(header))}
        return b"".join([header, *blobs]), headers

    def _decode(self, answer: _Answer) -> list[npt.NDArray[Any]]:
        try:
            if "msgpack" in answer.headers.get("Content-Type", ""):
                doc = msgpack.unpackb(answer.body)
                blobs = {o["name"]: o["data"] for o in doc["outputs"]}
            else:
                length = int(answer.headers.get(HEADER_LENGTH, len(answer.body)))
                doc = orjson.loads(answer.body[:length])
                blobs, offset = {}, length
                for out in doc["outputs"]:
                    size = out.get("parameters", {}).get("binary_data_size")
                    if size is None:
                        blobs[out["name"]] = out["data"]
                    else:
                        blobs[out["name"]] = answer.body[offset : offset + size]
                        offset += size
            version = str(doc.get("model_version", ""))
            if not self.version:
                self.version = version
            elif version and version != self.version:
                raise JobError(f"asked version {self.version}, answered by {version}")
            by_name = {o["name"]: o for o in doc["outputs"]}
            outputs = []
            for spec in self.outputs:
                out = by_name[spec.name]
                shape = tuple(int(d) for d in out["shape"])
                data = blobs[spec.name]
                if isinstance(data, list):  # JSON data, or msgpack BYTES
                    outputs.append(_from_list(data, out["datatype"], shape))
                else:
                    outputs.append(tensor_from_bytes(data, out["datatype"], shape, spec.name))
            return outputs
        except (KeyError, TypeError, ValueError, InvalidRequest) as exc:
            raise JobError(f"{self.url}: an answer the job cannot read: {exc}") from None


def _msgpack_data(tensor: InputTensor) -> Any:
    if tensor.datatype == "BYTES":
        return list(tensor.data.reshape(-1))
    return tensor_bytes(tensor.data, tensor.datatype)


def _from_list(data: list[Any], datatype: str, shape: tuple[int, ...]) -> npt.NDArray[Any]:
    from fastserve.protocol import DATATYPE_TO_NUMPY

    array = np.asarray(data, dtype=DATATYPE_TO_NUMPY[datatype])
    return array.reshape(shape)


def _spec(doc: dict[str, Any]) -> TensorSpec:
    return TensorSpec(str(doc["name"]), str(doc["datatype"]), tuple(int(d) for d in doc["shape"]))


def _error_doc(answer: _Answer) -> dict[str, Any]:
    try:
        doc = orjson.loads(answer.body)
    except orjson.JSONDecodeError:
        return {}
    return doc if isinstance(doc, dict) else {}


def _error_of(answer: _Answer) -> str:
    error = _error_doc(answer).get("error")
    return str(error) if error else answer.body[:200].decode("utf-8", "replace")


def _refusal(answer: _Answer) -> str:
    doc = _error_doc(answer)
    failures = doc.get("failures")
    return schema_reason(_error_of(answer), failures if isinstance(failures, list) else None)


def _retry_after(answer: _Answer, attempt: int) -> float:
    try:
        given = float(answer.headers.get("Retry-After", ""))
    except ValueError:
        given = math.nan
    backoff = min(0.1 * 2**attempt, _MAX_BACKOFF_S)
    return backoff if math.isnan(given) else min(given, _MAX_BACKOFF_S)

"""Wire codecs of the Open Inference Protocol: JSON, Triton's binary tensors, msgpack.

``decode_request`` turns a request body into an ``InferenceRequest`` whose arrays already
have the declared shape and the numpy dtype of their datatype; ``encode_response`` goes
the other way (error bodies are built in ``fastserve.http.errors``). Everything here runs
once per request on the event loop, so the common paths avoid copies and Python-level
loops over elements.

Decisions a client can see:

- ``data`` is either flat (any declared shape, row-major) or nested exactly as the
  declared shape. Anything else, ragged nesting included, is a 400.
- Integers and booleans are accepted for FP16/FP32/FP64 and integer types; floats for
  integer types, strings for numbers, and non-booleans for BOOL are not. A value that does
  not fit the type (300 for UINT8, 1e39 for FP32) is a 400, never a silent wrap or ``inf``.
- BYTES in JSON are strings (sent as their UTF-8 bytes). BYTES outputs in JSON are
  decoded as UTF-8 with U+FFFD for invalid sequences, as Triton sends them as strings;
  clients that need the exact bytes ask for binary outputs (or use msgpack).
- msgpack floats are IEEE values, so NaN and inf pass there; JSON has no literal for them.
  In raw binary BOOL data any non-zero byte is true.
- Non-finite output values (NaN, inf) are written as JSON ``null``; FP16 outputs are
  written as the shortest decimal that reads back as the same value.
- An empty ``outputs`` list means every output, as no ``outputs`` does (as in Triton).
  Unknown fields are ignored. ``parameters`` may nest at most 16 levels, a JSON document
  at most 1024 (orjson's own limit).
- Every error message is bounded and names the input or field, never the data.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from typing import Any, Final, NoReturn

import msgpack
import numpy as np
import numpy.typing as npt
import orjson

from fastserve import _core
from fastserve.errors import InvalidRequest, UnsupportedMediaType
from fastserve.protocol import (
    DATATYPE_TO_NUMPY,
    InferenceRequest,
    InferenceResponse,
    InputTensor,
    OutputTensor,
    RequestedOutput,
    TensorSpec,
)

__all__ = [
    "HEADER_LENGTH",
    "JSON_CONTENT_TYPE",
    "MSGPACK_CONTENT_TYPE",
    "OCTET_STREAM",
    "decode_request",
    "decode_with_plan",
    "encode_every_output_json",
    "encode_response",
    "request_from_json",
    "tensor_bytes",
    "tensor_from_bytes",
]

HEADER_LENGTH: Final = "Inference-Header-Content-Length"
JSON_CONTENT_TYPE: Final = "application/json"
MSGPACK_CONTENT_TYPE: Final = "application/msgpack"
OCTET_STREAM: Final = "application/octet-stream"

MAX_ID_LENGTH: Final = 256
MAX_NAME_LENGTH: Final = 256
MAX_RANK: Final = 64  # numpy's own limit on dimensions
# orjson (>= 3.9.15, required) refuses JSON nested 1024 levels deep with a decode error.
MAX_JSON_DEPTH: Final = 1024
MAX_PARAMETER_DEPTH: Final = 16

_JSON_TYPES: Final = frozenset({"", "application/json"})
_MSGPACK_TYPES: Final = frozenset({"application/msgpack", "application/x-msgpack"})

# Wire dtypes are little-endian whatever the host.
_WIRE_DTYPES: Final[dict[str, np.dtype[Any]]] = {
    name: dt.newbyteorder("<") for name, dt in DATATYPE_TO_NUMPY.items() if name != "BYTES"
}
_NATIVE_DTYPES: Final[dict[str, np.dtype[Any]]] = {
    name: dt for name, dt in DATATYPE_TO_NUMPY.items() if name != "BYTES"
}
# orjson cannot write float16; float32 holds every float16 value exactly.
_JSON_DTYPES: Final[dict[str, np.dtype[Any]]] = {
    **_NATIVE_DTYPES,
    "FP16": np.dtype(np.float32),
}
_FLOAT_LIMITS: Final[dict[str, float]] = {
    "FP16": float(np.finfo(np.float16).max),
    "FP32": float(np.finfo(np.float32).max),
}
_NATIVE_FLOATS: Final = frozenset({"FP32", "FP64"})
"""Float datatypes whose plain ``data`` lists the native core converts
(``_core.numbers_from_list``)."""
_INT_RANGES: Final[dict[str, tuple[int, int]]] = {
    name: (int(np.iinfo(dt).min), int(np.iinfo(dt).max))
    for name, dt in _NATIVE_DTYPES.items()
    if dt.kind in "iu"
}
_U32: Final = struct.Struct("<I")

_JSON_SCALARS: Final = frozenset({str, int, float, bool, type(None)})

# ---------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------


def decode_request(
    body: bytes, content_type: str | None, header_length: str | None, *, max_elements: int
) -> InferenceRequest:
    """Decode an inference request body.

    ``content_type`` is the request's Content-Type (None when absent) and ``header_length``
    the value of its ``Inference-Header-Content-Length`` header (None when absent).
    ``max_elements`` bounds the element count each input may declare; it is checked before
    anything is converted or allocated.

    Raises InvalidRequest (400) for a malformed body and UnsupportedMediaType (415) for a
    content type that is not JSON, binary tensors or msgpack.
    """
    parts = _json_parts(body, content_type, header_length)
    if parts is not None:
        text, blob = parts
        return request_from_json(_load_json(text), max_elements=max_elements, blob=blob)
    media = _media_type(content_type)
    if media in _MSGPACK_TYPES:
        if header_length is not None:
            raise InvalidRequest(f"{HEADER_LENGTH} is only valid with JSON bodies, not msgpack")
        return _request_from_doc(_load_msgpack(body), max_elements, None, msgpack_doc=True)
    if media == OCTET_STREAM:
        raise UnsupportedMediaType(
            f"{OCTET_STREAM} bodies need the {HEADER_LENGTH} header (binary tensor extension)"
        )
    raise UnsupportedMediaType(
        f"unsupported Content-Type {_label(media)}: use application/json or application/msgpack"
    )


def _json_parts(
    body: bytes, content_type: str | None, header_length: str | None
) -> tuple[bytes, memoryview | None] | None:
    """The JSON document and the binary tensors after it (None: none) of a JSON body, or of
    one with Triton's binary extension; None for any other body (msgpack, or what
    ``decode_request`` refuses). Raises InvalidRequest for a bad ``header_length``."""
    media = _media_type(content_type)
    if media in _JSON_TYPES or (media == OCTET_STREAM and header_length is not None):
        if header_length is None:
            return body, None
        split = _parse_header_length(header_length, len(body))
        return body[:split], memoryview(body)[split:]
    return None


def request_from_json(
    doc: Any, *, max_elements: int, blob: memoryview | None = None
) -> InferenceRequest:
    """``decode_request`` of a JSON body's document that ``_load_json`` parsed (``blob``: the
    binary extension's bytes after it)."""
    return _request_from_doc(doc, max_elements, blob, msgpack_doc=False)


Planned = tuple[list[npt.NDArray[Any]], str | None, bool]
"""What a ``_core.JsonRequestPlan`` reads of a request: its arrays in signature order, already
checked against it, its id and its ``binary_data_output``."""


def decode_with_plan(
    body: bytes,
    content_type: str | None,
    header_length: str | None,
    plan: _core.JsonRequestPlan,
    *,
    max_elements: int,
) -> InferenceRequest | Planned:
    """``decode_request``, with the common request (JSON, binary extension or msgpack) read by
    a model version's ``plan`` natively; any other body decoded as ``decode_request`` decodes
    it, or refused, saying why. The document is parsed once either way."""
    parts = _json_parts(body, content_type, header_length)
    if parts is not None:
        text, blob = parts
        doc = _load_json(text)
        planned = plan.decode(doc, max_elements, blob)
        if planned is not None:
            return planned
        return _request_from_doc(doc, max_elements, blob, msgpack_doc=False)
    if header_length is None and _media_type(content_type) in _MSGPACK_TYPES:
        doc = _load_msgpack(body)
        planned = plan.decode(doc, max_elements, None, True)
        if planned is not None:
            return planned
        return _request_from_doc(doc, max_elements, None, msgpack_doc=True)
    return decode_request(body, content_type, header_length, max_elements=max_elements)


def _media_type(content_type: str | None) -> str:
    if not content_type:
        return ""
    return content_type.partition(";")[0].strip().lower()


def _parse_header_length(value: str, body_length: int) -> int:
    text = value.strip()
    if not (text.isascii() and text.isdigit() and len(text) <= 20):
        raise InvalidRequest(f"{HEADER_LENGTH} must be a non-negative integer")
    length = int(text)
    if not 0 < length <= body_length:
        raise InvalidRequest(
            f"{HEADER_LENGTH} is {length}, outside 1..{body_length} (the body's length)"
        )
    return length


def _load_json(raw: bytes) -> Any:
    """The document of a JSON body; InvalidRequest (400) when it is not one."""
    if not raw:
        raise InvalidRequest("empty request body")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        if "depth limit" in str(exc) or "recursion" in str(exc).lower():
            raise InvalidRequest(f"JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
        raise InvalidRequest(f"invalid JSON: {_clip(str(exc), 120)}") from None


class _ExtensionTypeError(Exception):
    pass


def _reject_ext(code: int, data: bytes) -> NoReturn:
    raise _ExtensionTypeError


def _load_msgpack(raw: bytes) -> Any:
    if not raw:
        raise InvalidRequest("empty request body")
    try:
        # unpackb bounds every claimed length by the buffer's size, so a header claiming
        # 2**32-1 items fails at once instead of allocating.
        return msgpack.unpackb(raw, raw=False, strict_map_key=True, ext_hook=_reject_ext)
    except _ExtensionTypeError:
        raise InvalidRequest("msgpack extension types are not supported") from None
    except msgpack.ExtraData:
        raise InvalidRequest("msgpack body has extra bytes after the document") from None
    except msgpack.StackError:
        raise InvalidRequest("msgpack document is nested too deeply") from None
    except UnicodeDecodeError:
        raise InvalidRequest("msgpack string is not valid UTF-8") from None
    except msgpack.FormatError:
        raise InvalidRequest("msgpack body is malformed") from None
    except ValueError as exc:
        if "map key" in str(exc):
            raise InvalidRequest("msgpack map keys must be strings") from None
        raise InvalidRequest("msgpack body is truncated or malformed") from None
    except (TypeError, OverflowError, RecursionError, MemoryError):
        raise InvalidRequest("msgpack body is malformed") from None


def _request_from_doc(
    doc: Any, max_elements: int, blob: memoryview | None, *, msgpack_doc: bool
) -> InferenceRequest:
    if type(doc) is not dict:
        raise InvalidRequest("the request must be an object")
    if msgpack_doc:
        _check_keys(doc, "request")
    request_id = doc.get("id")
    if request_id is not None:
        if type(request_id) is not str:
            raise InvalidRequest("'id' must be a string")
        if len(request_id) > MAX_ID_LENGTH:
            raise InvalidRequest(f"'id' is longer than {MAX_ID_LENGTH} characters")
    parameters = _parameters(doc.get("parameters"), "request", msgpack_doc)
    if "binary_data_output" in parameters and type(parameters["binary_data_output"]) is not bool:
        raise InvalidRequest("parameter 'binary_data_output' must be a boolean")
    inputs = _inputs(doc.get("inputs"), max_elements, blob, msgpack_doc)
    outputs = _outputs(doc.get("outputs"), msgpack_doc)
    return InferenceRequest(inputs=inputs, id=request_id, outputs=outputs, parameters=parameters)


def _check_keys(obj: dict[Any, Any], where: str) -> None:
    for key in obj:
        if type(key) is not str:
            raise InvalidRequest(f"{where}: map keys must be strings")


def _parameters(raw: Any, where: str, msgpack_doc: bool) -> dict[str, Any]:
    if raw is None:
        return {}
    if type(raw) is not dict:
        raise InvalidRequest(f"{where}: 'parameters' must be an object")
    if msgpack_doc:
        # msgpack can also hold bytes, timestamps and non-string keys, which nothing
        # downstream expects; both formats can nest deeper than anything should walk.
        _check_parameter_value(raw, where, 1)
    else:
        for value in raw.values():
            if type(value) is dict or type(value) is list:
                _check_parameter_value(value, where, 2)
    return raw


def _check_parameter_value(value: Any, where: str, depth: int) -> None:
    if depth > MAX_PARAMETER_DEPTH:
        raise InvalidRequest(f"{where}: 'parameters' nested too deeply")
    if type(value) is dict:
        for key, item in value.items():
            if type(key) is not str:
                raise InvalidRequest(f"{where}: parameter names must be strings")
            if type(item) not in _JSON_SCALARS:
                _check_parameter_value(item, where, depth + 1)
    elif type(value) is list:
        for item in value:
            if type(item) not in _JSON_SCALARS:
                _check_parameter_value(item, where, depth + 1)
    elif type(value) not in _JSON_SCALARS:
        raise InvalidRequest(f"{where}: parameter values must be strings, numbers or booleans")


def _inputs(
    raw: Any, max_elements: int, blob: memoryview | None, msgpack_doc: bool
) -> list[InputTensor]:
    if raw is None:
        raise InvalidRequest("the request has no 'inputs'")
    if type(raw) is not list or not raw:
        raise InvalidRequest("'inputs' must be a non-empty list")
    tensors: list[InputTensor] = []
    names: set[str] = set()
    offset = 0
    for index, obj in enumerate(raw):
        name, label = _named_entry(obj, "input", index, names, msgpack_doc)
        datatype = obj.get("datatype")
        if type(datatype) is not str:
            raise InvalidRequest(f"{label}: 'datatype' must be a string")
        if datatype not in DATATYPE_TO_NUMPY:
            raise InvalidRequest(f"{label}: unknown datatype {_label(datatype)}")
        shape, count = _shape(obj.get("shape"), label, max_elements)
        parameters = _parameters(obj.get("parameters"), label, msgpack_doc)
        size = parameters.get("binary_data_size")
        data = obj.get("data")
        if size is not None:
            if type(size) is not int or size < 0:
                raise InvalidRequest(f"{label}: 'binary_data_size' must be a non-negative integer")
            if data is not None:
                raise InvalidRequest(f"{label}: has both 'data' and 'binary_data_size'")
            if blob is None:
                raise InvalidRequest(
                    f"{label}: 'binary_data_size' needs the {HEADER_LENGTH} header"
                )
            if offset + size > len(blob):
                raise InvalidRequest(
                    f"{label}: binary data runs past the end of the body "
                    f"({offset + size} > {len(blob)} bytes after the header)"
                )
            array = _from_raw(blob[offset : offset + size], datatype, shape, count, label)
            offset += size
        elif type(data) is list:
            array = _from_list(data, datatype, shape, count, label, msgpack_doc=msgpack_doc)
        elif msgpack_doc and type(data) is bytes:
            array = _from_raw(data, datatype, shape, count, label)
        elif data is None:
            raise InvalidRequest(f"{label}: 'data' is missing")
        else:
            kinds = "a list or raw bytes" if msgpack_doc else "a list"
            raise InvalidRequest(f"{label}: 'data' must be {kinds}")
        tensors.append(InputTensor(name, datatype, shape, array, parameters))
    if blob is not None and offset != len(blob):
        raise InvalidRequest(
            f"binary data: the inputs' binary_data_size add up to {offset} bytes "
            f"but {len(blob)} bytes follow the JSON header"
        )
    return tensors


def _shape(raw: Any, label: str, max_elements: int) -> tuple[tuple[int, ...], int]:
    if raw is None:
        raise InvalidRequest(f"{label}: 'shape' is missing")
    if type(raw) is not list:
        raise InvalidRequest(f"{label}: 'shape' must be a list of non-negative integers")
    if len(raw) > MAX_RANK:
        raise InvalidRequest(f"{label}: 'shape' has more than {MAX_RANK} dimensions")
    count = 1
    bound = 1  # the count with empty dimensions taken as 1: what a reshape must address
    for dim in raw:
        if type(dim) is not int or dim < 0:
            raise InvalidRequest(f"{label}: 'shape' must be a list of non-negative integers")
        if dim > max_elements:
            bound = max_elements + 1
            break
        count *= dim
        bound *= dim or 1
    if bound > max_elements:
        raise InvalidRequest(
            f"{label}: the declared shape is too large (over {max_elements} elements)"
        )
    return tuple(raw), count


def _named_entry(
    obj: Any, kind: str, index: int, seen: set[str], msgpack_doc: bool
) -> tuple[str, str]:
    """Check one entry of ``inputs`` or ``outputs``: an object with a new, valid name.

    Returns the name and the label error messages use for it.
    """
    where = f"{kind}s[{index}]"
    if type(obj) is not dict:
        raise InvalidRequest(f"{where} must be an object")
    if msgpack_doc:
        _check_keys(obj, where)
    name = obj.get("name")
    if type(name) is not str or not name:
        raise InvalidRequest(f"{where}: 'name' must be a non-empty string")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidRequest(f"{where}: 'name' is longer than {MAX_NAME_LENGTH}")
    label = f"{kind} {_label(name)}"
    if name in seen:
        raise InvalidRequest(f"{label} appears twice")
    seen.add(name)
    return name, label


def _from_list(
    data: list[Any],
    datatype: str,
    shape: tuple[int, ...],
    count: int,
    label: str,
    *,
    msgpack_doc: bool,
) -> npt.NDArray[Any]:
    if datatype == "BYTES":
        return _bytes_from_list(data, shape, count, label, msgpack_doc)
    if len(data) != count and len(data) != (shape[0] if shape else 1):
        # Neither flat nor nested along the first dimension: fail before converting.
        raise InvalidRequest(
            f"{label}: 'data' has {len(data)} elements, 'shape' {_shape_text(shape)} needs {count}"
        )
    if datatype in _NATIVE_FLOATS:
        # The common case (plain numbers that fit) in one native pass; None leaves anything
        # else to numpy and the checks below, which explain what is wrong.
        array = _core.numbers_from_list(data, shape, datatype)
        if array is not None:
            return array
    try:
        # No dtype: numpy then reports what the elements are (bool, int, float, str,
        # object), which a cast to the target would hide (it parses "1.5" and truncates
        # 1.5 to 1 without a word).
        found = np.asarray(data)
    except (ValueError, TypeError, OverflowError, RecursionError):
        raise InvalidRequest(
            f"{label}: 'data' is ragged or nested deeper than {MAX_RANK} levels"
        ) from None
    if found.shape != shape:
        if found.ndim != 1:
            raise InvalidRequest(
                f"{label}: nested 'data' has shape {_shape_text(found.shape)}, "
                f"'shape' is {_shape_text(shape)} (send it flat or nested exactly)"
            )
        if found.size != count:
            raise InvalidRequest(
                f"{label}: 'data' has {found.size} elements, 'shape' {_shape_text(shape)} "
                f"needs {count}"
            )
    if found.dtype.kind in "fO" and found.size and datatype in _INT_RANGES:
        # Python ints beyond int64 turn a list into float64 (or object): look closer.
        found = _exact_ints(data, found.shape, datatype, label)
    array = _convert(data, found, datatype, label, msgpack_doc)
    return array if array.shape == shape else array.reshape(shape)


def _exact_ints(
    data: list[Any], shape: tuple[int, ...], datatype: str, label: str
) -> npt.NDArray[Any]:
    items = np.asarray(data, dtype=object).reshape(-1).tolist()
    for item in items:
        if type(item) is not int and type(item) is not bool:
            raise InvalidRequest(f"{label}: {datatype} data must be integers")
    try:
        return np.array(items, dtype=_NATIVE_DTYPES[datatype]).reshape(shape)
    except OverflowError:
        raise InvalidRequest(f"{label}: a value is out of range for {datatype}") from None


def _convert(
    data: list[Any], found: npt.NDArray[Any], datatype: str, label: str, msgpack_doc: bool
) -> npt.NDArray[Any]:
    """``found`` (``data`` as numpy saw it) as ``datatype``, refusing what does not fit."""
    target = _NATIVE_DTYPES[datatype]
    kind = found.dtype.kind
    if found.size == 0:
        return found.astype(target)
    if datatype == "BOOL":
        if kind != "b":
            raise InvalidRequest(f"{label}: BOOL data must be true or false")
        return found
    if target.kind == "f":
        if kind == "f":
            if datatype == "FP64":
                return found
            # A cast that cannot overflow needs no check. The bound must not warn on
            # overflow itself (a float64 sum of abs is inf then, and NaN fails it too);
            # for a short flat list, Python's sum is the fastest way there.
            limit = _FLOAT_LIMITS[datatype]
            if found.ndim == 1 and found.size <= 64:
                fits = sum(map(abs, data)) <= limit
            else:
                fits = float(np.abs(found).max()) <= limit
            if fits:
                return found.astype(target)
        elif kind not in "iub":
            raise InvalidRequest(f"{label}: {datatype} data must be numbers")
        elif datatype != "FP16":
            return found.astype(target)
        with np.errstate(over="ignore", invalid="ignore"):
            array = found.astype(target)
        overflow = np.isinf(array)
        if overflow.any() and (not msgpack_doc or (overflow & np.isfinite(found)).any()):
            raise InvalidRequest(f"{label}: a value is out of range for {datatype}")
        return array
    if kind in "iu":
        if found.dtype != target:
            low, high = _INT_RANGES[datatype]
            if int(found.min()) < low or int(found.max()) > high:
                raise InvalidRequest(f"{label}: a value is out of range for {datatype}")
            return found.astype(target)
        return found
    if kind == "b":
        return found.astype(target)
    raise InvalidRequest(f"{label}: {datatype} data must be integers")


def _bytes_from_list(
    data: list[Any], shape: tuple[int, ...], count: int, label: str, msgpack_doc: bool
) -> npt.NDArray[Any]:
    if data and type(data[0]) is list:
        try:
            nested = np.array(data, dtype=object)
        except (ValueError, TypeError, RecursionError):
            raise InvalidRequest(f"{label}: 'data' is ragged") from None
        if nested.shape != shape:
            raise InvalidRequest(
                f"{label}: nested 'data' has shape {_shape_text(nested.shape)}, "
                f"'shape' is {_shape_text(shape)} (send it flat or nested exactly)"
            )
        items: list[Any] = nested.reshape(-1).tolist()
    else:
        items = data
        if len(items) != count:
            raise InvalidRequest(
                f"{label}: 'data' has {len(items)} elements, 'shape' {_shape_text(shape)} "
                f"needs {count}"
            )
    encoded: list[bytes] = []
    append = encoded.append
    try:
        for item in items:
            if type(item) is str:
                append(item.encode())
            elif msgpack_doc and type(item) is bytes:
                append(item)
            else:
                raise InvalidRequest(f"{label}: BYTES data must be strings")
    except UnicodeEncodeError:
        raise InvalidRequest(f"{label}: BYTES data is not valid UTF-8") from None
    array = np.empty(count, dtype=object)
    array[:] = encoded
    return array.reshape(shape)


def _from_raw(
    buf: memoryview | bytes, datatype: str, shape: tuple[int, ...], count: int, label: str
) -> npt.NDArray[Any]:
    if datatype == "BYTES":
        return _bytes_from_raw(memoryview(buf), shape, count, label)
    dtype = _WIRE_DTYPES[datatype]
    if len(buf) != count * dtype.itemsize:
        raise InvalidRequest(
            f"{label}: binary data has {len(buf)} bytes, {datatype} {_shape_text(shape)} "
            f"needs {count * dtype.itemsize}"
        )
    array = np.frombuffer(buf, dtype=dtype)
    if datatype == "BOOL" and count and int(array.view(np.uint8).max()) > 1:
        array = array.view(np.uint8) != 0  # any non-zero byte is true
    return array.reshape(shape)


def tensor_from_bytes(
    buf: memoryview | bytes, datatype: str, shape: tuple[int, ...], label: str
) -> npt.NDArray[Any]:
    """A tensor from its raw little-endian bytes (BYTES: 4-byte lengths and the bytes), as
    Triton's binary extension and msgpack bodies carry it; ``InvalidRequest`` if the bytes
    do not make ``shape``."""
    return _from_raw(buf, datatype, shape, math.prod(shape), label)


def _bytes_from_raw(
    buf: memoryview, shape: tuple[int, ...], count: int, label: str
) -> npt.NDArray[Any]:
    end = len(buf)
    if count * 4 > end:  # every element has a 4-byte length: check before allocating
        raise InvalidRequest(
            f"{label}: binary BYTES data has {end} bytes, too short for {count} elements"
        )
    array = np.empty(count, dtype=object)
    unpack = _U32.unpack_from
    offset = 0
    for index in range(count):
        if offset + 4 > end:
            raise InvalidRequest(f"{label}: binary BYTES data ends inside element {index}")
        (length,) = unpack(buf, offset)
        offset += 4
        if offset + length > end:
            raise InvalidRequest(f"{label}: binary BYTES data ends inside element {index}")
        array[index] = buf[offset : offset + length].tobytes()
        offset += length
    if offset != end:
        raise InvalidRequest(
            f"{label}: binary BYTES data has {end - offset} bytes after its {count} elements"
        )
    return array.reshape(shape)


def _outputs(raw: Any, msgpack_doc: bool) -> list[RequestedOutput] | None:
    if raw is None:
        return None
    if type(raw) is not list:
        raise InvalidRequest("'outputs' must be a list")
    if not raw:
        return None  # as Triton: no requested outputs means all of them
    outputs: list[RequestedOutput] = []
    names: set[str] = set()
    for index, obj in enumerate(raw):
        name, label = _named_entry(obj, "output", index, names, msgpack_doc)
        parameters = _parameters(obj.get("parameters"), label, msgpack_doc)
        binary = parameters.get("binary_data")
        if binary is not None and type(binary) is not bool:
            raise InvalidRequest(f"{label}: 'binary_data' must be a boolean")
        outputs.append(RequestedOutput(name=name, binary=binary, parameters=parameters))
    return outputs


# ---------------------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------------------


def encode_response(
    resp: InferenceResponse, request: InferenceRequest | None, fmt: str
) -> tuple[bytes, dict[str, str]]:
    """Encode a response as ``fmt`` ("json" or "msgpack"); return the body and its headers.

    Only the outputs the request asked for are sent, in the order it asked for them. In
    JSON an output goes as raw bytes after the JSON header (Triton's binary extension) when
    its ``binary_data`` parameter says so, or when it says nothing and the request's
    ``binary_data_output`` parameter is true; the headers then carry
    ``Inference-Header-Content-Length``. In msgpack every output's data is raw
    little-endian bytes (BYTES: a list of bytes).
    """
    selected = _selected_outputs(resp, request)
    doc: dict[str, Any] = {"model_name": resp.model_name, "model_version": resp.model_version}
    if resp.id is not None:
        doc["id"] = resp.id
    if resp.parameters:
        doc["parameters"] = resp.parameters
    if fmt == "json":
        return _encode_json(doc, [(out.name, out.datatype, out.data, b) for out, b in selected])
    if fmt == "msgpack":
        doc["outputs"] = [
            {
                "name": out.name,
                "datatype": out.datatype,
                "shape": list(out.data.shape),
                "data": _msgpack_data(out.data, out.datatype),
            }
            for out, _ in selected
        ]
        return msgpack.packb(doc), {"Content-Type": MSGPACK_CONTENT_TYPE}
    raise ValueError(f"unknown response format {fmt!r}")


def encode_every_output_json(
    model_name: str,
    model_version: str,
    request_id: str,
    specs: Sequence[TensorSpec],
    arrays: Sequence[npt.NDArray[Any]],
    *,
    binary: bool = False,
) -> tuple[bytes, dict[str, str]]:
    """``encode_response`` in JSON of an answer with an id and no parameters to a request
    that asked for every output (``binary``: all as binary data, as ``binary_data_output``
    asks), the common answer, written straight from the model's output ``specs`` and
    ``arrays``: the same bytes, without the response's objects."""
    doc = {"model_name": model_name, "model_version": model_version, "id": request_id}
    entries = [
        (spec.name, spec.datatype, array, binary)
        for spec, array in zip(specs, arrays, strict=True)
    ]  # fmt: skip
    return _encode_json(doc, entries)


def _selected_outputs(
    resp: InferenceResponse, request: InferenceRequest | None
) -> list[tuple[OutputTensor, bool]]:
    if request is None:
        return [(out, False) for out in resp.outputs]
    default = request.binary_output
    if request.outputs is None:
        return [(out, default) for out in resp.outputs]
    by_name = {out.name: out for out in resp.outputs}
    selected = []
    for wanted in request.outputs:
        out = by_name.get(wanted.name)
        if out is not None:
            selected.append((out, default if wanted.binary is None else wanted.binary))
    return selected


def _encode_json(
    doc: dict[str, Any], entries: list[tuple[str, str, npt.NDArray[Any], bool]]
) -> tuple[bytes, dict[str, str]]:
    """``doc`` with the ``outputs`` (name, datatype, data, as binary data) in JSON."""
    outputs = []
    chunks: list[bytes | memoryview] = []
    for name, datatype, data, binary in entries:
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": data.shape}
        if binary:
            raw = tensor_bytes(data, datatype)
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = _json_data(data, datatype)
        outputs.append(entry)
    doc["outputs"] = outputs
    header = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    if not chunks:
        return header, {"Content-Type": JSON_CONTENT_TYPE}
    chunks.insert(0, header)
    return b"".join(chunks), {"Content-Type": OCTET_STREAM, HEADER_LENGTH: str(len(header))}


def _json_data(data: npt.NDArray[Any], datatype: str) -> Any:
    if datatype == "BYTES":
        return [_as_text(item) for item in data.reshape(-1).tolist()]
    # orjson writes only C-contiguous, native-endian arrays; ravel copies only if needed.
    return data.astype(_JSON_DTYPES[datatype], copy=False).ravel()


def _as_text(item: Any) -> str:
    if isinstance(item, bytes):
        return item.decode("utf-8", "replace")
    return item if isinstance(item, str) else str(item)


def _as_bytes(item: Any) -> bytes:
    if isinstance(item, bytes):
        return item
    return (item if isinstance(item, str) else str(item)).encode()


def tensor_bytes(data: npt.NDArray[Any], datatype: str) -> bytes | memoryview:
    """A tensor's raw little-endian bytes (BYTES: each element's 4-byte length, then it)."""
    if datatype == "BYTES":
        parts: list[bytes] = []
        append = parts.append
        for item in data.reshape(-1).tolist():
            raw = _as_bytes(item)
            append(_U32.pack(len(raw)))
            append(raw)
        return b"".join(parts)
    array = np.ascontiguousarray(data, dtype=_WIRE_DTYPES[datatype])
    return array.reshape(-1).view(np.uint8).data


def _msgpack_data(data: npt.NDArray[Any], datatype: str) -> Any:
    if datatype == "BYTES":
        return [_as_bytes(item) for item in data.reshape(-1).tolist()]
    return tensor_bytes(data, datatype)


# ---------------------------------------------------------------------------------------
# Messages
# ---------------------------------------------------------------------------------------


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _label(name: str) -> str:
    """A name, quoted and bounded, fit for an error message."""
    return repr(_clip(name, 64))


def _shape_text(shape: tuple[int, ...]) -> str:
    return _clip(str(list(shape)), 64)

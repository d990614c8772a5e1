"""The wire codecs: JSON, Triton's binary tensors and msgpack, decoded and encoded."""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np
import orjson
import pytest
import tritonclient.http as triton_http
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fastserve import _core
from fastserve.errors import InvalidRequest, UnsupportedMediaType
from fastserve.http import codecs
from fastserve.http.codecs import (
    HEADER_LENGTH,
    MAX_JSON_DEPTH,
    decode_request,
    encode_every_output_json,
    encode_response,
)
from fastserve.protocol import (
    DATATYPE_TO_NUMPY,
    InferenceRequest,
    InferenceResponse,
    OutputTensor,
    RequestedOutput,
    TensorSpec,
)

MAX_ELEMENTS = 1 << 20
SECRET = "S3CRET-PAYLOAD"
MAX_MESSAGE = 200

# ---------------------------------------------------------------------------------------
# Helpers: one request document, sent three ways
# ---------------------------------------------------------------------------------------


def tensor(
    data: Any = None, *, name: str = "x", shape: Any = (1, 3), datatype: str = "FP32"
) -> dict[str, Any]:
    obj: dict[str, Any] = {"name": name, "datatype": datatype}
    obj["shape"] = list(shape) if isinstance(shape, tuple) else shape
    obj["data"] = [1.0, 2.0, 3.0] if data is None else data
    return obj


def doc_of(*inputs: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"inputs": list(inputs), **extra}


def decode_json(doc: Any, content_type: str | None = "application/json") -> InferenceRequest:
    return decode_request(orjson.dumps(doc), content_type, None, max_elements=MAX_ELEMENTS)


def decode_msgpack(doc: Any) -> InferenceRequest:
    body = msgpack.packb(doc)
    return decode_request(body, "application/msgpack", None, max_elements=MAX_ELEMENTS)


def binary_body(header: Any, *chunks: bytes) -> tuple[bytes, str]:
    head = orjson.dumps(header)
    return head + b"".join(chunks), str(len(head))


def decode_binary(header: Any, *chunks: bytes, content_type: str | None = None) -> InferenceRequest:
    body, length = binary_body(header, *chunks)
    return decode_request(body, content_type, length, max_elements=MAX_ELEMENTS)


def as_binary(doc: dict[str, Any]) -> tuple[dict[str, Any], list[bytes]]:
    """The same request with every input's data moved after the JSON header."""
    chunks = []
    inputs = []
    for original in doc["inputs"]:
        obj = dict(original)
        dt = obj["datatype"]
        data = obj.pop("data")
        if dt == "BYTES":
            flat = np.array(data, dtype=object).reshape(-1)
            raw = b"".join(struct.pack("<I", len(s.encode())) + s.encode() for s in flat)
        else:
            raw = np.array(data, dtype=DATATYPE_TO_NUMPY[dt].newbyteorder("<")).tobytes()
        obj["parameters"] = {"binary_data_size": len(raw)}
        inputs.append(obj)
        chunks.append(raw)
    return {**doc, "inputs": inputs}, chunks


def as_msgpack_raw(doc: dict[str, Any]) -> dict[str, Any]:
    """The same request with every fixed-width input's data as raw little-endian bytes."""
    inputs = []
    for original in doc["inputs"]:
        obj = dict(original)
        dt = obj["datatype"]
        if dt != "BYTES":
            dtype = DATATYPE_TO_NUMPY[dt].newbyteorder("<")
            obj["data"] = np.array(obj["data"], dtype=dtype).tobytes()
        inputs.append(obj)
    return {**doc, "inputs": inputs}


Decoder = Callable[[dict[str, Any]], InferenceRequest]


def via_json(doc: dict[str, Any]) -> InferenceRequest:
    return decode_json(doc)


def via_binary(doc: dict[str, Any]) -> InferenceRequest:
    header, chunks = as_binary(doc)
    return decode_binary(header, *chunks)


def via_msgpack(doc: dict[str, Any]) -> InferenceRequest:
    return decode_msgpack(doc)


def via_msgpack_raw(doc: dict[str, Any]) -> InferenceRequest:
    return decode_msgpack(as_msgpack_raw(doc))


ALL_WAYS = pytest.mark.parametrize(
    "decode",
    [via_json, via_binary, via_msgpack, via_msgpack_raw],
    ids=["json", "binary", "msgpack", "msgpack-raw"],
)
DOC_WAYS = pytest.mark.parametrize(
    "decode", [via_json, via_msgpack], ids=["json", "msgpack"]
)  # for faults in the document itself, before any data is read


def check_message(exc: Exception, *words: str) -> str:
    message = str(exc)
    assert 0 < len(message) <= MAX_MESSAGE, message
    assert SECRET not in message
    for word in words:
        assert word.lower() in message.lower(), message
    return message


def invalid(call: Callable[[], object], *words: str) -> str:
    with pytest.raises(InvalidRequest) as info:
        call()
    return check_message(info.value, *words)


# ---------------------------------------------------------------------------------------
# Round trips of every datatype
# ---------------------------------------------------------------------------------------

VALUES: dict[str, list[Any]] = {
    "BOOL": [True, False, True, True, False, False],
    "UINT8": [0, 1, 2, 127, 128, 255],
    "UINT16": [0, 1, 2, 3, 1000, 65535],
    "UINT32": [0, 1, 2, 3, 4, 2**32 - 1],
    "UINT64": [0, 1, 2, 3, 2**63, 2**64 - 1],
    "INT8": [-128, -1, 0, 1, 2, 127],
    "INT16": [-32768, -1, 0, 1, 2, 32767],
    "INT32": [-(2**31), -1, 0, 1, 2, 2**31 - 1],
    "INT64": [-(2**63), -1, 0, 1, 2, 2**63 - 1],
    "FP16": [-65504.0, -1.5, 0.0, 0.5, 1.0, 65504.0],
    "FP32": [-3.4e38, -1.5, 0.0, 1e-30, 0.1, 3.4e38],
    "FP64": [-1.7e308, -1.5, 0.0, 5e-324, 0.1, 1.7e308],
    "BYTES": ["", "a", "héllo", "\x00nul\x00", "日本", "x" * 50],
}


def expected_array(datatype: str, values: list[Any], shape: tuple[int, ...]) -> np.ndarray:
    if datatype == "BYTES":
        return np.array([v.encode() for v in values], dtype=object).reshape(shape)
    return np.array(values, dtype=DATATYPE_TO_NUMPY[datatype]).reshape(shape)


@ALL_WAYS
@pytest.mark.parametrize("datatype", sorted(VALUES))
@pytest.mark.parametrize("nested", [False, True], ids=["flat", "nested"])
def test_every_datatype_decodes(decode: Decoder, datatype: str, nested: bool) -> None:
    values = VALUES[datatype]
    data = [values[:3], values[3:]] if nested else values
    request = decode(doc_of(tensor(data, shape=(2, 3), datatype=datatype)))
    (got,) = request.inputs
    want = expected_array(datatype, values, (2, 3))
    assert got.name == "x"
    assert got.datatype == datatype
    assert got.shape == (2, 3)
    assert got.data.shape == (2, 3)
    assert got.data.dtype == want.dtype
    assert got.data.tolist() == want.tolist()


def test_json_request_fields() -> None:
    request = decode_json(
        doc_of(
            tensor(name="a"),
            tensor([[1]], name="b", shape=(1, 1), datatype="INT64"),
            id="req-1",
            parameters={"binary_data_output": True, "priority": 1},
            outputs=[{"name": "y", "parameters": {"binary_data": False}}, {"name": "z"}],
        )
    )
    assert [t.name for t in request.inputs] == ["a", "b"]
    assert request.id == "req-1"
    assert request.binary_output is True
    assert request.parameters["priority"] == 1
    assert request.outputs == [
        RequestedOutput("y", binary=False, parameters={"binary_data": False}),
        RequestedOutput("z", binary=None, parameters={}),
    ]


@pytest.mark.parametrize("content_type", [None, "", "application/json; charset=utf-8"])
def test_json_content_types(content_type: str | None) -> None:
    request = decode_json(doc_of(tensor()), content_type=content_type)
    assert request.inputs[0].data.tolist() == [[1.0, 2.0, 3.0]]


@pytest.mark.parametrize("content_type", ["application/msgpack", "application/x-msgpack"])
def test_msgpack_content_types(content_type: str) -> None:
    body = msgpack.packb(doc_of(tensor()))
    request = decode_request(body, content_type, None, max_elements=MAX_ELEMENTS)
    assert request.inputs[0].data.tolist() == [[1.0, 2.0, 3.0]]


def test_empty_outputs_list_means_all() -> None:
    assert decode_json(doc_of(tensor(), outputs=[])).outputs is None
    assert decode_json(doc_of(tensor())).outputs is None


def test_ints_and_bools_are_fine_for_floats() -> None:
    (got,) = decode_json(doc_of(tensor([1, True, 2.5]))).inputs
    assert got.data.dtype == np.float32
    assert got.data.tolist() == [[1.0, 1.0, 2.5]]
    (got,) = decode_json(doc_of(tensor([70000, 1, 2], datatype="FP32"))).inputs
    assert got.data.tolist() == [[70000.0, 1.0, 2.0]]


def test_bools_are_fine_for_ints() -> None:
    (got,) = decode_json(doc_of(tensor([True, False, 3], datatype="UINT8"))).inputs
    assert got.data.tolist() == [[1, 0, 3]]


def test_empty_tensor() -> None:
    for datatype in VALUES:
        (got,) = decode_json(doc_of(tensor([], shape=(0, 3), datatype=datatype))).inputs
        assert got.data.shape == (0, 3)
        assert got.data.dtype == DATATYPE_TO_NUMPY[datatype]


def test_scalar_shape() -> None:
    (got,) = decode_json(doc_of(tensor([7], shape=(), datatype="INT32"))).inputs
    assert got.data.shape == ()
    assert int(got.data) == 7


@pytest.mark.parametrize("binary", [False, True])
def test_requests_built_by_tritonclient(binary: bool) -> None:
    arrays = {
        "f": ("FP32", np.arange(6, dtype=np.float32).reshape(2, 3) / 4),
        "h": ("FP16", np.array([[0.5, -2.0]], dtype=np.float16)),
        "i": ("INT64", np.array([[-(2**40), 7]], dtype=np.int64)),
        "u": ("UINT8", np.array([[0, 255]], dtype=np.uint8)),
        "b": ("BOOL", np.array([[True, False]])),
        "s": ("BYTES", np.array([["héllo".encode(), b"x"]], dtype=object)),
    }
    inputs = []
    for name, (datatype, array) in arrays.items():
        infer_input = triton_http.InferInput(name, list(array.shape), datatype)
        infer_input.set_data_from_numpy(array, binary_data=binary)
        inputs.append(infer_input)
    outputs = [triton_http.InferRequestedOutput("y", binary_data=not binary)]
    body, json_size = triton_http.InferenceServerClient.generate_request_body(
        inputs, outputs=outputs, request_id="t-1", priority=2
    )
    length = None if json_size is None else str(json_size)
    request = decode_request(body, None, length, max_elements=MAX_ELEMENTS)
    assert request.id == "t-1"
    assert request.parameters == {"priority": 2}
    assert request.outputs == [
        RequestedOutput("y", binary=not binary, parameters={"binary_data": not binary})
    ]
    for got in request.inputs:
        datatype, array = arrays[got.name]
        assert got.datatype == datatype
        assert got.data.dtype == array.dtype
        assert got.data.tolist() == array.tolist()


def test_binary_inputs_are_zero_copy_views() -> None:
    raw = np.arange(6, dtype="<f4").tobytes()
    header = doc_of(
        {"name": "x", "shape": [2, 3], "datatype": "FP32", "parameters": {"binary_data_size": 24}}
    )
    body, length = binary_body(header, raw)
    (got,) = decode_request(body, None, length, max_elements=MAX_ELEMENTS).inputs
    assert got.data.tolist() == [[0, 1, 2], [3, 4, 5]]
    assert not got.data.flags.owndata
    assert not got.data.flags.writeable
    assert got.parameters == {"binary_data_size": 24}


def test_binary_mixes_json_and_binary_inputs() -> None:
    header = doc_of(
        tensor(name="a"),
        {"name": "b", "shape": [2], "datatype": "INT16", "parameters": {"binary_data_size": 4}},
        {"name": "c", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 7}},
    )
    request = decode_binary(
        header, np.array([5, -6], "<i2").tobytes(), struct.pack("<I", 3) + b"\xff\x00z"
    )
    a, b, c = request.inputs
    assert a.data.tolist() == [[1.0, 2.0, 3.0]]
    assert b.data.tolist() == [5, -6]
    assert c.data.tolist() == [b"\xff\x00z"]  # BYTES are bytes: UTF-8 not required


@pytest.mark.parametrize("content_type", [None, "application/octet-stream", "application/json"])
def test_binary_content_types(content_type: str | None) -> None:
    header, chunks = as_binary(doc_of(tensor()))
    (got,) = decode_binary(header, *chunks, content_type=content_type).inputs
    assert got.data.tolist() == [[1.0, 2.0, 3.0]]


def test_binary_header_without_binary_inputs() -> None:
    (got,) = decode_binary(doc_of(tensor())).inputs
    assert got.data.tolist() == [[1.0, 2.0, 3.0]]


def test_binary_bool_normalises_nonzero_bytes() -> None:
    header = doc_of(
        {"name": "x", "shape": [3], "datatype": "BOOL", "parameters": {"binary_data_size": 3}}
    )
    (got,) = decode_binary(header, b"\x00\x01\x07").inputs
    assert got.data.dtype == np.bool_
    assert got.data.tolist() == [False, True, True]


def test_msgpack_raw_data_is_zero_copy() -> None:
    raw = np.arange(6, dtype="<i8").tobytes()
    (got,) = decode_msgpack(doc_of(tensor(raw, shape=(3, 2), datatype="INT64"))).inputs
    assert got.data.tolist() == [[0, 1], [2, 3], [4, 5]]
    assert not got.data.flags.owndata


def test_msgpack_bytes_accepts_bin_elements_and_raw_serialized_data() -> None:
    (got,) = decode_msgpack(doc_of(tensor([b"\xff", "ok"], shape=(2,), datatype="BYTES"))).inputs
    assert got.data.tolist() == [b"\xff", b"ok"]
    raw = struct.pack("<I", 1) + b"\xfe" + struct.pack("<I", 0)
    (got,) = decode_msgpack(doc_of(tensor(raw, shape=(2,), datatype="BYTES"))).inputs
    assert got.data.tolist() == [b"\xfe", b""]


def test_msgpack_accepts_nan_and_inf_floats() -> None:
    # msgpack floats are IEEE values; only JSON lacks NaN/Infinity literals.
    (got,) = decode_msgpack(doc_of(tensor([float("nan"), float("inf"), 1.0]))).inputs
    assert np.isnan(got.data[0, 0])
    assert np.isinf(got.data[0, 1])


# The native conversion of plain float data (``_core.numbers_from_list``) must decode every
# list exactly as numpy and the checks do, or decline it (None) and leave it to them.
_ELEMENTS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=-1e6, max_value=1e6),
    st.floats(min_value=3.4e38, max_value=3.5e38),  # around FP32's largest value
    st.integers(-(2**70), 2**70),
    st.integers(-(2**53) - 2, -(2**53) + 2) | st.integers(2**53 - 2, 2**53 + 2),
    st.booleans(),
    st.sampled_from([None, "1.5", [1.0]]),
)


def _plain_and_native(
    monkeypatch: pytest.MonkeyPatch, data: Any, shape: tuple[int, ...], datatype: str, fmt: str
) -> tuple[Any, Any] | None:
    """What the decoder makes of ``data`` with and without the native conversion; None when
    ``fmt`` cannot carry it (msgpack has no integers beyond 64 bits)."""
    doc = doc_of(tensor(data, shape=shape, datatype=datatype))
    # (the standard library's json: orjson does not write ints beyond 64 bits)
    try:
        body = msgpack.packb(doc) if fmt == "msgpack" else json.dumps(doc).encode()
    except OverflowError:
        return None
    content_type = f"application/{fmt}"

    def outcome() -> Any:
        try:
            (got,) = decode_request(body, content_type, None, max_elements=MAX_ELEMENTS).inputs
        except InvalidRequest as exc:
            return str(exc)
        return got.data

    native = outcome()
    with monkeypatch.context() as patch:
        patch.setattr(codecs, "_NATIVE_FLOATS", frozenset())
        plain = outcome()
    return plain, native


def _same(plain: Any, native: Any) -> None:
    if isinstance(plain, str):
        assert native == plain
        return
    assert isinstance(native, np.ndarray)
    assert (native.dtype, native.shape) == (plain.dtype, plain.shape)
    assert native.tobytes() == plain.tobytes()  # bit for bit, NaN included
    assert native.flags.c_contiguous and native.flags.writeable


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow,
          HealthCheck.function_scoped_fixture])  # fmt: skip
@given(
    rows=st.integers(1, 4),
    width=st.integers(1, 5),
    nested=st.booleans(),
    datatype=st.sampled_from(["FP32", "FP64"]),
    fmt=st.sampled_from(["json", "msgpack"]),
    draw=st.data(),
)
def test_native_float_lists_decode_as_numpy_does(
    monkeypatch: pytest.MonkeyPatch,
    rows: int,
    width: int,
    nested: bool,
    datatype: str,
    fmt: str,
    draw: st.DataObject,
) -> None:
    plain_only = draw.draw(st.booleans())
    elements = st.floats(-1e30, 1e30) | st.integers(-1000, 1000) if plain_only else _ELEMENTS
    flat = draw.draw(st.lists(elements, min_size=rows * width, max_size=rows * width))
    if fmt == "json":  # JSON has no NaN or infinity literals
        flat = [x if not (isinstance(x, float) and not math.isfinite(x)) else 0.5 for x in flat]
    data = [flat[r * width : (r + 1) * width] for r in range(rows)] if nested else flat
    both = _plain_and_native(monkeypatch, data, (rows, width), datatype, fmt)
    assume(both is not None)
    assert both is not None
    _same(*both)


_EDGE_CASES = [
    ([1.5, 2.5, 3.5], (1, 3)),  # flat
    ([[1.5, 2.5, 3.5]], (1, 3)),  # nested
    ([[1.5], [2.5], [3.5]], (3, 1)),
    ([[[1.0, 2.0]], [[3.0, 4.0]]], (2, 1, 2)),
    ([7.25], ()),  # a scalar
    ([[1.0, 2.0], [3.0]], (2, 2)),  # ragged
    ([[1.0, 2.0], 3.0], (2, 1)),  # mixed nesting
    ([1.0, 2.0], (2, 2)),  # too short
    ([[1.0, 2.0, 3.0]], (3, 1)),  # nested along other dims
    ([1, True, 2.5], (1, 3)),  # a bool: numpy's way
    ([2**53 + 1, 1.0, 2.0], (1, 3)),  # an int a double cannot hold
    ([2**64, 1.0, 2.0], (1, 3)),  # beyond int64
    ([3.5e38, 1.0, 2.0], (1, 3)),  # beyond FP32
    ([3.4028235e38, -3.4028235e38, 0.0], (1, 3)),  # FP32's largest
    ([1.0, None, 2.0], (1, 3)),
    ([1.0, "2.0", 3.0], (1, 3)),
]


@pytest.mark.parametrize(
    ("data", "shape", "fmt"),
    [
        (data, shape, fmt)
        for data, shape in _EDGE_CASES
        for fmt in ("json", "msgpack")
        if fmt == "json" or not any(type(x) is int and abs(x) >= 2**63 for x in data)
    ],
)  # (msgpack has no integers beyond 64 bits)
@pytest.mark.parametrize("datatype", ["FP32", "FP64"])
def test_native_float_lists_edge_cases(
    monkeypatch: pytest.MonkeyPatch, data: Any, shape: tuple[int, ...], datatype: str, fmt: str
) -> None:
    both = _plain_and_native(monkeypatch, data, shape, datatype, fmt)
    assert both is not None
    _same(*both)


def test_native_float_lists_take_the_common_case() -> None:
    """Plain numbers are converted natively (not declined), flat and nested alike."""
    for data, shape in (([1.5, 2, -3.0], (1, 3)), ([[1.5], [2], [-3.0]], (3, 1))):
        got = _core.numbers_from_list(data, shape, "FP32")
        assert got is not None and got.dtype == np.float32 and got.shape == shape
        assert got.ravel().tolist() == [1.5, 2.0, -3.0]
    assert _core.numbers_from_list([1.0, True], (2,), "FP32") is None
    assert _core.numbers_from_list([1e39], (1,), "FP32") is None
    assert _core.numbers_from_list([float("nan")], (1,), "FP64") is None
    with pytest.raises(ValueError, match="FP32 or FP64"):
        _core.numbers_from_list([1.0], (1,), "INT32")


def test_unknown_fields_are_ignored() -> None:
    doc = doc_of(tensor(), extra={"deep": [[[1]]]})
    doc["inputs"][0]["comment"] = "hello"
    assert decode_json(doc).inputs[0].data.shape == (1, 3)


# ---------------------------------------------------------------------------------------
# Malformed requests (RELIABILITY.md), each over every encoding that can carry it
# ---------------------------------------------------------------------------------------


def test_empty_body() -> None:
    for content_type in (None, "application/json", "application/msgpack"):
        invalid(lambda ct=content_type: decode_request(b"", ct, None, max_elements=10), "empty")
    invalid(lambda: decode_request(b"", None, "0", max_elements=10), HEADER_LENGTH)


@pytest.mark.parametrize("cut", [1, 10, 30, -1])
def test_truncated_json(cut: int) -> None:
    body = orjson.dumps(doc_of(tensor([SECRET], datatype="BYTES", shape=(1,))))
    invalid(lambda: decode_request(body[:cut], None, None, max_elements=10), "JSON")


def test_truncated_binary_header() -> None:
    header, chunks = as_binary(doc_of(tensor()))
    body, length = binary_body(header, *chunks)
    cut = body[: int(length) - 5]
    invalid(lambda: decode_request(cut, None, str(len(cut)), max_elements=10), "JSON")


@pytest.mark.parametrize("cut", [1, 5, 20, -1])
def test_truncated_msgpack(cut: int) -> None:
    body = msgpack.packb(doc_of(tensor()))
    invalid(lambda: decode_request(body[:cut], "application/msgpack", None, max_elements=10))


@DOC_WAYS
@pytest.mark.parametrize("top", [[], 1, "inputs", None, True, [doc_of(tensor())]])
def test_top_level_not_an_object(decode: Decoder, top: Any) -> None:
    invalid(lambda: decode(top), "object")


@DOC_WAYS
def test_no_inputs(decode: Decoder) -> None:
    invalid(lambda: decode({"id": "1"}), "inputs")
    invalid(lambda: decode({"inputs": None}), "inputs")


@DOC_WAYS
@pytest.mark.parametrize("inputs", [[], {}, "x", 1, {"name": "x"}])
def test_inputs_not_a_list_or_empty(decode: Decoder, inputs: Any) -> None:
    invalid(lambda: decode({"inputs": inputs}), "inputs")


@DOC_WAYS
@pytest.mark.parametrize("item", [1, "x", None, [tensor()]])
def test_input_not_an_object(decode: Decoder, item: Any) -> None:
    invalid(lambda: decode({"inputs": [item]}), "inputs[0]")


@DOC_WAYS
@pytest.mark.parametrize("field", ["name", "shape", "datatype", "data"])
def test_input_missing_a_field(decode: Decoder, field: str) -> None:
    obj = tensor()
    del obj[field]
    invalid(lambda: decode(doc_of(obj)), field)


@DOC_WAYS
@pytest.mark.parametrize("name", ["", 1, None, ["x"], True])
def test_input_name_not_a_string(decode: Decoder, name: Any) -> None:
    invalid(lambda: decode(doc_of(tensor(name=name))), "name")


@DOC_WAYS
def test_input_name_too_long(decode: Decoder) -> None:
    invalid(lambda: decode(doc_of(tensor(name="n" * 10_000))), "name", "longer")


@ALL_WAYS
def test_duplicate_input_names(decode: Decoder) -> None:
    invalid(lambda: decode(doc_of(tensor(name="a"), tensor(name="a"))), "'a'", "twice")


@DOC_WAYS
@pytest.mark.parametrize("datatype", ["FLOAT", "fp32", "", "BF16", "STRING"])
def test_unknown_datatype(decode: Decoder, datatype: str) -> None:
    invalid(lambda: decode(doc_of(tensor(datatype=datatype))), "datatype")


@DOC_WAYS
@pytest.mark.parametrize("datatype", [1, None, ["FP32"]])
def test_datatype_not_a_string(decode: Decoder, datatype: Any) -> None:
    invalid(lambda: decode(doc_of(tensor(datatype=datatype))), "datatype")


@ALL_WAYS
@pytest.mark.parametrize("shape", [[-1, 3], [1, -3], [-1]])
def test_negative_dimension(decode: Decoder, shape: list[int]) -> None:
    invalid(lambda: decode(doc_of(tensor(shape=shape))), "shape", "non-negative")


@DOC_WAYS
@pytest.mark.parametrize(
    "shape", [[1.0, 3], [1, 3.5], ["1", 3], [True, 3], [None], [[1], 3], "1,3", 3, {"a": 1}]
)
def test_non_integer_dimension(decode: Decoder, shape: Any) -> None:
    invalid(lambda: decode(doc_of(tensor(shape=shape))), "shape")


def test_too_many_dimensions() -> None:
    invalid(lambda: decode_json(doc_of(tensor([1], shape=[1] * 65))), "shape", "dimensions")


@DOC_WAYS
@pytest.mark.parametrize(
    "shape",
    [
        [2**32, 2**32, 2**32],  # the product overflows 64 bits
        [2**62, 4],
        [2**63 - 1, 2**63 - 1],
        [MAX_ELEMENTS + 1],
        [1024, 1025],
        [0, 2**62, 2**62],  # no elements, but not a shape anything should address
    ],
)
def test_shape_too_large(decode: Decoder, shape: list[int]) -> None:
    invalid(lambda: decode(doc_of(tensor([], shape=shape))), "too large")


def test_json_shape_beyond_64_bits_is_not_an_integer() -> None:
    body = b'{"inputs":[{"name":"x","datatype":"FP32","shape":[18446744073709551616],"data":[]}]}'
    invalid(lambda: decode_request(body, None, None, max_elements=10), "shape")


def test_small_body_declaring_huge_shape_is_refused_before_allocating() -> None:
    # A binary request of a few bytes whose shape would need terabytes.
    header = doc_of(
        {
            "name": "x",
            "shape": [1 << 20, 1 << 20],
            "datatype": "FP64",
            "parameters": {"binary_data_size": 8},
        }
    )
    body, length = binary_body(header, b"\x00" * 8)
    with pytest.raises(InvalidRequest, match="too large"):
        decode_request(body, None, length, max_elements=1 << 30)
    raw_doc = doc_of(tensor(b"", shape=(1 << 40,), datatype="BYTES"))
    with pytest.raises(InvalidRequest, match="too large"):
        decode_request(msgpack.packb(raw_doc), "application/msgpack", None, max_elements=1 << 30)


def test_max_elements_is_per_input_and_inclusive() -> None:
    doc = doc_of(tensor([0] * 8, shape=(2, 4)))
    assert decode_request(orjson.dumps(doc), None, None, max_elements=8).inputs[0].data.size == 8
    invalid(lambda: decode_request(orjson.dumps(doc), None, None, max_elements=7), "too large")


@ALL_WAYS
@pytest.mark.parametrize(
    ("data", "shape"),
    [([1.0, 2.0], (1, 3)), ([1.0, 2.0, 3.0, 4.0], (1, 3)), ([], (1, 3)), ([1.0], (0,))],
)
def test_data_length_differs_from_shape(
    decode: Decoder, data: list[float], shape: tuple[int, ...]
) -> None:
    invalid(lambda: decode(doc_of(tensor(data, shape=shape))), "'x'")


@DOC_WAYS
@pytest.mark.parametrize(
    ("data", "shape"),
    [
        ([[1.0, 2.0], [3.0, 4.0]], (1, 4)),  # nested, but not as declared
        ([[1.0, 2.0, 3.0, 4.0]], (2, 2)),
        ([[[1.0], [2.0]]], (2, 1)),
        ([[1.0, 2.0]], (1, 3)),
    ],
)
def test_nested_data_must_match_shape(
    decode: Decoder, data: list[Any], shape: tuple[int, ...]
) -> None:
    invalid(lambda: decode(doc_of(tensor(data, shape=shape))), "shape")


@DOC_WAYS
@pytest.mark.parametrize("datatype", ["FP32", "INT32", "BOOL", "BYTES"])
def test_ragged_nested_arrays(decode: Decoder, datatype: str) -> None:
    filler: Any = {"BOOL": True, "BYTES": "s", "INT32": 1, "FP32": 1.0}[datatype]
    data = [[filler, filler], [filler]]
    invalid(lambda: decode(doc_of(tensor(data, shape=(2, 2), datatype=datatype))), "'x'")
    data = [[filler, filler], filler]
    invalid(lambda: decode(doc_of(tensor(data, shape=(2, 2), datatype=datatype))), "'x'")


@DOC_WAYS
@pytest.mark.parametrize(
    ("datatype", "data", "words"),
    [
        ("FP32", [1.0, SECRET, 3.0], ["numbers"]),
        ("FP32", ["1.5", "2", "3"], ["numbers"]),  # numpy would parse these: must not
        ("FP64", [1.0, None, 3.0], ["numbers"]),
        ("FP16", [1.0, {"v": 1}, 3.0], ["numbers"]),
        ("INT32", [1, 2.5, 3], ["integers"]),
        ("INT64", [1.0, 2.0, 3.0], ["integers"]),  # whole floats are still floats
        ("UINT8", ["1", "2", "3"], ["integers"]),
        ("INT8", [1, None, 3], ["integers"]),
        ("BOOL", [1, 0, 1], ["BOOL"]),
        ("BOOL", [True, 0, False], ["BOOL"]),
        ("BOOL", ["true", "false", "true"], ["BOOL"]),
        ("BYTES", [1, 2, 3], ["strings"]),
        ("BYTES", ["a", None, "c"], ["strings"]),
        ("BYTES", [["a"], ["b"], ["c"]], ["shape"]),
    ],
)
def test_wrong_element_types(
    decode: Decoder, datatype: str, data: list[Any], words: list[str]
) -> None:
    invalid(lambda: decode(doc_of(tensor(data, shape=(3,), datatype=datatype))), "'x'", *words)


@DOC_WAYS
@pytest.mark.parametrize(
    ("datatype", "value"),
    [
        ("FP32", 1e39),
        ("FP32", -1e39),
        ("FP16", 70000.0),
        ("FP16", 70000),
        ("UINT8", 300),
        ("UINT8", -1),
        ("INT8", 128),
        ("UINT16", 65536),
        ("INT16", -32769),
        ("UINT32", 2**32),
        ("INT32", 2**31),
        ("INT64", 2**63),
        ("UINT64", -1),
    ],
)
def test_numbers_beyond_the_types_range(decode: Decoder, datatype: str, value: float) -> None:
    doc = doc_of(tensor([0, value, 0], shape=(3,), datatype=datatype))
    invalid(lambda: decode(doc), "'x'", "range", datatype)


@pytest.mark.parametrize(
    "literal", [b"NaN", b"Infinity", b"-Infinity", b"nan", b"inf", b"1e400", b"-1e400"]
)
def test_json_non_finite_literals(literal: bytes) -> None:
    body = b'{"inputs":[{"name":"x","shape":[2],"datatype":"FP64","data":[1.0,' + literal + b"]}]}"
    invalid(lambda: decode_request(body, None, None, max_elements=10), "JSON")


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 5_000, 400_000])
@pytest.mark.parametrize("where", ["data", "parameters", "extra", "top"])
def test_json_deeply_nested(depth: int, where: str) -> None:
    deep = b"[" * depth + b"]" * depth
    bodies = {
        "data": b'{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":' + deep + b"}]}",
        "parameters": b'{"inputs":[],"parameters":{"p":' + deep + b"}}",
        "extra": b'{"x":' + deep + b',"inputs":[]}',
        "top": deep,
    }
    body = bodies[where]
    invalid(lambda: decode_request(body, None, None, max_elements=10), "nested")
    header_length = str(len(body))
    invalid(lambda: decode_request(body, None, header_length, max_elements=10), "nested")


def test_json_deep_objects_and_brackets_inside_strings() -> None:
    deep = b'{"a":' * 5000 + b"1" + b"}" * 5000
    invalid(lambda: decode_request(deep, None, None, max_elements=10), "nested")
    # Closing brackets inside a string must not hide real nesting after it...
    sneaky = b'{"s":"' + b"]" * 5000 + b'","x":' + b"[" * 5000 + b"]" * 5000 + b"}"
    invalid(lambda: decode_request(sneaky, None, None, max_elements=10), "nested")
    # ...nor may escaped quotes end the string early.
    sneaky = b'{"s":"\\"' + b"]" * 5000 + b'","x":' + b"[" * 5000 + b"]" * 5000 + b"}"
    invalid(lambda: decode_request(sneaky, None, None, max_elements=10), "nested")


@pytest.mark.parametrize("depth", [70, 300, MAX_JSON_DEPTH - 10])
def test_json_nested_within_the_parser_limit(depth: int) -> None:
    deep = b"[" * depth + b"1.0" + b"]" * depth
    data = b'{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":' + deep + b"}]}"
    invalid(lambda: decode_request(data, None, None, max_elements=10), "'x'", "nested deeper")
    data = data.replace(b'"FP32"', b'"BYTES"').replace(b"1.0", b'"s"')
    invalid(lambda: decode_request(data, None, None, max_elements=10), "'x'")
    params = b'{"inputs":[],"parameters":{"p":' + deep + b"}}"
    invalid(lambda: decode_request(params, None, None, max_elements=10), "nested too deeply")
    # Nesting in fields nobody reads is harmless.
    extra = orjson.dumps(doc_of(tensor()))[:-1] + b',"extra":' + deep + b"}"
    assert decode_request(extra, None, None, max_elements=10).inputs[0].name == "x"


def test_json_brackets_in_strings_are_not_nesting() -> None:
    doc = doc_of(tensor(), parameters={"note": "[" * 5000 + '\\"{' * 300 + "\\\\"})
    assert decode_json(doc).parameters["note"].startswith("[[[")
    ids = [f"[{i}]" for i in range(300)]
    assert decode_json(doc_of(tensor(ids, shape=(300,), datatype="BYTES"))).inputs[0].data.size


def test_json_many_rows_is_not_deep() -> None:
    rows = [[float(i), 0.0, 1.0] for i in range(1000)]
    (got,) = decode_json(doc_of(tensor(rows, shape=(1000, 3)))).inputs
    assert got.data.shape == (1000, 3)


def test_msgpack_deeply_nested() -> None:
    for depth in (200, 1100, 100_000):
        body = b"\x81\xa6inputs" + b"\x91" * depth + b"\xc0"
        invalid(lambda b=body: decode_request(b, "application/msgpack", None, max_elements=10))
        data = msgpack.packb(doc_of(tensor([1.0])))
        # the same depth inside data
        body = data.replace(b"\x91\xcb", b"\x91" * depth + b"\xcb", 1)
        invalid(lambda b=body: decode_request(b, "application/msgpack", None, max_elements=10))


@pytest.mark.parametrize("bad", [b'"\xff"', b'"\xc3"', b'"\\ud800"', b'"\xed\xa0\x80"'])
def test_json_bytes_with_invalid_utf8(bad: bytes) -> None:
    body = b'{"inputs":[{"name":"x","shape":[1],"datatype":"BYTES","data":[' + bad + b"]}]}"
    invalid(lambda: decode_request(body, None, None, max_elements=10), "invalid JSON")


def test_msgpack_bytes_with_invalid_utf8_string() -> None:
    body = msgpack.packb(doc_of(tensor(["PLACEHOLDER"], shape=(1,), datatype="BYTES")))
    body = body.replace(b"\xabPLACEHOLDER", b"\xab\xff" + b"A" * 10)
    invalid(lambda: decode_request(body, "application/msgpack", None, max_elements=10), "UTF-8")


@ALL_WAYS
def test_duplicated_requested_output(decode: Decoder) -> None:
    doc = doc_of(tensor(), outputs=[{"name": "y"}, {"name": "y"}])
    invalid(lambda: decode(doc), "'y'", "twice")


@DOC_WAYS
@pytest.mark.parametrize(
    "outputs",
    [{"name": "y"}, "y", [1], [{"name": 1}], [{}], [{"name": "y", "parameters": []}]],
)
def test_malformed_outputs(decode: Decoder, outputs: Any) -> None:
    invalid(lambda: decode(doc_of(tensor(), outputs=outputs)), "output")


@DOC_WAYS
@pytest.mark.parametrize("binary", [1, "true", 0.0, [True]])
def test_output_binary_data_must_be_bool(decode: Decoder, binary: Any) -> None:
    doc = doc_of(tensor(), outputs=[{"name": "y", "parameters": {"binary_data": binary}}])
    invalid(lambda: decode(doc), "binary_data")


@DOC_WAYS
@pytest.mark.parametrize("parameters", [[], "p", 1, True, [["a", 1]]])
def test_non_object_parameters(decode: Decoder, parameters: Any) -> None:
    invalid(lambda: decode(doc_of(tensor(), parameters=parameters)), "parameters")
    obj = tensor()
    obj["parameters"] = parameters
    invalid(lambda: decode(doc_of(obj)), "parameters", "'x'")


@DOC_WAYS
def test_binary_data_output_must_be_bool(decode: Decoder) -> None:
    doc = doc_of(tensor(), parameters={"binary_data_output": "yes"})
    invalid(lambda: decode(doc), "binary_data_output")


@DOC_WAYS
@pytest.mark.parametrize("request_id", ["i" * 257, "i" * 1_000_000, 12, ["a"], True])
def test_bad_or_huge_id(decode: Decoder, request_id: Any) -> None:
    invalid(lambda: decode(doc_of(tensor(), id=request_id)), "'id'")


def test_id_at_the_limit() -> None:
    assert decode_json(doc_of(tensor(), id="i" * 256)).id == "i" * 256


@pytest.mark.parametrize(
    "content_type",
    [
        "text/plain",
        "application/xml",
        "multipart/form-data; boundary=x",
        "application/jsonx",
        "*/*",
    ],
)
def test_unsupported_content_type(content_type: str) -> None:
    body = orjson.dumps(doc_of(tensor()))
    with pytest.raises(UnsupportedMediaType) as info:
        decode_request(body, content_type, None, max_elements=10)
    check_message(info.value, "Content-Type")


def test_octet_stream_without_header_length() -> None:
    body = orjson.dumps(doc_of(tensor()))
    with pytest.raises(UnsupportedMediaType) as info:
        decode_request(body, "application/octet-stream", None, max_elements=10)
    check_message(info.value, HEADER_LENGTH)


def test_header_length_with_msgpack() -> None:
    body = msgpack.packb(doc_of(tensor()))
    invalid(
        lambda: decode_request(body, "application/msgpack", "3", max_elements=10), HEADER_LENGTH
    )


@pytest.mark.parametrize(
    "length", ["-1", "0", "", "abc", "1e3", "0x10", "+5", "٣", "1" * 30, "999999", "9" * 20]
)
def test_bad_header_length(length: str) -> None:
    header, chunks = as_binary(doc_of(tensor()))
    body, _ = binary_body(header, *chunks)
    invalid(lambda: decode_request(body, None, length, max_elements=10), HEADER_LENGTH)


def test_header_length_not_at_the_json_end() -> None:
    header, chunks = as_binary(doc_of(tensor()))
    body, length = binary_body(header, *chunks)
    for wrong in (int(length) - 1, int(length) + 1, len(body)):
        invalid(lambda w=wrong: decode_request(body, None, str(w), max_elements=10))


def binary_input(size: Any, *, shape: Any = (1, 3), datatype: str = "FP32") -> dict[str, Any]:
    return {
        "name": "x",
        "shape": list(shape),
        "datatype": datatype,
        "parameters": {"binary_data_size": size},
    }


@pytest.mark.parametrize(
    ("size", "raw", "words"),
    [
        (12, b"\x00" * 11, ["past the end"]),  # fewer bytes than declared
        (12, b"\x00" * 13, ["add up"]),  # bytes left over
        (8, b"\x00" * 8, ["needs 12"]),  # sizes add up, but not to the shape
        (16, b"\x00" * 16, ["needs 12"]),
        (-12, b"\x00" * 12, ["binary_data_size"]),
        (12.0, b"\x00" * 12, ["binary_data_size"]),
        ("12", b"\x00" * 12, ["binary_data_size"]),
        (True, b"\x00", ["binary_data_size"]),
    ],
)
def test_binary_sizes_that_do_not_add_up(size: Any, raw: bytes, words: list[str]) -> None:
    invalid(lambda: decode_binary(doc_of(binary_input(size)), raw), *words)


def test_binary_trailing_bytes_without_binary_inputs() -> None:
    invalid(lambda: decode_binary(doc_of(tensor()), b"\x00" * 4), "add up")


def test_binary_two_inputs_misaligned() -> None:
    a = binary_input(12) | {"name": "a"}
    b = binary_input(12) | {"name": "b"}
    invalid(lambda: decode_binary(doc_of(a, b), b"\x00" * 20), "'b'", "past the end")


def test_binary_data_size_without_header() -> None:
    invalid(lambda: decode_json(doc_of(binary_input(12))), HEADER_LENGTH)
    invalid(lambda: decode_msgpack(doc_of(binary_input(12))), HEADER_LENGTH)


def test_binary_data_and_binary_data_size_together() -> None:
    obj = binary_input(12) | {"data": [1.0, 2.0, 3.0]}
    invalid(lambda: decode_binary(doc_of(obj), b"\x00" * 12), "both")


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        (struct.pack("<I", 1) + b"a" + struct.pack("<I", 5) + b"ab", ["element 1"]),
        (struct.pack("<I", 1) + b"a" + b"\x01\x00\x00", ["element 1"]),
        (struct.pack("<I", 1) + b"a" + struct.pack("<I", 1) + b"b" + b"zz", ["after"]),
        (struct.pack("<I", 1) + b"a", ["too short"]),  # one element of two
        (struct.pack("<I", 2**32 - 1) + b"abcd", ["element 0"]),
    ],
)
def test_binary_bytes_malformed(raw: bytes, words: list[str]) -> None:
    obj = binary_input(len(raw), shape=(2,), datatype="BYTES")
    invalid(lambda: decode_binary(doc_of(obj), raw), "'x'", *words)
    # The same serialization as raw msgpack data.
    invalid(lambda: decode_msgpack(doc_of(tensor(raw, shape=(2,), datatype="BYTES"))), "'x'")


def test_msgpack_raw_data_wrong_length() -> None:
    raw = np.zeros(2, "<f4").tobytes()
    invalid(lambda: decode_msgpack(doc_of(tensor(raw, shape=(1, 3)))), "'x'", "needs 12")


@pytest.mark.parametrize("data", [{"a": 1}, "abc", 1.5, True])
def test_data_of_the_wrong_kind(data: Any) -> None:
    invalid(lambda: decode_json(doc_of(tensor(data))), "'x'", "'data'")
    invalid(lambda: decode_msgpack(doc_of(tensor(data))), "'x'", "'data'")


def test_json_data_cannot_be_raw_bytes_text() -> None:
    invalid(lambda: decode_json(doc_of(tensor("AAAA"))), "'data' must be a list")


@pytest.mark.parametrize(
    "body",
    [
        b"\xdd\xff\xff\xff\xff",  # array32 claiming 2**32-1 items
        b"\xdf\xff\xff\xff\xff",  # map32 claiming 2**32-1 pairs
        b"\x81\xa6inputs\xdd\xff\xff\xff\xff\xc0",
        b"\x81\xa6inputs\xc6\xff\xff\xff\xffabc",  # bin32 claiming 4 GiB
        b"\x81\xa6inputs\xdb\xff\xff\xff\xffabc",  # str32 claiming 4 GiB
    ],
)
def test_msgpack_huge_claimed_lengths(body: bytes) -> None:
    invalid(lambda: decode_request(body, "application/msgpack", None, max_elements=10))


@pytest.mark.parametrize(
    "ext",
    [
        msgpack.ExtType(5, b"\x00"),
        msgpack.ExtType(42, b"x" * 300),
        msgpack.Timestamp(0, 0),  # ext type -1, which msgpack decodes by itself
    ],
)
@pytest.mark.parametrize("where", ["top", "data", "parameters", "input_parameters", "shape", "id"])
def test_msgpack_extension_types(ext: Any, where: str) -> None:
    obj = tensor()
    doc = doc_of(obj)
    if where == "top":
        doc = ext
    elif where == "data":
        obj["data"] = [1.0, ext, 2.0]
    elif where == "parameters":
        doc["parameters"] = {"p": [1, {"q": ext}]}
    elif where == "input_parameters":
        obj["parameters"] = {"p": ext}
    elif where == "shape":
        obj["shape"] = [1, ext]
    else:
        doc["id"] = ext
    body = msgpack.packb(doc)
    invalid(lambda: decode_request(body, "application/msgpack", None, max_elements=10))


@pytest.mark.parametrize("where", ["top", "input", "output", "parameters"])
@pytest.mark.parametrize("key", [1, b"name", 1.5, None])
def test_msgpack_non_string_keys(where: str, key: Any) -> None:
    obj = tensor()
    doc: dict[Any, Any] = doc_of(obj, outputs=[{"name": "y"}], parameters={"a": {"b": 1}})
    target = {
        "top": doc,
        "input": obj,
        "output": doc["outputs"][0],
        "parameters": doc["parameters"]["a"],
    }[where]
    target[key] = 1
    body = msgpack.packb(doc)
    invalid(lambda: decode_request(body, "application/msgpack", None, max_elements=10))


def test_msgpack_extra_data() -> None:
    body = msgpack.packb(doc_of(tensor())) + b"\x00"
    invalid(lambda: decode_request(body, "application/msgpack", None, max_elements=10), "extra")


def test_msgpack_deep_parameters() -> None:
    value: Any = 1
    for _ in range(50):
        value = [value]
    invalid(lambda: decode_msgpack(doc_of(tensor(), parameters={"p": value})), "nested")


# ---------------------------------------------------------------------------------------
# Fuzz: whatever arrives, only InvalidRequest or UnsupportedMediaType come out
# ---------------------------------------------------------------------------------------

CONTENT_TYPES = st.sampled_from(
    [
        None,
        "",
        "application/json",
        "application/octet-stream",
        "application/msgpack",
        "application/x-msgpack",
        "text/plain",
    ]
)
HEADER_LENGTHS = st.one_of(st.none(), st.integers(-5, 300).map(str), st.text(max_size=5))


def check_outcome(body: bytes, content_type: str | None, header_length: str | None) -> None:
    try:
        request = decode_request(body, content_type, header_length, max_elements=4096)
    except (InvalidRequest, UnsupportedMediaType) as exc:
        check_message(exc)
    else:
        assert request.inputs
        for item in request.inputs:
            assert item.data.shape == item.shape
            assert item.data.dtype == DATATYPE_TO_NUMPY[item.datatype]


@given(st.binary(max_size=300), CONTENT_TYPES, HEADER_LENGTHS)
@settings(max_examples=500, deadline=None)
def test_fuzz_random_bytes(
    body: bytes, content_type: str | None, header_length: str | None
) -> None:
    check_outcome(body, content_type, header_length)


JSONISH = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**64), 2**64)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=6),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=20,
)
ELEMENTS = {
    "BOOL": st.booleans(),
    "BYTES": st.text(max_size=4),
    "FP16": st.floats(width=16) | st.integers(-70000, 70000),
    "FP32": st.floats(width=32) | st.floats() | st.booleans(),
    "FP64": st.floats(),
} | {
    name: st.integers(low - 2, high + 2) | st.booleans()
    for name, (low, high) in (
        (n, (int(np.iinfo(DATATYPE_TO_NUMPY[n]).min), int(np.iinfo(DATATYPE_TO_NUMPY[n]).max)))
        for n in DATATYPE_TO_NUMPY
        if DATATYPE_TO_NUMPY[n].kind in "iu"
    )
}
MUTATIONS = ["none", "none", "drop", "replace", "element", "nest", "binary", "shape"]


@st.composite
def input_docs(draw: st.DrawFn) -> Any:
    """Mostly a well-formed input, then at most one mutation of it."""
    datatype = draw(st.sampled_from(sorted(DATATYPE_TO_NUMPY)))
    shape = draw(st.lists(st.integers(0, 3), max_size=3))
    count = int(np.prod(shape))
    data: Any = draw(st.lists(ELEMENTS[datatype], min_size=count, max_size=count))
    obj: dict[str, Any] = {
        "name": draw(st.sampled_from(["x", "y", "z"])),
        "shape": shape,
        "datatype": datatype,
        "data": data,
    }
    mutation = draw(st.sampled_from(MUTATIONS))
    field = draw(st.sampled_from(["name", "shape", "datatype", "data", "parameters"]))
    if mutation == "drop":
        obj.pop(field, None)
    elif mutation == "replace":
        obj[field] = draw(JSONISH)
    elif mutation == "element" and data:
        data[draw(st.integers(0, len(data) - 1))] = draw(JSONISH | st.floats())
    elif mutation == "nest" and shape and count:
        obj["data"] = np.array(data, dtype=object).reshape(shape).tolist()
        if draw(st.booleans()):
            obj["shape"] = shape[::-1]
    elif mutation == "binary":
        obj["parameters"] = {"binary_data_size": draw(st.integers(-1, 40) | JSONISH)}
        if draw(st.booleans()):
            del obj["data"]
    elif mutation == "shape":
        obj["shape"] = draw(st.lists(st.integers(-2, 2**40) | JSONISH, max_size=4))
    return obj


@st.composite
def request_docs(draw: st.DrawFn) -> Any:
    if draw(st.sampled_from([False] + [True] * 9)):
        doc: dict[str, Any] = {"inputs": draw(st.lists(input_docs(), min_size=1, max_size=3))}
    else:
        doc = {"inputs": draw(JSONISH)} if draw(st.booleans()) else {}
    for key, values in (
        ("id", st.text(max_size=5) | JSONISH),
        ("parameters", st.dictionaries(st.text(max_size=20), JSONISH) | JSONISH),
        (
            "outputs",
            st.lists(
                st.fixed_dictionaries(
                    {"name": st.sampled_from(["a", "b"]) | JSONISH},
                    optional={"parameters": st.dictionaries(st.just("binary_data"), JSONISH)},
                ),
                max_size=3,
            )
            | JSONISH,
        ),
    ):
        if draw(st.sampled_from([False, False, True])):
            doc[key] = draw(values)
    return doc if draw(st.sampled_from([True] * 19 + [False])) else draw(JSONISH)


@given(request_docs(), st.binary(max_size=64), st.booleans())
@settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_fuzz_json_documents(doc: Any, tail: bytes, with_header: bool) -> None:
    try:
        text = orjson.dumps(doc)
    except orjson.JSONEncodeError:  # beyond 64 bits, or a lone surrogate: send text anyway
        text = repr(doc).encode("utf-8", "surrogatepass")
    check_outcome(text, "application/json", None)
    check_outcome(text + tail, None, str(len(text)) if with_header else None)


@given(request_docs(), st.booleans())
@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_fuzz_msgpack_documents(doc: Any, raw_data: bool) -> None:
    if raw_data and isinstance(doc, dict) and isinstance(doc.get("inputs"), list):
        for obj in doc["inputs"]:
            if isinstance(obj, dict) and "data" in obj:
                obj["data"] = bytes(range(12))
    try:
        body = msgpack.packb(doc)
    except (OverflowError, ValueError):  # integers beyond 64 bits
        return
    check_outcome(body, "application/msgpack", None)


def test_mutated_valid_requests() -> None:
    base = orjson.dumps(doc_of(tensor(), tensor([[1, 2]], name="z", shape=(1, 2), datatype="INT8")))
    packed = msgpack.packb(doc_of(tensor()))
    for cut in range(0, len(base), 7):
        check_outcome(base[:cut] + base[cut + 1 :], None, None)
        check_outcome(base[:cut], "application/json", None)
    for cut in range(len(packed)):
        check_outcome(packed[:cut], "application/msgpack", None)
        check_outcome(packed[:cut] + b"\xc1" + packed[cut + 1 :], "application/msgpack", None)


@given(
    hnp.arrays(
        st.sampled_from([np.dtype(t) for t in ("f2", "f4", "f8", "i1", "i8", "u2", "u8", "?")]),
        hnp.array_shapes(min_dims=1, max_dims=3, max_side=4),
    )
)
@settings(max_examples=200, deadline=None)
def test_fuzz_round_trip_through_every_encoding(array: np.ndarray) -> None:
    datatype = {v: k for k, v in DATATYPE_TO_NUMPY.items() if k != "BYTES"}[array.dtype]
    finite = array.dtype.kind != "f" or bool(np.isfinite(array).all())
    doc = doc_of(tensor(array.tolist(), shape=array.shape, datatype=datatype))
    ways = [via_binary, via_msgpack, via_msgpack_raw] + ([via_json] if finite else [])
    for decode in ways:
        (got,) = decode(doc).inputs
        assert got.data.dtype == array.dtype
        np.testing.assert_array_equal(got.data, array)
    resp = InferenceResponse("m", "1", [OutputTensor("y", datatype, array)])
    for binary in (False, True):
        req = InferenceRequest(inputs=[], parameters={"binary_data_output": binary})
        body, headers = encode_response(resp, req, "json")
        back = parse_with_tritonclient(body, headers).as_numpy("y")
        assert back is not None
        if finite:
            np.testing.assert_array_equal(back.astype(array.dtype), array)
    body, _ = encode_response(resp, None, "msgpack")
    np.testing.assert_array_equal(msgpack_output(body, 0), array)


# ---------------------------------------------------------------------------------------
# Encoding responses
# ---------------------------------------------------------------------------------------


def parse_with_tritonclient(body: bytes, headers: dict[str, str]) -> Any:
    length = headers.get(HEADER_LENGTH)
    return triton_http.InferResult.from_response_body(
        body, header_length=None if length is None else int(length)
    )


def msgpack_output(body: bytes, index: int) -> np.ndarray:
    out = msgpack.unpackb(body)["outputs"][index]
    if out["datatype"] == "BYTES":
        return np.array(out["data"], dtype=object).reshape(out["shape"])
    dtype = DATATYPE_TO_NUMPY[out["datatype"]].newbyteorder("<")
    return np.frombuffer(out["data"], dtype=dtype).reshape(out["shape"])


def response_of(*outputs: OutputTensor, **extra: Any) -> InferenceResponse:
    return InferenceResponse(model_name="m", model_version="3", outputs=list(outputs), **extra)


def output_arrays() -> list[OutputTensor]:
    outputs = []
    for datatype, values in VALUES.items():
        array = expected_array(datatype, values, (2, 3))
        outputs.append(OutputTensor(datatype.lower(), datatype, array))
    return outputs


def test_json_response_document() -> None:
    y = OutputTensor("y", "FP32", np.array([[0.5, 0.25], [1.0, 2.0]], dtype=np.float32))
    body, headers = encode_response(response_of(y, id="r1", parameters={"a": 1}), None, "json")
    assert headers == {"Content-Type": "application/json"}
    assert orjson.loads(body) == {
        "model_name": "m",
        "model_version": "3",
        "id": "r1",
        "parameters": {"a": 1},
        "outputs": [
            {"name": "y", "datatype": "FP32", "shape": [2, 2], "data": [0.5, 0.25, 1.0, 2.0]}
        ],
    }
    body, _ = encode_response(response_of(y), None, "json")
    assert set(orjson.loads(body)) == {"model_name", "model_version", "outputs"}


def test_json_response_floats_are_short() -> None:
    y = OutputTensor("y", "FP32", np.array([0.1, 1 / 3], dtype=np.float32))
    body, _ = encode_response(response_of(y), None, "json")
    assert b"[0.1,0.33333334]" in body


@pytest.mark.parametrize("binary", [False, True])
def test_every_datatype_through_tritonclient(binary: bool) -> None:
    outputs = output_arrays()
    request = InferenceRequest(inputs=[], parameters={"binary_data_output": binary})
    body, headers = encode_response(response_of(*outputs), request, "json")
    assert (HEADER_LENGTH in headers) == binary
    assert headers["Content-Type"] == ("application/octet-stream" if binary else "application/json")
    result = parse_with_tritonclient(body, headers)
    for out in outputs:
        got = result.as_numpy(out.name)
        assert got.shape == out.data.shape
        if out.datatype == "BYTES" and not binary:
            # tritonclient reads JSON strings back as str
            assert got.tolist() == [[b.decode() for b in row] for row in out.data.tolist()]
        else:
            assert got.tolist() == out.data.tolist(), out.datatype


def test_binary_per_output_setting_wins() -> None:
    outputs = [
        OutputTensor("a", "INT32", np.array([1, 2], np.int32)),
        OutputTensor("b", "INT32", np.array([3], np.int32)),
        OutputTensor("c", "INT32", np.array([4], np.int32)),
    ]
    request = InferenceRequest(
        inputs=[],
        parameters={"binary_data_output": True},
        outputs=[RequestedOutput("c", binary=False), RequestedOutput("a")],
    )
    body, headers = encode_response(response_of(*outputs), request, "json")
    length = int(headers[HEADER_LENGTH])
    header = orjson.loads(body[:length])
    assert [o["name"] for o in header["outputs"]] == ["c", "a"]  # only those asked, in order
    assert header["outputs"][0]["data"] == [4]
    assert header["outputs"][1]["parameters"] == {"binary_data_size": 8}
    assert body[length:] == np.array([1, 2], "<i4").tobytes()
    result = parse_with_tritonclient(body, headers)
    assert result.as_numpy("a").tolist() == [1, 2]
    assert result.as_numpy("c").tolist() == [4]
    assert result.as_numpy("b") is None

    request = InferenceRequest(inputs=[], outputs=[RequestedOutput("b", binary=True)])
    body, headers = encode_response(response_of(*outputs), request, "json")
    assert parse_with_tritonclient(body, headers).as_numpy("b").tolist() == [3]


def test_json_response_edge_values() -> None:
    outputs = [
        OutputTensor("nan", "FP32", np.array([np.nan, np.inf, 1.0], np.float32)),
        OutputTensor("half", "FP16", np.array([0.1, 65504], np.float16)),
        OutputTensor("big_endian", "INT32", np.array([1, -2], ">i4")),
        OutputTensor("strided", "FP64", np.arange(12.0).reshape(3, 4)[:, ::2]),
        OutputTensor("fortran", "INT64", np.asfortranarray(np.arange(6).reshape(2, 3))),
        OutputTensor("bytes", "BYTES", np.array([b"ok", b"\xff", "str"], dtype=object)),
        OutputTensor("fixed_bytes", "BYTES", np.array([b"ab", b"c"])),
        OutputTensor("empty", "FP32", np.zeros((0, 3), np.float32)),
        OutputTensor("scalar", "INT8", np.array(5, np.int8)),
    ]
    body, _ = encode_response(response_of(*outputs), None, "json")
    got = {o["name"]: o for o in orjson.loads(body)["outputs"]}
    assert got["nan"]["data"] == [None, None, 1.0]
    assert np.array(got["half"]["data"], np.float16).tolist() == outputs[1].data.tolist()
    assert got["big_endian"]["data"] == [1, -2]
    assert got["strided"] == {
        "name": "strided",
        "datatype": "FP64",
        "shape": [3, 2],
        "data": [0.0, 2.0, 4.0, 6.0, 8.0, 10.0],
    }
    assert got["fortran"]["data"] == [0, 1, 2, 3, 4, 5]
    assert got["bytes"]["data"] == ["ok", "\ufffd", "str"]
    assert got["fixed_bytes"]["data"] == ["ab", "c"]
    assert got["empty"]["shape"] == [0, 3]
    assert got["empty"]["data"] == []
    assert got["scalar"]["shape"] == []
    assert got["scalar"]["data"] == [5]

    request = InferenceRequest(inputs=[], parameters={"binary_data_output": True})
    body, headers = encode_response(response_of(*outputs), request, "json")
    result = parse_with_tritonclient(body, headers)
    assert result.as_numpy("big_endian").tolist() == [1, -2]
    assert result.as_numpy("strided").tolist() == outputs[3].data.tolist()
    assert result.as_numpy("bytes").tolist() == [b"ok", b"\xff", b"str"]
    assert result.as_numpy("empty").shape == (0, 3)
    assert result.as_numpy("scalar").tolist() == 5


def edge_outputs() -> list[OutputTensor]:
    return [
        *output_arrays(),
        OutputTensor("nan", "FP32", np.array([np.nan, -np.inf, 1e-8, 3e38], np.float32)),
        OutputTensor("half", "FP16", np.array([0.1, 65504], np.float16)),
        OutputTensor("big_endian", "INT32", np.array([1, -2], ">i4")),
        OutputTensor("strided", "FP64", np.arange(12.0).reshape(3, 4)[:, ::2]),
        OutputTensor("fortran", "INT64", np.asfortranarray(np.arange(6).reshape(2, 3))),
        OutputTensor("bytes", "BYTES", np.array([b"ok", b"\xff", "str"], dtype=object)),
        OutputTensor("empty", "FP32", np.zeros((0, 3), np.float32)),
        OutputTensor("scalar", "INT8", np.array(5, np.int8)),
    ]


@pytest.mark.parametrize("binary", [False, True])
@pytest.mark.parametrize("request_id", ["r1", 'quote " back \\ é \u2028 \x01'])
def test_the_common_answer_is_written_as_encode_response_writes_it(
    request_id: str, binary: bool
) -> None:
    outputs = edge_outputs()
    request = InferenceRequest([], parameters={"binary_data_output": binary})
    expected = encode_response(response_of(*outputs, id=request_id), request, "json")
    specs = [TensorSpec(out.name, out.datatype, (-1,)) for out in outputs]
    arrays = [out.data for out in outputs]
    written = encode_every_output_json("m", "3", request_id, specs, arrays, binary=binary)
    assert written == expected
    result = parse_with_tritonclient(*written)
    assert result.get_response()["id"] == request_id
    for out in outputs[:3]:  # (BOOL, UINT8, UINT16: each read back whole)
        assert result.as_numpy(out.name).tolist() == out.data.tolist()


def test_msgpack_response() -> None:
    outputs = output_arrays()
    body, headers = encode_response(response_of(*outputs, id="q"), None, "msgpack")
    assert headers == {"Content-Type": "application/msgpack"}
    doc = msgpack.unpackb(body)
    assert doc["model_name"] == "m"
    assert doc["model_version"] == "3"
    assert doc["id"] == "q"
    for index, out in enumerate(outputs):
        assert doc["outputs"][index]["shape"] == [2, 3]
        assert msgpack_output(body, index).tolist() == out.data.tolist()
    # and the msgpack response's data decodes as a msgpack request
    request = decode_request(
        msgpack.packb({"inputs": doc["outputs"]}), "application/msgpack", None, max_elements=99
    )
    for got, out in zip(request.inputs, outputs, strict=True):
        assert got.data.tolist() == out.data.tolist()


def test_msgpack_response_honours_requested_outputs() -> None:
    outputs = output_arrays()
    request = InferenceRequest(
        inputs=[], outputs=[RequestedOutput("int8"), RequestedOutput("bool")]
    )
    doc = msgpack.unpackb(encode_response(response_of(*outputs), request, "msgpack")[0])
    assert [o["name"] for o in doc["outputs"]] == ["int8", "bool"]


def test_unknown_format() -> None:
    with pytest.raises(ValueError, match="format"):
        encode_response(response_of(), None, "xml")


def test_decoded_request_encodes_back() -> None:
    header, chunks = as_binary(doc_of(tensor(VALUES["INT16"], shape=(6,), datatype="INT16")))
    request = decode_binary(header | {"parameters": {"binary_data_output": True}}, *chunks)
    (item,) = request.inputs
    resp = response_of(OutputTensor("y", item.datatype, item.data))
    body, headers = encode_response(resp, request, "json")
    assert parse_with_tritonclient(body, headers).as_numpy("y").tolist() == VALUES["INT16"]

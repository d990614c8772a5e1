"""The native reading of plain JSON requests (``_core.JsonRequestPlan``) against the Python
decoder and validator it stands in for.

The plan may take a request only when the Python path (``request_from_json``, then
``validate_inputs``) takes it too, into the same arrays and id; it gives every other document
back (None), and the Python path then decodes it or explains what is wrong. These tests hold
it to that over hand-made and generated documents, and check that it does take the common
requests, in the server as well.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from typing import Any

import aiohttp
import msgpack
import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastserve import _core
from fastserve.demo import example_rows
from fastserve.errors import InvalidRequest
from fastserve.http.codecs import (
    HEADER_LENGTH,
    decode_request,
    decode_with_plan,
    request_from_json,
)
from fastserve.protocol import InferenceRequest, ModelSignature, TensorSpec
from fastserve.server import Server
from fastserve.validation import validate_inputs

MAX_BATCH = 4

ONE = ModelSignature(inputs=(TensorSpec("input", "FP32", (-1, 3)),), outputs=())
TWO = ModelSignature(
    inputs=(TensorSpec("a", "FP32", (-1, 2)), TensorSpec("b", "FP64", (-1, 2, 2))), outputs=()
)
FIXED = ModelSignature(inputs=(TensorSpec("x", "FP32", (2, -1)),), outputs=())
"""A first dimension that is fixed (2 rows, within the max batch) and a free second one."""


def plan_of(signature: ModelSignature) -> _core.JsonRequestPlan:
    inputs = [(s.name, s.datatype, list(s.shape)) for s in signature.inputs]
    return _core.JsonRequestPlan(inputs, MAX_BATCH)


def python_path(
    doc: Any, signature: ModelSignature, max_elements: int, blob: bytes | None = None
) -> Any:
    """What the Python decoder and validator make of ``doc`` (and the binary extension's
    ``blob``): (arrays, id, binary_data_output), or the error."""
    try:
        view = None if blob is None else memoryview(blob)
        request = request_from_json(doc, max_elements=max_elements, blob=view)
        arrays = validate_inputs(request, signature, max_batch_size=MAX_BATCH)
    except InvalidRequest as exc:
        return exc
    return arrays, request.id, request.binary_output


def check(
    doc: Any, signature: ModelSignature, max_elements: int = 1 << 20, blob: bytes | None = None
) -> bool:
    """The plan agrees with the Python path on ``doc`` (and ``blob``); True when it took it."""
    planned = plan_of(signature).decode(
        doc, max_elements, None if blob is None else memoryview(blob)
    )
    if planned is None:
        return False
    expected = python_path(doc, signature, max_elements, blob)
    assert not isinstance(expected, Exception), f"the plan took what Python refuses: {expected}"
    arrays, request_id, binary_output = planned
    assert (request_id, binary_output) == expected[1:]
    assert len(arrays) == len(expected[0])
    for got, want in zip(arrays, expected[0], strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert got.flags.c_contiguous
        assert got.tobytes() == want.tobytes()
    return True


def one(rows: int = 1, **fields: Any) -> dict[str, Any]:
    entry = {"name": "input", "datatype": "FP32", "shape": [rows, 3],
             "data": [float(i) + 0.25 for i in range(rows * 3)]}  # fmt: skip
    return {"inputs": [entry], **fields}


def two() -> dict[str, Any]:
    return {
        "inputs": [
            {"name": "b", "datatype": "FP64", "shape": [2, 2, 2], "data": [[[1, 2], [3, 4]]] * 2},
            {"name": "a", "datatype": "FP32", "shape": [2, 2], "data": [0.1, 0.2, 0.3, 0.4]},
        ]
    }


# -- what the plan takes ------------------------------------------------------------------------


def doc_of(name: str, shape: list[int], data: list[Any], datatype: str = "FP32") -> Any:
    return {"inputs": [{"name": name, "datatype": datatype, "shape": shape, "data": data}]}


TAKEN = [
    (one(), ONE),
    (one(rows=MAX_BATCH), ONE),
    (one(id="req-1"), ONE),
    (one(id=None), ONE),
    (one(parameters={}), ONE),
    (one(parameters=None), ONE),
    (one(id="é" * 256), ONE),  # 256 characters, more bytes
    (doc_of("input", [2, 3], [[1, 2, 3], [4.5, -5, 6e30]]), ONE),  # nested, ints, large
    ({"inputs": [{"shape": [1, 3], "data": [1, 2, 3], "datatype": "FP32", "name": "input"}]}, ONE),
    (two(), TWO),  # out of order, nested, ints
    (doc_of("x", [2, 5], list(range(10))), FIXED),
]


@pytest.mark.parametrize(("doc", "signature"), TAKEN)
def test_the_plan_takes_plain_requests_into_the_arrays_python_makes(
    doc: dict[str, Any], signature: ModelSignature
) -> None:
    assert check(doc, signature)


# -- what it gives back -------------------------------------------------------------------------


def refused() -> Iterator[tuple[str, Any]]:
    """Documents the Python path refuses, or reads in a way the plan leaves to it (labels)."""
    yield "not an object", [one()]
    yield "no inputs", {"id": "x"}
    yield "inputs not a list", {"inputs": one()["inputs"][0]}
    yield "inputs empty", {"inputs": []}
    yield "id a number", one(id=7)
    yield "id too long", one(id="x" * 257)
    yield "parameters", one(parameters={"priority": 1})
    yield "outputs", one(outputs=[{"name": "output"}])
    yield "more rows than a batch", one(rows=MAX_BATCH + 1)
    yield "unknown field", one(extra=1)
    doc = one()
    doc["inputs"].append(copy.deepcopy(doc["inputs"][0]))
    yield "input twice", doc
    entry = one()["inputs"][0]
    for key in entry:
        doc = one()
        del doc["inputs"][0][key]
        yield f"no {key}", doc
    for key, values in {
        "name": ["output", "", None, 1, "INPUT"],
        "datatype": ["FP64", "fp32", "INT32", "BYTES", None, 32],
        "shape": [[1], [1, 3, 1], [3], [0, 3], [MAX_BATCH + 1, 3], [1, -3], [1.0, 3], [True, 3],
                  [1, "3"], "1,3", None, [1, 2**70], [2, 3]],
        "data": [[1, 2], [1, 2, 3, 4], [[1, 2, 3, 4]], [[1, 2], [3]], [1, 2, "3"], [1, 2, None],
                 [1, 2, True], [1, 2, 1e39], [1, 2, 2**60], [1, 2, [3]], [], None, "1 2 3",
                 [1, 2, float("nan")], [1, 2, -math.inf]],
    }.items():  # fmt: skip
        for value in values:
            doc = one()
            doc["inputs"][0][key] = value
            yield f"{key} = {value!r}", doc
    doc = one()
    doc["inputs"][0]["parameters"] = {}
    yield "input parameters", doc
    doc = two()
    doc["inputs"][1]["shape"] = [1, 2]
    doc["inputs"][1]["data"] = [0.1, 0.2]
    yield "batch sizes differ", doc


@pytest.mark.parametrize(("label", "doc"), list(refused()), ids=[label for label, _ in refused()])
def test_the_plan_gives_back_what_it_does_not_read_as_python_does(label: str, doc: Any) -> None:
    signature = TWO if "batch sizes" in label else ONE
    assert not check(doc, signature)


def test_a_shape_too_large_for_the_body_is_left_to_the_decoder() -> None:
    doc = one(rows=2)
    assert check(doc, ONE, max_elements=6)
    assert not check(doc, ONE, max_elements=5)  # (the decoder refuses it before converting)
    assert isinstance(python_path(doc, ONE, 5), InvalidRequest)


def test_a_plan_is_refused_for_what_it_cannot_read() -> None:
    with pytest.raises(ValueError, match="FP32 and FP64"):
        _core.JsonRequestPlan([("input", "INT64", [-1, 3])], MAX_BATCH)
    with pytest.raises(ValueError, match="1 to 256"):
        _core.JsonRequestPlan([("x" * 257, "FP32", [-1, 3])], MAX_BATCH)
    with pytest.raises(ValueError):
        _core.JsonRequestPlan([], MAX_BATCH)


# -- the binary extension ---------------------------------------------------------------------

VALUES = np.array([[1.5, -2.0, np.nan], [np.inf, 0.0, 3e38]], "<f4")


def binary_one(rows: int = 1, **fields: Any) -> tuple[dict[str, Any], bytes]:
    """``one`` with its input in the blob after the JSON (tritonclient's default)."""
    values = np.resize(VALUES, (rows, 3)).astype("<f4")
    entry = {"name": "input", "datatype": "FP32", "shape": [rows, 3],
             "parameters": {"binary_data_size": values.nbytes}}  # fmt: skip
    return {"inputs": [entry], **fields}, values.tobytes()


def binary_two() -> tuple[dict[str, Any], bytes]:
    """``two`` with ``b`` (FP64) in the blob and ``a`` in JSON."""
    doc = two()
    values = np.arange(8, dtype="<f8") / 3
    doc["inputs"][0] = {"name": "b", "datatype": "FP64", "shape": [2, 2, 2],
                        "parameters": {"binary_data_size": values.nbytes}}  # fmt: skip
    return doc, values.tobytes()


BINARY_TAKEN = [
    binary_one(),
    binary_one(rows=MAX_BATCH, id="req-2"),
    binary_one(parameters={"binary_data_output": True}),
    binary_one(parameters={"binary_data_output": False}),
    binary_one(parameters={}),
    (one(), b""),  # the header alone: the whole body is JSON
]


@pytest.mark.parametrize(("doc", "blob"), BINARY_TAKEN)
def test_the_plan_takes_binary_tensors_as_python_does(doc: dict[str, Any], blob: bytes) -> None:
    assert check(doc, ONE, blob=blob)


def test_the_plan_takes_binary_and_json_inputs_together() -> None:
    doc, blob = binary_two()
    assert check(doc, TWO, blob=blob)


def test_raw_values_are_read_in_place_where_aligned_and_never_written() -> None:
    """As the Python decoder reads them: a read-only view of the body, kept alive by it; bytes
    not aligned for the datatype are copied (``validate_inputs`` would copy them too)."""
    doc, blob = binary_one(rows=2)
    plan = plan_of(ONE)
    body = b"\0" * 8 + blob
    aligned = memoryview(body)[8:]
    planned = plan.decode(doc, 1 << 20, aligned)
    assert planned is not None
    (array,) = planned[0]
    assert not array.flags.owndata and not array.flags.writeable
    assert np.shares_memory(array, np.frombuffer(body, np.uint8))
    del aligned, body  # the array keeps what it reads alive
    assert array.tobytes() == blob
    shifted = memoryview(b"\0" + blob)[1:]
    planned = plan.decode(doc, 1 << 20, shifted)
    assert planned is not None
    assert planned[0][0].flags.owndata and planned[0][0].tobytes() == blob
    # msgpack's raw bytes alike
    raw = msgpack_one(rows=2)
    packed = msgpack.unpackb(msgpack.packb(raw))
    planned = plan.decode(packed, 1 << 20, None, True)
    assert planned is not None
    assert planned[0][0].tobytes() == raw["inputs"][0]["data"]
    assert not planned[0][0].flags.writeable


def binary_refused() -> Iterator[tuple[str, Any, bytes | None]]:
    doc, blob = binary_one()
    yield "no blob", doc, None
    yield "blob too short", doc, blob[:-1]
    yield "bytes no input claims", doc, blob + b"\0\0\0\0"
    for size in (len(blob) - 4, len(blob) + 4, -1, True, 12.0, "12", None):
        bad = copy.deepcopy(doc)
        bad["inputs"][0]["parameters"]["binary_data_size"] = size
        yield f"binary_data_size = {size!r}", bad, blob
    bad = copy.deepcopy(doc)
    bad["inputs"][0]["parameters"]["other"] = 1
    yield "another input parameter", bad, blob
    bad = copy.deepcopy(doc)
    bad["inputs"][0]["data"] = [1, 2, 3]
    yield "data and binary_data_size", bad, blob
    bad = copy.deepcopy(doc)
    bad["inputs"][0]["parameters"] = None
    yield "input parameters null", bad, blob
    for value in ("true", 1, None):
        yield (
            f"binary_data_output = {value!r}",
            {**doc, "parameters": {"binary_data_output": value}},
            blob,
        )
    yield "another request parameter", {**doc, "parameters": {"priority": 1}}, blob


@pytest.mark.parametrize(
    ("label", "doc", "blob"), list(binary_refused()), ids=[label for label, *_ in binary_refused()]
)
def test_the_plan_gives_back_binary_requests_it_does_not_read(
    label: str, doc: Any, blob: bytes | None
) -> None:
    assert not check(doc, ONE, blob=blob)


# -- msgpack ------------------------------------------------------------------------------------


def check_msgpack(doc: Any, signature: ModelSignature) -> bool:
    """``decode_with_plan`` of ``doc`` as a msgpack body agrees with ``decode_request`` and
    ``validate_inputs``; True when the plan took it."""
    try:
        body = msgpack.packb(doc)
    except (TypeError, ValueError, OverflowError):
        return False  # (nothing msgpack can carry)
    plan = plan_of(signature)
    try:
        expected = decode_request(body, "application/msgpack", None, max_elements=len(body))
        arrays = validate_inputs(expected, signature, max_batch_size=MAX_BATCH)
    except InvalidRequest:  # Python refuses it: the plan must give it back, to be refused alike
        try:
            read = decode_with_plan(body, "application/msgpack", None, plan, max_elements=len(body))
        except InvalidRequest:
            return False
        assert isinstance(read, InferenceRequest), "the plan took what Python refuses"
        with pytest.raises(InvalidRequest):
            validate_inputs(read, signature, max_batch_size=MAX_BATCH)
        return False
    read = decode_with_plan(body, "application/msgpack", None, plan, max_elements=len(body))
    if isinstance(read, InferenceRequest):
        return False
    got, request_id, binary_output = read
    assert (request_id, binary_output) == (expected.id, expected.binary_output)
    for mine, want in zip(got, arrays, strict=True):
        assert mine.dtype == want.dtype and mine.shape == want.shape
        assert mine.tobytes() == want.tobytes()
    return True


def msgpack_one(rows: int = 1, **fields: Any) -> dict[str, Any]:
    doc = one(rows, **fields)
    values = np.resize(VALUES, (rows, 3)).astype("<f4")
    doc["inputs"][0]["data"] = values.tobytes()
    return doc


MSGPACK_TAKEN = [
    (one(), ONE),
    (msgpack_one(), ONE),
    (msgpack_one(rows=MAX_BATCH, id="m"), ONE),
    (msgpack_one(parameters={"binary_data_output": True}), ONE),
    (two(), TWO),
]


@pytest.mark.parametrize(("doc", "signature"), MSGPACK_TAKEN)
def test_the_plan_takes_msgpack_bodies_as_python_does(
    doc: dict[str, Any], signature: ModelSignature
) -> None:
    assert check_msgpack(doc, signature)


def msgpack_refused() -> Iterator[tuple[str, Any]]:
    doc = msgpack_one()
    yield "bytes too short", {**doc, "inputs": [{**doc["inputs"][0], "data": b"\0" * 8}]}
    yield "bytes too long", {**doc, "inputs": [{**doc["inputs"][0], "data": b"\0" * 16}]}
    yield "id as bytes", {**doc, "id": b"x"}
    yield "a key not a string", {**doc, 1: "x"}
    yield "name as bytes", {**doc, "inputs": [{**doc["inputs"][0], "name": b"input"}]}
    yield "parameters with bytes", {**doc, "parameters": {"binary_data_output": b"1"}}


@pytest.mark.parametrize(
    ("label", "doc"), list(msgpack_refused()), ids=[label for label, _ in msgpack_refused()]
)
def test_the_plan_gives_back_msgpack_bodies_it_does_not_read(label: str, doc: Any) -> None:
    assert not check_msgpack(doc, ONE)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), raw=st.booleans())
def test_generated_msgpack_bodies_are_read_as_python_reads_them_or_given_back(
    data: st.DataObject, raw: bool
) -> None:
    doc = msgpack_one(rows=data.draw(st.integers(1, MAX_BATCH))) if raw else one()
    mutate(data, doc, ODD | st.binary(max_size=16))
    check_msgpack(doc, ONE)


# -- generated documents ------------------------------------------------------------------------

ODD = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**64), 2**64) | st.floats() | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=8,
)


def mutate(data: st.DataObject, doc: Any, values: st.SearchStrategy[Any]) -> None:
    """Replace up to three values anywhere in ``doc`` with ones drawn from ``values``."""
    for _ in range(data.draw(st.integers(0, 3))):
        *parent_path, last = data.draw(st.sampled_from(list(paths(doc))[1:]))
        parent = doc
        for key in parent_path:
            parent = parent[key]
        parent[last] = data.draw(values)


def paths(doc: Any, at: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every place in ``doc`` a value sits (dict keys and list indices)."""
    yield at
    items = (
        doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    )
    for key, value in items:
        yield from paths(value, (*at, key))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), kind=st.sampled_from(["one", "two", "binary one", "binary two"]))
def test_generated_documents_are_read_as_python_reads_them_or_given_back(
    data: st.DataObject, kind: str
) -> None:
    blob = None
    if kind == "one":
        doc = one(rows=data.draw(st.integers(1, MAX_BATCH)))
    elif kind == "two":
        doc = two()
    elif kind == "binary one":
        doc, blob = binary_one(rows=data.draw(st.integers(1, MAX_BATCH)))
    else:
        doc, blob = binary_two()
    mutate(data, doc, ODD)
    # as the server sees it: what orjson parses of what a client serialized
    try:
        doc = orjson.loads(orjson.dumps(doc))
    except (orjson.JSONEncodeError, TypeError):
        return  # (NaN, inf or a huge int: no JSON holds them)
    check(doc, ONE if kind.endswith("one") else TWO, blob=blob)


# -- in the server ------------------------------------------------------------------------------


async def test_the_server_answers_planned_and_decoded_requests_alike(
    server: Server, client: aiohttp.ClientSession
) -> None:
    registry = server.registry
    assert registry.get("breast_cancer", None).json_plan is not None
    assert registry.get("adder", None).json_plan is not None  # (two inputs)
    rows = example_rows("breast_cancer", 3)
    entry = {"name": "input", "shape": [3, 30], "datatype": "FP32", "data": rows.tolist()}
    answers = []
    # planned; then with empty parameters and outputs, which the Python path decodes
    for extra in ({}, {"parameters": {}, "outputs": []}):
        body = {"id": "same", "inputs": [entry], **extra}
        async with client.post("/v2/models/breast_cancer/infer", json=body) as resp:
            assert resp.status == 200, await resp.text()
            answers.append(await resp.json())
    assert answers[0] == answers[1]
    # a request the plan gives back is refused by the Python path, saying why
    bad = {"inputs": [{**entry, "shape": [3, 29]}]}
    async with client.post("/v2/models/breast_cancer/infer", json=bad) as resp:
        assert resp.status == 400
        assert "'shape' is [3, 29]" in (await resp.json())["error"]
    # the binary extension both ways, binary answer asked for: planned, and with a field the
    # plan does not read (and the decoder ignores)
    raw = np.ascontiguousarray(rows, "<f4").tobytes()
    bodies = []
    for extra in ({}, {"unknown": 1}):
        entry = {"name": "input", "shape": [3, 30], "datatype": "FP32",
                 "parameters": {"binary_data_size": len(raw)}}  # fmt: skip
        header = orjson.dumps({"id": "bin", "inputs": [entry],
                               "parameters": {"binary_data_output": True}, **extra})  # fmt: skip
        headers = {HEADER_LENGTH: str(len(header)), "Content-Type": "application/octet-stream"}
        path = "/v2/models/breast_cancer/infer"
        async with client.post(path, data=header + raw, headers=headers) as resp:
            assert resp.status == 200, await resp.text()
            bodies.append((await resp.read(), resp.headers[HEADER_LENGTH]))
    assert bodies[0] == bodies[1]
    stats = registry.get("breast_cancer", None).request_stats
    assert (stats.success, stats.fail, stats.rows) == (4, 1, 12)
    assert stats.validated == [4, 0]  # the value schema checked the planned requests too

"""Every malformed request of RELIABILITY.md over HTTP: the right 4xx, a short JSON error,
and a server that is still healthy afterwards. JSON, binary tensors and msgpack."""

from __future__ import annotations

import gzip
import io
import struct
from typing import Any

import aiohttp
import msgpack
import orjson
import pytest

from fastserve.demo import example_rows
from fastserve.server import Server

pytestmark = pytest.mark.timeout(60)

INFER = "/v2/models/breast_cancer/infer"
EXAMPLE = example_rows("breast_cancer", 1)  # a real row: it passes the demo's value schema
ROW = EXAMPLE[0].tolist()
JSON = {"Content-Type": "application/json"}
MSGPACK = {"Content-Type": "application/msgpack"}


def doc(**tensor: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"name": "input", "shape": [1, 30], "datatype": "FP32", "data": ROW}
    base.update(tensor)
    return {"inputs": [{k: v for k, v in base.items() if v is not None}]}


def js(document: Any) -> bytes:
    return orjson.dumps(document)


def binary(
    header: dict[str, Any], tail: bytes, length: str | None = None
) -> tuple[bytes, dict[str, str]]:
    head = orjson.dumps(header)
    return head + tail, {"Inference-Header-Content-Length": length or str(len(head))}


RAW_ROW = EXAMPLE.astype("<f4").tobytes()
BIN_INPUT = {
    "name": "input",
    "shape": [1, 30],
    "datatype": "FP32",
    "parameters": {"binary_data_size": 120},
}

# (case id, path, headers, body, expected status)
CASES: list[tuple[str, str, dict[str, str], bytes, int]] = [
    ("empty body", INFER, JSON, b"", 400),
    ("truncated json", INFER, JSON, b'{"inputs": [{"name": "in', 400),
    ("top level not object", INFER, JSON, b"[1, 2, 3]", 400),
    ("no inputs", INFER, JSON, b"{}", 400),
    ("inputs not a list", INFER, JSON, js({"inputs": {"name": "input"}}), 400),
    ("inputs empty", INFER, JSON, js({"inputs": []}), 400),
    ("input missing name", INFER, JSON, js(doc(name=None)), 400),
    ("input missing shape", INFER, JSON, js(doc(shape=None)), 400),
    ("input missing datatype", INFER, JSON, js(doc(datatype=None)), 400),
    ("input missing data", INFER, JSON, js(doc(data=None)), 400),
    ("unknown input name", INFER, JSON, js(doc(name="nope")), 400),
    ("duplicate input names", INFER, JSON, js({"inputs": doc()["inputs"] * 2}), 400),
    (
        "required input missing",
        "/v2/models/adder/infer",
        JSON,
        js({"inputs": [{"name": "a", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}),
        400,
    ),
    ("unknown datatype", INFER, JSON, js(doc(datatype="FP128")), 400),
    ("datatype not the model's", INFER, JSON, js(doc(datatype="INT32", data=[1] * 30)), 400),
    ("negative dimension", INFER, JSON, js(doc(shape=[-1, 30])), 400),
    ("non-integer dimension", INFER, JSON, js(doc(shape=[1.5, 30])), 400),
    ("string dimension", INFER, JSON, js(doc(shape=["1", 30])), 400),
    ("shape overflowing 64 bits", INFER, JSON, js(doc(shape=[2**62, 2**62, 30])), 400),
    ("data shorter than shape", INFER, JSON, js(doc(data=ROW[:29])), 400),
    ("data longer than shape", INFER, JSON, js(doc(data=[*ROW, 1.0])), 400),
    ("wrong rank", INFER, JSON, js(doc(shape=[30])), 400),
    ("wrong inner dimension", INFER, JSON, js(doc(shape=[2, 15])), 400),
    ("batch above maximum", INFER, JSON, js(doc(shape=[65, 30], data=ROW * 65)), 400),
    ("zero rows", INFER, JSON, js(doc(shape=[0, 30], data=[])), 400),
    ("strings for numbers", INFER, JSON, js(doc(data=["a"] * 30)), 400),
    (
        "NaN literal",
        INFER,
        JSON,
        b'{"inputs":[{"name":"input","shape":[1,1],"datatype":"FP32","data":[NaN]}]}',
        400,
    ),
    (
        "Infinity literal",
        INFER,
        JSON,
        b'{"inputs":[{"name":"input","shape":[1,1],"datatype":"FP32","data":[Infinity]}]}',
        400,
    ),
    ("number beyond FP32", INFER, JSON, js(doc(data=[1e39] * 30)), 400),
    (
        "int beyond type range",
        "/v2/models/adder/infer",
        JSON,
        js(
            {"inputs": [{"name": "a", "shape": [1, 4], "datatype": "INT8", "data": [300, 1, 2, 3]}]}
        ),
        400,
    ),
    (
        "deeply nested arrays",
        INFER,
        JSON,
        b'{"inputs":[{"name":"input","shape":[1,30],"datatype":"FP32","data":'
        + b"[" * 5000
        + b"]" * 5000
        + b"}]}",
        400,
    ),
    ("ragged nested arrays", INFER, JSON, js(doc(shape=[2, 30], data=[ROW, ROW[:29]])), 400),
    ("BYTES for a numeric input", INFER, JSON, js(doc(datatype="BYTES", data=["x"] * 30)), 400),
    ("unknown requested output", INFER, JSON, js({**doc(), "outputs": [{"name": "nope"}]}), 400),
    (
        "duplicated requested output",
        INFER,
        JSON,
        js({**doc(), "outputs": [{"name": "label"}, {"name": "label"}]}),
        400,
    ),
    ("parameters not an object", INFER, JSON, js({**doc(), "parameters": [1]}), 400),
    ("huge id", INFER, JSON, js({**doc(), "id": "x" * 100_000}), 400),
    ("priority out of range", INFER, JSON, js({**doc(), "parameters": {"priority": 99}}), 400),
    ("timeout not a number", INFER, JSON, js({**doc(), "parameters": {"timeout": "soon"}}), 400),
    ("small body declaring a huge shape", INFER, JSON, js(doc(shape=[1, 2**40], data=[1.0])), 400),
    ("unknown model", "/v2/models/nope/infer", JSON, js(doc()), 404),
    ("unknown version", "/v2/models/breast_cancer/versions/9/infer", JSON, js(doc()), 404),
    ("traversal in model name", "/v2/models/..%2F..%2Fetc/infer", JSON, js(doc()), 404),
    ("unsupported content type", INFER, {"Content-Type": "text/csv"}, b"1,2,3", 415),
    ("unknown content encoding", INFER, {**JSON, "Content-Encoding": "br"}, js(doc()), 415),
    ("corrupt gzip", INFER, {**JSON, "Content-Encoding": "gzip"}, b"\x1f\x8b\x08\x00garbage", 400),
    # binary tensor extension
    (
        "binary header length negative",
        INFER,
        *binary({"inputs": [BIN_INPUT]}, RAW_ROW, "-5")[::-1],
        400,
    ),
    (
        "binary header length beyond body",
        INFER,
        *binary({"inputs": [BIN_INPUT]}, RAW_ROW, "100000")[::-1],
        400,
    ),
    (
        "binary header length not a number",
        INFER,
        *binary({"inputs": [BIN_INPUT]}, RAW_ROW, "ten")[::-1],
        400,
    ),
    (
        "binary sizes short of the body",
        INFER,
        *binary({"inputs": [BIN_INPUT]}, RAW_ROW + b"xx")[::-1],
        400,
    ),
    (
        "binary sizes beyond the body",
        INFER,
        *binary({"inputs": [BIN_INPUT]}, RAW_ROW[:100])[::-1],
        400,
    ),
    (
        "binary size not matching shape",
        INFER,
        *binary(
            {"inputs": [{**BIN_INPUT, "parameters": {"binary_data_size": 116}}]}, RAW_ROW[:116]
        )[::-1],
        400,
    ),
    (
        "binary BYTES invalid length prefix",
        INFER,
        *binary(
            {
                "inputs": [
                    {
                        **BIN_INPUT,
                        "datatype": "BYTES",
                        "shape": [1, 1],
                        "parameters": {"binary_data_size": 6},
                    }
                ]
            },
            struct.pack("<I", 99) + b"ab",
        )[::-1],
        400,
    ),
    # msgpack
    ("msgpack truncated", INFER, MSGPACK, msgpack.packb(doc())[:-7], 400),
    ("msgpack claims 2^32-1 items", INFER, MSGPACK, b"\x81\xa6inputs\xdd\xff\xff\xff\xff", 400),
    ("msgpack deeply nested", INFER, MSGPACK, b"\x91" * 5000 + b"\x00", 400),
    (
        "msgpack extension type",
        INFER,
        MSGPACK,
        msgpack.packb({"inputs": msgpack.ExtType(5, b"xx")}),
        400,
    ),
    ("msgpack non-string keys", INFER, MSGPACK, msgpack.packb({1: 2}), 400),
    (
        "msgpack raw bytes of wrong length",
        INFER,
        MSGPACK,
        msgpack.packb(doc(data=RAW_ROW[:-4])),
        400,
    ),
    ("msgpack top level not a map", INFER, MSGPACK, msgpack.packb([1, 2]), 400),
]


@pytest.mark.parametrize(
    ("path", "headers", "body", "status"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
async def test_malformed_request_gets_a_short_4xx(
    client: aiohttp.ClientSession, path: str, headers: dict[str, str], body: bytes, status: int
) -> None:
    async with client.post(path, data=body, headers=headers) as resp:
        text = await resp.text()
        assert resp.status == status, text
        error = orjson.loads(text)["error"]
    assert isinstance(error, str) and 0 < len(error) <= 300
    assert "/tmp" not in error and "xxxxxxxxxx" not in error
    await _still_healthy(client)


async def _still_healthy(client: aiohttp.ClientSession) -> None:
    async with client.post(INFER, json=doc()) as resp:
        assert resp.status == 200, await resp.text()


async def test_get_on_infer_is_405(client: aiohttp.ClientSession) -> None:
    async with client.get(INFER) as resp:
        assert resp.status == 405
        assert "error" in await resp.json()
        assert "POST" in resp.headers["Allow"]


async def test_unknown_routes_and_methods_get_json_errors(client: aiohttp.ClientSession) -> None:
    for method, path in [("GET", "/nope"), ("POST", "/v2/models"), ("PATCH", "/v2/x/y/z")]:
        async with client.request(method, path) as resp:
            assert resp.status == 404
            assert "error" in await resp.json()
    async with client.put("/v2/health/live") as resp:
        assert resp.status == 405
        assert resp.headers["Allow"] == "GET, HEAD"
        assert "not allowed" in (await resp.json())["error"]
    async with client.head("/v2/health/ready") as resp:
        assert resp.status == 200


async def test_body_limit_applies_before_and_after_decompression(
    client: aiohttp.ClientSession, server: Server
) -> None:
    limit = server.config.max_body_bytes
    padding = limit - len(js(doc())) - len(b',"id":""') - 100
    ok = js({**doc(), "parameters": {"pad": "x" * padding}})
    assert len(ok) <= limit
    async with client.post(INFER, data=io.BytesIO(ok), headers=JSON) as resp:
        assert resp.status == 200, await resp.text()
    too_big = js({**doc(), "parameters": {"pad": "x" * (limit + 10)}})
    async with client.post(INFER, data=io.BytesIO(too_big), headers=JSON) as resp:
        assert resp.status == 413
    bomb = gzip.compress(b" " * (limit * 4))  # valid JSON whitespace once inflated
    assert len(bomb) < limit
    async with client.post(INFER, data=bomb, headers={**JSON, "Content-Encoding": "gzip"}) as resp:
        assert resp.status == 413
    await _still_healthy(client)

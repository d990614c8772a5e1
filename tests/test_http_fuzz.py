"""Property-based fuzzing of the live server: V2-shaped documents with hostile values, in
JSON, msgpack and binary-tensor form, plus random bytes. Nothing may produce a 5xx."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import msgpack
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.timeout(120)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
)
values = st.recursive(scalars, lambda c: st.lists(c, max_size=6), max_leaves=40)
names = st.sampled_from(["input", "a", "b", "image", "nope", "", "x" * 300])
datatypes = st.sampled_from(
    ["FP32", "FP64", "INT64", "INT8", "UINT8", "BOOL", "BYTES", "FP16", "bf16", ""]
)
shapes = st.lists(
    st.integers(min_value=-3, max_value=2**40) | st.sampled_from([1, 30, 4]), max_size=5
)
parameters = st.dictionaries(
    st.sampled_from(
        ["binary_data_size", "priority", "timeout", "binary_data", "binary_data_output", "x"]
    ),
    scalars,
    max_size=3,
)
tensors = st.fixed_dictionaries(
    {},
    optional={
        "name": names,
        "shape": shapes | values,
        "datatype": datatypes,
        "data": values,
        "parameters": parameters,
    },
)
documents = st.fixed_dictionaries(
    {},
    optional={
        "inputs": st.lists(tensors, max_size=3) | values,
        "outputs": st.lists(
            st.fixed_dictionaries({}, optional={"name": names, "parameters": parameters}),
            max_size=3,
        ),
        "id": st.text(max_size=10) | scalars,
        "parameters": parameters | values,
    },
)
paths = st.sampled_from(
    [
        "/v2/models/breast_cancer/infer",
        "/v2/models/adder/infer",
        "/v2/models/digits/versions/1/infer",
    ]
)


def collect() -> list[tuple[str, bytes, dict[str, str]]]:
    """Draw the requests with hypothesis (generation only: each is checked against the server)."""
    cases: list[tuple[str, bytes, dict[str, str]]] = []

    @given(
        path=paths,
        doc=documents,
        encoding=st.sampled_from(["json", "msgpack", "binary", "raw"]),
        tail=st.binary(max_size=64),
        header_length=st.integers(min_value=-5, max_value=400),
    )
    @settings(
        max_examples=400, database=None, deadline=None, suppress_health_check=list(HealthCheck)
    )
    def draw(
        path: str, doc: dict[str, Any], encoding: str, tail: bytes, header_length: int
    ) -> None:
        # the stdlib encoder writes integers of any size, which is part of the point
        if encoding == "json":
            cases.append((path, json.dumps(doc).encode(), {"Content-Type": "application/json"}))
        elif encoding == "msgpack":
            try:
                body = msgpack.packb(doc)
            except OverflowError:  # msgpack has no integers past 64 bits
                return
            cases.append((path, body, {"Content-Type": "application/msgpack"}))
        elif encoding == "binary":
            head = json.dumps(doc).encode()
            cases.append(
                (path, head + tail, {"Inference-Header-Content-Length": str(header_length)})
            )
        else:
            cases.append((path, tail, {"Content-Type": "application/json"}))

    draw()
    return cases


async def test_no_input_makes_the_server_fail(client: aiohttp.ClientSession) -> None:
    cases = collect()
    assert len(cases) >= 300
    statuses: dict[int, int] = {}
    for path, body, headers in cases:
        async with client.post(path, data=body, headers=headers) as resp:
            text = await resp.text()
            assert resp.status < 500, (resp.status, text, body[:200])
            statuses[resp.status] = statuses.get(resp.status, 0) + 1
            if resp.status >= 400:
                assert len(orjson.loads(text)["error"]) <= 300
    assert statuses.get(400, 0) > 0
    async with client.get("/v2/health/ready") as resp:
        assert resp.status == 200

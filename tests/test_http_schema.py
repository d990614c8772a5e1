"""A version's schema.yaml checked on every request (real server, real sessions): reject,
warn and off; a schema that does not fit refuses the version's load."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import numpy as np
import orjson
import pandera.pandas as pa
import pytest

from conftest import running, write_config
from fastserve.config import ServerConfig
from fastserve.demo import example_rows, load_split
from fastserve.schema import register_checks
from models import tabular_body

register_checks()  # fastserve's custom checks: pa.Check.finite, pa.Check.multiple_of

MODEL = "breast_cancer"
INFER = f"/v2/models/{MODEL}/infer"


def write_schema(repo: Path) -> list[str]:
    """Every feature within 0..10x its training maximum; 'mean radius' not null."""
    split = load_split(MODEL)
    names = list(split.feature_names)
    columns = {
        name: pa.Column(
            float,
            pa.Check.in_range(0.0, float(split.x_train[:, i].max()) * 10),
            nullable=name != "mean radius",
        )
        for i, name in enumerate(names)
    }
    (repo / MODEL / "1" / "schema.yaml").write_text(pa.DataFrameSchema(columns).to_yaml())
    return names


@pytest.mark.parametrize("mode", ["reject", "warn", "off"])
async def test_values_that_fail_the_schema_get_400_or_are_counted(
    repo: Path, server_config: ServerConfig, mode: str
) -> None:
    names = write_schema(repo)
    write_config(repo, MODEL, f"validation: {mode}\n")
    good = example_rows(MODEL, 1)[0]
    bad = good.copy()
    bad[names.index("mean area")] = -5.0
    async with (
        running(server_config) as srv,
        aiohttp.ClientSession(f"http://127.0.0.1:{srv.port}") as s,
    ):
        async with s.post(INFER, json=tabular_body(good)) as resp:
            assert resp.status == 200
        async with s.post(INFER, json=tabular_body(bad)) as resp:
            doc = await resp.json()
            status = resp.status
        metrics = srv.registry.metrics.exposition().decode()
    series = (
        'fastserve_validation_failures_total{check="in_range",feature="mean area",'
        'model="breast_cancer",version="1"} 1.0'
    )
    if mode == "reject":
        assert status == 400
        assert "mean area (in_range)" in doc["error"]
        assert doc["failures"] == [
            {"feature": "mean area", "check": "in_range", "failing_rows": 1, "rows": [0],
             "values": [-5.0]}
        ]  # fmt: skip
    else:
        assert status == 200 and doc["outputs"]
    assert (series in metrics) == (mode != "off")
    for result in ("pass", "fail"):
        counted = (
            f'fastserve_validated_requests_total{{model="breast_cancer",result="{result}",'
            'version="1"} 1.0'
        )
        assert (counted in metrics) == (mode != "off"), metrics


async def test_a_schema_that_does_not_fit_the_model_refuses_the_load(
    repo: Path, server_config: ServerConfig
) -> None:
    schema = pa.DataFrameSchema({"a": pa.Column(float), "b": pa.Column(float)})
    (repo / MODEL / "1" / "schema.yaml").write_text(schema.to_yaml())
    async with running(server_config) as srv:
        (row,) = [r for r in srv.registry.index() if r.name == MODEL]
        assert row.state.value == "UNAVAILABLE"
        assert "schema.yaml" in row.reason and "2 columns fit 0" in row.reason


# -- every check type, every encoding, packed and by feature name ---------------------------

# feature -> (check, a value that passes, a value that fails)
EVERY_CHECK: dict[str, tuple[Any, float, float]] = {
    "mean radius": (pa.Check.gt(0.0), 12.0, -1.0),
    "mean texture": (pa.Check.ge(0.0), 0.0, -0.5),
    "mean perimeter": (pa.Check.lt(1000.0), 80.0, 1000.0),
    "mean area": (pa.Check.le(5000.0), 5000.0, 6000.0),
    "mean smoothness": (pa.Check.eq(1.0), 1.0, 2.0),
    "mean compactness": (pa.Check.ne(0.0), 0.1, 0.0),
    "mean concavity": (pa.Check.in_range(0.0, 1.0, include_max=False), 0.5, 1.0),
    "mean concave points": (pa.Check.isin([0.0, 1.0, 2.0]), 1.0, 7.0),
    "mean symmetry": (pa.Check.notin([9.0]), 0.2, 9.0),
    "mean fractal dimension": (pa.Check.finite(), 0.06, math.inf),
    "radius error": (pa.Check.multiple_of(step=0.5), 1.5, 1.25),
    "texture error": (None, 1.0, math.nan),  # not nullable
}
IEEE_ONLY = {"mean fractal dimension", "texture error"}  # inf and NaN: JSON has no literal


def write_every_check_schema(repo: Path) -> list[str]:
    names = list(load_split(MODEL).feature_names)
    columns = {}
    for name in names:
        check, _, _ = EVERY_CHECK.get(name, (None, 0.0, 0.0))
        nullable = name != "texture error"
        columns[name] = pa.Column(float, [check] if check is not None else [], nullable=nullable)
    (repo / MODEL / "1" / "schema.yaml").write_text(pa.DataFrameSchema(columns).to_yaml())
    return names


def rows_with(names: list[str], *, failing: set[str]) -> np.ndarray:
    """Two rows: row 0 passes every check, row 1 fails those named in ``failing``."""
    rows = example_rows(MODEL, 2).astype(np.float32)
    for name, (_, good, bad) in EVERY_CHECK.items():
        column = names.index(name)
        rows[:, column] = good
        if name in failing:
            rows[1, column] = bad
    return rows


def encode(rows: np.ndarray, names: list[str], encoding: str, by_name: bool) -> tuple[bytes, dict]:
    """A request body of ``rows`` and its headers: one packed tensor, or one input a feature."""
    if by_name:
        # shuffled, and not all FP32: columns are matched by name and converted
        order = list(reversed(range(len(names))))
        tensors = [
            (names[i], "FP64" if i % 2 else "FP32", rows[:, i].astype("<f8" if i % 2 else "<f4"))
            for i in order
        ]
    else:
        tensors = [("input", "FP32", rows.astype("<f4"))]
    inputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name, datatype, data in tensors:
        doc: dict[str, Any] = {"name": name, "shape": list(data.shape), "datatype": datatype}
        if encoding == "json":
            doc["data"] = data.tolist()
        elif encoding == "msgpack":
            doc["data"] = data.tobytes()
        else:
            blobs.append(data.tobytes())
            doc["parameters"] = {"binary_data_size": len(blobs[-1])}
        inputs.append(doc)
    if encoding == "json":
        return orjson.dumps({"inputs": inputs}), {"Content-Type": "application/json"}
    if encoding == "msgpack":
        return msgpack.packb({"inputs": inputs}), {"Content-Type": "application/msgpack"}
    header = orjson.dumps({"inputs": inputs})
    return header + b"".join(blobs), {"Inference-Header-Content-Length": str(len(header))}


@pytest.mark.parametrize("by_name", [False, True], ids=["packed", "by-name"])
@pytest.mark.parametrize("encoding", ["json", "msgpack", "binary"])
async def test_every_check_type_in_every_encoding(
    repo: Path, server_config: ServerConfig, encoding: str, by_name: bool
) -> None:
    names = write_every_check_schema(repo)
    failing = set(EVERY_CHECK) - (IEEE_ONLY if encoding == "json" else set())
    good, bad = rows_with(names, failing=set()), rows_with(names, failing=failing)
    async with (
        running(server_config) as srv,
        aiohttp.ClientSession(f"http://127.0.0.1:{srv.port}") as s,
    ):
        body, headers = encode(good, names, encoding, by_name)
        async with s.post(INFER, data=body, headers=headers) as resp:
            assert resp.status == 200, await resp.text()
        body, headers = encode(bad, names, encoding, by_name)
        async with s.post(INFER, data=body, headers=headers) as resp:
            assert resp.status == 400
            doc = await resp.json()
    expected = {
        (name, "not_nullable" if check is None else check.name)
        for name, (check, _, _) in EVERY_CHECK.items()
        if name in failing
    }
    assert {(f["feature"], f["check"]) for f in doc["failures"]} == expected
    for failure in doc["failures"]:
        assert failure["rows"] == [1] and failure["failing_rows"] == 1
        _, _, bad_value = EVERY_CHECK[failure["feature"]]
        shown = failure["values"][0]
        if math.isnan(bad_value):
            assert shown is None
        elif math.isinf(bad_value):
            assert shown == "inf"
        else:
            assert shown == pytest.approx(bad_value)


async def test_features_by_name_answer_as_the_packed_tensor_does(
    repo: Path, server_config: ServerConfig
) -> None:
    """MLServer's pandas codec sends one input per column; the answer is the same."""
    rows = example_rows(MODEL, 5)
    names = list(load_split(MODEL).feature_names)
    named = {
        "parameters": {"content_type": "pd"},
        "inputs": [
            {"name": name, "shape": [5], "datatype": "FP32", "data": rows[:, i].tolist()}
            for i, name in reversed(list(enumerate(names)))
        ],
    }
    packed = {"inputs": [{"name": "input", "shape": [5, 30], "datatype": "FP32",
                          "data": rows.tolist()}]}  # fmt: skip
    async with (
        running(server_config) as srv,
        aiohttp.ClientSession(f"http://127.0.0.1:{srv.port}") as s,
    ):
        answers = []
        for body in (named, packed):
            async with s.post(INFER, json=body) as resp:
                assert resp.status == 200, await resp.text()
                answers.append({o["name"]: o["data"] for o in (await resp.json())["outputs"]})
    assert answers[0] == answers[1]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda ins: ins[1:], "1 of its 30 features are missing: 'worst fractal dimension'"),
        (lambda ins: ins[5:], "5 of its 30 features are missing"),
        (lambda ins: [*ins, ins[0]], "'worst fractal dimension' appears twice"),
        (
            lambda ins: [{**ins[0], "shape": [1, 2], "data": [1.0, 2.0]}, *ins[1:]],
            "shape [1, 2] is not a column",
        ),
        (
            lambda ins: [{**ins[0], "datatype": "BYTES", "data": ["x"]}, *ins[1:]],
            "datatype BYTES is not numeric",
        ),
        (
            lambda ins: [{**ins[0], "shape": [2], "data": [1.0, 2.0]}, *ins[1:]],
            "'worst fractal dimension' has 2 rows but feature 'mean radius' has 1",
        ),
        (
            lambda ins: [{**ins[0], "datatype": "FP64", "data": [1e300]}, *ins[1:]],
            "a feature's value does not fit FP32",
        ),
        (lambda ins: [*ins, {**ins[0], "name": "extra"}], "unknown input 'extra'"),
    ],
    ids=["one missing", "five missing", "twice", "not a column", "bytes", "rows", "fp32", "extra"],
)
async def test_features_by_name_that_do_not_make_the_tensor_get_400(
    repo: Path, server_config: ServerConfig, change: Any, message: str
) -> None:
    row = example_rows(MODEL, 1)[0]
    names = list(load_split(MODEL).feature_names)
    inputs = [
        {"name": name, "shape": [1], "datatype": "FP32", "data": [float(row[i])]}
        for i, name in reversed(list(enumerate(names)))
    ]
    async with (
        running(server_config) as srv,
        aiohttp.ClientSession(f"http://127.0.0.1:{srv.port}") as s,
    ):
        async with s.post(INFER, json={"inputs": change(inputs)}) as resp:
            assert resp.status == 400
            assert message in (await resp.json())["error"]
        async with s.post(INFER, json={"inputs": inputs}) as resp:
            assert resp.status == 200

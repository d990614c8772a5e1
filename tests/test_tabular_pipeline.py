"""Tabular pipelines: the native kernel against a numpy reference, and features by name
over HTTP into a model that echoes what the pipeline fed it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto

from conftest import running, write_config
from fastserve import _core
from fastserve.config import ModelConfig, ServerConfig
from fastserve.profiling import profile_frame
from models import image_identity, save

pytestmark = pytest.mark.timeout(60)

MSGPACK = {"Content-Type": "application/msgpack"}


# -- the kernel -------------------------------------------------------------------------------


def reference_rows(columns: list[dict[str, Any]], values: list[np.ndarray]) -> np.ndarray:
    """What the kernel must write, one row and one column at a time (float64)."""
    rows = len(values[0]) if values else 0
    width = sum(c["width"] for c in columns)
    out = []
    for r in range(rows):
        row: list[float] = []
        for column, v in zip(columns, values, strict=True):
            if column["kind"] == "number":
                x = v[r] if not np.isnan(v[r]) else column["fill"]
                row.append((x - column["shift"]) * column["scale"])
                continue
            code = int(v[r])
            if code == -2:
                code = column["fill_code"]
            if column["kind"] == "index":
                row.append(float(code) if code >= 0 else column["unknown_value"])
            else:
                hot = [0.0] * column["width"]
                if 0 <= code < column["width"]:
                    hot[code] = 1.0
                row += hot
        out.append(row)
    return np.array(out, np.float64).reshape(rows, width)


@st.composite
def kernel_case(draw: st.DrawFn) -> tuple[list[dict[str, Any]], list[np.ndarray]]:
    rows = draw(st.integers(0, 40))
    finite = st.floats(-1e6, 1e6, allow_nan=False)
    columns, values = [], []
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["number", "index", "onehot"]))
        if kind == "number":
            column = {
                "kind": kind,
                "shift": draw(finite),
                "scale": draw(finite),
                "fill": draw(finite),
                "width": 1,
                "fill_code": -1,
                "unknown_value": 0.0,
            }
            data = draw(st.lists(st.one_of(finite, st.just(np.nan)), min_size=rows,
                                 max_size=rows))  # fmt: skip
            values.append(np.array(data, np.float64))
        else:
            size = draw(st.integers(1, 5))
            column = {"kind": kind, "shift": 0.0, "scale": 1.0, "fill": 0.0,
                      "width": size if kind == "onehot" else 1,
                      "fill_code": draw(st.integers(-1, size - 1)),
                      "unknown_value": draw(finite)}  # fmt: skip
            data = draw(st.lists(st.integers(-2, size - 1), min_size=rows, max_size=rows))
            values.append(np.array(data, np.int64))
        columns.append(column)
    return columns, values


def kernel_of(columns: list[dict[str, Any]], dtype: str) -> _core.TabularKernel:
    return _core.TabularKernel(
        *([c[key] for c in columns] for key in
          ("kind", "shift", "scale", "fill", "width", "fill_code", "unknown_value")),
        dtype=dtype,
    )  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(kernel_case(), st.sampled_from(["float32", "float64"]))
def test_the_kernel_equals_the_reference(
    case: tuple[list[dict[str, Any]], list[np.ndarray]], dtype: str
) -> None:
    columns, values = case
    rows = len(values[0])
    kernel = kernel_of(columns, dtype)
    got = kernel.run(values, rows)
    assert got.dtype == np.dtype(dtype) and got.shape == (rows, kernel.width)
    expected = reference_rows(columns, values).astype(dtype)
    assert np.array_equal(got, expected, equal_nan=True)
    assert np.array_equal(kernel.run(values, rows, threads=3), got, equal_nan=True)


def test_the_kernel_refuses_what_it_cannot_run() -> None:
    one = [{"kind": "onehot", "shift": 0.0, "scale": 1.0, "fill": 0.0, "width": 3,
            "fill_code": -1, "unknown_value": 0.0}]  # fmt: skip
    kernel = kernel_of(one, "float32")
    with pytest.raises(ValueError, match="int64"):
        kernel.run([np.zeros(2, np.float64)], 2)
    with pytest.raises(ValueError, match="int64"):
        kernel.run([np.zeros(3, np.int64)], 2)  # not `rows` long
    with pytest.raises(ValueError, match="one array per column"):
        kernel.run([], 2)
    with pytest.raises(ValueError, match="fill code"):
        kernel_of([{**one[0], "fill_code": 3}], "float32")
    with pytest.raises(ValueError, match="kinds"):
        kernel_of([{**one[0], "kind": "bucket"}], "float32")
    with pytest.raises(ValueError, match="float32 or float64"):
        kernel_of(one, "float16")


# -- over HTTP --------------------------------------------------------------------------------

# not whole numbers, so that profiling takes them as continuous (ranges, not value sets)
TRAIN = pd.DataFrame({"age": [20.5, 30.5, 40.5, 50.5, 60.5], "income": [1.5, 2.5, 3.5, 4.5, 9.5]})
PIPELINE = """\
preprocessing:
  tabular:
    input: pixels
    features:
      - {name: age, scale: standard, fill: median}
      - {name: income, scale: minmax}
      - {name: colour, categories: [red, green, blue], unknown: ignore, fill: red}
      - {name: size, categories: [10, 20, 30], encode: index, unknown: error}
"""
WIDTH = 6  # age, income, 3 colours, size


def add_echo(
    repo: Path, config: str = PIPELINE, *, width: int = WIDTH, schema: bool = False
) -> None:
    """Model ``echo``: FP32 [batch, width] in, the same out; the reference (and optionally
    the schema) profiled from TRAIN."""
    folder = repo / "echo" / "1"
    save(image_identity(TensorProto.FLOAT, (width,)), folder / "model.onnx")
    profile = profile_frame(TRAIN, source="train.csv")
    profile.write(folder)
    if not schema:
        (folder / "schema.yaml").unlink()
    write_config(repo, "echo", config)


def features(**columns: Any) -> dict[str, Any]:
    inputs = []
    for name, values in columns.items():
        if isinstance(values[0], str):
            datatype = "BYTES"
        elif isinstance(values[0], int):
            datatype = "INT64"
        else:
            datatype = "FP64"
        inputs.append({"name": name, "shape": [len(values)], "datatype": datatype,
                       "data": list(values)})  # fmt: skip
    return {"inputs": inputs}


async def echo(s: aiohttp.ClientSession, body: dict[str, Any]) -> tuple[int, Any]:
    async with s.post("/v2/models/echo/infer", data=msgpack.packb(body), headers=MSGPACK) as resp:
        doc = msgpack.unpackb(await resp.read()) if resp.status == 200 else await resp.json()
        if resp.status != 200:
            return resp.status, doc["error"]
    out = doc["outputs"][0]
    return 200, np.frombuffer(out["data"], "<f4").reshape(out["shape"])


async def test_features_by_name_are_scaled_filled_and_encoded(
    repo: Path, server_config: ServerConfig
) -> None:
    add_echo(repo)
    mean, std = TRAIN.age.mean(), TRAIN.age.std(ddof=0)
    body = features(
        age=[30.0, float("nan"), 60.0],
        income=[1.5, 5.5, 9.5],
        colour=["blue", "", "purple"],  # known, missing (filled red), unknown (ignored)
        size=[20, 10, 30],
    )
    async with (
        running(server_config) as srv,
        aiohttp.ClientSession(f"http://127.0.0.1:{srv.port}") as s,
    ):
        # a pipeline reads its requests: none is read natively (fastserve.model._json_plan)
        assert srv.registry.get("echo", None).json_plan is None
        rows = {r.name: r for r in srv.registry.index()}
        assert rows["echo"].state.value == "READY", rows["echo"].reason
        status, got = await echo(s, body)
        assert status == 200, got
        std_of = profile_frame(TRAIN, source="x").reference.features[0].std  # what it stored
        expected = np.array(
            [
                [(30 - mean) / std_of, 0.0, 0, 0, 1, 1],
                [(40.5 - mean) / std_of, 0.5, 1, 0, 0, 0],  # NaN -> the median, 40.5
                [(60 - mean) / std_of, 1.0, 0, 0, 0, 2],
            ],
            np.float32,
        )
        np.testing.assert_allclose(got, expected, rtol=1e-6)
        assert std_of == pytest.approx(std, rel=0.2)  # a standard deviation, either ddof
        # an absent feature with a fill is all missing; JSON works as msgpack does
        async with s.post(
            "/v2/models/echo/infer", json=features(age=[50.0], income=[3.0], size=[30])
        ) as resp:
            doc = await resp.json()
            assert resp.status == 200, doc
        assert doc["outputs"][0]["data"][2:] == [1.0, 0.0, 0.0, 2.0]  # colour: red


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (features(age=[1.0], colour=["red"], size=[10]), "missing (with no fill): 'income'"),
        (features(income=[1.0, float("nan")], size=[10, 20]), "'income': NaN (missing) in rows 1"),
        (features(income=[1.0, 2.0], size=[10, 40]),
         "'size': not one of its categories in rows 1 (40)"),
        (features(income=[1.0], size=[10], colour=[3]), "categories are strings, sent as BYTES"),
        (features(income=[1.0], size=["10"]), "categories are integers"),
        (features(income=["a"], size=[10]), "'income': datatype BYTES is not numeric"),
        (features(income=[1.0, 2.0], size=[10]), "'size' has 1 rows but feature 'income' has 2"),
        (features(other=[1.0]), "missing (with no fill): 'income', 'size'"),
    ],
)  # fmt: skip
async def test_bad_features_are_refused_with_the_reason(
    repo: Path, server_config: ServerConfig, body: dict[str, Any], message: str
) -> None:
    add_echo(repo)
    async with (
        running(server_config) as srv,
        aiohttp.ClientSession(f"http://127.0.0.1:{srv.port}") as s,
    ):
        status, error = await echo(s, body)
    assert status == 400
    assert message in error


async def test_the_schema_checks_the_values_as_sent(
    repo: Path, server_config: ServerConfig
) -> None:
    add_echo(repo, schema=True)  # profiled: age in 20.5..60.5, income in 1.5..9.5
    async with (
        running(server_config) as srv,
        aiohttp.ClientSession(f"http://127.0.0.1:{srv.port}") as s,
    ):
        status, error = await echo(s, features(age=[25.0], income=[2.0], size=[10]))
        assert status == 200, error
        status, error = await echo(s, features(age=[25.0], income=[90.0], size=[10]))
        assert status == 400 and "income" in str(error)
        # the model's own tensor would skip the check: refused
        tensor = {"inputs": [{"name": "pixels", "shape": [1, WIDTH], "datatype": "FP32",
                              "data": [0.0] * WIDTH}]}  # fmt: skip
        status, error = await echo(s, tensor)
        assert status == 400 and "send its features by name" in error


async def test_without_a_schema_the_models_tensor_passes(
    repo: Path, server_config: ServerConfig
) -> None:
    add_echo(repo)
    tensor = {"inputs": [{"name": "pixels", "shape": [1, WIDTH], "datatype": "FP32",
                          "data": list(range(WIDTH))}]}  # fmt: skip
    async with (
        running(server_config) as srv,
        aiohttp.ClientSession(f"http://127.0.0.1:{srv.port}") as s,
    ):
        status, got = await echo(s, tensor)
    assert status == 200 and got.tolist() == [list(map(float, range(WIDTH)))]


@pytest.mark.parametrize(
    ("config", "width", "reference", "message"),
    [
        (PIPELINE, 5, True, "the features make 6 column(s)"),
        (PIPELINE.replace("input: pixels", "input: nope"), WIDTH, True, "has no input 'nope'"),
        (PIPELINE, WIDTH, False, "'age' uses the reference's statistics (standard, median)"),
        (PIPELINE.replace("name: income", "name: salary"), WIDTH, True,
         "'salary' uses the reference's statistics (minmax)"),
    ],
)  # fmt: skip
async def test_a_pipeline_that_does_not_fit_refuses_the_load(
    repo: Path, server_config: ServerConfig, config: str, width: int, reference: bool, message: str
) -> None:
    add_echo(repo, config, width=width)
    if not reference:
        (repo / "echo" / "1" / "reference.json").unlink()
    async with running(server_config) as srv:
        row = next(r for r in srv.registry.index() if r.name == "echo")
    assert row.state.value == "UNAVAILABLE"
    assert "preprocessing.tabular" in row.reason and message in row.reason


async def test_a_schema_of_other_columns_refuses_the_load(
    repo: Path, server_config: ServerConfig
) -> None:
    add_echo(repo, PIPELINE.replace("name: income, scale: minmax", "name: income, fill: 0"),
             schema=True)  # fmt: skip
    schema = repo / "echo" / "1" / "schema.yaml"
    schema.write_text(schema.read_text().replace("income", "salary"))
    async with running(server_config) as srv:
        row = next(r for r in srv.registry.index() if r.name == "echo")
    assert row.state.value == "UNAVAILABLE"
    assert "schema.yaml's columns must be the pipeline's numeric features" in row.reason


def test_pipeline_settings_are_checked() -> None:
    from pydantic import ValidationError

    for features_, message in (
        ([], "at least one is needed"),
        ([{"name": "a"}, {"name": "a"}], "features listed twice: a"),
        ([{"name": "c", "categories": ["x", "x"]}], "categories must be distinct"),
        ([{"name": "c", "categories": ["x"], "fill": "y"}], "'y' is not one of the categories"),
        ([{"name": "c", "categories": ["1", 2]}], "valid string"),
        ([{"name": "c", "categories": ["x"], "scale": "standard"}], "Extra inputs"),
        ([{"name": "a", "fill": "average"}], "'mean', 'median', 'min' or 'max'"),
    ):
        with pytest.raises(ValidationError, match=message):
            ModelConfig.model_validate(
                {"preprocessing": {"tabular": {"input": "x", "features": features_}}}
            )

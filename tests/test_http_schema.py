"""A version's schema.yaml checked on every request (real server, real sessions): reject,
warn and off; a schema that does not fit refuses the version's load."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pandera.pandas as pa
import pytest

from conftest import running, write_config
from fastserve.config import ServerConfig
from fastserve.demo import example_rows, load_split
from models import tabular_body

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


async def test_a_schema_that_does_not_fit_the_model_refuses_the_load(
    repo: Path, server_config: ServerConfig
) -> None:
    schema = pa.DataFrameSchema({"a": pa.Column(float), "b": pa.Column(float)})
    (repo / MODEL / "1" / "schema.yaml").write_text(schema.to_yaml())
    async with running(server_config) as srv:
        (row,) = [r for r in srv.registry.index() if r.name == MODEL]
        assert row.state.value == "UNAVAILABLE"
        assert "schema.yaml" in row.reason and "2 columns fit 0" in row.reason

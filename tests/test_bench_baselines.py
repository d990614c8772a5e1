"""The benchmark's reference servers (bench/baselines.py) answer as the model does: the
suite's comparisons are only fair if they do the same work."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import aiohttp
import numpy as np
import pytest

from conftest import free_port
from fastserve.demo import example_rows
from models import predict, tabular_body

pytestmark = pytest.mark.timeout(90)

BASELINES = Path(__file__).resolve().parent.parent / "bench" / "baselines.py"


@contextmanager
def baseline(kind: str, model: Path, *extra: str) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(BASELINES), kind, str(model), "--port", str(port), *extra]
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=1):
                    break
            except OSError:
                assert proc.poll() is None, "the baseline server exited"
                assert time.monotonic() < deadline, "the baseline server did not start"
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


async def labels(url: str, rows: np.ndarray) -> list[list[int]]:
    async with aiohttp.ClientSession(url) as s:

        async def one(row: np.ndarray) -> list[int]:
            async with s.post("/v2/models/m/infer", json=tabular_body(row, "r")) as resp:
                doc = await resp.json()
                assert resp.status == 200, doc
            assert doc["id"] == "r"
            out = {o["name"]: o for o in doc["outputs"]}
            return list(out["label"]["data"])

        return await asyncio.gather(*(one(row) for row in rows))


@pytest.mark.parametrize("kind", ["plain", "pybatch"])
def test_the_model_baselines_answer_as_the_model_does(kind: str, demo_repo: Path) -> None:
    model = demo_repo / "breast_cancer" / "1" / "model.onnx"
    rows = example_rows("breast_cancer", 24)
    expected = predict(demo_repo, "breast_cancer", rows)["label"]
    with baseline(kind, model, "--delay-us", "2000") as url:
        got = asyncio.run(labels(url, rows))  # concurrent: the Python batcher batches them
    assert [g[0] for g in got] == expected.tolist()


@pytest.mark.parametrize("kind", ["ceiling", "ceiling-llhttp"])
def test_the_ceilings_parse_the_body_and_answer_fixed(kind: str, demo_repo: Path) -> None:
    model = demo_repo / "breast_cancer" / "1" / "model.onnx"
    row = example_rows("breast_cancer", 1)[0]
    with baseline(kind, model) as url:
        import orjson

        good = orjson.dumps(tabular_body(row))
        with urllib.request.urlopen(
            urllib.request.Request(f"{url}/v2/models/m/infer", data=good)
        ) as resp:
            assert orjson.loads(resp.read())["outputs"] == []
        bad = b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": ["a"]}]}'
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(urllib.request.Request(f"{url}/v2/models/m/infer", data=bad))
        assert err.value.code == 500  # it did parse: a bad tensor fails
        err.value.close()

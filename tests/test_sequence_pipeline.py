"""Sequence pipelines over HTTP: requests of different lengths share one batch, which the
native batcher pads (or truncates) and gives its attention mask, for a real onnxruntime
model that shows what it got."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from onnx import TensorProto

from conftest import running, write_config
from fastserve.config import ModelConfig, ServerConfig
from models import save, sequence_model

pytestmark = pytest.mark.timeout(60)

PIPELINE = """\
batching: {max_batch_size: 8, max_queue_delay_us: 1000}
preprocessing:
  sequence: {inputs: [ids], mask: mask, pad: -1%s}
"""


def add_model(repo: Path, extra: str = "", **model: Any) -> None:
    save(sequence_model(**model), repo / "seq" / "1" / "model.onnx")
    write_config(repo, "seq", PIPELINE % extra)


def body(*rows: list[int]) -> dict[str, Any]:
    return {"inputs": [{"name": "ids", "shape": [len(rows), len(rows[0])], "datatype": "INT64",
                        "data": [v for r in rows for v in r]}]}  # fmt: skip


async def infer(s: aiohttp.ClientSession, doc: dict[str, Any]) -> tuple[int, Any]:
    async with s.post("/v2/models/seq/infer", json=doc) as resp:
        answer = await resp.json()
        if resp.status != 200:
            return resp.status, answer["error"]
    return 200, {o["name"]: o for o in answer["outputs"]}


async def test_requests_of_other_lengths_share_one_padded_batch(
    repo: Path, server_config: ServerConfig
) -> None:
    add_model(repo)
    async with (
        running(server_config) as srv,
        aiohttp.ClientSession(f"http://127.0.0.1:{srv.port}") as s,
    ):
        async with s.get("/v2/models/seq") as resp:
            meta = await resp.json()
        # clients send the ids, of any length; the mask is the server's
        assert meta["inputs"] == [{"name": "ids", "datatype": "INT64", "shape": [-1, -1]}]
        srv.registry.get("seq").batcher.hold(3)  # one batch of the three requests
        answers = await asyncio.gather(
            infer(s, body([1, 2])),
            infer(s, body([10, 20, 30, 40, 50])),
            infer(s, body([5, 6, 7], [8, 9, 10])),
        )
        async with s.get("/v2/models/seq/stats") as resp:
            stats = await resp.json()
    for status, out in answers:
        assert status == 200, out
    (_, short), (_, long), (_, two) = answers
    assert short["count"]["data"] == [2] and short["total"]["data"] == [3]
    assert long["count"]["data"] == [5] and long["total"]["data"] == [150]
    assert two["count"]["data"] == [3, 3] and two["total"]["data"] == [18, 27]
    # the model saw every row padded to the batch's longest, 5, with -1
    assert short["tokens"]["shape"] == [1, 5]
    assert short["tokens"]["data"] == [1, 2, -1, -1, -1]
    assert two["tokens"]["data"] == [5, 6, 7, -1, -1, 8, 9, 10, -1, -1]
    batches = stats["model_stats"][0]["batch_stats"]
    assert [b["batch_size"] for b in batches] == [4]


async def test_max_length_truncates_and_a_fixed_model_length_pads_to_it(
    repo: Path, server_config: ServerConfig
) -> None:
    add_model(repo, ", max_length: 3")
    save(sequence_model(length=4, mask_type=TensorProto.BOOL), repo / "fixed" / "1" / "model.onnx")
    write_config(repo, "fixed", PIPELINE % "")
    async with (
        running(server_config) as srv,
        aiohttp.ClientSession(f"http://127.0.0.1:{srv.port}") as s,
    ):
        status, out = await infer(s, body([1, 2, 3, 4, 5]))
        assert status == 200, out
        assert out["tokens"]["data"] == [1, 2, 3] and out["total"]["data"] == [6]
        async with s.post("/v2/models/fixed/infer", json=body([1, 2])) as resp:
            doc = await resp.json()
            assert resp.status == 200, doc
        fixed = {o["name"]: o for o in doc["outputs"]}
        assert fixed["tokens"]["data"] == [1, 2, -1, -1]  # the model's own length, 4
        assert fixed["count"]["data"] == [2]  # its BOOL mask
        async with s.post("/v2/models/fixed/infer", json=body([1, 2, 3, 4, 5, 6])) as resp:
            doc = await resp.json()
        assert {o["name"]: o for o in doc["outputs"]}["total"]["data"] == [10]  # cut to 4


async def test_requests_that_cannot_be_padded_are_refused(
    repo: Path, server_config: ServerConfig
) -> None:
    add_model(repo)
    mask = {"name": "mask", "shape": [1, 2], "datatype": "INT64", "data": [1, 1]}
    async with (
        running(server_config) as srv,
        aiohttp.ClientSession(f"http://127.0.0.1:{srv.port}") as s,
    ):
        status, error = await infer(s, {"inputs": [*body([1, 2])["inputs"], mask]})
        assert status == 400 and "mask" in error  # the server makes the mask
        status, error = await infer(
            s, {"inputs": [{"name": "ids", "shape": [2], "datatype": "INT64", "data": [1, 2]}]}
        )
        assert status == 400 and "rank" in error


@pytest.mark.parametrize(
    ("config", "model", "message"),
    [
        ("sequence: {inputs: [ids, nope]}", {}, "has no input 'nope'"),
        ("sequence: {inputs: [ids], pad: 0.5}", {}, "pad 0.5 is not one"),
        ("sequence: {inputs: [ids], mask: mask, length: 3}", {"length": 4},
         "fixed lengths (ids: 4, mask: 4) do not match the pipeline's length (3)"),
    ],
)  # fmt: skip
async def test_a_pipeline_that_does_not_fit_refuses_the_load(
    repo: Path, server_config: ServerConfig, config: str, model: dict[str, Any], message: str
) -> None:
    save(sequence_model(**model), repo / "seq" / "1" / "model.onnx")
    write_config(repo, "seq", f"preprocessing:\n  {config}\n")
    async with running(server_config) as srv:
        row = next(r for r in srv.registry.index() if r.name == "seq")
    assert row.state.value == "UNAVAILABLE"
    assert "preprocessing.sequence" in row.reason and message in row.reason


def test_pipeline_settings_are_checked() -> None:
    from pydantic import ValidationError

    for sequence, message in (
        ({"inputs": ["a", "a"]}, "distinct"),
        ({"inputs": ["a"], "mask": "a"}, "also one of the inputs"),
        ({"inputs": ["a", "b"], "pad": {"a": 0}}, "one value for each"),
        ({"inputs": ["a"], "length": 4, "max_length": 8}, "exclude each other"),
        ({"inputs": ["a"], "length": 0}, "greater than or equal to 1"),
    ):
        with pytest.raises(ValidationError, match=message):
            ModelConfig.model_validate({"preprocessing": {"sequence": sequence}})
    with pytest.raises(ValidationError, match="two pipelines feed the same input: x"):
        ModelConfig.model_validate(
            {"preprocessing": {"sequence": {"inputs": ["x"]},
                               "image": {"input": "x", "mean": [0], "std": [1]}}}
        )  # fmt: skip

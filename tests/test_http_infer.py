"""Inference over HTTP against a real server on a free port: JSON, binary tensors, msgpack."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import numpy as np
import orjson
import pytest

from fastserve.demo import example_rows
from models import predict

pytestmark = pytest.mark.timeout(60)


def binary_body(header: dict[str, Any], *blobs: bytes) -> tuple[bytes, dict[str, str]]:
    head = orjson.dumps(header)
    return head + b"".join(blobs), {"Inference-Header-Content-Length": str(len(head))}


async def test_health_and_server_metadata(client: aiohttp.ClientSession) -> None:
    async with client.get("/v2/health/live") as resp:
        assert resp.status == 200
    async with client.get("/v2/health/ready") as resp:
        assert resp.status == 200
    async with client.get("/v2") as resp:
        doc = await resp.json()
    assert doc["name"] == "fastserve"
    assert "binary_tensor_data" in doc["extensions"]


async def test_model_metadata_reads_the_onnx_signature(client: aiohttp.ClientSession) -> None:
    async with client.get("/v2/models/breast_cancer") as resp:
        assert resp.status == 200
        doc = await resp.json()
    assert doc["name"] == "breast_cancer"
    assert doc["versions"] == ["1"]
    assert doc["platform"] == "onnxruntime_onnx"
    assert doc["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 30]}]
    outputs = {o["name"]: o for o in doc["outputs"]}
    assert outputs["label"]["datatype"] == "INT64"
    assert outputs["probabilities"]["shape"] == [-1, 2]
    async with client.get("/v2/models/breast_cancer/versions/1/ready") as resp:
        assert resp.status == 200
        assert (await resp.json())["ready"] is True
    async with client.get("/v2/models/breast_cancer/versions/7") as resp:
        assert resp.status == 404
    async with client.get("/v2/models/digits/config") as resp:
        assert (await resp.json())["max_batch_size"] >= 1


@pytest.mark.parametrize(
    "path", ["/v2/models/breast_cancer/infer", "/v2/models/breast_cancer/versions/1/infer"]
)
async def test_json_infer_gives_the_models_answers(
    client: aiohttp.ClientSession, path: str, demo_repo: Path
) -> None:
    rows = example_rows("breast_cancer", 5)
    labels = predict(demo_repo, "breast_cancer", rows)["label"]
    body = {
        "id": "req-1",
        "inputs": [{"name": "input", "shape": [5, 30], "datatype": "FP32", "data": rows.tolist()}],
    }
    async with client.post(path, json=body) as resp:
        assert resp.status == 200, await resp.text()
        doc = await resp.json()
    assert doc["id"] == "req-1"
    assert doc["model_name"] == "breast_cancer"
    assert doc["model_version"] == "1"
    out = {o["name"]: o for o in doc["outputs"]}
    assert out["label"]["shape"] == [5]
    assert out["label"]["data"] == labels.tolist()
    probs = np.array(out["probabilities"]["data"]).reshape(out["probabilities"]["shape"])
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    assert (probs.argmax(axis=1) == labels).all()


async def test_flat_json_data_and_requested_outputs(
    client: aiohttp.ClientSession, demo_repo: Path
) -> None:
    rows = example_rows("digits", 3)
    labels = predict(demo_repo, "digits", rows)["label"]
    body = {
        "inputs": [
            {
                "name": "image",
                "shape": [3, 1, 8, 8],
                "datatype": "FP32",
                "data": rows.ravel().tolist(),
            }
        ],
        "outputs": [{"name": "label"}],
    }
    async with client.post("/v2/models/digits/infer", json=body) as resp:
        assert resp.status == 200, await resp.text()
        doc = await resp.json()
    assert [o["name"] for o in doc["outputs"]] == ["label"]
    assert doc["outputs"][0]["data"] == labels.tolist()
    assert doc["id"]  # none given: the server made one to send feedback with


async def test_made_ids_are_unique_and_sort_in_the_order_they_were_issued(
    client: aiohttp.ClientSession,
) -> None:
    body = {
        "inputs": [
            {
                "name": "input",
                "shape": [1, 30],
                "datatype": "FP32",
                "data": example_rows("breast_cancer", 1).ravel().tolist(),
            }
        ]
    }
    ids = []
    for _ in range(20):  # past the first 16, where an unpadded hex counter reaches "10"
        async with client.post("/v2/models/breast_cancer/infer", json=body) as resp:
            assert resp.status == 200, await resp.text()
            ids.append((await resp.json())["id"])
    assert len(set(ids)) == len(ids)
    assert sorted(ids) == ids  # the predictions table's key grows at its end
    assert len({len(i) for i in ids}) == 1


async def test_binary_tensors_in_and_out(client: aiohttp.ClientSession, demo_repo: Path) -> None:
    rows = example_rows("breast_cancer", 4)
    labels = predict(demo_repo, "breast_cancer", rows)["label"]
    raw = rows.astype("<f4").tobytes()
    header = {
        "inputs": [
            {
                "name": "input",
                "shape": [4, 30],
                "datatype": "FP32",
                "parameters": {"binary_data_size": len(raw)},
            }
        ],
        "outputs": [
            {"name": "label", "parameters": {"binary_data": True}},
            {"name": "probabilities"},
        ],
    }
    body, headers = binary_body(header, raw)
    async with client.post("/v2/models/breast_cancer/infer", data=body, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        payload = await resp.read()
        length = int(resp.headers["Inference-Header-Content-Length"])
    doc = orjson.loads(payload[:length])
    label, probs = doc["outputs"]
    assert label["parameters"]["binary_data_size"] == 4 * 8
    assert np.frombuffer(payload[length:], "<i8").tolist() == labels.tolist()
    assert len(probs["data"]) == 8  # JSON for the output that did not ask for binary


async def test_msgpack_with_raw_tensor_bytes(
    client: aiohttp.ClientSession, demo_repo: Path
) -> None:
    rows = example_rows("breast_cancer", 6)
    labels = predict(demo_repo, "breast_cancer", rows)["label"]
    body = msgpack.packb(
        {
            "id": "m1",
            "inputs": [
                {
                    "name": "input",
                    "shape": [6, 30],
                    "datatype": "FP32",
                    "data": rows.astype("<f4").tobytes(),
                }
            ],
        }
    )
    headers = {"Content-Type": "application/msgpack"}
    async with client.post("/v2/models/breast_cancer/infer", data=body, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["Content-Type"].startswith("application/msgpack")
        doc = msgpack.unpackb(await resp.read())
    assert doc["id"] == "m1"
    out = {o["name"]: o for o in doc["outputs"]}
    assert np.frombuffer(out["label"]["data"], "<i8").tolist() == labels.tolist()


async def test_gzip_request_and_compressed_response(
    client: aiohttp.ClientSession, demo_repo: Path
) -> None:
    rows = example_rows("breast_cancer", 40)
    labels = predict(demo_repo, "breast_cancer", rows)["label"]
    body = orjson.dumps(
        {
            "inputs": [
                {"name": "input", "shape": [40, 30], "datatype": "FP32", "data": rows.tolist()}
            ]
        }
    )
    headers = {
        "Content-Encoding": "gzip",
        "Accept-Encoding": "gzip",
        "Content-Type": "application/json",
    }
    async with client.post(
        "/v2/models/breast_cancer/infer", data=gzip.compress(body), headers=headers
    ) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers.get("Content-Encoding") == "gzip"
        doc = orjson.loads(gzip.decompress(await resp.read()))
    assert {o["name"]: o for o in doc["outputs"]}["label"]["data"] == labels.tolist()
    headers["Content-Encoding"] = "deflate"
    async with client.post(
        "/v2/models/breast_cancer/infer", data=zlib.compress(body), headers=headers
    ) as resp:
        assert resp.status == 200


async def test_two_inputs_and_statistics(client: aiohttp.ClientSession) -> None:
    a = np.arange(8, dtype=np.float32).reshape(2, 4)
    b = np.ones((2, 4), np.float32)
    body = {
        "inputs": [
            {"name": "b", "shape": [2, 4], "datatype": "FP32", "data": b.ravel().tolist()},
            {"name": "a", "shape": [2, 4], "datatype": "FP32", "data": a.tolist()},
        ]
    }
    async with client.post("/v2/models/adder/infer", json=body) as resp:
        assert resp.status == 200, await resp.text()
        out = {o["name"]: o["data"] for o in (await resp.json())["outputs"]}
    assert out["sum"] == (a + b).ravel().tolist()
    assert out["diff"] == (a - b).ravel().tolist()
    async with client.get("/v2/models/adder/stats") as resp:
        stats = (await resp.json())["model_stats"][0]
    assert stats["inference_count"] == 2
    assert stats["execution_count"] == 1
    assert stats["inference_stats"]["success"]["count"] == 1
    assert stats["batch_stats"][0]["batch_size"] == 2
    async with client.get("/v2/models/stats") as resp:
        names = {s["name"] for s in (await resp.json())["model_stats"]}
    assert names == {"adder", "breast_cancer", "digits", "scorecard"}

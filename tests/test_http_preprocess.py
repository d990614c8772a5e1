"""Raw images through a model's declared image pipeline, over HTTP: the demo digits model
takes UINT8 pixels of any size and answers as it does for its own FP32 tensor."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from conftest import running, write_config
from fastserve.config import ServerConfig
from fastserve.demo import example_rows

INFER = "/v2/models/digits/infer"


def raw_body(pixels: np.ndarray) -> dict[str, Any]:
    return {
        "inputs": [{"name": "image", "shape": list(pixels.shape), "datatype": "UINT8",
                    "data": pixels.ravel().tolist()}],
        "outputs": [{"name": "label"}],
    }  # fmt: skip


async def labels(session: aiohttp.ClientSession, body: dict[str, Any]) -> list[int]:
    async with session.post(INFER, json=body) as resp:
        doc = await resp.json()
        assert resp.status == 200, doc
    return list(doc["outputs"][0]["data"])


async def test_raw_pixels_of_any_size_get_the_tensors_answer(
    repo: Path, server_config: ServerConfig
) -> None:
    images = example_rows("digits", 12)  # FP32 [12, 1, 8, 8], values 0..16
    pixels = np.rint(images[:, 0] * 255 / 16).astype(np.uint8)  # what a camera would send
    bigger = np.kron(pixels, np.ones((1, 4, 4), np.uint8))  # the same digits at 32x32
    tensor = {
        "inputs": [{"name": "image", "shape": [12, 1, 8, 8], "datatype": "FP32",
                    "data": images.ravel().tolist()}],
        "outputs": [{"name": "label"}],
    }  # fmt: skip
    async with (
        running(server_config) as srv,
        aiohttp.ClientSession(f"http://127.0.0.1:{srv.port}") as s,
    ):
        expected = await labels(s, tensor)
        assert await labels(s, raw_body(pixels)) == expected
        assert await labels(s, raw_body(bigger)) == expected
        assert await labels(s, raw_body(pixels[..., np.newaxis])) == expected  # [N, H, W, 1]
        async with s.get("/metrics") as resp:
            metrics = await resp.text()
        # the three raw requests went through the pipeline (the tensor one did not)
        assert (
            'fastserve_request_stage_duration_seconds_count{model="digits",stage="preprocess",'
            'version="1"} 3.0'
        ) in metrics
        for bad, message in (
            (np.zeros((1, 8, 8, 3), np.uint8), "UINT8 images must be [N, height, width, 1]"),
            (np.zeros((1, 0, 8), np.uint8), "no pixels"),
        ):
            async with s.post(INFER, json=raw_body(bad)) as resp:
                assert resp.status == 400
                assert message in (await resp.json())["error"]


async def test_a_pipeline_that_cannot_feed_the_model_refuses_the_load(
    repo: Path, server_config: ServerConfig
) -> None:
    write_config(repo, "breast_cancer", "preprocessing:\n  image:\n    input: input\n"
                 "    mean: [0.5]\n    std: [0.5]\n")  # fmt: skip
    write_config(repo, "scorecard", "preprocessing:\n  image:\n    input: pixels\n"
                 "    mean: [0.5]\n    std: [0.5]\n")  # fmt: skip
    async with running(server_config) as srv:
        rows = {r.name: r for r in srv.registry.index()}
    assert rows["breast_cancer"].state.value == "UNAVAILABLE"
    assert "a 4-D FP32 input" in rows["breast_cancer"].reason
    assert "has no input 'pixels'" in rows["scorecard"].reason
    assert rows["digits"].state.value == "READY"


def test_pipeline_settings_are_checked() -> None:
    import pytest
    from pydantic import ValidationError

    from fastserve.config import ModelConfig

    for image, message in (
        ({"input": "x", "mean": [0.5, 0.5], "std": [0.5]}, "one value per channel"),
        ({"input": "x", "mean": [0.5], "std": [0.0]}, "std values must be positive"),
        ({"input": "x", "mean": [0.5], "std": [1.0], "aspect": "fill"}, "stretch"),
    ):
        with pytest.raises(ValidationError, match=message):
            ModelConfig.model_validate({"preprocessing": {"image": image}})

"""Raw and encoded images through a model's declared image pipeline, over HTTP: the demo
digits model takes UINT8 pixels of any size, or PNG/JPEG files, and answers as it does for
its own FP32 tensor; an FP16 model gets the kernel's FP16 output."""

from __future__ import annotations

import asyncio
import base64
import io
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import numpy as np
from PIL import Image

from conftest import running, write_config
from fastserve import _core
from fastserve.config import ServerConfig
from fastserve.demo import example_rows
from models import image_identity, save
from reference_preprocess import preprocess

INFER = "/v2/models/digits/infer"
MSGPACK = {"Content-Type": "application/msgpack"}


def digit_pixels(count: int, scale: int = 1) -> np.ndarray:
    """UINT8 [count, 8 * scale, 8 * scale]: the demo digits as a camera would send them."""
    images = example_rows("digits", count)  # FP32 [count, 1, 8, 8], values 0..16
    pixels = np.rint(images[:, 0] * 255 / 16).astype(np.uint8)
    return np.kron(pixels, np.ones((1, scale, scale), np.uint8))


def encode(pixels: np.ndarray, fmt: str, **options: Any) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt, **options)
    return out.getvalue()


def files_body(files: list[bytes], **parameters: Any) -> dict[str, Any]:
    return {
        "inputs": [{"name": "image", "shape": [len(files)], "datatype": "BYTES", "data": files,
                    "parameters": parameters}],
        "outputs": [{"name": "label"}],
    }  # fmt: skip


async def msgpack_labels(session: aiohttp.ClientSession, files: list[bytes]) -> list[int]:
    body = msgpack.packb(files_body(files))
    async with session.post(INFER, data=body, headers=MSGPACK) as resp:
        assert resp.status == 200, await resp.text()
        doc = msgpack.unpackb(await resp.read())
    return np.frombuffer(doc["outputs"][0]["data"], "<i8").tolist()


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
        # raw pixels and a ready tensor share one batch: the batcher transforms the pixels
        # into their slot as it gathers, so no request had a preprocess stage of its own
        srv.registry.get("digits").batcher.hold(2)
        both = await asyncio.gather(labels(s, raw_body(bigger[:3])), labels(s, tensor))
        assert both == [expected[:3], expected]
        async with s.get("/v2/models/digits/stats") as resp:
            stats = await resp.json()
        assert 15 in [b["batch_size"] for b in stats["model_stats"][0]["batch_stats"]]
        async with s.get("/metrics") as resp:
            metrics = await resp.text()
        assert (
            'fastserve_request_stage_duration_seconds_count{model="digits",stage="preprocess",'
            'version="1"} 0.0'
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
    assert "a 4-D FP32 or FP16 input" in rows["breast_cancer"].reason
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


async def test_png_and_jpeg_files_get_the_answer_of_their_pixels(
    repo: Path, server_config: ServerConfig
) -> None:
    small, big = digit_pixels(6), digit_pixels(6, scale=4)
    pngs = [encode(p, "PNG") for p in big]
    # JPEG is lossy and in colour here: the answer is that of the pixels Pillow decodes
    jpegs = [encode(np.repeat(p[..., None], 3, axis=-1), "JPEG", quality=90) for p in big]
    decoded = np.stack([np.asarray(Image.open(io.BytesIO(j)).convert("L")) for j in jpegs])
    async with (
        running(server_config) as srv,
        aiohttp.ClientSession(f"http://127.0.0.1:{srv.port}") as s,
    ):
        expected = await labels(s, raw_body(big))
        assert await msgpack_labels(s, pngs) == expected
        assert await msgpack_labels(s, jpegs) == await labels(s, raw_body(decoded))
        # files of different sizes share a request
        mixed = [encode(small[0], "PNG"), pngs[1], encode(small[2], "PNG")]
        assert await msgpack_labels(s, mixed) == [
            (await labels(s, raw_body(small[i : i + 1])))[0] for i in range(3)
        ]
        # JSON carries the files in base64
        text = [base64.b64encode(p).decode() for p in pngs]
        assert await labels(s, files_body(text, content_type="base64")) == expected  # type: ignore[arg-type]
        async with s.get("/metrics") as resp:
            metrics = await resp.text()
        # the four requests of files: decoded and preprocessed in a worker thread, a stage each
        assert (
            'fastserve_request_stage_duration_seconds_count{model="digits",stage="preprocess",'
            'version="1"} 4.0'
        ) in metrics


async def test_bad_image_files_are_refused_with_the_reason(
    repo: Path, server_config: ServerConfig
) -> None:
    config = (repo / "digits" / "config.yaml").read_text()
    write_config(repo, "digits", config + "    max_decoded_pixels: 5000\n")
    big = digit_pixels(3, scale=5)  # 40x40 = 1600 pixels each
    png = encode(big[0], "PNG")
    gif = encode(big[0], "GIF")
    cases: list[tuple[dict[str, Any], str]] = [
        (files_body([png, b"not an image"]), "image 1 is not a JPEG or PNG file"),
        (files_body([gif]), "image 0 is not a JPEG or PNG file"),
        (files_body([png[: len(png) // 2]]), "image 0 (PNG) could not be decoded"),
        (files_body([png, png, png, png]), "decode to more than 5,000 pixels"),
        (files_body([b"@@@"], content_type="base64"), "invalid base64"),
        ({**files_body([png, png]), "inputs": [{**files_body([png, png])["inputs"][0],
                                                "shape": [1, 2]}]}, "BYTES [N] (or [N, 1])"),
    ]  # fmt: skip
    async with (
        running(server_config) as srv,
        aiohttp.ClientSession(f"http://127.0.0.1:{srv.port}") as s,
    ):
        for body, message in cases:
            async with s.post(INFER, data=msgpack.packb(body), headers=MSGPACK) as resp:
                assert resp.status == 400, message
                assert message in (await resp.json())["error"]
        assert len(await msgpack_labels(s, [png, png, png])) == 3  # 4,800 pixels: within


async def test_an_fp16_model_gets_the_kernels_fp16_output(
    repo: Path, server_config: ServerConfig
) -> None:
    save(image_identity(), repo / "echo16" / "1" / "model.onnx")
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    write_config(repo, "echo16", f"preprocessing:\n  image:\n    input: pixels\n"
                 f"    mean: {mean}\n    std: {std}\n    aspect: shorter_side\n")  # fmt: skip
    pixels = np.random.default_rng(7).integers(0, 256, (2, 7, 5, 3), dtype=np.uint8)
    body = {"inputs": [{"name": "pixels", "shape": [2, 7, 5, 3], "datatype": "UINT8",
                        "data": pixels.tobytes()}]}  # fmt: skip
    async with (
        running(server_config) as srv,
        aiohttp.ClientSession(f"http://127.0.0.1:{srv.port}") as s,
        s.post("/v2/models/echo16/infer", data=msgpack.packb(body), headers=MSGPACK) as resp,
    ):
        assert resp.status == 200, await resp.text()
        out = msgpack.unpackb(await resp.read())["outputs"][0]
    assert out["datatype"] == "FP16" and out["shape"] == [2, 3, 4, 4]
    got = np.frombuffer(out["data"], "<f2").reshape(2, 3, 4, 4)
    wide = _core.preprocess_images(list(pixels), 4, 4, mean, std, "shorter_side")
    assert np.array_equal(got, wide.astype(np.float16))  # numpy rounds to nearest even too
    for image, half in zip(pixels, got, strict=True):
        reference = preprocess(image, 4, 4, mean, std, "shorter_side")
        np.testing.assert_allclose(half, reference, rtol=2**-10, atol=1e-4)

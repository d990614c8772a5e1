"""``fastserve serve`` as a user runs it: tritonclient (a client we did not write), the
default demo repository, and draining on SIGTERM."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import orjson
import pytest
from PIL import Image

from conftest import ServerProcess, free_port, write_config
from fastserve.demo import example_rows
from models import predict

pytestmark = pytest.mark.timeout(120)

JSON = {"Content-Type": "application/json"}


def test_tritonclient_json_and_binary(server_process: ServerProcess, demo_repo: Path) -> None:
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(server_process.url)
    try:
        assert client.is_server_live()
        assert client.is_server_ready()
        assert client.is_model_ready("breast_cancer")
        meta = client.get_model_metadata("breast_cancer")
        assert meta["inputs"][0]["shape"] == [-1, 30]
        rows = example_rows("breast_cancer", 8)
        labels = predict(demo_repo, "breast_cancer", rows)["label"]
        for binary in (False, True):
            tensor = httpclient.InferInput("input", list(rows.shape), "FP32")
            tensor.set_data_from_numpy(rows.astype(np.float32), binary_data=binary)
            outputs = [
                httpclient.InferRequestedOutput("label", binary_data=binary),
                httpclient.InferRequestedOutput("probabilities", binary_data=binary),
            ]
            result = client.infer(
                "breast_cancer",
                [tensor],
                outputs=outputs,
                request_id=f"r{binary}",
                model_version="1",
            )
            assert result.as_numpy("label").tolist() == labels.tolist()
            assert result.as_numpy("probabilities").shape == (8, 2)
            response = result.get_response()
            assert response["model_version"] == "1"
            assert response["id"] == f"r{binary}"
        stats = client.get_inference_statistics("breast_cancer")
        assert stats["model_stats"][0]["inference_count"] >= 16
        # PNG files as a binary BYTES tensor, to the digits model's image pipeline
        images = example_rows("digits", 4)
        pixels = np.rint(images[:, 0] * 255 / 16).astype(np.uint8)
        files = []
        for p in pixels:
            out = io.BytesIO()
            Image.fromarray(p).save(out, format="PNG")
            files.append(out.getvalue())
        encoded = httpclient.InferInput("image", [4], "BYTES")
        encoded.set_data_from_numpy(np.array(files, dtype=object), binary_data=True)
        result = client.infer("digits", [encoded])
        expected = predict(demo_repo, "digits", images)["label"]
        assert result.as_numpy("label").tolist() == expected.tolist()
        with pytest.raises(Exception, match="unknown model"):
            client.infer("nope", [tensor])
    finally:
        client.close()


def test_serve_with_no_argument_builds_and_serves_the_demo(tmp_path: Path, demo_repo: Path) -> None:
    image = example_rows("digits", 1)
    port = free_port()
    env = {**os.environ, "FASTSERVE_DEMO_DIR": str(tmp_path / "demo"), "PYTHONUNBUFFERED": "1"}
    log = (tmp_path / "log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastserve", "serve", "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        body = orjson.dumps(
            {
                "inputs": [
                    {
                        "name": "image",
                        "shape": [1, 1, 8, 8],
                        "datatype": "FP32",
                        "data": image.ravel().tolist(),
                    }
                ]
            }
        )
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v2/models/digits/infer", data=body, headers=JSON
        )
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(request, timeout=2) as resp:
                    doc = orjson.loads(resp.read())
                break
            except urllib.error.HTTPError as exc:
                assert exc.code == 503, exc.read()  # live but still loading: retry
            except (urllib.error.URLError, ConnectionError):
                pass  # not listening yet
            assert proc.poll() is None, (tmp_path / "log").read_text()
            assert time.monotonic() < deadline, (tmp_path / "log").read_text()
            time.sleep(0.1)
        assert doc["outputs"][0]["data"] == predict(demo_repo, "digits", image)["label"].tolist()
        assert (tmp_path / "demo" / "digits" / "config.yaml").is_file()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        log.close()
    text = (tmp_path / "log").read_text()
    assert "model digits:1 is served by onnxruntime" in text
    assert "(CPUExecutionProvider)" in text  # the provider serving each model is logged


def test_sigterm_drains_in_flight_requests_and_refuses_new_ones(repo: Path) -> None:
    # a long queue delay keeps a request in flight when SIGTERM arrives
    write_config(repo, "adder", "batching:\n  max_batch_size: 8\n  max_queue_delay_us: 3000000\n")
    server = ServerProcess(repo, "--drain-timeout", "10")
    try:
        server.wait_ready()
        body = orjson.dumps(
            {
                "inputs": [
                    {"name": n, "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}
                    for n in "ab"
                ]
            }
        )
        answer: dict[str, object] = {}

        def in_flight() -> None:
            req = urllib.request.Request(
                f"http://{server.url}/v2/models/adder/infer", data=body, headers=JSON
            )
            with urllib.request.urlopen(req, timeout=20) as resp:
                answer["status"] = resp.status
                answer["doc"] = orjson.loads(resp.read())

        thread = threading.Thread(target=in_flight)
        thread.start()
        time.sleep(0.5)
        started = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        # readiness goes down and new work is refused while the first request drains
        refused = False
        for _ in range(100):
            try:
                urllib.request.urlopen(f"http://{server.url}/v2/health/ready", timeout=1)
            except urllib.error.HTTPError as exc:
                assert exc.code == 503
                refused = True
                break
            except urllib.error.URLError:
                refused = True  # already closed
                break
            time.sleep(0.01)
        assert refused
        thread.join(timeout=20)
        assert answer["status"] == 200
        assert answer["doc"]["outputs"][0]["data"] == [2.0, 4.0, 6.0, 8.0]  # type: ignore[index]
        assert server.proc.wait(timeout=15) == 0
        assert time.monotonic() - started < 10
    finally:
        server.stop()

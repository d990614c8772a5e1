"""Reference servers the benchmark suite measures fastserve against, on the same V2 JSON
requests (issue 8's reference lines):

    python bench/baselines.py ceiling  MODEL.onnx --port 8001   # the HTTP stack's ceiling
    python bench/baselines.py ceiling-llhttp MODEL.onnx --port 8004  # the fast path's
    python bench/baselines.py plain    MODEL.onnx --port 8002   # one request at a time
    python bench/baselines.py pybatch  MODEL.onnx --port 8003 [--max-batch 64] [--delay-us 500]

- ``ceiling``: a minimal aiohttp handler that parses the same body as a V2 server must
  (the JSON document and its tensor into numpy) and returns a fixed answer: no server built
  on aiohttp can answer faster.
- ``ceiling-llhttp``: the same on the stack of fastserve's fast path: an asyncio protocol
  on uvloop that frames requests with httptools (llhttp) and writes the fixed answer.
- ``plain``: aiohttp + onnxruntime, ``session.run`` on each request as it comes: what a user
  writes in an afternoon.
- ``pybatch``: the same with a pure-Python asyncio batcher (a queue, a delay, one
  concatenation and one ``session.run`` per batch): what the native core must beat.

All three answer ``POST /v2/models/{name}/infer`` with the model's first input from the
request's first input, and every output as V2 JSON; ``GET /v2/health/ready`` says ready.
onnxruntime runs with one intra-op thread, on the CPU, as in the fastserve benchmarks.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from aiohttp import web

DTYPES = {"FP32": np.float32, "FP64": np.float64, "INT64": np.int64, "INT32": np.int32}
V2 = {
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(int64)": "INT64",
    "tensor(int32)": "INT32",
}


def parse(body: bytes) -> tuple[dict[str, Any], np.ndarray]:
    """The V2 JSON document and its first input as a numpy array of its shape."""
    doc = orjson.loads(body)
    tensor = doc["inputs"][0]
    data = np.asarray(tensor["data"], dtype=DTYPES[tensor["datatype"]])
    return doc, data.reshape(tensor["shape"])


class Model:
    def __init__(self, path: Path) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        self.outputs = [(o.name, V2.get(o.type, "FP32")) for o in self.session.get_outputs()]

    def run(self, rows: np.ndarray) -> list[np.ndarray]:
        return self.session.run(None, {self.input: rows})  # type: ignore[no-any-return]

    def answer(self, name: str, doc: dict[str, Any], outputs: list[np.ndarray]) -> web.Response:
        body = {
            "model_name": name,
            "model_version": "1",
            "outputs": [
                {"name": n, "datatype": t, "shape": list(a.shape), "data": a.ravel().tolist()}
                for (n, t), a in zip(self.outputs, outputs, strict=True)
            ],
        }
        if "id" in doc:
            body["id"] = doc["id"]
        return web.Response(body=orjson.dumps(body), content_type="application/json")


class PythonBatcher:
    """Requests queue; the first waits up to ``delay_s`` for others (or until ``max_batch``
    rows), then one ``session.run`` answers them all."""

    def __init__(self, model: Model, max_batch: int, delay_s: float) -> None:
        self.model = model
        self.max_batch = max_batch
        self.delay_s = delay_s
        self.queue: asyncio.Queue[tuple[np.ndarray, asyncio.Future[list[np.ndarray]]]] = (
            asyncio.Queue()
        )

    async def infer(self, rows: np.ndarray) -> list[np.ndarray]:
        future: asyncio.Future[list[np.ndarray]] = asyncio.get_running_loop().create_future()
        await self.queue.put((rows, future))
        return await future

    async def serve(self) -> None:
        while True:
            batch = [await self.queue.get()]
            count = len(batch[0][0])
            deadline = time.perf_counter() + self.delay_s
            while count < self.max_batch:
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self.queue.get(), left)
                except asyncio.TimeoutError:  # (not the builtin before Python 3.11)
                    break
                batch.append(item)
                count += len(item[0])
            self._run(batch)

    def _run(self, batch: list[tuple[np.ndarray, asyncio.Future[list[np.ndarray]]]]) -> None:
        try:
            outputs = self.model.run(np.concatenate([rows for rows, _ in batch]))
        except Exception as exc:  # every waiter gets the error
            for _, future in batch:
                future.set_exception(exc)
            return
        start = 0
        for rows, future in batch:
            end = start + len(rows)
            future.set_result([o[start:end] for o in outputs])
            start = end


def app(kind: str, model_file: Path, max_batch: int, delay_us: int) -> web.Application:
    application = web.Application()
    fixed = orjson.dumps({"model_name": "m", "model_version": "1", "outputs": []})

    async def ready(request: web.Request) -> web.Response:
        return web.Response(text="")

    application.router.add_get("/v2/health/ready", ready)
    if kind == "ceiling":

        async def ceiling(request: web.Request) -> web.Response:
            parse(await request.read())
            return web.Response(body=fixed, content_type="application/json")

        application.router.add_post("/v2/models/{name}/infer", ceiling)
        return application

    model = Model(model_file)
    if kind == "plain":

        async def plain(request: web.Request) -> web.Response:
            doc, rows = parse(await request.read())
            return model.answer(request.match_info["name"], doc, model.run(rows))

        application.router.add_post("/v2/models/{name}/infer", plain)
        return application

    batcher = PythonBatcher(model, max_batch, delay_us / 1e6)

    async def batched(request: web.Request) -> web.Response:
        doc, rows = parse(await request.read())
        return model.answer(request.match_info["name"], doc, await batcher.infer(rows))

    async def run_batcher(application: web.Application) -> Any:
        task = asyncio.create_task(batcher.serve())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    application.router.add_post("/v2/models/{name}/infer", batched)
    application.cleanup_ctx.append(run_batcher)
    return application


class LlhttpCeiling(asyncio.Protocol):
    """``ceiling-llhttp``: one connection; llhttp frames the requests, each body is parsed as
    ``ceiling`` parses it, and the answer is fixed (health routes: an empty 200)."""

    FIXED = orjson.dumps({"model_name": "m", "model_version": "1", "outputs": []})
    ANSWER = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
        % (len(FIXED), FIXED)
    )
    EMPTY = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
    FAILED = b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n"

    def __init__(self) -> None:
        import httptools

        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.body: list[bytes] = []
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        assert self.transport is not None
        url, body = self.url, b"".join(self.body)
        self.url, self.body = b"", []
        if url.endswith(b"/infer"):
            try:
                parse(body)
            except Exception:  # a body that does not parse, as aiohttp would answer it
                self.transport.write(self.FAILED)
            else:
                self.transport.write(self.ANSWER)
        else:
            self.transport.write(self.EMPTY)


async def serve_llhttp_ceiling(host: str, port: int) -> None:
    server = await asyncio.get_running_loop().create_server(LlhttpCeiling, host, port, backlog=1024)
    await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("kind", choices=["ceiling", "ceiling-llhttp", "plain", "pybatch"])
    parser.add_argument("model", type=Path)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--delay-us", type=int, default=500)
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    if args.kind == "ceiling-llhttp":
        asyncio.run(serve_llhttp_ceiling(args.host, args.port))
        return
    web.run_app(
        app(args.kind, args.model, args.max_batch, args.delay_us),
        host=args.host,
        port=args.port,
        access_log=None,
        print=None,
    )


if __name__ == "__main__":
    main()

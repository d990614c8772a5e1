"""Batching behaviour seen over HTTP: queue bound, deadlines, priority, formed batches."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from conftest import running, write_config
from fastserve.backends.onnxruntime import OnnxRuntimeSession
from fastserve.config import ServerConfig, load_model_config
from fastserve.errors import ConfigError
from fastserve.model import resolve_execution

pytestmark = pytest.mark.timeout(60)

ADDER = "/v2/models/adder/infer"


def adder_body(value: float, **parameters: Any) -> dict[str, Any]:
    row = [value] * 4
    body: dict[str, Any] = {
        "inputs": [
            {"name": "a", "shape": [1, 4], "datatype": "FP32", "data": row},
            {"name": "b", "shape": [1, 4], "datatype": "FP32", "data": row},
        ]
    }
    if parameters:
        body["parameters"] = parameters
    return body


async def post(
    session: aiohttp.ClientSession, body: dict[str, Any]
) -> tuple[int, dict[str, Any], dict[str, str]]:
    async with session.post(ADDER, json=body) as resp:
        return resp.status, await resp.json(), dict(resp.headers)


async def wait_for_depth(batcher: Any, depth: int) -> None:
    for _ in range(2000):
        if batcher.queue_depth >= depth:
            return
        await asyncio.sleep(0.002)
    raise AssertionError(f"queue never reached {depth} (at {batcher.queue_depth})")


@pytest.fixture(params=["event_loop", "threads"])
def execution(request: pytest.FixtureRequest) -> str:
    """Every behaviour here holds whichever runs the batches."""
    return str(request.param)


@pytest.fixture
def adder_config(repo: Path, server_config: ServerConfig, execution: str) -> ServerConfig:
    write_config(
        repo,
        "adder",
        "batching:\n  max_batch_size: 4\n  max_queue_delay_us: 1000\n  max_queue_size: 8\n"
        f"  priority_levels: 2\nexecution: {execution}\n",
    )
    return server_config


async def test_full_queue_sheds_at_once_with_retry_after(adder_config: ServerConfig) -> None:
    async with (
        running(adder_config) as srv,
        aiohttp.ClientSession(f"http://127.0.0.1:{srv.port}") as s,
    ):
        batcher = srv.registry.get("adder").batcher
        batcher.hold(100)
        tasks = [asyncio.create_task(post(s, adder_body(i))) for i in range(10)]
        await wait_for_depth(batcher, 8)
        for _ in range(200):  # the two over the bound are answered at once, without the hold
            if sum(t.done() for t in tasks) == 2:
                break
            await asyncio.sleep(0.005)
        rejected = [t.result() for t in tasks if t.done()]
        assert len(rejected) == 2
        for status, doc, headers in rejected:
            assert status == 503
            assert "queue full" in doc["error"]
            assert int(headers["Retry-After"]) >= 1
        batcher.hold(0)
        results = await asyncio.gather(*tasks)
        assert sorted(r[0] for r in results) == [200] * 8 + [503] * 2
        for status, doc, _ in results:
            if status == 200:
                value = doc["outputs"][0]["data"][0] / 2
                assert doc["outputs"][0]["data"] == [value * 2] * 4


async def test_request_past_its_deadline_gets_503_and_never_runs(
    adder_config: ServerConfig,
) -> None:
    async with (
        running(adder_config) as srv,
        aiohttp.ClientSession(f"http://127.0.0.1:{srv.port}") as s,
    ):
        model = srv.registry.get("adder")
        model.batcher.hold(100)
        started = time.monotonic()
        status, doc, headers = await post(s, adder_body(1.0, timeout=50_000))
        assert status == 503, doc
        assert "timed out" in doc["error"]
        assert "Retry-After" in headers
        assert time.monotonic() - started >= 0.05
        model.batcher.hold(0)
        assert model.batcher.core_stats()["batches"] == 0
        stats = model.statistics()
        assert stats["batching"]["timed_out_in_queue"] == 1
        assert stats["inference_stats"]["fail"]["count"] == 1
        # the batcher still serves
        assert (await post(s, adder_body(2.0)))[0] == 200


async def test_higher_priority_is_served_first(
    adder_config: ServerConfig, repo: Path, execution: str
) -> None:
    write_config(
        repo,
        "adder",
        "batching:\n  max_batch_size: 1\n  max_queue_delay_us: 0\n  priority_levels: 2\n"
        f"execution: {execution}\n",
    )
    async with (
        running(adder_config) as srv,
        aiohttp.ClientSession(f"http://127.0.0.1:{srv.port}") as s,
    ):
        batcher = srv.registry.get("adder").batcher
        batcher.hold(4)
        finished: list[int] = []

        async def send(value: int, priority: int) -> None:
            status, _, _ = await post(s, adder_body(value, priority=priority))
            assert status == 200
            finished.append(value)

        tasks = []
        for value, priority in [(1, 2), (2, 2), (3, 1), (4, 1)]:
            tasks.append(asyncio.create_task(send(value, priority)))
            if len(tasks) < 4:  # the fourth opens the hold
                await wait_for_depth(batcher, len(tasks))
        await asyncio.gather(*tasks)
        assert set(finished[:2]) == {3, 4}
        assert set(finished[2:]) == {1, 2}


async def test_concurrent_requests_share_batches(
    adder_config: ServerConfig, execution: str
) -> None:
    async with (
        running(adder_config) as srv,
        aiohttp.ClientSession(f"http://127.0.0.1:{srv.port}") as s,
    ):
        model = srv.registry.get("adder")
        assert model.batcher.execution == execution
        model.batcher.hold(8)
        results = await asyncio.gather(*(post(s, adder_body(i)) for i in range(8)))
        for i, (status, doc, _) in enumerate(results):
            assert status == 200
            assert doc["outputs"][0]["data"] == [2.0 * i] * 4  # each caller got its own rows
        core = model.batcher.core_stats()
        assert core["batches"] == core["batches_full"] == 2
        assert [(rows, n) for rows, n, _ in model.batcher.batch_sizes.snapshot()] == [(4, 2)]


async def test_broken_config_leaves_the_model_unavailable_and_the_others_serving(
    repo: Path, server_config: ServerConfig
) -> None:
    write_config(repo, "adder", "batching:\n  max_batch_size: 4\n  max_queue_dealy_us: 5\n")
    async with (
        running(server_config) as srv,
        aiohttp.ClientSession(f"http://127.0.0.1:{srv.port}") as s,
    ):
        async with s.get("/v2/health/ready") as resp:
            assert resp.status == 503
        async with s.get("/v2/models/adder/ready") as resp:
            assert resp.status == 503
        async with s.post(ADDER, json=adder_body(1.0)) as resp:
            assert resp.status == 503
        status = {st.name: st for st in srv.registry.index()}["adder"]
        assert "config.yaml: line 3: batching.max_queue_dealy_us: unknown setting" in status.reason
        async with s.get("/v2/models/digits/ready") as resp:
            assert resp.status == 200


async def test_several_instances_each_run_batches(
    repo: Path, server_config: ServerConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_config(
        repo,
        "adder",
        "batching:\n  max_batch_size: 2\n  max_queue_delay_us: 0\ninstance_count: 2\n",
    )
    ran: set[int] = set()  # the sessions (instances) that ran a batch
    original = OnnxRuntimeSession.run

    def tracking(self: OnnxRuntimeSession, inputs: Any) -> Any:
        ran.add(id(self))
        time.sleep(0.002)  # long enough that one worker cannot take every batch
        return original(self, inputs)

    monkeypatch.setattr(OnnxRuntimeSession, "run", tracking)
    async with (
        running(server_config) as srv,
        aiohttp.ClientSession(f"http://127.0.0.1:{srv.port}") as s,
    ):
        model = srv.registry.get("adder")
        assert len(model.sessions) == 2
        ran.clear()  # warm-up ran both: count traffic only
        results = await asyncio.gather(*(post(s, adder_body(i)) for i in range(40)))
        for i, (status, doc, _) in enumerate(results):
            assert status == 200
            assert doc["outputs"][0]["data"] == [2.0 * i] * 4
        assert ran >= {id(session) for session in model.sessions}


@pytest.fixture
def cursed_13(monkeypatch: pytest.MonkeyPatch) -> None:
    """The backend fails every batch that holds a 13."""
    original = OnnxRuntimeSession.run

    def flaky(self: OnnxRuntimeSession, inputs: Any) -> Any:
        if (inputs[0] == 13).any():
            raise RuntimeError("row 13 is cursed")
        return original(self, inputs)

    monkeypatch.setattr(OnnxRuntimeSession, "run", flaky)


@pytest.mark.usefixtures("cursed_13")
async def test_a_failing_batch_fails_only_its_own_requests(adder_config: ServerConfig) -> None:
    async with (
        running(adder_config) as srv,
        aiohttp.ClientSession(f"http://127.0.0.1:{srv.port}") as s,
    ):
        status, doc, _ = await post(s, adder_body(13.0))
        assert status == 500
        assert "inference failed: RuntimeError: row 13 is cursed" in doc["error"]
        status, doc, _ = await post(s, adder_body(1.0))  # the loop and the model live on
        assert status == 200 and doc["outputs"][0]["data"] == [2.0] * 4
        stats = srv.registry.get("adder").statistics()["inference_stats"]
        assert stats["fail"]["count"] == 1 and stats["success"]["count"] == 1


@pytest.mark.usefixtures("cursed_13")
async def test_a_lone_request_is_counted_as_the_core_would_count_its_batch(
    repo: Path, server_config: ServerConfig, execution: str
) -> None:
    # event loop: a lone request runs on its own arrays, past the core; threads: through it.
    # The answers, the errors and every count agree.
    write_config(
        repo,
        "adder",
        "batching:\n  max_batch_size: 8\n  max_queue_delay_us: 5000000\n"
        f"  release_when_idle: true\nexecution: {execution}\n",
    )
    async with (
        running(server_config) as srv,
        aiohttp.ClientSession(f"http://127.0.0.1:{srv.port}") as s,
    ):
        for value in (1.0, 2.0):
            status, doc, _ = await post(s, adder_body(value))
            assert status == 200 and doc["outputs"][0]["data"] == [2 * value] * 4, doc
        status, doc, _ = await post(s, adder_body(13.0))
        assert status == 500
        assert "inference failed: RuntimeError: row 13 is cursed" in doc["error"]
        model = srv.registry.get("adder")
        stats = model.statistics()
        assert stats["execution_count"] == 3
        assert stats["batching"]["batches_by_release_reason"]["idle"] == 3
        assert [(b["batch_size"], b["compute_infer"]["count"]) for b in stats["batch_stats"]] == [
            (1, 3)
        ]
        inference = stats["inference_stats"]
        assert (inference["success"]["count"], inference["fail"]["count"]) == (2, 1)
        core = model.batcher.core_stats()
        assert (core["submitted"], core["completed"], core["failed"]) == (3, 2, 1)
        ran_in_core = model.batcher._core.stats()["batches"]  # the native core's own count
        assert ran_in_core == (0 if execution == "event_loop" else 3)


@pytest.mark.parametrize(
    ("text", "provider", "expected"),
    [
        ("", "CPUExecutionProvider", "event_loop"),
        ("", "CUDAExecutionProvider", "threads"),
        ("instance_count: 2\n", "CPUExecutionProvider", "threads"),
        ("execution: threads\n", "CPUExecutionProvider", "threads"),
        ("execution: event_loop\n", "CUDAExecutionProvider", "event_loop"),
    ],
)
def test_auto_execution_runs_one_cpu_instance_on_the_event_loop(
    tmp_path: Path, text: str, provider: str, expected: str
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    assert resolve_execution(load_model_config(path, "m"), provider) == expected


def test_the_event_loop_runs_one_instance_only(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("instance_count: 3\nexecution: event_loop\n")
    with pytest.raises(ConfigError, match="event_loop runs one instance, but instance_count is 3"):
        load_model_config(path, "m")


@pytest.mark.parametrize("execution", ["event_loop", "threads"])
async def test_release_when_idle_skips_the_delay_only_when_every_client_waits(
    repo: Path, server_config: ServerConfig, execution: str
) -> None:
    # a delay far past the deadline: a request that waits it out gets 503 (timeout)
    write_config(
        repo,
        "adder",
        "batching:\n  max_batch_size: 8\n  max_queue_delay_us: 5000000\n"
        f"  queue_timeout_us: 500000\n  release_when_idle: true\nexecution: {execution}\n",
    )
    async with (
        running(server_config) as srv,
        aiohttp.ClientSession(f"http://127.0.0.1:{srv.port}") as session,
    ):
        # the only client, waiting: nothing can join its batch, so it goes at once
        status, doc, _ = await post(session, adder_body(1.0))
        assert status == 200, doc
        async with session.get("/v2/models/adder/stats") as resp:
            reasons = (await resp.json())["model_stats"][0]["batching"]["batches_by_release_reason"]
        assert reasons == {"full": 0, "preferred": 0, "delay": 0, "idle": 1, "drain": 0}
        # another client connected (idle) could still send: the delay is waited for
        _, idle = await asyncio.open_connection("127.0.0.1", srv.port)
        try:
            await asyncio.sleep(0.05)  # the server has accepted it
            status, doc, _ = await post(session, adder_body(2.0))
            assert status == 503 and "timed out in the queue" in doc["error"], doc
        finally:
            idle.close()

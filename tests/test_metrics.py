"""``/metrics`` of a real server under real requests: the serving families count what
happened, by stage and outcome; an unknown model creates no series; promtool accepts it."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from conftest import needs_promtool, promtool
from fastserve.demo import example_rows
from fastserve.server import Server
from fastserve.stats import STAGES
from models import tabular_body

MODEL = "breast_cancer"
INFER = f"/v2/models/{MODEL}/infer"


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, sorted labels) -> value."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(found: dict[Any, float], name: str, **labels: str) -> float:
    return found[name, tuple(sorted(labels.items()))]


async def scrape(client: aiohttp.ClientSession) -> str:
    async with client.get("/metrics") as resp:
        assert resp.status == 200
        return await resp.text()


async def test_requests_are_counted_by_outcome_stage_and_batch(
    server: Server, client: aiohttp.ClientSession
) -> None:
    rows = example_rows(MODEL, 3)
    for i in range(5):
        async with client.post(INFER, json=tabular_body(rows[i % 3])) as resp:
            assert resp.status == 200
    three = {"inputs": [{"name": "input", "shape": [3, 30], "datatype": "FP32",
                         "data": rows.tolist()}]}  # fmt: skip
    async with client.post(INFER, json=three) as resp:
        assert resp.status == 200
    for body in ({"inputs": []}, {"inputs": [{"name": "nope"}]}):
        async with client.post(INFER, json=body) as resp:
            assert resp.status == 400
    async with client.post("/v2/models/nope/infer", json=tabular_body(rows[0])) as resp:
        assert resp.status == 404

    text = await scrape(client)
    found = samples(text)
    key = {"model": MODEL, "version": "1"}
    assert value(found, "fastserve_requests_total", outcome="success", **key) == 6
    assert value(found, "fastserve_requests_total", outcome="invalid", **key) == 2
    for outcome in ("rejected", "timeout", "error"):
        assert value(found, "fastserve_requests_total", outcome=outcome, **key) == 0
    assert value(found, "fastserve_inferred_rows_total", **key) == 8
    assert value(found, "fastserve_request_duration_seconds_count", **key) == 8
    measured = [stage for stage in STAGES[1:] if stage != "preprocess"]  # no pipeline here
    assert ("fastserve_request_stage_duration_seconds_count",
            tuple(sorted({"stage": "preprocess", **key}.items()))) not in found  # fmt: skip
    for stage in measured:
        count = value(found, "fastserve_request_stage_duration_seconds_count", stage=stage, **key)
        assert count == 6, stage
        total = value(found, "fastserve_request_stage_duration_seconds_sum", stage=stage, **key)
        assert total > 0, stage
    # a successful request's stages fit inside its end-to-end time
    parts = sum(
        value(found, "fastserve_request_stage_duration_seconds_sum", stage=stage, **key)
        for stage in measured
    )
    assert parts <= value(found, "fastserve_request_duration_seconds_sum", **key)
    inf = value(found, "fastserve_request_duration_seconds_bucket", le="+Inf", **key)
    assert inf == 8

    batches = sum(
        v for (name, labels), v in found.items()
        if name == "fastserve_batches_total" and dict(labels)["model"] == MODEL
    )  # fmt: skip
    assert value(found, "fastserve_batch_size_rows_count", **key) == batches >= 6
    assert value(found, "fastserve_batch_size_rows_sum", **key) == 8
    assert value(found, "fastserve_queue_depth", **key) == 0
    assert value(found, "fastserve_model_inflight_requests", **key) == 0
    assert value(found, "fastserve_inflight_requests") == 0
    assert 'model="nope"' not in text


@needs_promtool
async def test_promtool_accepts_a_live_scrape(
    server: Server, client: aiohttp.ClientSession
) -> None:
    async with client.post(INFER, json=tabular_body(example_rows(MODEL, 1)[0])) as resp:
        assert resp.status == 200
    text = await scrape(client)
    result = await asyncio.to_thread(promtool, "check", "metrics", stdin=text)
    assert result.returncode == 0, result.stdout + result.stderr


async def test_without_monitoring_stages_and_drift_are_not_counted(server_config: Any) -> None:
    from conftest import running

    config = server_config.model_copy(update={"monitoring": False})
    async with (
        running(config) as srv,
        aiohttp.ClientSession(f"http://127.0.0.1:{srv.port}") as client,
    ):
        async with client.post(INFER, json=tabular_body(example_rows(MODEL, 1)[0])) as resp:
            assert resp.status == 200
        found = samples(await scrape(client))
        async with client.get(f"/v2/models/{MODEL}/drift") as resp:
            drift = await resp.json()
    key = {"model": MODEL, "version": "1"}
    assert value(found, "fastserve_requests_total", outcome="success", **key) == 1
    assert value(found, "fastserve_request_stage_duration_seconds_count", stage="queue", **key) == 0
    assert drift["total_rows"] == 0

"""Drift of live inputs against a version's reference profile: the demo model fed its own
test split (no drift), then a copy with two features scaled (drift only there); over the
drift API and the Prometheus gauges, with a real server and the native sketch."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import running, write_config
from fastserve.config import ServerConfig
from fastserve.demo import load_split
from fastserve.monitoring.drift import distance
from fastserve.profiling import FeatureReference

MODEL = "breast_cancer"
SHIFTED = {"mean area": 1.5, "worst radius": 1.5}
PSI_DRIFT = 0.25


def reference(kind: str, edges: tuple[float, ...], fractions: tuple[float, ...]) -> Any:
    return FeatureReference(
        name="f", kind=kind, count=100, nulls=0, mean=0.0, std=1.0, min=0.0, max=1.0,
        quantiles=(0.0,) * 101, edges=edges, fractions=fractions,
    )  # fmt: skip


def test_psi_and_jensen_shannon_of_known_distributions() -> None:
    quarters = reference("continuous", (1.0, 2.0, 3.0), (0.25, 0.25, 0.25, 0.25))
    assert distance(quarters, [10, 10, 10, 10]) == ("psi", pytest.approx(0.0))
    method, value = distance(quarters, [40, 0, 0, 0])
    # (1 - .25) ln(1/.25) + 3 (1e-4 - .25) ln(1e-4/.25)
    assert method == "psi" and value == pytest.approx(
        0.75 * np.log(4) + 3 * (1e-4 - 0.25) * np.log(1e-4 / 0.25)
    )
    flags = reference("discrete", (0.0, 1.0), (0.5, 0.5))
    assert distance(flags, [5, 5, 0]) == ("jensen_shannon", pytest.approx(0.0))
    # every live value one the reference never had: as far apart as can be
    assert distance(flags, [0, 0, 7]) == ("jensen_shannon", pytest.approx(1.0))


def body(rows: np.ndarray) -> dict[str, Any]:
    return {"inputs": [{"name": "input", "shape": list(rows.shape), "datatype": "FP32",
                        "data": rows.tolist()}]}  # fmt: skip


async def send(session: aiohttp.ClientSession, rows: np.ndarray, per_request: int = 11) -> None:
    for start in range(0, len(rows), per_request):
        part = rows[start : start + per_request]
        async with session.post(f"/v2/models/{MODEL}/infer", json=body(part)) as resp:
            assert resp.status == 200, await resp.text()


async def drift_doc(session: aiohttp.ClientSession) -> dict[str, Any]:
    async with session.get(f"/v2/models/{MODEL}/drift") as resp:
        assert resp.status == 200
        doc: dict[str, Any] = await resp.json()
        return doc


async def gauges(session: aiohttp.ClientSession) -> dict[str, float]:
    async with session.get("/metrics") as resp:
        text = await resp.text()
    return {
        s.labels["feature"]: s.value
        for family in text_string_to_metric_families(text)
        if family.name == "fastserve_feature_drift"
        for s in family.samples
        if s.labels["model"] == MODEL
    }


async def test_only_shifted_features_drift(repo: Path, server_config: ServerConfig) -> None:
    split = load_split(MODEL)
    test_rows = np.array(split.x_test)  # 143 rows: one window
    write_config(repo, MODEL, f"drift:\n  window_rows: {len(test_rows)}\n  min_rows: 50\n")
    names = list(split.feature_names)
    async with (
        running(server_config) as srv,
        aiohttp.ClientSession(f"http://127.0.0.1:{srv.port}") as s,
    ):
        await send(s, test_rows[:33])
        early = await drift_doc(s)
        assert early["rows"] == 33 and early["features"] is None  # under min_rows
        assert await gauges(s) == {}

        await send(s, test_rows[33:])
        same = await drift_doc(s)
        assert same["rows"] == len(test_rows) and same["total_rows"] == len(test_rows)
        assert [f["feature"] for f in same["features"]] == names
        assert {f["method"] for f in same["features"]} == {"psi"}
        assert max(f["value"] for f in same["features"]) < PSI_DRIFT, same["features"]
        assert same["predictions"]["method"] == "jensen_shannon"
        assert same["predictions"]["value"] < 0.1
        quiet = await gauges(s)
        assert set(quiet) == set(names) and max(quiet.values()) < PSI_DRIFT

        shifted = test_rows.copy()
        for name, factor in SHIFTED.items():
            shifted[:, names.index(name)] *= factor
        await send(s, shifted)
        moved = await gauges(s)
    drifted = {name for name, value in moved.items() if value > PSI_DRIFT}
    assert drifted == set(SHIFTED), moved
    for name in set(names) - set(SHIFTED):
        assert moved[name] == pytest.approx(quiet[name])  # the same rows as before


async def test_drift_needs_a_reference_and_one_that_fits(
    repo: Path, server_config: ServerConfig
) -> None:
    broken = repo / "scorecard" / "1" / "reference.json"
    broken.write_text(broken.read_text().replace('"mean radius"', '"radius, mean"'))
    async with (
        running(server_config) as srv,
        aiohttp.ClientSession(f"http://127.0.0.1:{srv.port}") as s,
    ):
        async with s.get("/v2/models/digits/drift") as resp:
            assert resp.status == 404
            assert "no reference profile" in (await resp.json())["error"]
        (row,) = [r for r in srv.registry.index() if r.name == "scorecard"]
        assert row.state.value == "UNAVAILABLE"
        assert "reference.json" in row.reason and "schema.yaml's columns" in row.reason


async def test_drift_alerts_reach_a_webhook_and_resolve(
    repo: Path, server_config: ServerConfig
) -> None:
    """--alert-webhook: a real receiver gets Alertmanager's payload when the shifted
    features drift, and a resolved one when the inputs look like training data again."""
    from aiohttp import web

    received: list[dict[str, Any]] = []
    arrived = asyncio.Event()

    async def hook(request: web.Request) -> web.Response:
        received.append(await request.json())
        arrived.set()
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]

    async def next_payload() -> dict[str, Any]:
        await asyncio.wait_for(arrived.wait(), timeout=10)
        arrived.clear()
        return received[-1]

    split = load_split(MODEL)
    rows = np.array(split.x_test)
    names = list(split.feature_names)
    shifted = rows.copy()
    for name, factor in SHIFTED.items():
        shifted[:, names.index(name)] *= factor
    write_config(repo, MODEL, f"drift:\n  window_rows: {len(rows)}\n  min_rows: {len(rows)}\n")
    config = server_config.model_copy(
        update={"alert_webhook": f"http://127.0.0.1:{port}/hook", "alert_interval_s": 0.2}
    )
    try:
        async with (
            running(config) as srv,
            aiohttp.ClientSession(f"http://127.0.0.1:{srv.port}") as s,
        ):
            await send(s, shifted)
            firing = await next_payload()
            assert firing["version"] == "4" and firing["status"] == "firing"
            drifted = {
                a["labels"]["feature"] for a in firing["alerts"]
                if a["labels"]["alertname"] == "FastserveFeatureDrift"
            }  # fmt: skip
            assert drifted == set(SHIFTED)
            for alert in firing["alerts"]:
                assert alert["status"] == "firing" and alert["labels"]["model"] == MODEL
                assert "drifted" in alert["annotations"]["summary"]
            await send(s, rows)  # a window like the training data again
            resolved = await next_payload()
    finally:
        await runner.cleanup()
    assert resolved["status"] == "resolved"
    assert {a["labels"]["feature"] for a in resolved["alerts"]} == set(SHIFTED)
    assert all(
        a["status"] == "resolved" and a["endsAt"] >= a["startsAt"] for a in resolved["alerts"]
    )

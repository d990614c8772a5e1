"""Shadow review end to end: request ids, feedback, accuracy, mirrored candidates, the
review flag; with a real server, real onnxruntime sessions and a real SQLite file.

The candidate is real too: the demo ``scorecard`` model takes the same 30 breast-cancer
features as ``breast_cancer`` and was trained differently, so the two disagree on a few
of the test rows. Copied in as ``breast_cancer`` version 2, it is the shadow of version 1.
"""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from conftest import running, write_config
from fastserve.backends.onnxruntime import OnnxRuntimeSession
from fastserve.config import ServerConfig
from fastserve.demo import example_labels, example_rows
from models import linear, reference, save, tabular_body

pytestmark = pytest.mark.timeout(120)

MODEL = "breast_cancer"
INFER = f"/v2/models/{MODEL}/infer"
ROWS = 143  # the whole test split


@pytest.fixture
def candidate_repo(repo: Path) -> Path:
    """breast_cancer v1 (primary) and v2 = the scorecard model (the shadow)."""
    shutil.copytree(repo / "scorecard" / "1", repo / MODEL / "2")
    write_config(
        repo,
        MODEL,
        "primary: 1\nshadow:\n  version: 2\n  sample_rate: 1.0\n  max_pending: 1000\n"
        "batching:\n  max_batch_size: 16\n  max_queue_delay_us: 500\n",
    )
    return repo


def config_for(repo: Path, **extra: Any) -> ServerConfig:
    return ServerConfig(
        repository=repo, port=0, drain_timeout_s=5, state_db=repo.parent / "state.db", **extra
    )


async def infer_all(
    session: aiohttp.ClientSession, rows: np.ndarray, prefix: str = "r"
) -> list[dict[str, Any]]:
    async def one(i: int) -> dict[str, Any]:
        async with session.post(INFER, json=tabular_body(rows[i], f"{prefix}{i}")) as resp:
            assert resp.status == 200, await resp.text()
            return dict(await resp.json())

    return list(await asyncio.gather(*(one(i) for i in range(len(rows)))))


async def wait_compared(session: aiohttp.ClientSession, n: int) -> dict[str, Any]:
    """The shadow summary once ``n`` mirrored requests are recorded (compared or failed)."""
    doc: dict[str, Any] = {}
    for _ in range(400):
        async with session.get(f"/v2/models/{MODEL}/shadow") as resp:
            assert resp.status == 200
            doc = await resp.json()
        if doc.get("compared", 0) + doc.get("shadow_errors", 0) >= n:
            return doc
        await asyncio.sleep(0.025)
    raise AssertionError(f"only {doc} recorded, wanted {n}")


# -- ids and feedback --------------------------------------------------------------------------


async def test_every_answer_carries_an_id_to_send_feedback_with(repo: Path) -> None:
    row = example_rows(MODEL, 1)[0]
    async with (
        running(config_for(repo)) as srv,
        aiohttp.ClientSession(f"http://127.0.0.1:{srv.port}") as s,
    ):
        async with s.post(INFER, json=tabular_body(row, "client-7")) as resp:
            assert (await resp.json())["id"] == "client-7"
        async with s.post(INFER, json=tabular_body(row)) as resp:
            made = (await resp.json())["id"]
        async with s.post(INFER, json=tabular_body(row)) as resp:
            other = (await resp.json())["id"]
        prefix, _, number = made.rpartition("-")
        assert len(prefix) == 12 and int(number, 16) >= 0  # process prefix, then a counter
        assert made != other
        async with s.post(f"/v2/models/{MODEL}/feedback", json={"id": made, "label": 1}) as resp:
            assert resp.status == 200, await resp.text()
            assert (await resp.json())["recorded"] == "recorded"


async def test_feedback_is_idempotent_validated_and_counts_toward_accuracy(repo: Path) -> None:
    rows, labels = example_rows(MODEL, 20), example_labels(MODEL, 20)
    predicted = reference(repo / MODEL / "1" / "model.onnx", rows)["label"]
    feedback = f"/v2/models/{MODEL}/feedback"
    async with (
        running(config_for(repo)) as srv,
        aiohttp.ClientSession(f"http://127.0.0.1:{srv.port}") as s,
    ):
        await infer_all(s, rows)
        for i, label in enumerate(labels):
            async with s.post(feedback, json={"id": f"r{i}", "label": int(label)}) as resp:
                assert resp.status == 200 and (await resp.json())["recorded"] == "recorded"
        # the same again: nothing changes; a correction replaces, counted once
        async with s.post(feedback, json={"id": "r0", "label": int(labels[0])}) as resp:
            assert (await resp.json())["recorded"] == "unchanged"
        async with s.post(feedback, json={"id": "r1", "label": 1 - int(labels[1])}) as resp:
            assert (await resp.json())["recorded"] == "updated"
        for bad, status, message in [
            ({"id": "nope", "label": 1}, 404, "no prediction of model 'breast_cancer' has id"),
            ({"id": "r2", "label": "yes"}, 400, "class indexes"),
            ({"id": "r2", "label": -1}, 400, "class indexes"),
            ({"id": "r2", "label": 1.5}, 400, "class indexes"),
            ({"id": 5, "label": 1}, 400, "'id' must be the request id"),
            ({"id": "r2"}, 400, "feedback is"),
            ({"id": "r2", "label": 1, "extra": 2}, 400, "feedback is"),
        ]:
            async with s.post(feedback, json=bad) as resp:
                assert resp.status == status, (bad, await resp.text())
                assert message in (await resp.json())["error"]
        async with s.post(feedback, data=b"{not json") as resp:
            assert resp.status == 400
        async with s.get(feedback) as resp:
            assert resp.status == 405
        async with s.get(f"/v2/models/{MODEL}/accuracy") as resp:
            (entry,) = (await resp.json())["versions"]
        async with s.get("/metrics") as resp:
            metrics = await resp.text()
    truth = labels.copy()
    truth[1] = 1 - truth[1]
    accuracy = float((predicted == truth).mean())
    assert entry["version"] == "1" and entry["labelled"] == 20
    assert entry["value"] == pytest.approx(accuracy)
    # every label is among the last 1,000 and came within the hour: the windows agree
    for window in ("last_1000", "1h"):
        assert entry["windows"][window]["labelled"] == 20
        assert entry["windows"][window]["value"] == pytest.approx(accuracy)
    assert entry["coverage"] == 1.0  # 20 predictions recorded, 20 labelled
    assert 0 <= entry["label_delay_p50_s"] < 60
    for window in ("all", "last_1000", "1h"):
        assert (
            'fastserve_model_accuracy{metric="accuracy",model="breast_cancer",role="primary",'
            f'version="1",window="{window}"}} {accuracy}'
        ) in metrics
    assert (
        'fastserve_label_coverage{model="breast_cancer",role="primary",version="1"} 1.0'
    ) in metrics
    assert 'fastserve_label_delay_seconds_count{model="breast_cancer"} 20.0' in metrics
    assert (
        'fastserve_model_labelled_requests{model="breast_cancer",role="primary",version="1"} 20.0'
    ) in metrics
    assert 'fastserve_feedback_total{model="breast_cancer",outcome="recorded"} 20.0' in metrics
    assert 'fastserve_feedback_total{model="breast_cancer",outcome="updated"} 1.0' in metrics


# -- shadow --------------------------------------------------------------------------------


async def test_shadow_agreement_and_accuracy_match_an_offline_computation(
    candidate_repo: Path,
) -> None:
    rows, labels = example_rows(MODEL, ROWS), example_labels(MODEL, ROWS)
    primary = reference(candidate_repo / MODEL / "1" / "model.onnx", rows)
    shadow = reference(candidate_repo / MODEL / "2" / "model.onnx", rows)
    p_label, s_label = primary["probabilities"].argmax(1), shadow["probabilities"].argmax(1)
    async with (
        running(config_for(candidate_repo)) as srv,
        aiohttp.ClientSession(f"http://127.0.0.1:{srv.port}") as s,
    ):
        answers = await infer_all(s, rows)
        for i, doc in enumerate(answers):  # the client always gets the primary's answer
            assert doc["model_version"] == "1"
            assert doc["outputs"][0]["data"] == [int(primary["label"][i])]
        summary = await wait_compared(s, ROWS)
        for i, label in enumerate(labels):
            async with s.post(
                f"/v2/models/{MODEL}/feedback", json={"id": f"r{i}", "label": int(label)}
            ) as resp:
                assert resp.status == 200
        async with s.get(f"/v2/models/{MODEL}/shadow") as resp:
            summary = await resp.json()
        async with s.get(f"/v2/models/{MODEL}/accuracy") as resp:
            accuracy = {e["role"]: e for e in (await resp.json())["versions"]}
        metrics = srv.registry.metrics.exposition().decode()

    agree = int((p_label == s_label).sum())
    assert 0 < ROWS - agree < ROWS // 4  # a real candidate: mostly, not always, the same
    assert summary["primary_version"] == "1" and summary["shadow_version"] == "2"
    assert summary["compared"] == ROWS and summary["shadow_errors"] == 0
    assert summary["disagreements"] == ROWS - agree
    assert summary["agreement"] == pytest.approx(agree / ROWS)
    low, high = summary["agreement_ci95"]
    assert low < agree / ROWS < high
    gap = np.abs(primary["probabilities"] - shadow["probabilities"]).max(axis=1)
    assert summary["probability_gap"]["max"] == pytest.approx(float(gap.max()), rel=1e-5)
    assert summary["latency"]["shadow"]["p99_ms"] > 0
    on_compared = {e["role"]: e for e in summary["accuracy_on_compared"].values()}
    for role, predicted in (("primary", p_label), ("shadow", s_label)):
        expected = float((predicted == labels).mean())
        assert accuracy[role]["labelled"] == ROWS
        assert accuracy[role]["value"] == pytest.approx(expected)
        assert on_compared[role]["value"] == pytest.approx(expected)
    assert accuracy["shadow"]["version"] == "2"
    assert f'fastserve_shadow_requests_total{{model="{MODEL}",result="agree"}} {agree}.0' in metrics
    # disagreements went to the review queue with both answers
    with sqlite3.connect(candidate_repo.parent / "state.db") as db:
        queued = db.execute(
            "SELECT request_id, shadow_answer FROM review_items WHERE reason = 'disagreement'"
        ).fetchall()
    assert len(queued) == ROWS - agree and all(answer for _, answer in queued)
    assert {rid for rid, _ in queued} == {f"r{i}" for i in np.flatnonzero(p_label != s_label)}


@pytest.mark.parametrize("fault", ["raises", "sleeps"])
async def test_a_failing_or_slow_shadow_changes_nothing_for_the_client(
    candidate_repo: Path, monkeypatch: pytest.MonkeyPatch, fault: str
) -> None:
    write_config(
        candidate_repo,
        MODEL,
        "primary: 1\nshadow:\n  version: 2\n  max_pending: 4\n  timeout_ms: 100\n"
        "batching:\n  max_batch_size: 4\n  max_queue_delay_us: 200\n",
    )
    original = OnnxRuntimeSession.run

    def faulty(self: OnnxRuntimeSession, inputs: Any) -> Any:
        if self.version == "2":
            if fault == "raises":
                raise RuntimeError("the candidate is broken")
            time.sleep(0.3)  # slower than the mirror's timeout
        return original(self, inputs)

    monkeypatch.setattr(OnnxRuntimeSession, "run", faulty)
    monkeypatch.setattr(
        OnnxRuntimeSession,
        "warmup",
        lambda self, rows: None,  # the faulty shadow must still load
    )
    rows = example_rows(MODEL, 40)
    expected = reference(candidate_repo / MODEL / "1" / "model.onnx", rows)
    async with (
        running(config_for(candidate_repo)) as srv,
        aiohttp.ClientSession(f"http://127.0.0.1:{srv.port}") as s,
    ):
        answers = await infer_all(s, rows)
        got = np.array([a["outputs"][1]["data"] for a in answers])
        # float32 from onnxruntime: the size of the batch a row ran in moves the last bits
        assert np.allclose(got, expected["probabilities"], rtol=1e-5, atol=1e-6)
        stats = srv.registry.get(MODEL).statistics()["inference_stats"]
        assert stats["success"]["count"] == 40 and stats["fail"]["count"] == 0
        summary = await wait_compared(s, 1)
        await asyncio.sleep(0.5)
        async with s.get(f"/v2/models/{MODEL}/shadow") as resp:
            summary = await resp.json()
    assert summary["compared"] == 0
    assert summary["pending"] <= 4
    # bounded: what was not mirrored was dropped and counted, the rest failed
    assert summary["shadow_errors"] + summary["dropped"] == 40
    if fault == "sleeps":
        assert summary["dropped"] > 0
    metrics = srv.registry.metrics.exposition().decode()
    assert f'fastserve_shadow_requests_total{{model="{MODEL}",result="error"}}' in metrics


async def test_low_confidence_answers_are_flagged_and_queued(repo: Path) -> None:
    write_config(
        repo,
        MODEL,
        "review:\n  confidence_measure: max_probability\n  confidence_threshold: 0.9\n",
    )
    rows = example_rows(MODEL, ROWS)
    probabilities = reference(repo / MODEL / "1" / "model.onnx", rows)["probabilities"]
    unsure = {f"r{i}" for i in np.flatnonzero(probabilities.max(axis=1) < 0.9)}
    assert 0 < len(unsure) < ROWS
    async with (
        running(config_for(repo)) as srv,
        aiohttp.ClientSession(f"http://127.0.0.1:{srv.port}") as s,
    ):
        answers = await infer_all(s, rows)
        await srv.review.store.flush()
    flagged = {a["id"] for a in answers if a.get("parameters", {}).get("review")}
    assert flagged == unsure
    for a in answers:
        if a["id"] in unsure:
            assert a["parameters"]["review"] == "low_confidence"
            assert a["parameters"]["confidence"] < 0.9
    with sqlite3.connect(repo.parent / "state.db") as db:
        items = db.execute("SELECT request_id, inputs FROM review_items").fetchall()
    assert {rid for rid, _ in items} == unsure
    assert all('"input"' in inputs for _, inputs in items)


async def test_a_shadow_version_must_exist_and_differ_from_the_primary(repo: Path) -> None:
    write_config(repo, MODEL, "shadow:\n  version: 7\n")
    async with running(config_for(repo)) as srv:
        (row,) = [r for r in srv.registry.index() if r.name == MODEL]
        assert "shadow version 7 has no folder" in row.reason
    write_config(repo, MODEL, "primary: 1\nshadow:\n  version: 1\n")
    async with running(config_for(repo)) as srv:
        (row,) = [r for r in srv.registry.index() if r.name == MODEL]
        assert "cannot be both primary and shadow" in row.reason


async def test_recording_predictions_can_be_turned_off(repo: Path) -> None:
    write_config(repo, MODEL, "review:\n  record_predictions: false\n")
    row = example_rows(MODEL, 1)[0]
    async with (
        running(config_for(repo)) as srv,
        aiohttp.ClientSession(f"http://127.0.0.1:{srv.port}") as s,
    ):
        async with s.post(INFER, json=tabular_body(row, "x1")) as resp:
            assert resp.status == 200 and (await resp.json())["id"] == "x1"
        async with s.post(f"/v2/models/{MODEL}/feedback", json={"id": "x1", "label": 1}) as resp:
            assert resp.status == 400
            assert "record_predictions is false" in (await resp.json())["error"]
        assert await srv.review.store.query("SELECT count(*) FROM predictions") == [(0,)]


async def test_a_shadow_that_always_disagrees_is_recorded_and_the_queue_stays_bounded(
    candidate_repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the shadow is the primary's own model, made to answer the other class
    shutil.copy(candidate_repo / MODEL / "1" / "model.onnx", candidate_repo / MODEL / "2")
    write_config(
        candidate_repo,
        MODEL,
        "primary: 1\nshadow:\n  version: 2\n  max_pending: 1000\nreview:\n  max_pending: 5\n",
    )
    original = OnnxRuntimeSession.run

    def contrary(self: OnnxRuntimeSession, inputs: Any) -> Any:
        label, probabilities = original(self, inputs)
        if self.version == "2":  # the other class, on purpose
            return [1 - label, probabilities[:, ::-1].copy()]
        return [label, probabilities]

    monkeypatch.setattr(OnnxRuntimeSession, "run", contrary)
    rows = example_rows(MODEL, 40)
    expected = reference(candidate_repo / MODEL / "1" / "model.onnx", rows)["label"]
    async with (
        running(config_for(candidate_repo)) as srv,
        aiohttp.ClientSession(f"http://127.0.0.1:{srv.port}") as s,
    ):
        answers = await infer_all(s, rows)
        summary = await wait_compared(s, 40)
        metrics = srv.registry.metrics.exposition().decode()
        await srv.review.store.flush()
        queued = await srv.review.store.query("SELECT count(*) FROM review_items")
    assert [a["outputs"][0]["data"] for a in answers] == [[int(v)] for v in expected]
    assert summary["compared"] == 40 and summary["disagreements"] == 40
    assert summary["agreement"] == 0.0
    assert queued == [(5,)]
    assert f'fastserve_review_items_dropped_total{{model="{MODEL}"}} 35.0' in metrics


async def test_a_regressor_shadow_is_compared_by_difference_and_judged_by_error(
    repo: Path,
) -> None:
    save(linear([1.0, 2.0, 3.0]), repo / "price" / "1" / "model.onnx")
    save(linear([1.0, 2.0, 3.0], bias=0.5), repo / "price" / "2" / "model.onnx")
    write_config(repo, "price", "primary: 1\nshadow:\n  version: 2\n")
    rows = np.arange(30, dtype=np.float32).reshape(10, 3)
    truth = rows @ np.array([1.0, 2.0, 3.0]) + 0.25  # halfway between the two versions
    async with (
        running(config_for(repo)) as srv,
        aiohttp.ClientSession(f"http://127.0.0.1:{srv.port}") as s,
    ):
        for i, row in enumerate(rows):
            doc = {"id": f"p{i}", "inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32",
                                              "data": row.tolist()}]}  # fmt: skip
            async with s.post("/v2/models/price/infer", json=doc) as resp:
                assert resp.status == 200
        for _ in range(400):
            async with s.get("/v2/models/price/shadow") as resp:
                summary = await resp.json()
            if summary["compared"] == 10:
                break
            await asyncio.sleep(0.025)
        for i, value in enumerate(truth):
            async with s.post(
                "/v2/models/price/feedback", json={"id": f"p{i}", "label": float(value)}
            ) as resp:
                assert resp.status == 200, await resp.text()
        async with s.post("/v2/models/price/feedback", json={"id": "p0", "label": "x"}) as resp:
            assert resp.status == 400 and "numbers" in (await resp.json())["error"]
        async with s.get("/v2/models/price/accuracy") as resp:
            accuracy = {e["role"]: e for e in (await resp.json())["versions"]}
    assert summary["compared"] == 10 and summary["agreement"] is None
    assert summary["abs_diff"]["max"] == pytest.approx(0.5)
    assert summary["abs_diff"]["mean"] == pytest.approx(0.5)
    assert summary["rel_diff"]["mean"] > 0
    for role in ("primary", "shadow"):
        assert accuracy[role]["metric"] == "mean_absolute_error"
        assert accuracy[role]["value"] == pytest.approx(0.25, abs=1e-4)

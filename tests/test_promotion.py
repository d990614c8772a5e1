"""The review queue's admin API and CLI, and promotion of a shadow through its gate: with
a real server, the demo models (``scorecard`` as the candidate of ``breast_cancer``) and
the SQLite review store."""

from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from conftest import ServerProcess, running, write_config
from fastserve.config import ServerConfig
from fastserve.demo import example_labels, example_rows
from fastserve.server import Server
from models import tabular_body

pytestmark = pytest.mark.timeout(120)

MODEL = "breast_cancer"
TOKEN = "review-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ROWS = 143
SHADOWED = (
    "# the candidate sees every request\n"
    "primary: 1\n"
    "shadow:\n"
    "  version: 2\n"
    "  max_pending: 1000\n"
    "promotion:\n"
    "  min_compared: 100\n"
    "  min_agreement: {agreement}\n"
    "  min_labelled: 100\n"
    "  max_accuracy_drop: 0.1\n"
    "  max_p99_regression: 1000.0  # latency on a loaded 2-core test machine is noise\n"
    "batching:\n"
    "  max_batch_size: 16\n"
)


@pytest.fixture
def candidate_repo(repo: Path) -> Path:
    shutil.copytree(repo / "scorecard" / "1", repo / MODEL / "2")
    write_config(repo, MODEL, SHADOWED.format(agreement=0.99))
    return repo


def config_for(repo: Path) -> ServerConfig:
    return ServerConfig(
        repository=repo,
        port=0,
        admin_token=TOKEN,
        watch="off",
        state_db=repo.parent / "state.db",
    )


@pytest.fixture
async def traffic(candidate_repo: Path) -> AsyncIterator[tuple[Server, aiohttp.ClientSession]]:
    """A server whose shadow has compared every test row, each labelled with its truth."""
    rows, labels = example_rows(MODEL, ROWS), example_labels(MODEL, ROWS)
    async with (
        running(config_for(candidate_repo)) as srv,
        aiohttp.ClientSession(f"http://127.0.0.1:{srv.port}") as s,
    ):

        async def one(i: int) -> None:
            async with s.post(
                f"/v2/models/{MODEL}/infer", json=tabular_body(rows[i], f"r{i}")
            ) as resp:
                assert resp.status == 200

        await asyncio.gather(*(one(i) for i in range(ROWS)))
        for _ in range(400):
            async with s.get(f"/v2/models/{MODEL}/shadow") as resp:
                if (await resp.json())["compared"] == ROWS:
                    break
            await asyncio.sleep(0.025)
        for i, label in enumerate(labels):
            async with s.post(
                f"/v2/models/{MODEL}/feedback", json={"id": f"r{i}", "label": int(label)}
            ) as resp:
                assert resp.status == 200
        yield srv, s


async def promote(s: aiohttp.ClientSession, **body: Any) -> tuple[int, dict[str, Any]]:
    async with s.post(f"/v2/repository/models/{MODEL}/promote", json=body, headers=AUTH) as resp:
        return resp.status, await resp.json()


async def test_a_failing_gate_refuses_and_says_which_conditions_failed(
    traffic: tuple[Server, aiohttp.ClientSession], candidate_repo: Path
) -> None:
    srv, s = traffic
    before = (candidate_repo / MODEL / "config.yaml").read_text()
    status, doc = await promote(s, reason="try")
    assert status == 409, doc
    conditions = {c["name"]: c for c in doc["conditions"]}
    assert not conditions["agreement"]["passed"]  # scorecard disagrees on a few rows
    assert conditions["agreement"]["actual"] < 0.99
    assert conditions["compared"]["passed"] and conditions["compared"]["actual"] == ROWS
    assert conditions["labelled"]["passed"] and conditions["accuracy"]["passed"]
    assert "agreement" in doc["error"]
    assert (candidate_repo / MODEL / "config.yaml").read_text() == before
    assert srv.registry.get(MODEL).version == "1"


async def test_forcing_a_failed_gate_promotes_and_is_recorded(
    traffic: tuple[Server, aiohttp.ClientSession], candidate_repo: Path
) -> None:
    srv, s = traffic
    status, doc = await promote(s, force=True, actor="ann", reason="deadline")
    assert status == 200, doc
    assert doc["primary"] == "2" and doc["previous"] == "1" and doc["forced"] is True
    text = (candidate_repo / MODEL / "config.yaml").read_text()
    parsed = yaml.safe_load(text)
    assert parsed["primary"] == 2 and "shadow" not in parsed  # the file says what serves
    assert "# the candidate sees every request" in text  # comments survive
    assert srv.registry.get(MODEL).version == "2"
    async with s.get(f"/v2/review/changes/{MODEL}", headers=AUTH) as resp:
        (change,) = (await resp.json())["changes"]
    assert change["action"] == "promote" and change["forced"] is True
    assert (change["actor"], change["reason"]) == ("ann", "deadline")
    assert (change["from_version"], change["to_version"]) == ("1", "2")
    assert {c["name"] for c in change["gate"]} >= {"compared", "agreement", "accuracy"}

    async with s.post(
        f"/v2/repository/models/{MODEL}/rollback", json={"actor": "bob", "reason": "bad"},
        headers=AUTH,
    ) as resp:  # fmt: skip
        assert resp.status == 200
    async with s.get(f"/v2/review/changes/{MODEL}", headers=AUTH) as resp:
        latest = (await resp.json())["changes"][0]
    assert latest["action"] == "rollback" and latest["to_version"] == "1"
    assert latest["actor"] == "bob"


async def test_changes_made_while_the_state_file_is_locked_are_recorded_once_it_is_free(
    candidate_repo: Path,
) -> None:
    """Another process holds the state file's lock past the busy timeout: a promotion and a
    rollback are still made and answered, and their records are written once it is free."""
    state = candidate_repo.parent / "state.db"
    srv = Server(config_for(candidate_repo))
    srv.review.store.busy_timeout_s = 0.2  # (5 s in service)
    await srv.start()
    other = sqlite3.connect(state, isolation_level=None)
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{srv.port}") as s:
            other.execute("BEGIN IMMEDIATE")
            status, doc = await promote(s, force=True, actor="ann", reason="locked")
            assert status == 200, doc
            assert doc["primary"] == "2" and doc["record"] is None
            assert srv.registry.get(MODEL).version == "2"
            async with s.post(
                f"/v2/repository/models/{MODEL}/rollback", json={"actor": "bob"}, headers=AUTH
            ) as resp:
                assert resp.status == 200, await resp.text()
            assert srv.registry.get(MODEL).version == "1"
            async with s.get(f"/v2/review/changes/{MODEL}", headers=AUTH) as resp:
                assert resp.status == 503  # the records wait for the file
            other.execute("COMMIT")
            async with s.get(f"/v2/review/changes/{MODEL}", headers=AUTH) as resp:
                assert resp.status == 200
                changes = (await resp.json())["changes"]
        assert [(c["action"], c["actor"], c["to_version"]) for c in changes] == [
            ("rollback", "bob", "1"),
            ("promote", "ann", "2"),
        ]
        assert changes[1]["forced"] is True and changes[1]["reason"] == "locked"
        assert "compared" in {c["name"] for c in changes[1]["gate"]}
    finally:
        other.close()
        await srv.stop()


async def test_a_passing_gate_promotes_the_shadow(
    traffic: tuple[Server, aiohttp.ClientSession], candidate_repo: Path
) -> None:
    srv, s = traffic
    write_config(candidate_repo, MODEL, SHADOWED.format(agreement=0.8))
    async with s.post(f"/v2/repository/models/{MODEL}/load", headers=AUTH) as resp:
        assert resp.status == 200  # gate settings changed: no session is reloaded
    status, doc = await promote(s, actor="ann")
    assert status == 200, doc
    assert doc["forced"] is False and all(c["passed"] for c in doc["gate"])
    assert srv.registry.get(MODEL).version == "2"
    assert srv.registry.route(MODEL).shadow is None  # type: ignore[union-attr]


async def test_promote_without_a_shadow_or_with_bad_fields_is_refused(
    traffic: tuple[Server, aiohttp.ClientSession],
) -> None:
    _, s = traffic
    for body, message in [
        ({"force": "yes"}, "'force' must be true or false"),
        ({"actor": ""}, "'actor' must be a name"),
        ({"reason": 5}, "'reason' must be a string"),
    ]:
        status, doc = await promote(s, **body)
        assert status == 400 and message in doc["error"]
    async with s.post("/v2/repository/models/digits/promote", json={}, headers=AUTH) as resp:
        assert resp.status == 400
        assert "no shadow version to promote" in (await resp.json())["error"]


# -- the review queue's API -------------------------------------------------------------------


async def test_reviewers_list_inspect_and_label_items(
    traffic: tuple[Server, aiohttp.ClientSession],
) -> None:
    srv, s = traffic
    async with s.get("/v2/review/items", params={"model": MODEL}, headers=AUTH) as resp:
        items = (await resp.json())["items"]
    assert items and all(i["reason"] == "disagreement" and i["status"] == "pending" for i in items)
    first = items[0]
    async with s.get(f"/v2/review/items/{first['id']}", headers=AUTH) as resp:
        item = await resp.json()
    assert item["inputs"]["input"]["shape"] == [1, 30]
    assert item["primary_answer"]["label"]["data"] != item["shadow_answer"]["label"]["data"]

    async with s.post(
        f"/v2/review/items/{first['id']}/label", json={"label": 0, "reviewer": "ann"},
        headers=AUTH,
    ) as resp:  # fmt: skip
        assert resp.status == 200
        labelled = await resp.json()
    assert (labelled["status"], labelled["label"], labelled["reviewer"]) == ("labelled", [0], "ann")
    async with s.get("/v2/review/items", params={"status": "labelled"}, headers=AUTH) as resp:
        assert [i["id"] for i in (await resp.json())["items"]] == [first["id"]]
    # the reviewer's label is the request's ground truth now
    rows = await srv.review.store.query(
        "SELECT label, source FROM feedback WHERE request_id = ?", (first["request_id"],)
    )
    assert rows == [("[0]", "reviewer:ann")]

    for path, params, status in [
        ("/v2/review/items/999999", None, 404),
        ("/v2/review/items/x1", None, 404),
        ("/v2/review/items", {"status": "done"}, 400),
        ("/v2/review/items", {"limit": "-1"}, 400),
        ("/v2/review/items", {"model": "nope"}, 404),
        ("/v2/review/changes/nope", None, 404),
        ("/v2/review/other", None, 404),
    ]:
        async with s.get(path, params=params, headers=AUTH) as resp:
            assert resp.status == status, (path, params, await resp.text())
    for body in ({"label": "a", "reviewer": "ann"}, {"label": 1}, {"label": 1, "reviewer": ""}):
        async with s.post(f"/v2/review/items/{first['id']}/label", json=body, headers=AUTH) as resp:
            assert resp.status == 400, body
    async with s.get("/v2/review/items") as resp:
        assert resp.status == 401  # admin routes need the token
    async with s.get("/v2/review/items", headers={"Authorization": "Bearer no"}) as resp:
        assert resp.status == 403


# -- the CLI ----------------------------------------------------------------------------------


def fastserve(*args: str, url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fastserve", *args[:1], "--url", f"http://{url}", *args[1:]],
        capture_output=True,
        text=True,
        env={**os.environ, "FASTSERVE_ADMIN_TOKEN": TOKEN},
        timeout=120,
        check=False,
    )


async def test_the_cli_shows_the_shadow_works_the_queue_and_promotes(
    candidate_repo: Path,
) -> None:
    proc = ServerProcess(
        candidate_repo,
        "--state-db",
        str(candidate_repo.parent / "s.db"),
        env={"FASTSERVE_ADMIN_TOKEN": TOKEN},
    )
    try:
        await asyncio.to_thread(proc.wait_ready)
        rows = example_rows(MODEL, 40)
        async with aiohttp.ClientSession(f"http://{proc.url}") as s:
            for i, row in enumerate(rows):
                async with s.post(
                    f"/v2/models/{MODEL}/infer", json=tabular_body(row, f"c{i}")
                ) as resp:
                    assert resp.status == 200
            for _ in range(200):
                async with s.get(f"/v2/models/{MODEL}/shadow") as resp:
                    if (await resp.json())["compared"] == 40:
                        break
                await asyncio.sleep(0.025)

        shadow = await asyncio.to_thread(fastserve, "models", "shadow", MODEL, url=proc.url)
        assert shadow.returncode == 0, shadow.stderr
        assert "primary 1, shadow 2" in shadow.stdout and "compared 40" in shadow.stdout

        listed = await asyncio.to_thread(fastserve, "review", "list", url=proc.url)
        assert listed.returncode == 0, listed.stderr
        header, *lines = listed.stdout.splitlines()
        assert header.split()[:4] == ["ID", "MODEL", "REQUEST", "REASON"]
        item = lines[0].split()[0]
        labelled = await asyncio.to_thread(
            fastserve, "review", "label", item, "1", "--reviewer", "ann", url=proc.url
        )
        assert labelled.returncode == 0, labelled.stderr
        assert labelled.stdout.strip() == f"item {item}: labelled [1] by ann"

        refused = await asyncio.to_thread(fastserve, "models", "promote", MODEL, url=proc.url)
        assert refused.returncode == 1
        assert "the promotion gate did not pass" in refused.stderr
        assert "FAIL" in refused.stderr and "CONDITION" in refused.stderr

        forced = await asyncio.to_thread(
            fastserve, "models", "promote", MODEL, "--force", "--reason", "demo", url=proc.url
        )
        assert forced.returncode == 0, forced.stderr
        assert "primary 2 (was 1) (gate overridden with --force, recorded)" in forced.stdout

        history = await asyncio.to_thread(fastserve, "models", "history", MODEL, url=proc.url)
        assert history.returncode == 0, history.stderr
        assert "promote" in history.stdout and "demo" in history.stdout
    finally:
        proc.stop()

"""Versions, primary, hot swap by editing the repository, rollback, and what bad edits do.

Every test runs the real server on a free port with the real watcher (filesystem events)
and real onnxruntime sessions; edits are plain file writes, as an operator makes them.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import onnx
import pytest
from onnx import TensorProto, helper

from conftest import running, write_atomically
from fastserve.config import ServerConfig
from fastserve.server import Server
from models import IR_VERSION, OPSET, adder, save

pytestmark = pytest.mark.timeout(90)

TOKEN = "test-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ADDER = "/v2/models/adder/infer"
BODY = {
    "inputs": [
        {"name": "a", "shape": [1, 4], "datatype": "FP32", "data": [1.0] * 4},
        {"name": "b", "shape": [1, 4], "datatype": "FP32", "data": [2.0] * 4},
    ]
}
BATCHING = "batching:\n  max_batch_size: 8\n  max_queue_delay_us: 500\n"


def config_text(*, primary: int | None = None, policy: str = "") -> str:
    text = BATCHING + policy
    if primary is not None:
        text += f"primary: {primary}\n"
    return text


def add_versions(repo: Path, *versions: int) -> None:
    for version in versions:
        save(adder(), repo / "adder" / str(version) / "model.onnx")


@pytest.fixture
def admin_config(repo: Path) -> ServerConfig:
    return ServerConfig(
        repository=repo,
        port=0,
        max_body_bytes=1 << 20,
        drain_timeout_s=5,
        admin_token=TOKEN,
        watch_debounce_ms=30,
    )


@pytest.fixture
async def served(admin_config: ServerConfig) -> AsyncIterator[tuple[Server, aiohttp.ClientSession]]:
    async with (
        running(admin_config) as srv,
        aiohttp.ClientSession(f"http://127.0.0.1:{srv.port}") as session,
    ):
        yield srv, session


async def answer_version(session: aiohttp.ClientSession, path: str = ADDER) -> tuple[int, Any]:
    async with session.post(path, json=BODY) as resp:
        doc = await resp.json()
        return resp.status, doc.get("model_version", doc.get("error"))


async def index(session: aiohttp.ClientSession) -> list[dict[str, Any]]:
    async with session.post("/v2/repository/index", headers=AUTH) as resp:
        assert resp.status == 200
        return await resp.json()  # type: ignore[no-any-return]


async def adder_rows(session: aiohttp.ClientSession) -> list[dict[str, Any]]:
    return [row for row in await index(session) if row["name"] == "adder"]


async def eventually(check: Callable[[], Any], timeout_s: float = 20.0) -> Any:
    """Poll the async ``check`` until it returns something truthy."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        result = await check()
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met in {timeout_s} s (last: {result!r})")
        await asyncio.sleep(0.05)


async def serving(session: aiohttp.ClientSession, primary: str, loaded: set[str]) -> bool:
    """True once the index shows exactly ``loaded`` READY with ``primary`` primary, and
    nothing else for the model (no version loading or unloading)."""
    rows = await adder_rows(session)
    ready = {r["version"] for r in rows if r["state"] == "READY"}
    primaries = [r["version"] for r in rows if r["primary"]]
    return ready == loaded and primaries == [primary] and len(rows) == len(loaded)


def swap_count(srv: Server, result: str) -> float:
    value = srv.registry.metrics.registry.get_sample_value(
        "fastserve_model_swaps_total", {"model": "adder", "result": result}
    )
    return value or 0.0


# -- versions and primary --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "primary", "loaded", "serving_version"),
    [
        ("", None, {"3"}, "3"),
        ("version_policy:\n  latest: 2\n", None, {"2", "3"}, "3"),
        ("version_policy:\n  specific: [1, 3]\n", None, {"1", "3"}, "3"),
        ("version_policy:\n  all: true\n", 2, {"1", "2", "3"}, "2"),
        # the primary is loaded even when the policy leaves it out
        ("version_policy:\n  latest: 1\n", 1, {"1", "3"}, "1"),
    ],
)
async def test_version_policy_and_primary(
    repo: Path,
    admin_config: ServerConfig,
    policy: str,
    primary: int | None,
    loaded: set[str],
    serving_version: str,
) -> None:
    add_versions(repo, 2, 3)
    (repo / "adder" / "config.yaml").write_text(config_text(primary=primary, policy=policy))
    async with (
        running(admin_config) as srv,
        aiohttp.ClientSession(f"http://127.0.0.1:{srv.port}") as session,
    ):
        assert await serving(session, serving_version, loaded)
        assert await answer_version(session) == (200, serving_version)
        for version in ("1", "2", "3"):
            path = f"/v2/models/adder/versions/{version}/infer"
            status, got = await answer_version(session, path)
            if version in loaded:
                assert (status, got) == (200, version)
            else:
                assert status == 404
        async with session.get("/v2/models/adder") as resp:
            assert (await resp.json())["versions"] == sorted(loaded, key=int)


def test_config_rejects_two_policies_at_once(tmp_path: Path) -> None:
    from fastserve.config import load_model_config
    from fastserve.errors import ConfigError

    path = tmp_path / "config.yaml"
    path.write_text("version_policy:\n  latest: 2\n  all: true\n")
    with pytest.raises(ConfigError, match="give one of latest, specific and all"):
        load_model_config(path)


# -- hot swap by editing files ----------------------------------------------------------------


async def test_editing_the_primary_swaps_and_unloads_the_old_version(
    repo: Path, served: tuple[Server, aiohttp.ClientSession]
) -> None:
    srv, session = served
    add_versions(repo, 2)
    config = repo / "adder" / "config.yaml"
    write_atomically(config, config_text(primary=1, policy="version_policy:\n  specific: [1]\n"))
    await eventually(lambda: serving(session, "1", {"1"}))
    old = srv.registry.get("adder")
    assert old.version == "1"

    write_atomically(config, config_text(primary=2, policy="version_policy:\n  specific: [2]\n"))
    await eventually(lambda: serving(session, "2", {"2"}))
    # reported done: every answer from now on comes from version 2
    for _ in range(20):
        assert await answer_version(session) == (200, "2")
    # the old version's sessions are gone and its batcher refuses work
    assert all(s._session is None for s in old.sessions)
    assert swap_count(srv, "success") >= 2


async def test_the_polling_watcher_applies_edits_too(
    repo: Path, admin_config: ServerConfig
) -> None:
    """Where the platform gives no filesystem events, polling finds the same edits."""
    add_versions(repo, 2)
    config = admin_config.model_copy(update={"watch": "poll", "poll_interval_s": 0.05})
    async with (
        running(config) as srv,
        aiohttp.ClientSession(f"http://127.0.0.1:{srv.port}") as session,
    ):
        assert await serving(session, "2", {"2"})
        write_atomically(repo / "adder" / "config.yaml", config_text(primary=1))
        await eventually(lambda: serving(session, "1", {"1", "2"}))
        assert await answer_version(session) == (200, "1")


async def test_config_only_edits_keep_the_loaded_sessions(
    repo: Path, served: tuple[Server, aiohttp.ClientSession]
) -> None:
    srv, session = served
    add_versions(repo, 2)
    config = repo / "adder" / "config.yaml"
    write_atomically(config, config_text(primary=1, policy="version_policy:\n  all: true\n"))
    await eventually(lambda: serving(session, "1", {"1", "2"}))
    first, second = srv.registry.get("adder", "1"), srv.registry.get("adder", "2")

    write_atomically(config, config_text(primary=2, policy="version_policy:\n  all: true\n"))
    await eventually(lambda: serving(session, "2", {"1", "2"}))
    assert srv.registry.get("adder", "1") is first and srv.registry.get("adder", "2") is second

    # a changed serving setting rebuilds the versions
    write_atomically(
        config,
        "batching:\n  max_batch_size: 4\nversion_policy:\n  all: true\nprimary: 2\n",
    )

    async def rebuilt() -> bool:
        return srv.registry.get("adder", "2") is not second

    await eventually(rebuilt)
    assert srv.registry.get("adder").config.batching.max_batch_size == 4


async def test_a_replaced_model_file_is_loaded_again(
    repo: Path, served: tuple[Server, aiohttp.ClientSession]
) -> None:
    srv, session = served
    before = srv.registry.get("adder")
    staging = repo / "adder" / ".model.onnx.new"
    save(adder(), staging)
    os.replace(staging, repo / "adder" / "1" / "model.onnx")

    async def reloaded() -> bool:
        return srv.registry.get("adder") is not before

    await eventually(reloaded)
    assert await answer_version(session) == (200, "1")


# -- bad edits change nothing -----------------------------------------------------------------


def _wrong_input_names() -> onnx.ModelProto:
    """A graph whose node reads an input that does not exist."""
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, ["batch", 4])
    out = helper.make_tensor_value_info("sum", TensorProto.FLOAT, ["batch", 4])
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "not_an_input"], ["sum"])], "bad", [a], [out]
    )
    return helper.make_model(
        graph, ir_version=IR_VERSION, opset_imports=[helper.make_opsetid("", OPSET)]
    )


def _external_data_outside(folder: Path) -> bytes:
    """A model whose weights point at a file outside its folder."""
    model = adder()
    weight = helper.make_tensor("w", TensorProto.FLOAT, [4], [0.0] * 4)
    weight.data_location = TensorProto.EXTERNAL
    del weight.float_data[:]
    for key, value in (("location", "../../../outside.bin"), ("offset", "0"), ("length", "16")):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    model.graph.initializer.append(weight)
    return model.SerializeToString()


CORRUPT_MODELS: dict[str, Callable[[Path], bytes]] = {
    "empty": lambda folder: b"",
    "truncated": lambda folder: adder().SerializeToString()[:57],
    "random bytes": lambda folder: os.urandom(4096),
    "wrong input names": lambda folder: _wrong_input_names().SerializeToString(),
    "external data outside the folder": _external_data_outside,
}


@pytest.mark.parametrize("kind", list(CORRUPT_MODELS))
async def test_a_model_file_that_does_not_load_changes_nothing(
    repo: Path, served: tuple[Server, aiohttp.ClientSession], kind: str
) -> None:
    srv, session = served
    (repo.parent / "outside.bin").write_bytes(b"\0" * 16)
    folder = repo / "adder" / "2"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(CORRUPT_MODELS[kind](folder))

    async def refused() -> list[dict[str, Any]]:
        rows = await adder_rows(session)
        return [r for r in rows if r["version"] == "2" and r["state"] == "UNAVAILABLE"]

    (row,) = await eventually(refused)
    assert "cannot load model 'adder' version 2" in row["reason"]
    assert str(repo) not in row["reason"]  # no filesystem paths in what clients see
    assert await answer_version(session) == (200, "1")
    ready = [r for r in await adder_rows(session) if r["state"] == "READY"]
    assert [r["version"] for r in ready] == ["1"]
    assert "the last change was not applied" in ready[0]["reason"]
    assert swap_count(srv, "failure") >= 1
    metrics = srv.registry.metrics.registry
    assert metrics.get_sample_value("fastserve_model_last_change_failed", {"model": "adder"}) == 1

    # fixing the file applies the fix
    staging = repo / "adder" / ".fixed.onnx"
    save(adder(), staging)
    os.replace(staging, folder / "model.onnx")
    await eventually(lambda: serving(session, "2", {"2"}))
    assert await answer_version(session) == (200, "2")
    assert metrics.get_sample_value("fastserve_model_last_change_failed", {"model": "adder"}) == 0


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (BATCHING + "primary: 7\n", "primary version 7 has no folder"),
        ("batching:\n  max_batch_size: 8\n  max_queue_dealy_us: 5\n", "unknown setting"),
        ("batching:\n  max_batch_size: [\n", "invalid YAML"),  # half-written
        ("version_policy:\n  specific: [5, 6]\n", "the version policy selects none"),
        ("primary: two\n", "primary"),
    ],
)
async def test_a_bad_config_changes_nothing_until_fixed(
    repo: Path, served: tuple[Server, aiohttp.ClientSession], text: str, problem: str
) -> None:
    srv, session = served
    config = repo / "adder" / "config.yaml"
    good = config.read_text()
    before = srv.registry.get("adder")
    config.write_text(text)  # not atomic on purpose: the watcher may see it half-written

    async def refused() -> list[dict[str, Any]]:
        rows = await adder_rows(session)
        return [r for r in rows if problem in r["reason"]]

    (row,) = await eventually(refused)
    assert row["state"] == "READY" and row["version"] == "1"
    assert srv.registry.get("adder") is before
    assert await answer_version(session) == (200, "1")

    config.write_text(good)

    async def fixed() -> bool:
        return not any(r["reason"] for r in await adder_rows(session))

    await eventually(fixed)
    assert srv.registry.get("adder") is before  # nothing needed reloading


# -- models come and go ------------------------------------------------------------------------


async def test_models_added_and_removed_while_serving(
    repo: Path, served: tuple[Server, aiohttp.ClientSession]
) -> None:
    _, session = served
    staging = repo.parent / "staging"
    shutil.copytree(repo / "adder", staging)
    os.rename(staging, repo / "adder2")

    async def added() -> bool:
        status, version = await answer_version(session, "/v2/models/adder2/infer")
        return status == 200 and version == "1"

    await eventually(added)
    shutil.rmtree(repo / "adder2")

    async def removed() -> bool:
        status, _ = await answer_version(session, "/v2/models/adder2/infer")
        return status == 404

    await eventually(removed)
    assert all(r["name"] != "adder2" for r in await index(session))
    assert await answer_version(session) == (200, "1")


# -- repository API: load, unload, promote, rollback ------------------------------------------


async def test_unload_then_load_through_the_api(
    served: tuple[Server, aiohttp.ClientSession],
) -> None:
    srv, session = served
    async with session.post("/v2/repository/models/adder/unload", headers=AUTH) as resp:
        assert resp.status == 200
    assert await answer_version(session) == (503, "model 'adder' is unloaded")
    assert (await adder_rows(session)) == [
        {
            "name": "adder",
            "version": "",
            "state": "UNAVAILABLE",
            "reason": "unloaded through the repository API",
            "primary": False,
        }
    ]
    # readiness is about the models that should serve; an unloaded one does not count
    async with session.get("/v2/health/ready") as resp:
        assert resp.status == 200
    async with session.post("/v2/repository/models/adder/load", headers=AUTH) as resp:
        assert resp.status == 200
        assert await resp.json() == {"name": "adder", "primary": "1", "versions": ["1"]}
    assert await answer_version(session) == (200, "1")
    assert swap_count(srv, "unload") == 1


async def test_load_reports_why_a_model_cannot_load(repo: Path, admin_config: ServerConfig) -> None:
    admin_config = admin_config.model_copy(update={"watch": "off"})
    async with (
        running(admin_config) as srv,
        aiohttp.ClientSession(f"http://127.0.0.1:{srv.port}") as session,
    ):
        (repo / "adder" / "config.yaml").write_text("instance_count: 0\n")
        async with session.post("/v2/repository/models/adder/load", headers=AUTH) as resp:
            assert resp.status == 400
            error = (await resp.json())["error"]
        assert "change not applied" in error and "instance_count" in error
        assert await answer_version(session) == (200, "1")


async def test_promote_and_rollback_edit_the_config_file(
    repo: Path, served: tuple[Server, aiohttp.ClientSession]
) -> None:
    _, session = served
    add_versions(repo, 2, 3)
    config = repo / "adder" / "config.yaml"
    write_atomically(config, "# the adder\n" + config_text(primary=1))
    await eventually(lambda: serving(session, "1", {"1", "3"}))

    async with session.post(
        "/v2/repository/models/adder/promote", headers=AUTH, json={"version": "2"}
    ) as resp:
        assert resp.status == 200
        doc = await resp.json()
    assert doc == {"name": "adder", "primary": "2", "versions": ["2", "3"], "previous": "1"}
    assert "primary: 2\n" in config.read_text() and "# the adder" in config.read_text()
    assert await answer_version(session) == (200, "2")

    async with session.post("/v2/repository/models/adder/rollback", headers=AUTH) as resp:
        assert resp.status == 200
        assert (await resp.json())["primary"] == "1"
    assert "primary: 1\n" in config.read_text()
    assert await answer_version(session) == (200, "1")

    # nothing older than 1: refused, nothing changes
    async with session.post("/v2/repository/models/adder/rollback", headers=AUTH) as resp:
        assert resp.status == 400
        assert "no version older than 1" in (await resp.json())["error"]
    async with session.post(
        "/v2/repository/models/adder/promote", headers=AUTH, json={"version": "9"}
    ) as resp:
        assert resp.status == 400
    assert "primary: 1\n" in config.read_text()


async def test_a_promotion_that_does_not_load_puts_the_file_back(
    repo: Path, served: tuple[Server, aiohttp.ClientSession]
) -> None:
    _, session = served
    (repo / "adder" / "2").mkdir()
    (repo / "adder" / "2" / "model.onnx").write_bytes(b"not onnx")
    config = repo / "adder" / "config.yaml"
    before = config.read_text()
    await eventually(lambda: adder_rows(session))
    async with session.post(
        "/v2/repository/models/adder/promote", headers=AUTH, json={"version": 2}
    ) as resp:
        assert resp.status == 400
        assert "version 2" in (await resp.json())["error"]
    assert config.read_text() == before
    assert await answer_version(session) == (200, "1")

"""Admin routes need the token; names cannot leave the repository; the CLI drives them."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from conftest import ServerProcess, running
from fastserve.config import ServerConfig
from fastserve.server import Server

pytestmark = pytest.mark.timeout(90)

TOKEN = "s3cret-admin-token"
ADMIN_ROUTES = [
    "/v2/repository/index",
    "/v2/repository/models/adder/load",
    "/v2/repository/models/adder/unload",
    "/v2/repository/models/adder/promote",
    "/v2/repository/models/adder/rollback",
    "/v2/review/items",
    "/v2/review/items/1",
    "/v2/review/items/1/label",
    "/v2/review/changes/adder",
]


@pytest.fixture
async def served(repo: Path) -> AsyncIterator[Server]:
    config = ServerConfig(repository=repo, port=0, admin_token=TOKEN, watch="off")
    async with running(config) as srv:
        yield srv


async def raw(port: int, head: str, body: bytes = b"") -> tuple[int, bytes]:
    """Send a request exactly as written (no client-side path normalization)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        headers = f"Host: x\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        writer.write(f"{head}\r\n{headers}".encode() + body)
        await writer.drain()
        answer = await reader.read()
    finally:
        writer.close()
    status_line, _, rest = answer.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


def registry_state(srv: Server) -> list[tuple[str, str, str, bool]]:
    return [(r.name, r.version, r.state.value, r.primary) for r in srv.registry.index()]


# -- the token --------------------------------------------------------------------------------


async def test_without_a_configured_token_admin_routes_are_refused(repo: Path) -> None:
    config = ServerConfig(repository=repo, port=0, watch="off")
    async with (
        running(config) as srv,
        aiohttp.ClientSession(f"http://127.0.0.1:{srv.port}") as session,
    ):
        for path in ADMIN_ROUTES:
            for headers in ({}, {"Authorization": "Bearer anything"}):
                async with session.post(path, headers=headers) as resp:
                    assert resp.status == 403
                    assert "admin API is disabled" in (await resp.json())["error"]
        assert srv.registry.get("adder").version == "1"


@pytest.mark.parametrize(
    ("authorization", "status"),
    [
        (None, 401),
        ("", 401),
        ("Bearer", 401),
        ("Bearer ", 401),
        (f"Basic {TOKEN}", 401),
        (f"Bearer {TOKEN} extra", 401),
        ("Bearer wrong-token", 403),
        (f"Bearer {TOKEN[:-1]}", 403),
        (f"Bearer {TOKEN}x", 403),
        (f"Bearer {TOKEN.upper()}", 403),
        ("Bearer tökën", 403),
    ],
)
async def test_missing_malformed_or_wrong_tokens_are_denied(
    served: Server, authorization: str | None, status: int
) -> None:
    before = registry_state(served)
    headers = {} if authorization is None else {"Authorization": authorization}
    async with aiohttp.ClientSession(f"http://127.0.0.1:{served.port}") as session:
        for path in ADMIN_ROUTES:
            async with session.post(path, headers=headers, json={"version": "1"}) as resp:
                assert resp.status == status, path
                if status == 401:
                    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert registry_state(served) == before
    assert served.registry.get("adder").version == "1"


async def test_the_right_token_is_accepted_in_any_scheme_case(served: Server) -> None:
    async with aiohttp.ClientSession(f"http://127.0.0.1:{served.port}") as session:
        for scheme in ("Bearer", "bearer", "BEARER"):
            headers = {"Authorization": f"{scheme} {TOKEN}"}
            async with session.post("/v2/repository/index", headers=headers) as resp:
                assert resp.status == 200
                rows = await resp.json()
        assert {r["name"] for r in rows} >= {"adder", "breast_cancer", "digits"}
        async with session.post(
            "/v2/repository/index",
            headers={"Authorization": f"Bearer {TOKEN}"},
            json={"ready": True},
        ) as resp:
            assert all(r["state"] == "READY" for r in await resp.json())


@pytest.mark.parametrize(
    "head",
    [
        "GET /v2/repository/index HTTP/1.1",
        "HEAD /v2/repository/index HTTP/1.1",
        "PUT /v2/repository/models/adder/unload HTTP/1.1",
        "POST //v2/repository/models/adder/unload HTTP/1.1",
        "POST /v2//repository/models/adder/unload HTTP/1.1",
        "POST /v2/repository/models/adder/unload/ HTTP/1.1",
        "POST /V2/repository/models/adder/unload HTTP/1.1",
        "POST /v2/Repository/models/adder/unload HTTP/1.1",
        "POST /v2/repository/models/adder/UNLOAD HTTP/1.1",
        "POST /v2/repository%2Fmodels/adder/unload HTTP/1.1",
        "POST /v2/repository/models%2Fadder/unload HTTP/1.1",
        "POST /v2/repository/models/adder%2Funload HTTP/1.1",
        "POST /v2/./repository/models/adder/unload HTTP/1.1",
        "POST /v2/repository/models/adder/unload?x=/v2/health HTTP/1.1",
    ],
)
async def test_path_tricks_without_a_token_are_denied(served: Server, head: str) -> None:
    before = registry_state(served)
    status, body = await raw(served.port, head)
    assert status in (400, 401, 404, 405)
    assert b"unloaded" not in body
    assert registry_state(served) == before
    assert served.registry.get("adder").version == "1"


async def test_the_token_never_reaches_the_log(
    served: Server, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with aiohttp.ClientSession(f"http://127.0.0.1:{served.port}") as session:
        for token in (TOKEN, "wrong-token"):
            headers = {"Authorization": f"Bearer {token}"}
            for path in ADMIN_ROUTES:
                async with session.post(path, headers=headers, json={"version": "1"}) as resp:
                    await resp.read()
    assert caplog.records
    text = "\n".join(record.getMessage() for record in caplog.records)
    assert TOKEN not in text and "wrong-token" not in text
    assert TOKEN not in repr(served.config)


# -- names stay inside the repository ---------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "..",
        "%2E%2E",
        "..%2F..%2Fetc",
        "%2Fetc",
        "adder%2F..%2Fdigits",
        "adder%00",
        "%00",
        ".hidden",
        "a" * 300,
        "outside_link",
        "not_a_model",
        "~",
        "adder%5C..%5Cdigits",
    ],
)
async def test_names_cannot_leave_the_repository(
    repo: Path, served: Server, tmp_path: Path, name: str
) -> None:
    outside = tmp_path / "outside_model"
    (outside / "1").mkdir(parents=True)
    (outside / "config.yaml").write_text("")
    (outside / "1" / "model.onnx").write_bytes((repo / "adder/1/model.onnx").read_bytes())
    (repo / "outside_link").symlink_to(outside, target_is_directory=True)
    (repo / "not_a_model").mkdir()
    before = registry_state(served)
    auth = f"Authorization: Bearer {TOKEN}"
    for action in ("load", "unload", "promote", "rollback"):
        status, body = await raw(
            served.port, f"POST /v2/repository/models/{name}/{action} HTTP/1.1\r\n{auth}"
        )
        assert status in (400, 404), (action, status, body)
        assert str(tmp_path).encode() not in body and str(repo).encode() not in body
        assert len(body) < 400
    status, _ = await raw(served.port, f"POST /v2/models/{name}/infer HTTP/1.1")
    assert status in (400, 404)
    assert registry_state(served) == before
    assert "outside_link" not in {r.name for r in served.registry.index()}


# -- the CLI ----------------------------------------------------------------------------------


def fastserve(
    *args: str, token: str | None = TOKEN, url: str = ""
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "FASTSERVE_ADMIN_TOKEN"}
    if token is not None:
        env["FASTSERVE_ADMIN_TOKEN"] = token
    prefix = ["--url", f"http://{url}"] if url else []
    return subprocess.run(
        [sys.executable, "-m", "fastserve", "models", *prefix, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


def test_models_cli_against_a_running_server(repo: Path) -> None:
    (repo / "adder" / "2").mkdir()
    (repo / "adder" / "2" / "model.onnx").write_bytes((repo / "adder/1/model.onnx").read_bytes())
    (repo / "adder" / "config.yaml").write_text("primary: 1\n")
    env_before = os.environ.get("FASTSERVE_ADMIN_TOKEN")
    os.environ["FASTSERVE_ADMIN_TOKEN"] = TOKEN
    try:
        server = ServerProcess(repo)
    finally:
        if env_before is None:
            del os.environ["FASTSERVE_ADMIN_TOKEN"]
        else:
            os.environ["FASTSERVE_ADMIN_TOKEN"] = env_before
    try:
        server.wait_ready()
        url = server.url
        listed = fastserve("list", url=url)
        assert listed.returncode == 0, listed.stderr
        lines = listed.stdout.splitlines()
        assert lines[0].split() == ["MODEL", "VERSION", "STATE", "PRIMARY", "REASON"]
        adder_lines = [line.split() for line in lines if line.startswith("adder ")]
        assert adder_lines == [["adder", "1", "READY", "*"], ["adder", "2", "READY"]]

        promoted = fastserve("promote", "adder", "2", url=url)
        assert promoted.returncode == 0, promoted.stderr
        assert promoted.stdout.strip() == "adder: primary 2 (was 1); loaded: 2"
        assert "primary: 2" in (repo / "adder" / "config.yaml").read_text()

        rolled = fastserve("rollback", "adder", url=url)
        assert rolled.returncode == 0, rolled.stderr
        assert rolled.stdout.strip() == "adder: primary 1 (was 2); loaded: 1, 2"

        assert fastserve("unload", "adder", url=url).stdout.strip() == "adder: unloaded"
        assert "UNAVAILABLE" in fastserve("list", url=url).stdout
        assert fastserve("load", "adder", url=url).returncode == 0

        refused = fastserve("promote", "adder", "7", url=url)
        assert refused.returncode == 1
        assert "there is no version 7" in refused.stderr

        wrong = fastserve("list", token="wrong", url=url)
        assert wrong.returncode == 1 and "403" in wrong.stderr
        missing = fastserve("list", token=None, url=url)
        assert missing.returncode == 2 and "FASTSERVE_ADMIN_TOKEN" in missing.stderr
    finally:
        server.stop()
    log = server.log.read_text()
    assert TOKEN not in log


def test_models_cli_reports_an_unreachable_server() -> None:
    result = fastserve("list", url="127.0.0.1:9")
    assert result.returncode == 2
    assert "cannot reach" in result.stderr


def test_serve_reads_the_admin_token_from_a_file(repo: Path, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    server = ServerProcess(repo, "--admin-token-file", str(token_file))
    try:
        server.wait_ready()
        assert fastserve("list", url=server.url).returncode == 0
        assert fastserve("list", token="nope", url=server.url).returncode == 1
    finally:
        server.stop()

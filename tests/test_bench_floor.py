"""bench/http_floor.cc, the floor server of bench/http_floor.py: built with the system's C++
compiler, it answers each request framed by Content-Length once, in order, whether the
request arrives whole, in pieces or pipelined behind another; so the CPU it spends a
request is an honest floor."""

from __future__ import annotations

import json
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))
import http_floor  # noqa: E402  (bench/ is not a package)

pytestmark = pytest.mark.timeout(120)


def request(body: bytes) -> bytes:
    head = (
        "POST /v2/models/breast_cancer/infer HTTP/1.1\r\nHost: x\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def answers(sock: socket.socket, count: int) -> list[dict[str, object]]:
    """Read ``count`` answers (each framed by its Content-Length); their JSON bodies."""
    data, docs = b"", []
    while len(docs) < count:
        chunk = sock.recv(65536)
        assert chunk, "the floor server closed the connection"
        data += chunk
        while b"\r\n\r\n" in data:
            head, _, rest = data.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 OK")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            if len(rest) < length:
                break
            docs.append(json.loads(rest[:length]))
            data = rest[length:]
    assert data == b""
    return docs


@pytest.fixture(scope="module")
def floor(tmp_path_factory: pytest.TempPathFactory) -> Iterator[http_floor.Floor]:
    server = http_floor.Floor(http_floor.build(tmp_path_factory.mktemp("floor")))
    try:
        yield server
    finally:
        server.stop()


def test_each_request_gets_one_v2_answer_however_it_arrives(floor: http_floor.Floor) -> None:
    body = b'{"inputs": [{"name": "input", "shape": [1, 1], "datatype": "FP32", "data": [1]}]}'
    whole = request(body)
    with socket.create_connection(("127.0.0.1", floor.port), timeout=10) as sock:
        sock.sendall(whole)
        (doc,) = answers(sock, 1)
        assert doc["model_name"] == "breast_cancer" and len(doc["outputs"]) == 2  # type: ignore[arg-type]
        for piece in (whole[:10], whole[10:-5], whole[-5:]):  # a head and a body in pieces
            sock.sendall(piece)
        assert len(answers(sock, 1)) == 1
        sock.sendall(whole * 3)  # pipelined
        assert len(answers(sock, 3)) == 3
        sock.sendall(whole[:-1])  # a body one byte short is not answered
        sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            sock.recv(1)

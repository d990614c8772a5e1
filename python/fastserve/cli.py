"""The ``fastserve`` command."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from fastserve import __version__
from fastserve.config import ServerConfig

if TYPE_CHECKING:
    from fastserve.workers import Worker


def _run(coro: Coroutine[Any, Any, None]) -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
    else:
        uvloop.run(coro)


ADMIN_TOKEN_ENV = "FASTSERVE_ADMIN_TOKEN"


def _admin_token(token_file: str | None) -> str | None:
    """The admin token: from ``token_file`` when given, else from the environment."""
    if token_file:
        try:
            token = Path(token_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or exc
            raise SystemExit(f"fastserve: cannot read the admin token file: {reason}") from None
        if not token:
            raise SystemExit("fastserve: the admin token file is empty")
        return token
    return os.environ.get(ADMIN_TOKEN_ENV) or None


def _serve_one(config: ServerConfig, worker: Worker | None = None) -> None:
    from fastserve.server import Server  # (in a worker: imported after the fork)

    _run(Server(config, worker).serve_forever())


def _serve(args: argparse.Namespace) -> int:
    if args.repository is None:
        from fastserve.demo import demo_repository_path

        repository = demo_repository_path()
    else:
        repository = Path(args.repository)
    if not repository.is_dir():
        print(f"fastserve: model repository {repository} is not a folder", file=sys.stderr)
        return 2
    try:
        config = ServerConfig(
            repository=repository,
            host=args.host,
            port=args.port,
            max_body_bytes=args.max_body_bytes,
            body_timeout_s=args.body_timeout,
            drain_timeout_s=args.drain_timeout,
            idle_timeout_s=args.idle_timeout,
            watch=args.watch,
            watch_debounce_ms=args.watch_debounce_ms,
            poll_interval_s=args.poll_interval,
            admin_token=_admin_token(args.admin_token_file),
            state_db=args.state_db,
            retention_days=args.retention_days,
            busy_poll_us=args.busy_poll_us,
            monitoring=args.monitoring,
            alert_webhook=args.alert_webhook,
            alert_interval_s=args.alert_interval,
        )
    except ValidationError as exc:
        print(f"fastserve: invalid option: {exc.errors()[0]['msg']}", file=sys.stderr)
        return 2
    if args.workers == 1:
        _serve_one(config)
        return 0
    from fastserve.workers import MAX_WORKERS, Supervisor

    if not 1 <= args.workers <= MAX_WORKERS:
        print(f"fastserve: --workers must be 1..{MAX_WORKERS}", file=sys.stderr)
        return 2
    return Supervisor(config, args.workers, _serve_one).run()


def _demo(args: argparse.Namespace) -> int:
    from fastserve.demo import build_demo_repository, demo_repository_path

    path = build_demo_repository(Path(args.out), force=args.force) if args.out else None
    print(path or demo_repository_path())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastserve", description=__doc__)
    parser.add_argument("--version", action="version", version=f"fastserve {__version__}")
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve a model repository over HTTP (KServe V2)")
    serve.add_argument(
        "repository", nargs="?", help="model repository folder (default: the bundled demo)"
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks one)")
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        help="server processes sharing the port (SO_REUSEPORT), each a whole server on its "
        "own core; metrics and repository changes span them all (default 1)",
    )
    serve.add_argument(
        "--max-body-bytes", type=int, default=64 << 20, help="request body limit (default 64 MiB)"
    )
    serve.add_argument(
        "--body-timeout", type=float, default=30.0, help="seconds to receive a body (408)"
    )
    serve.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        help="seconds in-flight requests get on SIGTERM",
    )
    serve.add_argument(
        "--idle-timeout",
        type=float,
        default=15.0,
        help="seconds a connection may take to send a request head, or stay idle (default 15)",
    )
    serve.add_argument(
        "--watch",
        choices=["events", "poll", "off"],
        default="events",
        help="apply repository edits from filesystem events (default), by polling, or not",
    )
    serve.add_argument(
        "--watch-debounce-ms",
        type=int,
        default=100,
        help="apply a burst of edits once it has been quiet this long (default 100)",
    )
    serve.add_argument(
        "--poll-interval", type=float, default=0.5, help="seconds between polls (--watch poll)"
    )
    serve.add_argument(
        "--admin-token-file",
        help=f"file holding the admin token (default: ${ADMIN_TOKEN_ENV}; none: admin API off)",
    )
    serve.add_argument(
        "--state-db",
        type=Path,
        help="SQLite file of predictions, feedback, shadow comparisons, review items and "
        "promotion records (default: REPO-state.db beside the repository)",
    )
    serve.add_argument(
        "--retention-days", type=float, default=7.0, help="keep records this long (default 7)"
    )
    serve.add_argument(
        "--busy-poll-us",
        type=int,
        default=200,
        help="once idle, poll for the next request for up to this many µs before "
        "sleeping; adapts to the traffic (default 200, 0: off)",
    )
    serve.add_argument(
        "--no-monitoring",
        dest="monitoring",
        action="store_false",
        help="do not time request stages or count inputs for drift",
    )
    serve.add_argument(
        "--alert-webhook",
        metavar="URL",
        help="POST alerts computed in the server (drift, error rate) here (default: off)",
    )
    serve.add_argument(
        "--alert-interval", type=float, default=30.0, help="seconds between alert evaluations"
    )
    serve.set_defaults(func=_serve)

    from fastserve.admin_client import add_models_command

    add_models_command(commands)

    from fastserve.data_commands import add_data_commands

    add_data_commands(commands)

    from fastserve.offline.cli import add_batch_command

    add_batch_command(commands)

    demo = commands.add_parser("demo", help="build the demo model repository and print its path")
    demo.add_argument("--out", help="folder to build it in (default: the user cache)")
    demo.add_argument("--force", action="store_true", help="rebuild even if present")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())

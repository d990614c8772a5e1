"""``fastserve models ...``: the repository API of a running server, from the shell.

    fastserve models list                      every model version, its state and reason
    fastserve models load MODEL                apply the model's folder now
    fastserve models unload MODEL
    fastserve models promote MODEL VERSION     make VERSION primary (edits config.yaml)
    fastserve models rollback MODEL            back to the previous primary

The admin token comes from ``$FASTSERVE_ADMIN_TOKEN`` (or ``--token-file``), the server
from ``--url`` or ``$FASTSERVE_URL`` (default http://127.0.0.1:8000). Exit status: 0 done,
1 the server refused (its reason is printed), 2 the server could not be asked.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

DEFAULT_URL = "http://127.0.0.1:8000"
_TIMEOUT_S = 300.0  # a load waits for the model's sessions to be built and warmed up


class AdminError(Exception):
    """The server answered with an error (``status`` and its message)."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(message)


def call(url: str, path: str, token: str | None, body: dict[str, Any] | None = None) -> Any:
    """POST ``body`` to an admin route and return the decoded JSON answer."""
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(
        url.rstrip("/") + path,
        data=json.dumps(body or {}).encode(),
        headers=headers,
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=_TIMEOUT_S) as response:
            return json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read()).get("error", exc.reason)
        except (ValueError, AttributeError):
            message = str(exc.reason)
        raise AdminError(exc.code, message) from None


def format_index(rows: list[dict[str, Any]]) -> str:
    table = [("MODEL", "VERSION", "STATE", "PRIMARY", "REASON")]
    for row in rows:
        table.append(
            (
                row["name"],
                row["version"] or "-",
                row["state"],
                "*" if row.get("primary") else "",
                row["reason"],
            )
        )
    widths = [max(len(r[i]) for r in table) for i in range(4)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(r[:4], widths, strict=True))
        + ("  " + r[4] if r[4] else "")
        for r in table
    ).rstrip()


def _run(args: argparse.Namespace) -> int:
    from fastserve.cli import _admin_token

    token = _admin_token(args.token_file)
    if not token:
        print(
            "fastserve: no admin token: set FASTSERVE_ADMIN_TOKEN or pass --token-file",
            file=sys.stderr,
        )
        return 2
    action = args.action
    try:
        if action == "list":
            print(format_index(call(args.url, "/v2/repository/index", token)))
            return 0
        path = f"/v2/repository/models/{urllib.parse.quote(args.model, safe='')}/{action}"
        body = {"version": args.version} if action == "promote" else None
        result = call(args.url, path, token, body)
    except AdminError as exc:
        print(f"fastserve: {action} refused ({exc.status}): {exc}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        print(f"fastserve: cannot reach {args.url}: {reason}", file=sys.stderr)
        return 2
    if action == "unload":
        print(f"{args.model}: unloaded")
    else:
        versions = ", ".join(result["versions"])
        before = result.get("previous")
        change = f" (was {before})" if before and before != result["primary"] else ""
        print(f"{args.model}: primary {result['primary']}{change}; loaded: {versions}")
    return 0


def add_models_command(commands: Any) -> None:
    """Add ``models`` to the CLI's sub-commands."""
    models = commands.add_parser(
        "models",
        help="list, load, unload, promote or roll back models on a running server",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    models.add_argument(
        "--url",
        default=os.environ.get("FASTSERVE_URL", DEFAULT_URL),
        help=f"the server (default $FASTSERVE_URL or {DEFAULT_URL})",
    )
    models.add_argument("--token-file", help="file holding the admin token")
    actions = models.add_subparsers(dest="action", required=True)
    actions.add_parser("list", help="every model version with its state")
    for name, text in (
        ("load", "load or reload a model from the repository"),
        ("unload", "stop serving a model until it is loaded again"),
        ("rollback", "make the previous primary version primary again"),
    ):
        actions.add_parser(name, help=text).add_argument("model")
    promote = actions.add_parser("promote", help="make a version primary")
    promote.add_argument("model")
    promote.add_argument("version")
    models.set_defaults(func=_run)

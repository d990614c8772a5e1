"""``fastserve models ...``: the repository API of a running server, from the shell.

    fastserve models list                      every model version, its state and reason
    fastserve models load MODEL                apply the model's folder now
    fastserve models unload MODEL
    fastserve models promote MODEL VERSION     make VERSION primary (edits config.yaml)
    fastserve models promote MODEL [--force]   make the shadow primary if its gate passes
    fastserve models rollback MODEL            back to the previous primary
    fastserve models shadow MODEL              the shadow comparison summary
    fastserve models history MODEL             promotions and rollbacks, newest first

    fastserve review list [--model M] [--status pending|labelled|all]
    fastserve review show ID                   an item's inputs and both answers
    fastserve review label ID LABEL --reviewer NAME

promote and rollback take --reason and --actor (default $USER); they are recorded.

The admin token comes from ``$FASTSERVE_ADMIN_TOKEN`` (or ``--token-file``), the server
from ``--url`` or ``$FASTSERVE_URL`` (default http://127.0.0.1:8000). Exit status: 0 done,
1 the server refused (its reason is printed), 2 the server could not be asked.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from typing import Any

DEFAULT_URL = "http://127.0.0.1:8000"
_TIMEOUT_S = 300.0  # a load waits for the model's sessions to be built and warmed up


class AdminError(Exception):
    """The server answered with an error (``status``, its message and its whole answer)."""

    def __init__(self, status: int, message: str, doc: dict[str, Any] | None = None) -> None:
        self.status = status
        self.doc = doc or {}
        super().__init__(message)


def call(
    url: str, path: str, token: str | None, body: dict[str, Any] | None = None, method: str = "POST"
) -> Any:
    """Send ``body`` (POST) or nothing (GET) to a route and return the decoded JSON answer."""
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(
        url.rstrip("/") + path,
        data=json.dumps(body or {}).encode() if method == "POST" else None,
        headers=headers,
        method=method,
    )
    try:
        with urllib.request.urlopen(request, timeout=_TIMEOUT_S) as response:
            return json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        try:
            doc = json.loads(exc.read())
            message = doc.get("error", exc.reason)
        except (ValueError, AttributeError):
            doc, message = None, str(exc.reason)
        raise AdminError(exc.code, message, doc) from None


def format_table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(r, widths, strict=True)).rstrip()
        for r in rows
    )


def format_gate(conditions: list[dict[str, Any]]) -> str:
    rows = [("CONDITION", "REQUIRED", "ACTUAL", "")]
    for c in conditions:
        actual = c["actual"]
        shown = "-" if actual is None else f"{actual:.4f}" if isinstance(actual, float) else actual
        rows.append((c["name"], c["required"], str(shown), "pass" if c["passed"] else "FAIL"))
    return format_table(rows)


def format_shadow(doc: dict[str, Any]) -> str:
    if doc.get("shadow_version") is None:
        return f"{doc['model_name']}: no shadow (primary {doc['primary_version']})"
    lines = [
        f"{doc['model_name']}: primary {doc['primary_version']}, shadow {doc['shadow_version']}",
        f"  compared {doc['compared']}, shadow errors {doc['shadow_errors']}, "
        f"dropped {doc['dropped']}, pending {doc['pending']}",
    ]
    if doc.get("agreement") is not None:
        low, high = doc["agreement_ci95"]
        lines.append(
            f"  agreement {doc['agreement']:.4f} (95% CI {low:.4f}..{high:.4f}), "
            f"disagreements {doc['disagreements']}"
        )
    for side in ("primary", "shadow"):
        latency = doc["latency"][side]
        if latency["p50_ms"] is not None:
            lines.append(
                f"  {side} latency p50 {latency['p50_ms']:.3f} ms, p99 {latency['p99_ms']:.3f} ms"
            )
    for entry in doc.get("accuracy_on_compared", {}).values():
        lines.append(
            f"  {entry['role']} {entry['metric']} {entry['value']:.4f} "
            f"on {entry['labelled']} labelled request(s)"
        )
    return "\n".join(lines)


def format_index(rows: list[dict[str, Any]]) -> str:
    """The repository index as a table (the reason, which may be long, last and unpadded)."""
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


def _token(args: argparse.Namespace) -> str | None:
    from fastserve.cli import _admin_token

    token = _admin_token(args.token_file)
    if not token:
        print(
            "fastserve: no admin token: set FASTSERVE_ADMIN_TOKEN or pass --token-file",
            file=sys.stderr,
        )
    return token


def _asking(args: argparse.Namespace, what: str, ask: Any) -> int:
    """Run ``ask()`` and map what goes wrong to the exit status (1 refused, 2 unreachable)."""
    try:
        ask()
    except AdminError as exc:
        print(f"fastserve: {what} refused ({exc.status}): {exc}", file=sys.stderr)
        if exc.doc.get("conditions"):
            print(format_gate(exc.doc["conditions"]), file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        print(f"fastserve: cannot reach {args.url}: {reason}", file=sys.stderr)
        return 2
    return 0


def _change_body(args: argparse.Namespace) -> dict[str, Any]:
    return {"actor": args.actor, "reason": args.reason}


def _run(args: argparse.Namespace) -> int:
    token = _token(args)
    if not token:
        return 2
    action = args.action
    quoted = urllib.parse.quote(getattr(args, "model", "") or "", safe="")

    def ask() -> None:
        if action == "list":
            print(format_index(call(args.url, "/v2/repository/index", token)))
            return
        if action == "shadow":
            print(format_shadow(call(args.url, f"/v2/models/{quoted}/shadow", token, method="GET")))
            return
        if action == "history":
            doc = call(args.url, f"/v2/review/changes/{quoted}", token, method="GET")
            rows = [("WHEN (UTC)", "ACTION", "FROM", "TO", "ACTOR", "FORCED", "REASON")]
            for c in doc["changes"]:
                when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(c["created"]))
                rows.append((when, c["action"], c["from_version"] or "-", c["to_version"],
                             c["actor"], "yes" if c["forced"] else "", c["reason"]))  # fmt: skip
            print(format_table(rows))
            return
        path = f"/v2/repository/models/{quoted}/{action}"
        body: dict[str, Any] | None = None
        if action == "promote":
            body = {**_change_body(args), "force": args.force}
            if args.version is not None:
                body["version"] = args.version
        elif action == "rollback":
            body = _change_body(args)
        result = call(args.url, path, token, body)
        if action == "unload":
            print(f"{args.model}: unloaded")
        else:
            if result.get("gate"):
                print(format_gate(result["gate"]))
            versions = ", ".join(result["versions"])
            before = result.get("previous")
            change = f" (was {before})" if before and before != result["primary"] else ""
            forced = " (gate overridden with --force, recorded)" if result.get("forced") else ""
            print(f"{args.model}: primary {result['primary']}{change}{forced}; loaded: {versions}")
        # a server of several workers (serve --workers): one that did not follow is an error
        behind = {w: how for w, how in result.get("workers", {}).items() if how != "applied"}
        for worker, how in sorted(behind.items(), key=lambda kv: int(kv[0])):
            print(f"fastserve: worker {worker} did not follow: {how}", file=sys.stderr)
        if behind:
            raise SystemExit(1)

    return _asking(args, action, ask)


def _run_review(args: argparse.Namespace) -> int:
    token = _token(args)
    if not token:
        return 2

    def ask() -> None:
        if args.action == "list":
            query = {"status": args.status, "limit": str(args.limit)}
            if args.model:
                query["model"] = args.model
            doc = call(
                args.url, "/v2/review/items?" + urllib.parse.urlencode(query), token, method="GET"
            )
            rows = [("ID", "MODEL", "REQUEST", "REASON", "CONFIDENCE", "VERSIONS", "STATUS")]
            for item in doc["items"]:
                confidence = "" if item["confidence"] is None else f"{item['confidence']:.4f}"
                versions = item["version"] + (
                    f" vs {item['shadow_version']}" if item["shadow_version"] else ""
                )
                rows.append((str(item["id"]), item["model"], item["request_id"], item["reason"],
                             confidence, versions, item["status"]))  # fmt: skip
            print(format_table(rows))
        elif args.action == "show":
            print(json.dumps(call(args.url, f"/v2/review/items/{args.id}", token, method="GET"),
                             indent=2))  # fmt: skip
        else:
            try:
                label = json.loads(args.label)
            except ValueError:
                raise AdminError(400, "LABEL must be a number or a JSON list") from None
            item = call(
                args.url,
                f"/v2/review/items/{args.id}/label",
                token,
                {"label": label, "reviewer": args.reviewer},
            )
            print(f"item {item['id']}: labelled {json.dumps(item['label'])} by {item['reviewer']}")

    return _asking(args, args.action, ask)


def _add_connection(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url",
        default=os.environ.get("FASTSERVE_URL", DEFAULT_URL),
        help=f"the server (default $FASTSERVE_URL or {DEFAULT_URL})",
    )
    parser.add_argument("--token-file", help="file holding the admin token")


def _add_change_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reason", default="", help="why (recorded)")
    parser.add_argument(
        "--actor", default=os.environ.get("USER") or "admin", help="who (default $USER)"
    )


def add_models_command(commands: Any) -> None:
    """Add ``models`` and ``review`` to the CLI's sub-commands."""
    models = commands.add_parser(
        "models",
        help="list, load, unload, promote or roll back models on a running server",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_connection(models)
    actions = models.add_subparsers(dest="action", required=True)
    actions.add_parser("list", help="every model version with its state")
    for name, text in (
        ("load", "load or reload a model from the repository"),
        ("unload", "stop serving a model until it is loaded again"),
        ("shadow", "the shadow comparison summary"),
        ("history", "promotions and rollbacks, newest first"),
    ):
        actions.add_parser(name, help=text).add_argument("model")
    rollback = actions.add_parser("rollback", help="make the previous primary primary again")
    rollback.add_argument("model")
    _add_change_options(rollback)
    promote = actions.add_parser(
        "promote", help="make VERSION primary, or without one the shadow if its gate passes"
    )
    promote.add_argument("model")
    promote.add_argument("version", nargs="?")
    promote.add_argument("--force", action="store_true", help="promote even if the gate fails")
    _add_change_options(promote)
    models.set_defaults(func=_run)

    review = commands.add_parser(
        "review",
        help="work through the review queue of a running server",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_connection(review)
    steps = review.add_subparsers(dest="action", required=True)
    listing = steps.add_parser("list", help="queue items, oldest first")
    listing.add_argument("--model")
    listing.add_argument("--status", default="pending", choices=["pending", "labelled", "all"])
    listing.add_argument("--limit", type=int, default=100)
    steps.add_parser("show", help="one item with its inputs and answers").add_argument("id")
    label = steps.add_parser("label", help="label an item (counts as feedback)")
    label.add_argument("id")
    label.add_argument("label", help="a class index or value (JSON list: one per row)")
    label.add_argument("--reviewer", required=True)
    review.set_defaults(func=_run_review)

"""``fastserve profile`` and ``fastserve validate``: the offline side of value schemas.

Exit codes: 0 the data passes (or the profile is written), 1 the data fails the schema,
2 the command could not run (unreadable file, unknown model, bad schema, ...).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from fastserve.tabular import FORMATS, TableError, read_table

__all__ = ["Refused", "add_data_commands", "resolve_schema_file", "resolve_version"]


class Refused(Exception):
    """The command cannot run; the message says why (exit 2)."""


def resolve_version(repository: Path, model: str, version: str | None) -> str:
    """``version`` if ``model`` has it; else the primary its config names, else the
    highest version its version policy loads (the version online traffic gets)."""
    return _resolve(repository, model, version)[1]


def resolve_schema_file(repository: Path, model: str, version: str | None) -> Path:
    """The ``schema.yaml`` of ``model``'s ``version`` (default: as ``resolve_version``)."""
    from fastserve.schema import SCHEMA_FILE

    source_path, version = _resolve(repository, model, version)
    path = source_path / version / SCHEMA_FILE
    if not path.is_file():
        raise Refused(f"model '{model}' version {version} has no {SCHEMA_FILE}")
    return path


def _resolve(repository: Path, model: str, version: str | None) -> tuple[Path, str]:
    """(the model's folder, the version): see ``resolve_version``."""
    from fastserve import repository as repo
    from fastserve.config import load_model_config
    from fastserve.errors import ConfigError

    source = repo.find(repository, model)
    if source is None:
        raise Refused(f"{repository} has no model '{model}'")
    available = source.versions()
    if version is not None:
        if version not in available:
            raise Refused(f"model '{model}' has no version {version}")
        return source.path, version
    try:
        config = load_model_config(source.config_path)
    except ConfigError as exc:
        raise Refused(str(exc)) from None
    loaded = config.version_policy.select([int(v) for v in available])
    chosen = config.primary or (loaded[-1] if loaded else None)
    if chosen is None:
        raise Refused(f"model '{model}' has no version to serve")
    return source.path, str(chosen)


def _profile(args: argparse.Namespace) -> int:
    from fastserve.profiling import ProfileError, profile_frame
    from fastserve.schema import SCHEMA_FILE

    out = Path(args.out)
    if not args.force and (out / SCHEMA_FILE).exists():
        raise Refused(f"{out / SCHEMA_FILE} exists (--force replaces it)")
    frame = read_table(Path(args.data), args.format)
    named = [*args.drop, *([args.predictions] if args.predictions else [])]
    missing = [c for c in named if c not in frame.columns]
    if missing:
        raise Refused(f"no column {', '.join(map(repr, missing))} in the data")
    try:
        profile = profile_frame(
            frame.drop(columns=named),
            source=Path(args.data).name,
            discrete_max=args.discrete_max,
            predictions=None if args.predictions is None else frame[args.predictions].to_numpy(),
        )
    except ProfileError as exc:
        raise Refused(f"{args.data}: {exc}") from None
    schema_path, reference_path = profile.write(out)
    features = profile.reference.features
    discrete = sum(f.kind == "discrete" for f in features)
    print(
        f"{len(features)} features ({discrete} discrete) from {profile.reference.rows} rows\n"
        f"wrote {schema_path} (review it: ranges are the observed min..max)\n"
        f"wrote {reference_path}"
    )
    return 0


def _validate(args: argparse.Namespace) -> int:
    from fastserve.datacheck import validate_frame
    from fastserve.schema import read_schema

    if args.schema is not None:
        schema_path = Path(args.schema)
    else:
        if args.repository is not None:
            repository = Path(args.repository)
        else:
            from fastserve.demo import demo_repository_path

            repository = demo_repository_path()
        schema_path = resolve_schema_file(repository, args.model, args.version)
    try:
        schema = read_schema(schema_path)
    except Exception as exc:  # pandera's and PyYAML's errors alike: the file is at fault
        raise Refused(f"{schema_path}: not a pandera schema: {exc}") from None
    frame = read_table(Path(args.data), args.format)
    report = validate_frame(schema, frame, source=args.data)
    if args.json:
        print(json.dumps(report.as_doc(), indent=1))
    else:
        print(f"schema: {schema_path}")
        sys.stdout.write(report.render())
    return 0 if report.ok else 1


def _guarded(func: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        try:
            result: int = func(args)
        except (Refused, TableError) as exc:
            print(f"fastserve {args.command}: {exc}", file=sys.stderr)
            return 2
        return result

    return run


def add_data_commands(commands: Any) -> None:
    """Add ``profile`` and ``validate`` to the CLI's sub-commands."""
    profile = commands.add_parser(
        "profile",
        help="infer a starting schema and reference statistics from training data",
        description="Write schema.yaml (pandera, for review) and reference.json (for drift "
        "monitoring) from a CSV/Parquet/JSONL file. Columns, in file order, are the model "
        "input's features: drop labels and ids.",
    )
    profile.add_argument("data", help="training data file (.csv, .parquet, .jsonl)")
    profile.add_argument("--format", choices=FORMATS, help="file format (default: from suffix)")
    profile.add_argument(
        "--drop", action="append", default=[], metavar="COLUMN", help="leave out (repeatable)"
    )
    profile.add_argument(
        "--predictions",
        metavar="COLUMN",
        help="column holding the model's answers on these rows (class index or value): "
        "the reference for prediction drift; not a feature",
    )
    profile.add_argument("--out", default=".", help="folder to write into, e.g. a version folder")
    profile.add_argument(
        "--discrete-max",
        type=int,
        default=20,
        help="at most this many distinct whole numbers make a feature discrete (isin)",
    )
    profile.add_argument("--force", action="store_true", help="replace an existing schema.yaml")
    profile.set_defaults(func=_guarded(_profile))

    validate = commands.add_parser(
        "validate",
        help="check a data file against a model's schema (exit 1 on failure)",
        description="Check a CSV/Parquet/JSONL file against a model version's schema.yaml "
        "with pandera, columns matched by name. Exit 0: it passes; 1: it fails; 2: error.",
    )
    validate.add_argument("data", help="data file (.csv, .parquet, .jsonl)")
    which = validate.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="model whose schema to use")
    which.add_argument("--schema", help="a schema.yaml file instead of a model's")
    validate.add_argument("--version", help="model version (default: the primary)")
    validate.add_argument("--repository", help="model repository (default: the bundled demo)")
    validate.add_argument("--format", choices=FORMATS, help="file format (default: from suffix)")
    validate.add_argument("--json", action="store_true", help="print the report as JSON")
    validate.set_defaults(func=_guarded(_validate))

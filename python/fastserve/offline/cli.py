"""``fastserve batch``: the command line of offline jobs.

Exit codes: 0 every row predicted; 1 done, but some rows (or malformed lines) went to the
reject file; 2 the job could not run or stopped on an error (committed chunks are kept:
the same command resumes); 3 more rows were rejected than ``--max-reject`` allows.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from fastserve.tabular import FORMATS, TableError, table_format

__all__ = ["add_batch_command"]

EXIT_REJECTED = 1
EXIT_ERROR = 2
EXIT_TOO_MANY = 3
MAX_BATCH_ROWS = 65536
"""The most rows a model call may take (the core's limit on a batch)."""


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive number")
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative")
    return value


def _batch_size(text: str) -> int:
    value = _positive(text)
    if value > MAX_BATCH_ROWS:
        raise argparse.ArgumentTypeError(f"{value} is above {MAX_BATCH_ROWS} rows")
    return value


def _rejects_path(output: Path) -> Path:
    return output.with_name(f"{output.stem}.rejects.jsonl")


def _batch(args: argparse.Namespace) -> int:
    from fastserve.data_commands import Refused, resolve_version
    from fastserve.offline.job import JobSpec, TooManyRejects, WorkFolder, run_job
    from fastserve.offline.predictors import JobError, LocalModel, RemoteModel

    data, output = Path(args.input), Path(args.output)
    try:
        spec_formats = (
            table_format(data, args.input_format),
            table_format(output, args.output_format),
        )
    except TableError as exc:
        print(f"fastserve batch: {exc}", file=sys.stderr)
        return EXIT_ERROR
    if not data.is_file():
        print(f"fastserve batch: {data}: no such file", file=sys.stderr)
        return EXIT_ERROR
    # a resumed job keeps the version it began with, whatever the primary is now
    began = WorkFolder(output).manifest() if not args.restart else None
    version = args.version or (str(began["version"]) if began and began.get("version") else None)
    predictor: Any
    if args.url:
        source = f"url:{args.url.rstrip('/')}"
        predictor = RemoteModel(
            args.url,
            args.model,
            version,
            wire=args.wire,
            in_flight=args.concurrency,
            request_rows=args.request_rows,
            timeout_s=args.timeout,
        )
    else:
        if args.repository is not None:
            repository = Path(args.repository)
        else:
            from fastserve.demo import demo_repository_path

            repository = demo_repository_path()
        try:
            version = resolve_version(repository, args.model, version)
        except Refused as exc:
            print(f"fastserve batch: {exc}", file=sys.stderr)
            return EXIT_ERROR
        source = f"repo:{repository.resolve()}"
        predictor = LocalModel(repository, args.model, version, args.batch_size)
    spec = JobSpec(
        input=data,
        input_format=spec_formats[0],
        output=output,
        output_format=spec_formats[1],
        rejects=Path(args.rejects) if args.rejects else _rejects_path(output),
        model=args.model,
        source=source,
        key=args.key,
        drop=tuple(args.drop),
        pack=args.pack,
        chunk_rows=args.chunk_rows,
        max_reject=args.max_reject,
        overwrite=args.overwrite,
        restart=args.restart,
        progress=args.progress,
        log_every_s=args.log_every,
    )

    async def job() -> Any:
        async with predictor:
            return await run_job(spec, predictor)

    try:
        summary = asyncio.run(job())
    except TooManyRejects as exc:
        summary = exc.args[0]
        sys.stdout.write(summary.render())
        return EXIT_TOO_MANY
    except (JobError, TableError) as exc:
        print(f"fastserve batch: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as exc:  # the output's folder cannot be written, say
        where = f": {exc.filename}" if exc.filename else ""
        print(f"fastserve batch: {exc.strerror or exc}{where}", file=sys.stderr)
        return EXIT_ERROR
    sys.stdout.write(summary.render())
    return EXIT_REJECTED if summary.refused else 0


def add_batch_command(commands: Any) -> None:
    batch = commands.add_parser(
        "batch",
        help="score a CSV/Parquet/JSONL file through a model, resumably",
        description="Predict every row of INPUT with a model version, through the same "
        "validation, preprocessing and batcher as online requests, and write OUTPUT (the "
        "key or row number, then the model's outputs). Rows that fail validation go to a "
        "reject file with the reason. Killed, the same command resumes from the last "
        "committed chunk. Exit 0: all predicted; 1: some rejected; 2: error; 3: more "
        "rejected than --max-reject.",
    )
    batch.add_argument("input", help="data file (.csv, .parquet, .jsonl)")
    batch.add_argument("output", help="file to write (.csv, .parquet, .jsonl)")
    batch.add_argument("--model", required=True, help="model name")
    batch.add_argument("--version", help="model version (default: the primary)")
    where = batch.add_mutually_exclusive_group()
    where.add_argument(
        "--repo",
        dest="repository",
        help="model repository to load the model from, in this process (default: the demo)",
    )
    where.add_argument("--url", help="a running V2 server to send the rows to instead")
    batch.add_argument("--input-format", choices=FORMATS, help="default: from the suffix")
    batch.add_argument("--output-format", choices=FORMATS, help="default: from the suffix")
    batch.add_argument(
        "--key",
        metavar="COLUMN",
        help="column carried to the output with "
        "each prediction (default: the row number, as 'row')",
    )
    batch.add_argument(
        "--drop",
        action="append",
        default=[],
        metavar="COLUMN",
        help="column not to send (labels, ...); repeatable",
    )
    batch.add_argument(
        "--pack",
        metavar="INPUT",
        help="send the columns, in file order, as the elements of this input's rows",
    )
    batch.add_argument("--rejects", help="reject file (default: OUTPUT-STEM.rejects.jsonl)")
    batch.add_argument(
        "--max-reject",
        type=_count,
        metavar="N",
        help="stop (exit 3) once more than N rows (or malformed lines) are rejected",
    )
    batch.add_argument(
        "--chunk-rows",
        type=_positive,
        default=65536,
        help="rows read, scored and committed at a time (default 65536)",
    )
    batch.add_argument(
        "--batch-size",
        type=_batch_size,
        default=16384,
        help="--repo: rows per model call (default 16384)",
    )
    batch.add_argument(
        "--request-rows",
        type=_positive,
        help="--url: rows per request (default: the model's max batch size on the server)",
    )
    batch.add_argument(
        "--concurrency", type=_positive, default=4, help="--url: requests in flight (default 4)"
    )
    batch.add_argument(
        "--wire",
        choices=["msgpack", "binary"],
        default="msgpack",
        help="--url: request body (default msgpack; binary: Triton's)",
    )
    batch.add_argument(
        "--timeout", type=float, default=60.0, help="--url: seconds a request may take (default 60)"
    )
    batch.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT")
    batch.add_argument(
        "--restart",
        action="store_true",
        help="discard an unfinished job's committed chunks and start over",
    )
    batch.add_argument(
        "--progress",
        choices=["auto", "bar", "log", "off"],
        default="auto",
        help="a bar on a terminal, else a log line every 10 s (default auto)",
    )
    batch.add_argument(
        "--log-every",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="seconds between progress lines when not on a terminal (default 10)",
    )
    batch.set_defaults(func=_batch)

"""``fastserve batch``: score a file through the online path, resumably.

The job reads the input in fixed chunks (``source``), turns each into V2 request inputs
(``columns``), predicts them in requests of at most ``request_rows`` rows with a bounded
number in flight (``predictors``), and commits the chunk: its output part, its reject
part, then a small record that marks it done, each written beside its final name and
renamed into place. A job killed at any point and started again with the same arguments
finds the committed chunks in its work folder (``.OUTPUT.batch`` beside the output),
starts after the last one, and so writes exactly the rows one clean run writes. When the
last chunk is committed, the parts are merged into OUTPUT and the reject file, and the
work folder is removed.

A request the model refuses (a 400 online) is split in halves until the rows at fault are
alone; each goes to the reject file with the model's own reason and the rest are scored.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np
import numpy.typing as npt
import orjson
import pyarrow as pa

from fastserve import __version__
from fastserve.offline.columns import ColumnPlan, PlanError, convert, plan
from fastserve.offline.output import (
    ROW_KEY,
    OutputFiles,
    reject_lines,
    write_atomically,
)
from fastserve.offline.predictors import JobError, Predictor, Refused
from fastserve.offline.source import Chunk, Source
from fastserve.protocol import InputTensor
from fastserve.tabular import TableError, TableFormat

__all__ = ["JobSpec", "Summary", "TooManyRejects", "run_job"]

log = logging.getLogger("fastserve.batch")

MANIFEST: Final = "job.json"
Progress = Literal["auto", "bar", "log", "off"]


class TooManyRejects(Exception):
    """More rows were rejected than ``--max-reject`` allows; the job stopped."""


@dataclass(frozen=True)
class JobSpec:
    input: Path
    input_format: TableFormat
    output: Path
    output_format: TableFormat
    rejects: Path
    model: str
    source: str
    """``repo:PATH`` or ``url:URL``: where the model runs."""
    key: str | None = None
    drop: tuple[str, ...] = ()
    pack: str | None = None
    chunk_rows: int = 65536
    max_reject: int | None = None
    overwrite: bool = False
    restart: bool = False
    progress: Progress = "auto"
    log_every_s: float = 10.0
    """Seconds between progress lines (when not on a terminal)."""

    def identity(self) -> dict[str, Any]:
        """What a resumed job must share with the one that began (the input file as it
        was; every argument that changes which rows go where)."""
        stat = self.input.stat()
        return {
            "input": str(self.input.resolve()),
            "input_size": stat.st_size,
            "input_mtime_ns": stat.st_mtime_ns,
            "input_format": self.input_format,
            "output": str(self.output.resolve()),
            "output_format": self.output_format,
            "rejects": str(self.rejects.resolve()),
            "model": self.model,
            "source": self.source,
            "key": self.key,
            "drop": list(self.drop),
            "pack": self.pack,
            "chunk_rows": self.chunk_rows,
        }


@dataclass
class Summary:
    rows: int = 0
    """Data rows read (scored or rejected); malformed lines are not rows."""
    predicted: int = 0
    rejected: int = 0
    malformed: int = 0
    seconds: float = 0.0
    resumed_chunks: int = 0
    version: str = ""
    output: Path | None = None
    rejects: Path | None = None
    stopped: str | None = None
    """Why the job stopped early (too many rejects); None when it finished."""
    fresh_rows: int = 0
    """Rows read by this run (the rate's numerator; a resumed job read the rest before)."""
    already_done: bool = False
    """The job had finished before this run: nothing was done."""
    _started: float = field(default_factory=time.perf_counter, repr=False)

    @property
    def refused(self) -> int:
        return self.rejected + self.malformed

    def render(self) -> str:
        if self.already_done:
            return (
                f"already done: {self.rows:,} rows read, {self.predicted:,} predicted, "
                f"{self.rejected:,} rejected, {self.malformed:,} malformed lines\n"
                f"output: {self.output}\n" + (f"rejects: {self.rejects}\n" if self.refused else "")
            )
        rate = self.fresh_rows / self.seconds if self.seconds > 0 else 0.0
        resumed = self.resumed_chunks
        lines = [
            f"rows: {self.rows:,} read, {self.predicted:,} predicted, {self.rejected:,} "
            f"rejected, {self.malformed:,} malformed lines",
            f"time: {self.seconds:.1f} s, {rate:,.0f} rows/s"
            + (
                f" (resumed after {resumed} committed chunk{'s' * (resumed > 1)})"
                if resumed
                else ""
            ),
            f"model version: {self.version}",
        ]
        if self.output is not None:
            lines.append(f"output: {self.output}")
        if self.refused and self.rejects is not None:
            lines.append(f"rejects: {self.rejects}")
        if self.stopped:
            lines.append(f"stopped: {self.stopped}")
        return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class _Record:
    """A committed chunk's counts (its ``chunk-K.done`` file)."""

    rows: int
    predicted: int
    rejected: int
    malformed: int
    part_bytes: int
    """The size of the chunk's output part: a part that is not there whole is not committed."""


class WorkFolder:
    """The job's committed chunks: ``job.json``, then per chunk its output part
    ``chunk-K.out`` (written to disk, then renamed into place) and ``chunk-K.done``, which
    commits it: the chunk's counts, the part's size and the chunk's reject lines. A chunk is
    committed when its ``done`` file reads whole and its part has that size; the first chunk
    that is not ends the list, so a kill -9 (or a power cut) at any moment leaves either the
    chunk committed or the chunk to do again."""

    def __init__(self, output: Path) -> None:
        self.path = output.with_name(f".{output.name}.batch")
        self._retired = output.with_name(f".{output.name}.batch-retired")
        self.finished = output.with_name(f".{output.name}.batch-done")
        """Left beside a finished job's output: its identity and counts, so that the same
        command run again (after a kill -9 that came after the last step, say) knows the
        job is done rather than refusing to overwrite its output."""

    def exists(self) -> bool:
        return self.path.is_dir()

    def manifest(self) -> dict[str, Any] | None:
        try:
            doc = orjson.loads((self.path / MANIFEST).read_bytes())
        except (OSError, orjson.JSONDecodeError):
            return None
        return doc if isinstance(doc, dict) else None

    def begin(self, manifest: dict[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        write_atomically(self.path / MANIFEST, lambda f: f.write(orjson.dumps(manifest)))

    def pin_version(self, version: str) -> None:
        """Record the version a job over HTTP found (its first answer's) for resumption."""
        manifest = self.manifest()
        if manifest is not None and not manifest.get("version"):
            self.begin({**manifest, "version": version})

    def committed(self) -> list[_Record]:
        """The committed chunks, 0 to the first one that is not."""
        records: list[_Record] = []
        while (doc := self._done(len(records))) is not None:
            doc.pop("rejects", None)
            try:
                record = _Record(**doc)
                if self.part(len(records)).stat().st_size != record.part_bytes:
                    return records
            except (TypeError, OSError):
                return records
            records.append(record)
        return records

    def _done(self, index: int) -> dict[str, Any] | None:
        try:
            doc = orjson.loads(self._file(index, "done").read_bytes())
        except (OSError, orjson.JSONDecodeError):
            return None
        return doc if isinstance(doc, dict) else None

    def part(self, index: int) -> Path:
        return self._file(index, "out")

    def rejects(self, index: int) -> bytes:
        """A committed chunk's reject lines."""
        doc = self._done(index)
        return str(doc.get("rejects", "")).encode() if doc is not None else b""

    def commit(self, index: int, record: _Record, rejects: bytes) -> None:
        """Commit a chunk whose part is written. The part was flushed to disk before its
        rename, so the ``done`` file needs no flush of its own: if a crash loses it, the
        chunk is simply done again."""
        doc = orjson.dumps({**record.__dict__, "rejects": rejects.decode()})
        write_atomically(self._file(index, "done"), lambda f: f.write(doc), durable=False)

    def remove(self) -> None:
        """Renamed away first, then deleted: a job killed meanwhile leaves no half a folder
        that the next run would take for a job to resume."""
        shutil.rmtree(self._retired, ignore_errors=True)
        if self.path.exists():
            self.path.rename(self._retired)
        shutil.rmtree(self._retired, ignore_errors=True)

    def _file(self, index: int, kind: str) -> Path:
        return self.path / f"chunk-{index:06d}.{kind}"


class _Progress:
    """A bar on a terminal (tqdm), else a log line every ``every_s`` seconds."""

    def __init__(self, mode: Progress, source: Source, done: int, every_s: float) -> None:
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "log"
        self.mode = mode
        # a text file's rows are counted by reading it once more: only for what shows them
        total, exact = source.total_rows() if mode != "off" else (0, False)
        self.total = total
        self.exact = exact
        self.done = done
        self.every_s = every_s
        self._start = time.perf_counter()
        self._start_done = done
        self._last_log = self._start
        self._bar: Any = None
        if mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(total=total or None, initial=done, unit="row", unit_scale=True,
                             dynamic_ncols=True, smoothing=0.1)  # fmt: skip

    def update(self, rows: int) -> None:
        self.done += rows
        if self._bar is not None:
            self._bar.update(rows)
            return
        now = time.perf_counter()
        if self.mode == "log" and now - self._last_log >= self.every_s:
            self._last_log = now
            rate = (self.done - self._start_done) / (now - self._start)
            left = max(self.total - self.done, 0)
            eta = f", ETA {left / rate:.0f} s" if rate > 0 and self.total else ""
            of = f" of {'' if self.exact else '~'}{self.total:,}" if self.total else ""
            log.info("%s rows%s, %s rows/s%s", f"{self.done:,}", of, f"{rate:,.0f}", eta)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


async def run_job(spec: JobSpec, predictor: Predictor) -> Summary:
    """Run (or resume) the job with an entered ``predictor``; ``JobError`` if it cannot
    go on, ``TooManyRejects`` (with the summary so far) past ``max_reject``."""
    work = WorkFolder(spec.output)
    summary = Summary(version=predictor.version)
    summary.rejects = spec.rejects
    finished = _finished(spec, work)
    if finished is not None:
        return finished
    done = _resume_point(spec, work, predictor)
    summary.resumed_chunks = len(done)
    for record in done:
        summary.rows += record.rows
        summary.predicted += record.predicted
        summary.rejected += record.rejected
        summary.malformed += record.malformed
    source = Source(spec.input, spec.input_format, spec.chunk_rows)
    progress = _Progress(spec.progress, source, summary.rows, spec.log_every_s)
    files: OutputFiles | None = None
    column_plan: ColumnPlan | None = None
    # A chunk is committed in a thread while the next one is scored: its part's flush to
    # disk is a wait, not work, and overlaps the model's.
    committing: asyncio.Future[None] | None = None
    try:
        for chunk in source.chunks():
            if column_plan is None:
                column_plan = _plan(chunk, predictor, spec)
                files = _files(spec, predictor)
            if chunk.index < len(done):
                continue  # committed by an earlier run (read again only for the plan)
            assert files is not None
            scored = await _score(chunk, column_plan, predictor, spec)
            if not summary.version and predictor.version:
                work.pin_version(predictor.version)  # before anything it answered is committed
            if committing is not None:
                await committing
            committing = asyncio.ensure_future(asyncio.to_thread(_commit, work, files, scored))
            record = scored.record
            summary.rows += record.rows
            summary.predicted += record.predicted
            summary.rejected += record.rejected
            summary.malformed += record.malformed
            summary.fresh_rows += record.rows
            summary.version = predictor.version
            progress.update(record.rows)
            if spec.max_reject is not None and summary.refused > spec.max_reject:
                await committing
                summary.stopped = (
                    f"{summary.refused:,} rows rejected, more than --max-reject "
                    f"{spec.max_reject:,}; the committed chunks are kept in {work.path}"
                )
                _merge_rejects(work, spec.rejects, work.committed())
                summary.seconds = time.perf_counter() - summary._started
                raise TooManyRejects(summary)
        if committing is not None:
            await committing
    except (JobError, TableError, OSError) as exc:
        if committing is not None and not committing.done():
            await asyncio.wait([committing])  # let a started commit finish (or fail) whole
        problem = _io_problem(exc) if isinstance(exc, OSError) else str(exc)
        committed = len(work.committed())
        if not committed:  # nothing to resume: leave no work folder behind
            work.remove()
            raise JobError(problem) from None
        raise JobError(
            f"{problem}\n{committed} chunks are committed in {work.path}: the same command "
            "resumes after them"
        ) from None
    finally:
        progress.close()
    if files is None:
        files = _files(spec, predictor)
    records = work.committed()
    if not records:  # an empty input: no chunk came, but the files should exist
        raise JobError(f"{spec.input}: no rows and no columns")
    try:
        files.merge([work.part(k) for k in range(len(records))], spec.output)
        _merge_rejects(work, spec.rejects, records)
    except OSError as exc:  # every chunk stays committed: the same command merges again
        raise JobError(f"{_io_problem(exc)}; the same command tries again") from None
    summary.output = spec.output
    summary.seconds = time.perf_counter() - summary._started
    marker = {"identity": spec.identity(), "version": summary.version, "rows": summary.rows,
              "predicted": summary.predicted, "rejected": summary.rejected,
              "malformed": summary.malformed}  # fmt: skip
    write_atomically(work.finished, lambda f: f.write(orjson.dumps(marker)))
    work.remove()
    return summary


def _io_problem(exc: OSError) -> str:
    """A failed write or read, as one line: what, and where (a full disk, say)."""
    where = f": {exc.filename}" if exc.filename else ""
    return f"{exc.strerror or exc.__class__.__name__}{where}"


def _finished(spec: JobSpec, work: WorkFolder) -> Summary | None:
    """The summary of this very job when it has finished before (its output is there, its
    marker names the same arguments and input); None otherwise."""
    if spec.overwrite or spec.restart or work.exists() or not spec.output.exists():
        return None
    try:
        marker = orjson.loads(work.finished.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    if not isinstance(marker, dict) or marker.get("identity") != spec.identity():
        return None
    return Summary(
        rows=int(marker.get("rows", 0)),
        predicted=int(marker.get("predicted", 0)),
        rejected=int(marker.get("rejected", 0)),
        malformed=int(marker.get("malformed", 0)),
        version=str(marker.get("version", "")),
        output=spec.output,
        rejects=spec.rejects,
        already_done=True,
    )


def _merge_rejects(work: WorkFolder, dest: Path, records: list[_Record]) -> None:
    """The committed chunks' reject lines as one JSON Lines file (none when nothing was
    rejected); only the chunks that have any are read again."""
    if not any(r.rejected or r.malformed for r in records):
        dest.unlink(missing_ok=True)
        return

    def write(f: Any) -> None:
        for k, record in enumerate(records):
            if record.rejected or record.malformed:
                f.write(work.rejects(k))

    write_atomically(dest, write)


def _resume_point(spec: JobSpec, work: WorkFolder, predictor: Predictor) -> list[_Record]:
    identity = spec.identity()
    if spec.restart or not work.exists():
        work.remove()  # (and what a job killed while removing it left)
    if not work.exists():
        if spec.output.exists() and not spec.overwrite:
            raise JobError(f"{spec.output} exists (--overwrite replaces it)")
        work.finished.unlink(missing_ok=True)  # an earlier job's, now being replaced
        work.begin({"fastserve": __version__, "identity": identity,
                    "version": predictor.version})  # fmt: skip
        return []
    manifest = work.manifest()
    if manifest is None:
        raise JobError(f"{work.path} is not a batch job's work folder (--restart removes it)")
    began = manifest.get("identity", {})
    changed = [k for k in identity if began.get(k) != identity[k]]
    if changed:
        raise JobError(
            f"{work.path} holds a job begun with other arguments or another input "
            f"({', '.join(changed)} differ): run it as it began, or --restart"
        )
    version = str(manifest.get("version") or "")
    if version and predictor.version != version:
        raise JobError(
            f"the job began with model '{spec.model}' version {version}, now version "
            f"{predictor.version}: finish it with --version {version}, or --restart"
        )
    done = work.committed()
    log.info("resuming: %d chunks committed (%d rows)", len(done), sum(r.rows for r in done))
    return done


def _plan(chunk: Chunk, predictor: Predictor, spec: JobSpec) -> ColumnPlan:
    try:
        column_plan = plan(chunk.table, predictor.inputs, key=spec.key, drop=list(spec.drop),
                           pack=spec.pack, known=predictor.feature_kinds)  # fmt: skip
    except PlanError as exc:
        raise JobError(f"{spec.input}: {exc}") from None
    sent = ", ".join(f"{name} ({kind})" for name, kind in column_plan.inputs[:6])
    more = len(column_plan.inputs) - 6
    log.info("columns sent: %s%s", sent, f" and {more} more" if more > 0 else "")
    return column_plan


def _files(spec: JobSpec, predictor: Predictor) -> OutputFiles:
    try:
        return OutputFiles(spec.output_format, spec.key or ROW_KEY, predictor.outputs)
    except ValueError as exc:
        raise JobError(str(exc)) from None


async def _score(
    chunk: Chunk,
    column_plan: ColumnPlan,
    predictor: Predictor,
    spec: JobSpec,
) -> _Scored:
    """Predict one chunk (nothing is written yet)."""
    table = chunk.table
    try:
        converted = convert(table, column_plan)
    except PlanError as exc:
        raise JobError(f"{spec.input}, rows from {chunk.first_row}: {exc}") from None
    reasons = dict(converted.rejected)
    good = converted.good
    outputs, refused = await _predict_all(predictor, predictor.pack(converted.tensors), len(good))
    for position, reason in refused.items():
        reasons[int(good[position])] = reason
    keep = np.ones(len(good), bool)
    keep[list(refused)] = False
    scored = good[keep]
    if table.num_rows and not len(scored) and chunk.index == 0 and len(set(reasons.values())) == 1:
        raise JobError(
            f"every row of the first chunk was refused, all for the same reason: "
            f"{next(iter(reasons.values()))}"
        )
    kept = outputs if keep.all() else [out[keep] for out in outputs]
    keys = _keys(table, scored, chunk.first_row, spec.key)
    rows = sorted(reasons)
    lines = reject_lines(table, rows, [reasons[r] for r in rows], chunk.first_row, spec.key,
                         chunk.malformed)  # fmt: skip
    record = _Record(table.num_rows, len(scored), len(rows), len(chunk.malformed), 0)
    return _Scored(chunk.index, keys, kept, lines, record)


@dataclass(frozen=True)
class _Scored:
    """A chunk's answers, to commit."""

    index: int
    keys: Any
    outputs: list[npt.NDArray[Any]]
    rejects: bytes
    record: _Record
    """Its counts (``part_bytes`` is known once the part is written)."""


def _commit(work: WorkFolder, files: OutputFiles, scored: _Scored) -> None:
    """Write the chunk's part to disk, then commit it (in a worker thread)."""
    part = work.part(scored.index)
    files.write_part(files.table(scored.keys, scored.outputs), part)
    record = dataclasses.replace(scored.record, part_bytes=part.stat().st_size)
    work.commit(scored.index, record, scored.rejects)


def _keys(table: pa.Table, rows: npt.NDArray[np.intp], first_row: int, key: str | None) -> Any:
    if key is None:
        return pa.array(rows.astype(np.int64) + first_row)
    return table.column(key).take(pa.array(rows, pa.int64())).combine_chunks()


async def _predict_all(
    predictor: Predictor, tensors: list[InputTensor], rows: int
) -> tuple[list[npt.NDArray[Any]], dict[int, str]]:
    """The outputs of ``rows`` rows (refused rows: zeros) and, by row, why any was refused."""
    step = predictor.request_rows
    calls = _Calls(predictor, tensors, asyncio.Semaphore(predictor.in_flight))
    await asyncio.gather(*(calls.attempt(lo, min(lo + step, rows)) for lo in range(0, rows, step)))
    pieces = calls.pieces
    outputs = []
    for k, spec in enumerate(predictor.outputs):
        parts = [pieces[lo][k] for lo in sorted(pieces)]
        if parts:
            out = np.zeros((rows, *parts[0].shape[1:]), parts[0].dtype)
        else:  # every row refused: an empty answer of the output's declared shape
            tail = [max(d, 1) for d in spec.shape[1:]]
            out = np.zeros((rows, *tail), _dtype(spec.datatype))
        for lo in sorted(pieces):
            piece = pieces[lo][k]
            out[lo : lo + len(piece)] = piece
        outputs.append(out)
    return outputs, calls.refused


class _Calls:
    """A chunk's requests: each that the model refuses is split in halves until the rows at
    fault are alone. (A class, not a recursive closure: a closure that calls itself is a
    reference cycle, which would keep every chunk's arrays alive until the cycle collector
    came by: memory that grew with the file.)"""

    def __init__(
        self, predictor: Predictor, tensors: list[InputTensor], gate: asyncio.Semaphore
    ) -> None:
        self.predictor = predictor
        self.tensors = tensors
        self.gate = gate
        self.pieces: dict[int, list[npt.NDArray[Any]]] = {}
        self.refused: dict[int, str] = {}

    async def attempt(self, lo: int, hi: int) -> None:
        inputs = [_rows(t, lo, hi) for t in self.tensors]
        try:
            async with self.gate:
                self.pieces[lo] = await self.predictor.predict(inputs)
        except Refused as exc:
            if hi - lo == 1:
                self.refused[lo] = str(exc)
                return
            mid = (lo + hi) // 2
            await asyncio.gather(self.attempt(lo, mid), self.attempt(mid, hi))


def _rows(tensor: InputTensor, lo: int, hi: int) -> InputTensor:
    data = tensor.data[lo:hi]
    return InputTensor(tensor.name, tensor.datatype, data.shape, data)


def _dtype(datatype: str) -> np.dtype[Any]:
    from fastserve.protocol import DATATYPE_TO_NUMPY

    return DATATYPE_TO_NUMPY[datatype]

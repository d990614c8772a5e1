"""Input files read as a stream of fixed-size chunks (pyarrow tables), for ``fastserve batch``.

Chunk ``k`` always holds data rows ``k * rows`` to ``(k + 1) * rows - 1``, whatever the
reader's own block sizes: a resumed job skips exactly the chunks it committed. Memory stays
at a chunk or two, whatever the file's size.

- CSV: every column is read as text (``pyarrow.csv``, streaming); ``columns`` turns text
  into numbers column by column, so one bad value rejects its row, not the file. A line
  with the wrong number of fields is skipped by the parser and reported as malformed.
- Parquet: ``pyarrow.parquet``, batch by batch, with the file's own types.
- JSON Lines: one object a line (``orjson``); a line that is not a JSON object is
  reported as malformed. Keys are columns, in the order the first chunk shows them; a key
  a row lacks is null there.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import orjson
import pyarrow as pa

from fastserve.tabular import TableError, TableFormat

__all__ = ["Chunk", "Malformed", "Source"]

_CSV_BLOCK_BYTES: Final = 1 << 20
_TEXT_SHOWN: Final = 200
_COUNT_BLOCK: Final = 8 << 20


@dataclass(frozen=True)
class Malformed:
    """A line of the file that is not a row at all."""

    line: int | None
    """1-based line number in the file, when the parser knows it."""
    reason: str
    text: str


@dataclass
class Chunk:
    index: int
    first_row: int
    """0-based data-row number of the chunk's first row."""
    table: pa.Table
    malformed: list[Malformed] = field(default_factory=list)
    """Lines that could not be read as rows, met while this chunk was read."""


class Source:
    """One input file, read in chunks of ``rows`` rows."""

    def __init__(self, path: Path, fmt: TableFormat, rows: int) -> None:
        self.path = path
        self.format = fmt
        self.rows = rows
        if not path.is_file():
            raise TableError(f"{path}: no such file")

    def total_rows(self) -> tuple[int, bool]:
        """(rows, exact): Parquet's row count, or the lines of a text file (an estimate:
        a quoted field may hold a newline; the header line is not counted)."""
        if self.format == "parquet":
            import pyarrow.parquet as pq

            return pq.ParquetFile(self.path).metadata.num_rows, True
        lines = 0
        last = b"\n"
        with self.path.open("rb") as f:
            while block := f.read(_COUNT_BLOCK):
                lines += block.count(b"\n")
                last = block[-1:]
        if last != b"\n":
            lines += 1
        return max(lines - (self.format == "csv"), 0), False

    def chunks(self, start: int = 0) -> Iterator[Chunk]:
        """Chunks ``start``, ``start + 1``, ... to the end of the file."""
        self._malformed: list[Malformed] = []
        self._schema: pa.Schema | None = None  # the columns, even of a file with no rows
        batches = self._batches()
        buffered: list[pa.RecordBatch] = []
        held = 0
        index = 0
        try:
            for batch in batches:
                if batch.num_rows == 0:
                    continue
                buffered.append(batch)
                held += batch.num_rows
                while held >= self.rows:
                    table = pa.Table.from_batches(buffered)
                    chunk, rest = table.slice(0, self.rows), table.slice(self.rows)
                    buffered = rest.to_batches() if rest.num_rows else []
                    held = rest.num_rows
                    if index >= start:
                        yield Chunk(index, index * self.rows, chunk, self._take_malformed())
                    else:
                        self._take_malformed()
                    index += 1
            if (held or self._malformed or index == 0) and index >= start:
                if buffered:
                    table = pa.Table.from_batches(buffered)
                else:
                    schema = self._schema
                    table = pa.table({}) if schema is None else schema.empty_table()
                yield Chunk(index, index * self.rows, table, self._take_malformed())
        except (pa.ArrowInvalid, OSError) as exc:
            raise TableError(
                f"{self.path}: cannot read as {self.format}: {_first_line(exc)}"
            ) from None

    # -- readers ---------------------------------------------------------------------------

    def _take_malformed(self) -> list[Malformed]:
        """The malformed lines met since the last chunk was cut: they go with the next
        (the same ones on every run, as the file is read the same way)."""
        taken, self._malformed = self._malformed, []
        return taken

    def _batches(self) -> Iterator[pa.RecordBatch]:
        """The file's record batches; malformed lines go to ``self._malformed`` as the
        reader meets them."""
        if self.format == "parquet":
            import pyarrow.parquet as pq

            try:
                file = pq.ParquetFile(self.path)
            except (pa.ArrowInvalid, OSError) as exc:
                raise TableError(
                    f"{self.path}: cannot read as parquet: {_first_line(exc)}"
                ) from None
            self._schema = file.schema_arrow
            yield from file.iter_batches(batch_size=self.rows)
        elif self.format == "csv":
            yield from self._csv_batches()
        else:
            yield from self._jsonl_batches()

    def _csv_batches(self) -> Iterator[pa.RecordBatch]:
        import pyarrow.csv as pacsv

        def skip(row: Any) -> str:
            self._malformed.append(
                Malformed(
                    None if row.number is None else int(row.number),
                    f"expected {row.expected_columns} fields, found {row.actual_columns}",
                    (row.text or "")[:_TEXT_SHOWN],
                )
            )
            return "skip"

        try:
            with pacsv.open_csv(
                self.path,
                read_options=pacsv.ReadOptions(block_size=1 << 16),
                parse_options=pacsv.ParseOptions(invalid_row_handler=lambda _: "skip"),
            ) as probe:
                names = probe.schema.names
        except pa.ArrowInvalid as exc:
            if "Empty CSV file" in str(exc):
                return
            raise TableError(f"{self.path}: cannot read as csv: {_first_line(exc)}") from None
        reader = pacsv.open_csv(
            self.path,
            read_options=pacsv.ReadOptions(block_size=_CSV_BLOCK_BYTES, use_threads=False),
            parse_options=pacsv.ParseOptions(invalid_row_handler=skip),
            convert_options=pacsv.ConvertOptions(
                column_types={name: pa.string() for name in names},
                strings_can_be_null=True,
            ),
        )
        with reader:
            self._schema = reader.schema
            yield from reader

    def _jsonl_batches(self) -> Iterator[pa.RecordBatch]:
        names: list[str] | None = None
        records: list[dict[str, Any]] = []
        with self.path.open("rb") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = orjson.loads(line)
                except orjson.JSONDecodeError as exc:
                    self._malformed.append(Malformed(number, f"not JSON: {exc}", _text(line)))
                    continue
                if not isinstance(record, dict):
                    self._malformed.append(Malformed(number, "not a JSON object", _text(line)))
                    continue
                records.append(record)
                if len(records) == self.rows:
                    if names is None:
                        names = _keys(records)
                    yield _record_batch(records, names)
                    records = []
        if records:
            yield _record_batch(records, names or _keys(records))


def _keys(records: list[dict[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for record in records:
        for key in record:
            seen.setdefault(key, None)
    return list(seen)


def _record_batch(records: list[dict[str, Any]], names: list[str]) -> pa.RecordBatch:
    arrays = []
    for name in names:
        values = [record.get(name) for record in records]
        try:
            array = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            # mixed types (a string among numbers): text, for ``columns`` to sort out
            array = pa.array([None if v is None else _as_text(v) for v in values], pa.string())
        arrays.append(array)
    return pa.RecordBatch.from_arrays(arrays, names=names)


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else orjson.dumps(value).decode()


def _text(line: bytes) -> str:
    return line.decode("utf-8", "replace").rstrip("\r\n")[:_TEXT_SHOWN]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]

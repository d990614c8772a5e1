"""A batch job's output and reject files: written a chunk at a time, merged at the end.

Output rows carry the key (the input's key column, or ``row``: the 0-based data row
number) and every model output: one column an output of one value a row; an output of
several values a row (class probabilities) is a list column in Parquet and JSON Lines,
and ``name_0``, ``name_1``, ... columns in CSV. The key is copied as the input holds it
(a CSV key stays text: ``007`` is not the number 7).

Rejected rows go to a JSON Lines file, whatever the formats: one object a row with its
row number, key, reason and the values as the input held them; or, for a line that was
not a row at all, its line number, reason and text.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import orjson
import pyarrow as pa

from fastserve.offline.source import Malformed
from fastserve.protocol import TensorSpec
from fastserve.tabular import TableFormat

__all__ = ["ROW_KEY", "OutputFiles", "write_atomically"]

ROW_KEY: Final = "row"
_COPY_BLOCK: Final = 1 << 20


class OutputFiles:
    """Builds and writes output parts, reject parts, and merges them."""

    def __init__(self, fmt: TableFormat, key: str, outputs: tuple[TensorSpec, ...]) -> None:
        clash = [s.name for s in outputs if s.name == key]
        if clash:
            raise ValueError(f"the key column {key!r} has the name of a model output")
        self.format = fmt
        self.key = key
        self.outputs = outputs

    # -- parts ------------------------------------------------------------------------------

    def table(self, keys: pa.Array, outputs: list[npt.NDArray[Any]]) -> pa.Table:
        columns: dict[str, pa.Array] = {self.key: keys}
        rows = len(keys)
        for spec, data in zip(self.outputs, outputs, strict=True):
            flat = data.reshape(rows, -1) if rows else data.reshape(0, _width(spec))
            if flat.shape[1] == 1 and all(d == 1 for d in data.shape[1:]):
                columns[spec.name] = _array(flat[:, 0], self.format)
            elif self.format == "csv":
                for j in range(flat.shape[1]):
                    columns[f"{spec.name}_{j}"] = _array(flat[:, j], self.format)
            else:
                values = _array(flat.reshape(-1), self.format)
                offsets = pa.array(np.arange(rows + 1, dtype=np.int32) * flat.shape[1])
                columns[spec.name] = pa.ListArray.from_arrays(offsets, values)
        return pa.table(columns)

    def write_part(self, table: pa.Table, path: Path) -> None:
        """``table`` to ``path`` (atomically, durably)."""
        write_atomically(path, lambda f: self._write(table, f))

    def _write(self, table: pa.Table, f: Any) -> None:
        if self.format == "csv":
            import pyarrow.csv as pacsv

            pacsv.write_csv(table, f)
        elif self.format == "parquet":
            # parts are Arrow IPC (no encoding, no compression); the merge writes Parquet once
            with pa.ipc.new_file(f, table.schema) as writer:
                writer.write_table(table)
        else:
            dumps = orjson.dumps
            f.write(b"".join(dumps(row) + b"\n" for row in table.to_pylist()))

    def merge(self, parts: list[Path], dest: Path) -> None:
        """The parts, in order, as one file at ``dest`` (written beside it, then renamed)."""
        write_atomically(dest, lambda f: self._merge(parts, f))

    def _merge(self, parts: list[Path], f: Any) -> None:
        if self.format == "parquet":
            import pyarrow.parquet as pq

            writer = None
            for part in parts:
                with pa.memory_map(str(part)) as source:
                    table = pa.ipc.open_file(source).read_all()
                if writer is None:
                    writer = pq.ParquetWriter(f, table.schema)
                elif table.schema != writer.schema:
                    table = table.cast(writer.schema)
                writer.write_table(table)
            if writer is not None:
                writer.close()
            return
        header = None
        for part in parts:
            with part.open("rb") as src:
                if self.format == "csv":
                    first = src.readline()
                    if header is None:
                        header = first
                        f.write(first)
                    elif first != header:
                        raise ValueError(
                            f"{part.name}: its columns differ from the first part's "
                            "(an output's width changed: write Parquet or JSON Lines)"
                        )
                shutil.copyfileobj(src, f, _COPY_BLOCK)


def reject_lines(
    table: pa.Table,
    rows: list[int],
    reasons: list[str],
    first_row: int,
    key: str | None,
    malformed: list[Malformed],
) -> bytes:
    """The reject file's lines for a chunk's rejected ``rows`` (chunk positions)."""
    lines = []
    for line in malformed:
        doc = {"line": line.line, "reason": line.reason, "text": line.text}
        lines.append(orjson.dumps(doc))
    if rows:
        values = table.take(pa.array(rows, pa.int64())).to_pylist()
        for row, reason, record in zip(rows, reasons, values, strict=True):
            doc = {"row": first_row + row}
            if key is not None:
                doc["key"] = record.get(key)
            doc["reason"] = reason
            doc["values"] = record
            lines.append(orjson.dumps(doc, option=orjson.OPT_NON_STR_KEYS, default=str))
    return b"".join(line + b"\n" for line in lines)


def write_atomically(path: Path, write: Any, *, durable: bool = True) -> None:
    """Write ``path`` through ``write(file)`` into a temporary file beside it, flush it to
    disk (``durable``), and rename it into place: a reader (or a resumed job) sees all of
    it or none."""
    staging = path.with_name(f".{path.name}.tmp")
    with staging.open("wb") as f:
        write(f)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(staging, path)


def _width(spec: TensorSpec) -> int:
    dims = spec.shape[1:]
    return int(np.prod(dims)) if dims and all(d > 0 for d in dims) else 1


def _array(values: npt.NDArray[Any], fmt: TableFormat) -> pa.Array:
    if values.dtype == object:  # BYTES: text where the format is text, else binary
        if fmt == "parquet":
            return pa.array(list(values), pa.binary())
        return pa.array([v.decode("utf-8", "replace") for v in values], pa.string())
    if values.dtype == np.float16 and fmt != "parquet":
        values = values.astype(np.float32)  # exact; CSV and JSON write no half floats
    return pa.array(values)

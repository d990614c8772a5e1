"""Tabular data files (CSV, Parquet, JSON Lines) read into pandas, for the offline commands.

The format comes from the file's suffix (``.csv``, ``.parquet``/``.pq``, ``.jsonl``/
``.ndjson``) unless given. Reading errors become ``TableError`` with the file and the reason,
never a traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Final, Literal

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["FORMATS", "TableError", "TableFormat", "read_table", "table_format"]

TableFormat = Literal["csv", "parquet", "jsonl"]
FORMATS: Final[tuple[TableFormat, ...]] = ("csv", "parquet", "jsonl")
_SUFFIXES: Final[dict[str, TableFormat]] = {
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
}


class TableError(ValueError):
    """A data file that cannot be read as a table."""


def table_format(path: Path, given: TableFormat | None = None) -> TableFormat:
    """``given``, or the format the file's suffix names."""
    if given is not None:
        return given
    found = _SUFFIXES.get(path.suffix.lower())
    if found is None:
        known = ", ".join(sorted(_SUFFIXES))
        raise TableError(f"{path}: unknown data file type (suffixes: {known}; or --format)")
    return found


def read_table(path: Path, fmt: TableFormat | None = None) -> pd.DataFrame:
    """The whole file as a DataFrame, columns in file order."""
    import pandas as pd

    kind = table_format(path, fmt)
    try:
        if kind == "csv":
            return pd.read_csv(path)
        if kind == "parquet":
            return pd.read_parquet(path)
        return pd.read_json(path, lines=True, precise_float=True)
    except FileNotFoundError:
        raise TableError(f"{path}: no such file") from None
    except (OSError, ValueError, ImportError) as exc:  # pandas' parse errors are ValueErrors
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TableError(f"{path}: cannot read as {kind}: {first[:300]}") from None

"""From a chunk's columns to the inputs of a V2 request, row by row where it must be.

How columns become inputs (``plan``), the same with ``--repo`` and ``--url``:

- a column named like a model input is that input: a scalar a row for a ``[-1]`` or
  ``[-1, 1]`` input, else a list a row (flat or nested) with the input's element count;
- with ``--pack INPUT``, every other column (in file order) is one element of INPUT, a
  row's columns reshaped to the input's shape (a CSV of 64 pixel columns for an 8x8 image);
- any other column is a feature, sent by name as a ``[rows]`` input, as an online client
  sends features (the model's schema or tabular pipeline packs them).

A feature is sent as numbers, as text (BYTES), or as integers, as the model says where it
can (its value schema's features are numbers; its tabular pipeline's categories are text or
integers); otherwise a text column is numbers when most of its first chunk's values are.

The key column and ``--drop`` columns are not sent. A value that cannot be an input's
element rejects its row alone, with the reason; so does a null, except in a feature of
numbers (NaN) or of text (empty): there the model's schema and pipeline decide, as online.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

from fastserve.protocol import DATATYPE_TO_NUMPY, InputTensor, TensorSpec

__all__ = ["ColumnPlan", "Converted", "PlanError", "convert", "feature_kinds", "plan"]

Kind = Literal["input", "pack", "number", "integer", "text"]
_NUMBER_SHARE: Final = 0.5
"""A text column of a feature the model does not describe is numbers when at least this
share of its values (in the first chunk) are: a few bad values reject their rows, they do
not turn a column of numbers into text."""
_SHOWN: Final = 40


_DATATYPES: Final = {dtype: name for name, dtype in DATATYPE_TO_NUMPY.items() if name != "BYTES"}


class PlanError(ValueError):
    """The file's columns cannot make the model's inputs; the message says why."""


@dataclass(frozen=True)
class ColumnPlan:
    key: str | None
    inputs: tuple[tuple[str, Kind], ...]
    """(column, kind) of each column sent; ``pack`` columns are listed once each."""
    specs: dict[str, TensorSpec] = field(default_factory=dict)
    """The model inputs the ``input`` and ``pack`` columns are."""
    pack: str | None = None

    def as_doc(self) -> dict[str, Any]:
        return {"key": self.key, "inputs": [list(i) for i in self.inputs], "pack": self.pack}


@dataclass
class Converted:
    """A chunk's rows as request inputs: ``tensors`` hold only the ``good`` rows."""

    good: npt.NDArray[np.intp]
    tensors: list[InputTensor]
    rejected: dict[int, str]
    """Chunk row -> reason, for rows that cannot be sent."""


def plan(
    table: pa.Table,
    inputs: tuple[TensorSpec, ...],
    *,
    key: str | None,
    drop: list[str],
    pack: str | None,
    known: dict[str, Kind] | None = None,
) -> ColumnPlan:
    """Which column is what, decided on the first chunk (and kept for the whole job).
    ``known``: the kinds of the features the model describes (its schema's numbers, its
    tabular pipeline's categories); others are told from the values."""
    names = list(table.column_names)
    if not names:
        raise PlanError("the input is empty: no columns")
    named = [n for n in [key, *drop] if n is not None]
    missing = [n for n in named if n not in names]
    if missing:
        shown = ", ".join(map(repr, missing))
        raise PlanError(f"no column {shown} in the input (its columns: {_names(names)})")
    by_name = {spec.name: spec for spec in inputs}
    values = [n for n in names if n not in named]
    if not values:
        raise PlanError("the input has no column to send (all are the key or dropped)")
    kinds: list[tuple[str, Kind]] = []
    specs: dict[str, TensorSpec] = {}
    if pack is not None:
        spec = by_name.get(pack)
        if spec is None:
            raise PlanError(f"--pack {pack!r}: the model has no such input ({_names(by_name)})")
        elements = _elements(spec)
        packed = [n for n in values if n not in by_name]
        if elements is None or elements != len(packed):
            raise PlanError(
                f"--pack {pack!r}: input {pack!r} is {spec.datatype} {list(spec.shape)}, "
                f"{elements or 'a free number of'} values a row, but {len(packed)} columns "
                "are left to pack"
            )
        specs[pack] = spec
        kinds += [(n, "pack") for n in packed]
    for name in values:
        if name in by_name:
            specs[name] = by_name[name]
            kinds.append((name, "input"))
        elif pack is None:
            kind = (known or {}).get(name) or _feature_kind(name, table.column(name))
            kinds.append((name, kind))
    return ColumnPlan(key, tuple(kinds), specs, pack)


def convert(table: pa.Table, plan: ColumnPlan) -> Converted:
    """The chunk's inputs; rows with a value no input can take are left out, with why."""
    rows = table.num_rows
    reasons: dict[int, str] = {}
    arrays: dict[str, npt.NDArray[Any]] = {}
    packed: list[npt.NDArray[np.float64]] = []
    for name, kind in plan.inputs:
        column = table.column(name)
        if kind == "input":
            arrays[name] = _tensor(name, column, plan.specs[name], reasons)
        elif kind == "text":
            arrays[name] = _text(column)
        elif kind == "integer":
            numbers = _numbers(name, column, reasons, nulls=False)
            owner = np.arange(rows)
            arrays[name] = _fit(name, numbers, "INT64", np.isnan(numbers), reasons, owner)
        else:
            numbers = _numbers(name, column, reasons, nulls=kind == "number")
            if kind == "pack":
                packed.append(numbers)
            else:
                arrays[name] = numbers
    packed_input = None
    if plan.pack is not None:
        spec = plan.specs[plan.pack]
        stacked = np.stack(packed, axis=1) if packed else np.zeros((rows, 0))
        owner = np.repeat(np.arange(rows), stacked.shape[1])
        flat = _fit(plan.pack, stacked.ravel(), spec.datatype, np.zeros(owner.size, bool),
                    reasons, owner)  # fmt: skip
        packed_input = flat.reshape((rows, *spec.shape[1:]))
    if reasons:
        sent = np.ones(rows, bool)
        sent[list(reasons)] = False
        good = np.flatnonzero(sent)
    else:
        good = np.arange(rows)
    tensors = []
    for name, kind in plan.inputs:
        if name in arrays:
            data = arrays[name][good] if len(good) < rows else arrays[name]
            tensors.append(_input(name, kind, data, plan))
    if packed_input is not None and plan.pack is not None:
        data = np.ascontiguousarray(packed_input[good])
        tensors.append(InputTensor(plan.pack, plan.specs[plan.pack].datatype, data.shape, data))
    return Converted(good, tensors, dict(sorted(reasons.items())))


# -- planning ------------------------------------------------------------------------------


def feature_kinds(config: dict[str, Any]) -> dict[str, Kind]:
    """The features a model config's tabular pipeline takes by name, and their kinds:
    numbers, categories of text, categories of integers. (A fastserve server sends its
    config at ``/v2/models/M/config``; others have no pipeline there.)"""
    tabular = (config.get("preprocessing") or {}).get("tabular") or {}
    kinds: dict[str, Kind] = {}
    for feature in tabular.get("features") or []:
        categories = feature.get("categories")
        if not categories:
            kinds[str(feature["name"])] = "number"
        else:
            kinds[str(feature["name"])] = "text" if isinstance(categories[0], str) else "integer"
    return kinds


def _feature_kind(name: str, column: pa.ChunkedArray) -> Kind:
    kind = column.type
    if pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind):
        return "number"
    if pa.types.is_null(kind):
        return "number"
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        present = pc.drop_null(column)
        if len(present) == 0:
            return "number"
        parsed = _parse_numbers(present)
        share = 1.0 - np.isnan(parsed).mean()
        return "number" if share >= _NUMBER_SHARE else "text"
    raise PlanError(
        f"column {name!r}: {kind} is not a feature (numbers or text); "
        "name it after a model input to send it as a tensor"
    )


def _elements(spec: TensorSpec) -> int | None:
    dims = spec.shape[1:]
    return None if any(d < 0 for d in dims) else math.prod(dims)


def _names(names: Any) -> str:
    listed = list(names)
    shown = ", ".join(map(repr, listed[:8]))
    return shown + (f" and {len(listed) - 8} more" if len(listed) > 8 else "")


# -- conversion ----------------------------------------------------------------------------


def _parse_numbers(column: Any) -> npt.NDArray[np.float64]:
    """Text to float64, NaN where a value is not a number (or is null)."""
    import pandas as pd

    series = pd.Series(np.asarray(column.to_pandas(), dtype=object))
    return pd.to_numeric(series, errors="coerce").to_numpy(np.float64)  # type: ignore[no-any-return]


def _numbers(
    name: str, column: pa.ChunkedArray, reasons: dict[int, str], *, nulls: bool
) -> npt.NDArray[Any]:
    """A column as numbers: float64 (NaN for null when ``nulls``; else a null rejects its
    row), or the column's own numeric type when it has no nulls (feature packing converts
    it into the model's, as it does an online request's)."""
    kind = column.type
    if column.null_count == 0 and (pa.types.is_floating(kind) or pa.types.is_integer(kind)):
        return column.to_numpy()  # type: ignore[no-any-return]
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        try:
            values = pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            values = _parse_numbers(column)
            text = column.to_numpy(zero_copy_only=False)
            for row in np.flatnonzero(np.isnan(values) & pc.is_valid(column).to_numpy()):
                if not _is_nan_text(text[row]):
                    reasons.setdefault(
                        int(row), f"column {name!r}: {_shown(text[row])} is not a number"
                    )
    elif pa.types.is_null(kind):
        values = np.full(len(column), np.nan)
    else:
        try:
            values = pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            raise PlanError(f"column {name!r}: {kind} values are not numbers") from None
    values = np.asarray(values, np.float64)
    if not nulls and column.null_count:
        for row in np.flatnonzero(pc.is_null(column).to_numpy(zero_copy_only=False)):
            reasons.setdefault(int(row), f"column {name!r}: no value")
    return values


def _is_nan_text(text: Any) -> bool:
    return isinstance(text, str) and text.strip().lower() in ("nan", "+nan", "-nan")


def _text(column: pa.ChunkedArray) -> npt.NDArray[np.object_]:
    """Text as BYTES elements (UTF-8); null is empty, the missing value of categories."""
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        column = pc.cast(column, pa.string())
    filled = pc.fill_null(column, "")
    out = np.empty(len(filled), dtype=object)
    out[:] = [s.encode() for s in filled.to_pylist()]
    return out


def _tensor(
    name: str, column: pa.ChunkedArray, spec: TensorSpec, reasons: dict[int, str]
) -> npt.NDArray[Any]:
    """A tensor column as [rows, *shape] of the input's datatype; rows whose values do
    not fit are marked in ``reasons`` (their data is zeros)."""
    rows = len(column)
    dims = spec.shape[1:]
    flat = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if not pa.types.is_list(flat.type) and not pa.types.is_large_list(flat.type):
        if any(d != 1 for d in dims):
            raise PlanError(
                f"column {name!r}: input {name!r} is {spec.datatype} {list(spec.shape)}, "
                "so each row needs a list of values, not one value"
            )
        values = _elements_of(name, flat, spec.datatype, reasons, np.arange(rows))
        return values.reshape((rows, *([1] * len(dims))))
    counts = np.ones(rows, np.int64)
    owner = np.arange(rows)
    nulls = flat.is_null().to_numpy(zero_copy_only=False)
    while pa.types.is_list(flat.type) or pa.types.is_large_list(flat.type):
        lengths = pc.fill_null(pc.list_value_length(flat), 0).to_numpy().astype(np.int64)
        per_row = np.bincount(owner, weights=lengths, minlength=rows).astype(np.int64)
        owner = np.repeat(owner, lengths)
        counts = per_row
        flat = pc.list_flatten(flat)
    expected = _elements(spec)
    if expected is None:
        expected = int(np.bincount(counts[~nulls]).argmax()) if (~nulls).any() else 0
    for row in np.flatnonzero(nulls):
        reasons.setdefault(int(row), f"column {name!r}: no value")
    for row in np.flatnonzero((counts != expected) & ~nulls):
        reasons.setdefault(
            int(row), f"column {name!r}: {counts[row]} values, input {name!r} takes {expected}"
        )
    values = _elements_of(name, flat, spec.datatype, reasons, owner)
    out = np.zeros((rows, expected), values.dtype)
    fits = counts == expected
    keep = fits[owner]
    out[fits] = values[keep].reshape(-1, expected)
    free = [d if d > 0 else expected for d in dims] if len(dims) else []
    shape = (rows, *free) if math.prod(free) == expected else (rows, expected)
    return out.reshape(shape)


def _elements_of(
    name: str,
    values: pa.Array,
    datatype: str,
    reasons: dict[int, str],
    owner: npt.NDArray[np.intp],
) -> npt.NDArray[Any]:
    """Elements in the input's numpy dtype; an element that does not fit (not a number,
    null, out of range, a fraction for an integer type) rejects its ``owner`` row."""
    dtype = DATATYPE_TO_NUMPY[datatype]
    if datatype == "BYTES":
        out = np.empty(len(values), dtype=object)
        out[:] = [b"" if v is None else str(v).encode() for v in values.to_pylist()]
        return out
    bad = values.is_null().to_numpy(zero_copy_only=False)
    kind = values.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        numbers = _parse_numbers(values)
        bad |= np.isnan(numbers) & ~np.array([_is_nan_text(v) for v in values.to_pylist()])
    elif pa.types.is_boolean(kind) or pa.types.is_integer(kind) or pa.types.is_floating(kind):
        numbers = pc.cast(values, pa.float64()).to_numpy(zero_copy_only=False)
        if pa.types.is_integer(kind) and dtype.kind in "iu":
            ints = pc.fill_null(values, 0).to_numpy(zero_copy_only=False)
            return _integers(name, ints, dtype, datatype, bad, reasons, owner)
    else:
        raise PlanError(f"column {name!r}: {kind} values are not {datatype}")
    return _fit(name, np.asarray(numbers, np.float64), datatype, bad, reasons, owner)


def _fit(
    name: str,
    numbers: npt.NDArray[np.float64],
    datatype: str,
    bad: npt.NDArray[np.bool_],
    reasons: dict[int, str],
    owner: npt.NDArray[np.intp],
) -> npt.NDArray[Any]:
    """float64 elements in ``datatype``: a NaN for a non-float type, a fraction for an
    integer type, or a value out of range rejects the ``owner`` row."""
    dtype = DATATYPE_TO_NUMPY[datatype]
    out: npt.NDArray[Any]
    if dtype.kind == "b":
        bad = bad | ~np.isin(numbers, (0.0, 1.0))
        out = numbers == 1.0
    elif dtype.kind in "iu":
        info = np.iinfo(dtype)
        whole = np.isfinite(numbers) & (numbers == np.round(numbers))
        bad = bad | ~whole | (numbers < info.min) | (numbers > info.max)
        out = np.where(bad, 0, numbers).astype(dtype)
    else:
        with np.errstate(over="ignore"):
            out = numbers.astype(dtype)
        bad = bad | (np.isinf(out) & ~np.isinf(numbers))
    _mark(name, datatype, bad, reasons, owner)
    return out


def _integers(
    name: str,
    ints: npt.NDArray[Any],
    dtype: np.dtype[Any],
    datatype: str,
    bad: npt.NDArray[np.bool_],
    reasons: dict[int, str],
    owner: npt.NDArray[np.intp],
) -> npt.NDArray[Any]:
    info = np.iinfo(dtype)
    wide = ints.astype(np.int64) if ints.dtype.kind == "i" else ints
    bad = bad | (wide < info.min) | (wide > info.max)
    _mark(name, datatype, bad, reasons, owner)
    return np.where(bad, 0, wide).astype(dtype)


def _mark(
    name: str,
    datatype: str,
    bad: npt.NDArray[np.bool_],
    reasons: dict[int, str],
    owner: npt.NDArray[np.intp],
) -> None:
    if not bad.any():
        return
    for row in np.unique(owner[bad]):
        reasons.setdefault(int(row), f"column {name!r}: a value is not {datatype}")


def _input(name: str, kind: Kind, data: npt.NDArray[Any], plan: ColumnPlan) -> InputTensor:
    if kind == "input":
        spec = plan.specs[name]
        return InputTensor(name, spec.datatype, data.shape, np.ascontiguousarray(data))
    if kind == "text":
        return InputTensor(name, "BYTES", data.shape, data)
    return InputTensor(name, _DATATYPES[data.dtype], data.shape, data)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _SHOWN else text[: _SHOWN - 3] + "..."

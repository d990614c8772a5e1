"""Value-level checks of tabular inputs: a pandera schema compiled into numpy.

pandera is the source of truth: a model's schema is a pandera ``DataFrameSchema`` (pandera's
own YAML form), one column per input feature, in the order of the features in the input
tensor. Validating a request through pandera costs about 1.5 ms (a DataFrame is built and
every check dispatched through pandas), far too much for the request path, so the schema is
compiled once into numpy expressions over the ``[rows, features]`` batch. Only what can be
compiled exactly is accepted; the tests compare both on generated data (hypothesis).

Most requests pass, so ``check`` first asks one question of the whole batch: with no NaN in
it, every bound check (gt, ge, lt, le, eq, ne, in_range) of every feature is one numpy
comparison per kind of bound over all the columns that have one (~10 µs for the demo's 30
features, where one feature at a time costs ~250 µs). Only a batch that fails that, or has
a NaN, is checked feature by feature to say exactly what failed.

Semantics follow pandera's: a non-nullable column fails ``not_nullable`` on NaN; the value
checks ignore nulls (pandera's ``ignore_na``); every failing (feature, check, row) is found.
The tensor's dtype is the model's and is checked by the protocol layer, not here; a column's
declared dtype must be numeric (it is what offline data is coerced to by ``fastserve
validate``).

Besides pandera's built-in checks, two custom checks are registered with pandera (so they
appear in its YAML by name, and pandera runs them offline) and compiled here:
``finite`` (no infinity) and ``multiple_of`` (``step``; e.g. 1 for a whole-number feature).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from fastserve import _core
from fastserve.protocol import ModelSignature

Mask = Callable[[npt.NDArray[Any]], npt.NDArray[np.bool_]]
"""Values of one feature (no NaN among them) -> True where the check fails."""

MAX_EXAMPLES = 5
"""Offending rows and values reported per (feature, check)."""


class SchemaNotCompilable(ValueError):
    """The schema uses something the compiled checks cannot reproduce exactly."""


@dataclass(frozen=True, slots=True)
class Failure:
    """One check of one feature failed on some rows."""

    feature: str
    check: str  # pandera's check name: in_range, isin, not_nullable, ...
    count: int  # failing rows
    rows: tuple[int, ...]  # the first few of them
    values: tuple[float, ...]  # their values

    def as_doc(self) -> dict[str, Any]:
        return {
            "feature": self.feature,
            "check": self.check,
            "failing_rows": self.count,
            "rows": list(self.rows),
            "values": [_json_value(v) for v in self.values],
        }


SCHEMA_FILE = "schema.yaml"
"""A version folder's pandera schema (pandera's YAML form), beside its model.onnx."""


@dataclass(frozen=True, slots=True)
class InputSchema:
    """A compiled schema and the model input whose columns it checks."""

    input_index: int
    input_name: str
    compiled: CompiledSchema


@functools.cache
def register_checks() -> None:
    """Register fastserve's custom checks with pandera (once), before a schema is read."""
    from pandera import extensions

    @extensions.register_check_method(statistics=[])  # type: ignore[untyped-decorator]
    def finite(pandas_obj: Any) -> Any:
        """No infinity (NaN is the nullability's business)."""
        return np.isfinite(pandas_obj)

    @extensions.register_check_method(statistics=["step"])  # type: ignore[untyped-decorator]
    def multiple_of(pandas_obj: Any, *, step: float) -> Any:
        """A whole number of ``step``s (1: a whole number)."""
        return pandas_obj % step == 0


def read_schema(path: Path) -> Any:
    """The pandera DataFrameSchema in the YAML file at ``path``."""
    register_checks()
    import pandera.pandas as pa

    return pa.DataFrameSchema.from_yaml(path.read_text(encoding="utf-8"))


def load_input_schema(path: Path, signature: ModelSignature) -> InputSchema:
    """Compile the schema at ``path`` for the model's one 2-D FP32/FP64 input whose width is
    the schema's number of columns; its columns, in file order, are that input's features.
    Raises SchemaNotCompilable (or pandera's errors) when it does not fit."""
    schema = read_schema(path)
    features = [str(name) for name in schema.columns]
    index = feature_input(signature, len(features))
    compiled = CompiledSchema.from_pandera(schema, features)
    return InputSchema(index, signature.inputs[index].name, compiled)


def load_pipeline_schema(path: Path, input_index: int, input_name: str) -> InputSchema:
    """Compile the schema at ``path`` for the raw features a tabular pipeline turns into
    input ``input_name``: its columns are checked as the client sent them, in file order."""
    schema = read_schema(path)
    features = [str(name) for name in schema.columns]
    return InputSchema(input_index, input_name, CompiledSchema.from_pandera(schema, features))


def feature_input(signature: ModelSignature, width: int) -> int:
    """The index of the model's one 2-D FP32/FP64 input ``width`` columns wide: the input
    whose columns a schema's (or a reference profile's) features are."""
    fitting = [
        i
        for i, spec in enumerate(signature.inputs)
        if spec.datatype in ("FP32", "FP64") and len(spec.shape) == 2 and spec.shape[1] == width
    ]
    if len(fitting) != 1:
        raise SchemaNotCompilable(
            f"{width} columns fit {len(fitting)} of the model's inputs (need exactly "
            "one 2-D float input that wide)"
        )
    return fitting[0]


Bound = tuple[str, float]
"""One comparison every present value must pass: (operator name, value)."""

_NATIVE_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
"""Batches the core's one-pass bounds check takes."""

_OPERATORS: dict[str, Callable[[Any, Any], npt.NDArray[np.bool_]]] = {
    "gt": np.greater,
    "ge": np.greater_equal,
    "lt": np.less,
    "le": np.less_equal,
    "eq": np.equal,
    "ne": np.not_equal,
}


@dataclass(frozen=True, slots=True)
class _Check:
    name: str
    fails: Mask
    bounds: tuple[Bound, ...] = ()
    """The same check as comparisons, when it is one (for the whole-batch pass)."""


@dataclass(frozen=True, slots=True)
class _Feature:
    name: str
    column: int
    nullable: bool
    checks: tuple[_Check, ...]


def _bounds(name: str, stats: dict[str, Any]) -> tuple[Bound, ...]:
    """The comparisons a bound check is (empty for the others)."""
    if name == "in_range":
        low = ("ge" if stats["include_min"] else "gt", stats["min_value"])
        return (low, ("le" if stats["include_max"] else "lt", stats["max_value"]))
    simple = {
        "greater_than": ("gt", "min_value"),
        "greater_than_or_equal_to": ("ge", "min_value"),
        "less_than": ("lt", "max_value"),
        "less_than_or_equal_to": ("le", "max_value"),
        "equal_to": ("eq", "value"),
        "not_equal_to": ("ne", "value"),
    }
    if name in simple:
        op, key = simple[name]
        return ((op, stats[key]),)
    return ()


def _fails(name: str, stats: dict[str, Any]) -> Mask:
    """The failing-values mask of one pandera built-in check."""
    if name == "greater_than":
        low = stats["min_value"]
        return lambda v: ~(v > low)
    if name == "greater_than_or_equal_to":
        low = stats["min_value"]
        return lambda v: ~(v >= low)
    if name == "less_than":
        high = stats["max_value"]
        return lambda v: ~(v < high)
    if name == "less_than_or_equal_to":
        high = stats["max_value"]
        return lambda v: ~(v <= high)
    if name == "in_range":
        low, high = stats["min_value"], stats["max_value"]
        include_low, include_high = stats["include_min"], stats["include_max"]

        def outside(v: npt.NDArray[Any]) -> npt.NDArray[np.bool_]:
            above: npt.NDArray[np.bool_] = v >= low if include_low else v > low
            below: npt.NDArray[np.bool_] = v <= high if include_high else v < high
            return ~(above & below)

        return outside
    if name == "equal_to":
        value = stats["value"]
        return lambda v: ~(v == value)
    if name == "not_equal_to":
        value = stats["value"]
        return lambda v: ~(v != value)
    if name == "isin":
        allowed = np.asarray(list(stats["allowed_values"]), dtype=np.float64)
        return lambda v: ~np.isin(v, allowed)
    if name == "notin":
        forbidden = np.asarray(list(stats["forbidden_values"]), dtype=np.float64)
        return lambda v: np.isin(v, forbidden)
    if name == "finite":
        return lambda v: ~np.isfinite(v)
    if name == "multiple_of":
        step = stats["step"]

        def not_multiple(v: npt.NDArray[Any]) -> npt.NDArray[np.bool_]:
            with np.errstate(invalid="ignore"):  # inf: NaN remainder, which fails
                whole: npt.NDArray[np.bool_] = np.remainder(v, step) == 0
            return ~whole

        return not_multiple
    raise SchemaNotCompilable(f"check '{name}' has no compiled form")


class CompiledSchema:
    """A pandera DataFrameSchema over the columns of a ``[rows, features]`` tensor."""

    def __init__(self, features: Sequence[_Feature], *, width: int | None = None) -> None:
        self._features = tuple(features)
        self.feature_names = tuple(f.name for f in features)
        self._width = len(self._features) if width is None else width
        self._bounds = [
            (op, feature.column, value)
            for feature in self._features
            for check in feature.checks
            for op, value in check.bounds
        ]
        self._others = tuple(
            (feature.column, check.fails)
            for feature in self._features
            for check in feature.checks
            if not check.bounds
        )
        self._bounds_by_dtype: dict[np.dtype[Any], list[tuple[Any, Any, Any]]] = {}
        self._native_by_dtype: dict[np.dtype[Any], tuple[Any, Any, list[Any]]] = {}
        self._nullable = np.ones(self._width, dtype=bool)
        for feature in self._features:
            self._nullable[feature.column] = feature.nullable

    def _bound_checks(self, dtype: np.dtype[Any]) -> list[tuple[Any, Any, Any]]:
        """(operator, columns or None for a whole row, values in ``dtype``) per kind of bound.

        Values are cast to the batch's dtype as a Python float is when compared with such an
        array (NEP 50), so ties resolve as in the feature-by-feature check and in pandas.
        Then every lower bound becomes one full-width row for ``>=`` (a strict ``x > a`` is
        ``x >= nextafter(a, inf)`` in that dtype; the tightest bound of each column; -inf
        where a column has none) and every upper bound one for ``<=``, each compared with
        the batch by broadcasting. eq and ne keep their own columns. A NaN fails every
        comparison, so a batch with one goes to the feature-by-feature check."""
        found = self._bounds_by_dtype.get(dtype)
        if found is not None:
            return found
        found = []
        inf = np.array(np.inf, dtype)
        rows = {"ge": np.full(self._width, -inf), "le": np.full(self._width, inf)}
        for op in ("gt", "ge", "lt", "le", "eq", "ne"):
            mine = [(column, value) for o, column, value in self._bounds if o == op]
            if not mine:
                continue
            columns = np.array([c for c, _ in mine], dtype=np.intp)
            with np.errstate(over="ignore"):  # a bound beyond the dtype's range: inf
                values = np.array([v for _, v in mine], dtype=np.float64).astype(dtype)
            if op == "gt":
                np.maximum.at(rows["ge"], columns, np.nextafter(values, inf))
            elif op == "ge":
                np.maximum.at(rows["ge"], columns, values)
            elif op == "lt":
                np.minimum.at(rows["le"], columns, np.nextafter(values, -inf))
            elif op == "le":
                np.minimum.at(rows["le"], columns, values)
            else:
                found.append((_OPERATORS[op], columns, values))
        # the >= row also finds a NaN (-inf where no bound: NaN fails even that), so it is
        # there whenever a column is not nullable
        lower = any(o in ("gt", "ge") for o, _, _ in self._bounds)
        if lower or not all(f.nullable for f in self._features):
            found.append((_OPERATORS["ge"], None, rows["ge"]))
        if any(o in ("lt", "le") for o, _, _ in self._bounds):
            found.append((_OPERATORS["le"], None, rows["le"]))
        self._bounds_by_dtype[dtype] = found
        return found

    def _native_bounds(self, dtype: np.dtype[Any]) -> tuple[Any, Any, list[Any]]:
        """``_bound_checks`` for the core's one-pass check: the lower and upper row (-inf
        and +inf where there is none: a NaN then fails even a nullable column, which only
        sends that batch to the feature-by-feature check), and the eq/ne checks left."""
        found = self._native_by_dtype.get(dtype)
        if found is None:
            lower = np.full(self._width, -np.inf, dtype)
            upper = np.full(self._width, np.inf, dtype)
            rest = []
            for op, columns, values in self._bound_checks(dtype):
                if columns is not None:
                    rest.append((op, columns, values))
                elif op is _OPERATORS["ge"]:
                    lower = values
                else:
                    upper = values
            found = self._native_by_dtype[dtype] = (lower, upper, rest)
        return found

    def _passes(self, batch: npt.NDArray[Any]) -> bool:
        """True when no check fails anywhere in the float ``batch``; False may also mean a
        NaN is in it (the feature-by-feature check then says what, if anything, failed)."""
        if batch.dtype in _NATIVE_DTYPES and batch.dtype.isnative and batch.flags.c_contiguous:
            lower, upper, rest = self._native_bounds(batch.dtype)
            if not _core.within_bounds(batch, lower, upper):
                return False
            checks = rest
        else:
            checks = self._bound_checks(batch.dtype)
        for op, columns, values in checks:
            part = batch if columns is None else batch[:, columns]
            if not op(part, values).all():
                return False
        return not self._others or all(
            not fails(batch[:, column]).any() for column, fails in self._others
        )

    @classmethod
    def from_pandera(cls, schema: Any, features: Sequence[str]) -> CompiledSchema:
        """Compile ``schema`` (a pandera DataFrameSchema); ``features`` names the tensor's
        columns in order. Every schema column must be one of them."""
        import pandera.dtypes

        position = {name: i for i, name in enumerate(features)}
        if len(position) != len(features):
            raise SchemaNotCompilable("feature names repeat")
        if schema.checks:
            raise SchemaNotCompilable("dataframe-wide checks have no compiled form")
        compiled = []
        for name, column in schema.columns.items():
            if name not in position:
                raise SchemaNotCompilable(f"column '{name}' is not a feature of the input")
            if column.dtype is not None and not pandera.dtypes.is_numeric(column.dtype):
                raise SchemaNotCompilable(
                    f"column '{name}': dtype {column.dtype} is not numeric (the input is)"
                )
            checks = []
            for check in column.checks:
                if check.statistics is None or getattr(check, "ignore_na", True) is False:
                    raise SchemaNotCompilable(f"column '{name}': check '{check.name}'")
                stats = dict(check.statistics)
                checks.append(
                    _Check(check.name, _fails(check.name, stats), _bounds(check.name, stats))
                )
            compiled.append(
                _Feature(str(name), position[name], bool(column.nullable), tuple(checks))
            )
        return cls(compiled, width=len(features))

    @classmethod
    def from_yaml(cls, text: str, features: Sequence[str]) -> CompiledSchema:
        """Compile a schema in pandera's YAML form."""
        register_checks()
        import pandera.pandas as pa

        return cls.from_pandera(pa.DataFrameSchema.from_yaml(text), features)

    def check(self, batch: npt.NDArray[Any]) -> list[Failure]:
        """Every (feature, check) that fails on some row of ``batch`` ([rows, features])."""
        if batch.dtype.kind != "f" or batch.shape[1] != self._width:
            return self.check_each(batch)
        if self._passes(batch):
            return []
        return self.check_each(batch, only=self._suspects(batch))

    def _suspects(self, batch: npt.NDArray[Any]) -> npt.NDArray[np.bool_]:
        """Per column: might a check fail there? Exact for nullability and the bounds (the
        rows of ``_bound_checks``, with NaN ignored as the checks ignore it), always True
        for the other checks; so a batch with a NaN in a nullable feature, or one bad
        value, is not checked feature by feature in full."""
        null = np.isnan(batch)
        suspects: npt.NDArray[np.bool_] = null.any(axis=0) & ~self._nullable
        for op, columns, values in self._bound_checks(batch.dtype):
            if columns is None:
                suspects |= ~(op(batch, values) | null).all(axis=0)
            else:
                bad = ~(op(batch[:, columns], values) | null[:, columns]).all(axis=0)
                suspects[columns[bad]] = True
        for column, _ in self._others:
            suspects[column] = True
        return suspects

    def check_each(
        self, batch: npt.NDArray[Any], only: npt.NDArray[np.bool_] | None = None
    ) -> list[Failure]:
        """``check``, one feature and one check at a time (what a failing batch gets); with
        ``only``, just the features of the columns it marks."""
        failures = []
        for feature in self._features:
            if only is not None and not only[feature.column]:
                continue
            values = batch[:, feature.column]
            null = np.isnan(values) if values.dtype.kind == "f" else np.zeros(len(values), bool)
            if not feature.nullable and null.any():
                failures.append(_failure(feature.name, "not_nullable", null, values))
            if not feature.checks:
                continue
            present = ~null
            kept = values[present]
            rows = np.flatnonzero(present)
            for check in feature.checks:
                failing = check.fails(kept)
                if failing.any():
                    mask = np.zeros(len(values), bool)
                    mask[rows[failing]] = True
                    failures.append(_failure(feature.name, check.name, mask, values))
        return failures


def _json_value(value: float) -> float | str | None:
    """A value as JSON can carry it: NaN (a null) as null, infinities as strings."""
    if np.isnan(value):
        return None
    return value if np.isfinite(value) else ("inf" if value > 0 else "-inf")


def _failure(
    feature: str, check: str, mask: npt.NDArray[np.bool_], values: npt.NDArray[Any]
) -> Failure:
    rows = np.flatnonzero(mask)
    shown = rows[:MAX_EXAMPLES]
    return Failure(
        feature,
        check,
        len(rows),
        tuple(int(r) for r in shown),
        tuple(float(v) for v in values[shown]),
    )

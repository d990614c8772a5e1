"""Tabular pipelines: feature columns by name in, the model's 2-D float input out.

A request sends one V2 input per feature, ``[rows]`` or ``[rows, 1]``, as MLServer's pandas
codec sends a DataFrame: numbers in any numeric datatype, string categories as BYTES,
integer categories in an integer datatype. Each feature, in the order the config lists
them, writes its columns of the model's input:

- a number: filled when missing (NaN, or the feature not sent) with a number or a statistic
  of the version's ``reference.json``, then scaled (standard or min-max, from the same
  statistics);
- a category: its position in the declared vocabulary, as one column (``index``) or as one
  column per category (``onehot``); an empty string or an absent feature is missing (filled
  with a declared category), a value outside the vocabulary is refused or ignored.

Looking up categories is numpy (integers) or a pandas hash index (strings); the
fill, scaling, encoding and layout are one native pass per row (``_core.TabularKernel``)
that writes the batch tensor directly, GIL released.

When the version also has a ``schema.yaml``, its columns are the pipeline's numeric
features: the values a client sent are checked before they are filled and scaled, and a
request must send the features (the model's own tensor would bypass the check).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from fastserve import _core
from fastserve.config import CategoricalFeature, NumericFeature, TabularPipeline
from fastserve.errors import InvalidRequest
from fastserve.preprocessing.common import PipelineMismatch
from fastserve.profiling import FeatureReference, ReferenceProfile
from fastserve.protocol import InferenceRequest, InputTensor, ModelSignature
from fastserve.validation import clip, feature_columns, name_list, quoted

__all__ = ["TabularPreprocessor"]

_DTYPES: Final = {"FP32": "float32", "FP64": "float64"}
_NUMBER_KINDS: Final = frozenset("biuf")
_INTEGER_KINDS: Final = frozenset("iu")
_UNKNOWN: Final = -1  # the kernel's codes: not in the vocabulary
_MISSING: Final = -2  # no value
_ROWS_SHOWN: Final = 5
_STATISTIC_USERS: Final = frozenset({"standard", "minmax", "mean", "median", "min", "max"})
"""Scales and fills that read the reference's statistics."""


@dataclass(frozen=True)
class _Vocabulary:
    """One categorical feature's lookup from values to codes (positions)."""

    feature: CategoricalFeature
    strings: Any  # pandas.Index of the categories' UTF-8 bytes, then b"" (missing)
    sorted_ints: npt.NDArray[np.int64] | None  # integer categories, sorted ...
    positions: npt.NDArray[np.int64] | None  # ... and each one's position

    @classmethod
    def of(cls, feature: CategoricalFeature) -> _Vocabulary:
        first = feature.categories[0]
        if isinstance(first, str):
            import pandas as pd  # a hashed lookup in C, for object arrays of bytes

            index = pd.Index([str(c).encode() for c in feature.categories] + [b""])
            return cls(feature, index, None, None)
        values = np.asarray(feature.categories, np.int64)
        order = np.argsort(values, kind="stable")
        return cls(feature, None, values[order], order.astype(np.int64))

    def codes(self, tensor: InputTensor) -> npt.NDArray[np.int64]:
        name = quoted(self.feature.name)
        values = tensor.data.ravel()
        if self.strings is not None:
            if tensor.datatype != "BYTES":
                raise InvalidRequest(
                    f"feature {name}: its categories are strings, sent as BYTES (not "
                    f"{clip(tensor.datatype)})"
                )
            codes = self.strings.get_indexer(values).astype(np.int64, copy=False)
            codes[codes == len(self.feature.categories)] = _MISSING  # b"", the last entry
            return codes  # type: ignore[no-any-return]
        if values.dtype.kind not in _INTEGER_KINDS:
            raise InvalidRequest(
                f"feature {name}: its categories are integers, sent as an integer datatype "
                f"(not {clip(tensor.datatype)})"
            )
        assert self.sorted_ints is not None and self.positions is not None
        ints = values.astype(np.int64, copy=False)
        at = np.searchsorted(self.sorted_ints, ints).clip(0, len(self.sorted_ints) - 1)
        found = self.sorted_ints[at] == ints
        if values.dtype.kind == "u":  # above int64's range: not a category, not wrapped
            found &= values <= np.iinfo(np.int64).max
        return np.where(found, self.positions[at], _UNKNOWN)

    def fill_code(self) -> int:
        fill = self.feature.fill
        return _UNKNOWN if fill is None else list(self.feature.categories).index(fill)


@dataclass(frozen=True)
class TabularPreprocessor:
    input: str
    datatype: str  # FP32 | FP64, the model input's
    features: tuple[NumericFeature | CategoricalFeature, ...]
    vocabularies: dict[str, _Vocabulary]
    kernel: _core.TabularKernel
    schema_columns: tuple[str, ...] | None
    """The value schema's columns (numeric features), in its order; None without one."""

    @classmethod
    def for_model(
        cls,
        pipeline: TabularPipeline,
        signature: ModelSignature,
        reference: ReferenceProfile | None,
        schema_columns: Sequence[str] | None = None,
    ) -> TabularPreprocessor:
        spec = signature.input(pipeline.input)
        if spec is None:
            names = ", ".join(s.name for s in signature.inputs)
            raise PipelineMismatch(f"the model has no input '{pipeline.input}' (it has {names})")
        features = pipeline.features
        width = sum(
            len(f.categories) if isinstance(f, CategoricalFeature) and f.encode == "onehot" else 1
            for f in features
        )
        if spec.datatype not in _DTYPES or len(spec.shape) != 2 or spec.shape[1] != width:
            raise PipelineMismatch(
                f"input '{spec.name}' is {spec.datatype} {list(spec.shape)}: the features "
                f"make {width} column(s), for a 2-D FP32 or FP64 input that wide"
            )
        numeric = [f.name for f in features if isinstance(f, NumericFeature)]
        if schema_columns is not None and sorted(schema_columns) != sorted(numeric):
            raise PipelineMismatch(
                "schema.yaml's columns must be the pipeline's numeric features "
                f"({', '.join(numeric) or 'none'})"
            )
        stats = {f.name: f for f in reference.features} if reference is not None else {}
        kinds, shifts, scales, fills, widths, codes, unknowns = [], [], [], [], [], [], []
        vocabularies = {}
        for f in features:
            if isinstance(f, NumericFeature):
                shift, scale, fill = _number_settings(f, stats.get(f.name))
                kinds.append("number")
                shifts.append(shift)
                scales.append(scale)
                fills.append(fill)
                widths.append(1)
                codes.append(_UNKNOWN)
                unknowns.append(0.0)
            else:
                vocabulary = vocabularies[f.name] = _Vocabulary.of(f)
                onehot = f.encode == "onehot"
                kinds.append("onehot" if onehot else "index")
                shifts.append(0.0)
                scales.append(1.0)
                fills.append(0.0)
                widths.append(len(f.categories) if onehot else 1)
                codes.append(vocabulary.fill_code())
                unknowns.append(f.unknown_value)
        kernel = _core.TabularKernel(
            kinds, shifts, scales, fills, widths, codes, unknowns, _DTYPES[spec.datatype]
        )
        columns = tuple(schema_columns) if schema_columns is not None else None
        return cls(spec.name, spec.datatype, features, vocabularies, kernel, columns)

    def apply(
        self, request: InferenceRequest
    ) -> tuple[InferenceRequest, npt.NDArray[np.float64] | None]:
        """``request`` with its features turned into the model's input, and the raw numeric
        values (``[rows, schema columns]``, as sent) for the value schema when there is one.
        A request sending the model's own tensor passes through, unless a schema needs the
        raw values."""
        if any(t.name == self.input for t in request.inputs):
            if self.schema_columns is not None:
                raise InvalidRequest(
                    f"input {quoted(self.input)} is made by the model's tabular pipeline: "
                    "send its features by name (their values are checked against the "
                    "schema as sent)"
                )
            return request, None
        names = [f.name for f in self.features]
        columns, others, rows = feature_columns(request, names)
        absent = [f.name for f in self.features if f.name not in columns and f.fill is None]
        if absent or not columns:
            raise InvalidRequest(
                f"input {quoted(self.input)} is made from its features, sent by name; "
                f"missing (with no fill): {name_list(absent or names)}"
            )
        arrays: list[npt.NDArray[Any]] = []
        numbers: dict[str, npt.NDArray[np.float64]] = {}
        for feature in self.features:
            tensor = columns.get(feature.name)
            if isinstance(feature, NumericFeature):
                values = _numbers(feature, tensor, rows)
                numbers[feature.name] = values
                arrays.append(values)
            else:
                arrays.append(self._codes(feature, tensor, rows))
        out = self.kernel.run(arrays, rows)
        tensor = InputTensor(self.input, self.datatype, tuple(out.shape), out)
        raw = None
        if self.schema_columns is not None:
            raw = np.stack([numbers[c] for c in self.schema_columns], axis=1)
        changed = InferenceRequest([*others, tensor], request.id, request.outputs,
                                   request.parameters)  # fmt: skip
        return changed, raw

    def _codes(
        self, feature: CategoricalFeature, tensor: InputTensor | None, rows: int
    ) -> npt.NDArray[np.int64]:
        if tensor is None:
            return np.full(rows, _MISSING, np.int64)
        codes = self.vocabularies[feature.name].codes(tensor)
        name = quoted(feature.name)
        if feature.fill is None and (missing := np.flatnonzero(codes == _MISSING)).size:
            raise InvalidRequest(
                f"feature {name}: empty (missing) in rows {_rows(missing)}, and it declares no fill"
            )
        if feature.unknown == "error" and (unknown := np.flatnonzero(codes == _UNKNOWN)).size:
            values = tensor.data.ravel()
            shown = ", ".join(clip(_text(values[r]), 32) for r in unknown[:_ROWS_SHOWN])
            raise InvalidRequest(
                f"feature {name}: not one of its categories in rows {_rows(unknown)} ({shown})"
            )
        return codes


def _number_settings(
    feature: NumericFeature, stats: FeatureReference | None
) -> tuple[float, float, float]:
    """(shift, scale, fill) of a numeric feature, from the reference's statistics."""
    needs = [what for what in (feature.scale, feature.fill) if what in _STATISTIC_USERS]
    if needs and stats is None:
        raise PipelineMismatch(
            f"feature '{feature.name}' uses the reference's statistics "
            f"({', '.join(map(str, needs))}), but reference.json does not describe it"
        )
    shift, scale = 0.0, 1.0
    if feature.scale != "none":
        assert stats is not None
        if feature.scale == "standard":
            shift, spread = stats.mean, stats.std
        else:
            shift, spread = stats.min, stats.max - stats.min
        scale = 1.0 / spread if spread > 0 else 1.0  # as scikit-learn's scalers do
    fill = feature.fill
    if fill is None:
        value = float("nan")
    elif isinstance(fill, str):
        assert stats is not None
        value = {
            "mean": stats.mean,
            "median": stats.quantiles[50],
            "min": stats.min,
            "max": stats.max,
        }[fill]
    else:
        value = float(fill)
    return shift, scale, value


def _numbers(
    feature: NumericFeature, tensor: InputTensor | None, rows: int
) -> npt.NDArray[np.float64]:
    if tensor is None:
        return np.full(rows, np.nan)
    name = quoted(feature.name)
    if tensor.data.dtype.kind not in _NUMBER_KINDS:
        raise InvalidRequest(f"feature {name}: datatype {clip(tensor.datatype)} is not numeric")
    values = np.ascontiguousarray(tensor.data.ravel(), np.float64)
    if feature.fill is None and (missing := np.flatnonzero(np.isnan(values))).size:
        raise InvalidRequest(
            f"feature {name}: NaN (missing) in rows {_rows(missing)}, and it declares no fill"
        )
    return values


def _rows(rows: npt.NDArray[np.intp]) -> str:
    shown = ", ".join(str(r) for r in rows[:_ROWS_SHOWN])
    return shown + (f" and {rows.size - _ROWS_SHOWN} more" if rows.size > _ROWS_SHOWN else "")


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return repr(value.decode("utf-8", "replace"))
    return str(value)

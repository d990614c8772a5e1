"""What training data looks like: a starting pandera schema and the reference statistics.

``fastserve profile DATA`` writes both beside a model version, for a person to review:

- ``schema.yaml``: pandera's ``infer_schema`` (dtype, nullability when nulls were seen, the
  observed min..max as ``ge``/``le``), except that a discrete feature (few distinct whole
  numbers: a category code, a count, a flag) gets ``isin`` its observed values instead, so
  a category never seen in training is caught at the door. The observed range is tight on
  purpose: widen it where the domain allows more than the sample showed.
- ``reference.json`` (``ReferenceProfile``): per feature, its summary, 101 quantiles (the
  reference's distribution, for a KS test), and bin edges with the reference's share in
  each bin (deciles, or the discrete values; for PSI and chi-square), which drift
  monitoring compares live traffic with.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "REFERENCE_FILE",
    "FeatureReference",
    "Profile",
    "ProfileError",
    "ReferenceProfile",
    "profile_frame",
]

REFERENCE_FILE: Final = "reference.json"
"""A version folder's reference statistics, beside its schema.yaml."""
DISCRETE_MAX: Final = 20
"""At most this many distinct whole-number values make a feature discrete."""
_DECILES: Final = np.linspace(0.1, 0.9, 9)
_PERCENTILES: Final = np.linspace(0.0, 1.0, 101)


class ProfileError(ValueError):
    """Data that cannot be profiled (no rows, a column that is not numeric, ...)."""


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FeatureReference(_Frozen):
    """One feature of the reference data."""

    name: str
    kind: Literal["continuous", "discrete"]
    count: int
    """Values present (not null)."""
    nulls: int
    mean: float
    std: float
    min: float
    max: float
    quantiles: tuple[float, ...]
    """The 0th, 1st, ..., 100th percentiles (101 values)."""
    edges: tuple[float, ...]
    """Continuous: the interior bin edges (the distinct deciles); the bins are (-inf, e1],
    (e1, e2], ..., (ek, inf). Discrete: the distinct values, one bin each."""
    fractions: tuple[float, ...]
    """The reference's share of present values in each bin (they sum to 1)."""


class ReferenceProfile(_Frozen):
    """The ``reference.json`` of a model version."""

    format: Literal[1] = 1
    source: str
    """The data file it was made from."""
    created: str
    """When (UTC, ISO 8601)."""
    rows: int
    features: tuple[FeatureReference, ...]
    predictions: FeatureReference | None = None
    """The model's answers on the reference data (predicted class or value), when given:
    what prediction drift is measured against."""


@dataclass(frozen=True)
class Profile:
    schema: Any  # pandera DataFrameSchema
    reference: ReferenceProfile

    def schema_yaml(self) -> str:
        """The schema in pandera's YAML form, under a header saying where it came from."""
        ref = self.reference
        header = (
            f"# Made by `fastserve profile` from {ref.source} ({ref.rows} rows) on {ref.created}.\n"
            "# Review before serving: ranges are the observed min..max, discrete features\n"
            "# allow only the values seen. Columns, in order, are the input tensor's features.\n"
        )
        return header + str(self.schema.to_yaml())

    def write(self, folder: Path) -> tuple[Path, Path]:
        """Write ``schema.yaml`` and ``reference.json`` into ``folder``."""
        from fastserve.schema import SCHEMA_FILE

        folder.mkdir(parents=True, exist_ok=True)
        schema_path, reference_path = folder / SCHEMA_FILE, folder / REFERENCE_FILE
        schema_path.write_text(self.schema_yaml(), encoding="utf-8")
        reference_path.write_text(self.reference.model_dump_json(indent=1) + "\n", "utf-8")
        return schema_path, reference_path


def profile_frame(
    frame: pd.DataFrame,
    *,
    source: str,
    discrete_max: int = DISCRETE_MAX,
    predictions: npt.ArrayLike | None = None,
) -> Profile:
    """Profile every column of ``frame`` (drop labels and ids first); ``predictions`` are
    the model's answers on these rows (a class index or a value each), when known."""
    import pandas as pd
    import pandera.pandas as pa

    if frame.empty or len(frame.columns) == 0:
        raise ProfileError("the data has no rows or no columns")
    not_numeric = [str(c) for c in frame.columns if not pd.api.types.is_numeric_dtype(frame[c])]
    if not_numeric:
        raise ProfileError(
            f"columns {', '.join(map(repr, not_numeric[:10]))} are not numeric: drop them "
            "(--drop) or encode them as numbers first"
        )
    if frame.columns.duplicated().any():
        raise ProfileError("column names repeat")

    inferred = pa.infer_schema(frame)
    columns = {}
    features = []
    for name in frame.columns:
        values = frame[name].to_numpy(dtype=np.float64, na_value=np.nan)
        summary = _summary(str(name), values, discrete_max)
        column = inferred.columns[name]
        if summary.kind == "discrete":
            column = column.set_checks([pa.Check.isin([_plain(v) for v in summary.edges])])
        columns[str(name)] = column
        features.append(summary)
    schema = pa.DataFrameSchema(columns, coerce=True)
    reference = ReferenceProfile(
        source=source,
        created=datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
        rows=len(frame),
        features=tuple(features),
        predictions=(
            None if predictions is None else _summary("prediction", predictions, discrete_max)
        ),
    )
    return Profile(schema, reference)


def _summary(name: str, data: npt.ArrayLike, discrete_max: int) -> FeatureReference:
    """The reference of one column of values: discrete (its edges are the distinct values)
    when at most ``discrete_max`` distinct whole numbers, else continuous."""
    values = np.asarray(data, dtype=np.float64).reshape(-1)
    present = values[~np.isnan(values)]
    if present.size == 0:
        raise ProfileError(f"column {name!r} has no values")
    distinct = np.unique(present)
    discrete = len(distinct) <= discrete_max and bool(np.all(distinct == np.round(distinct)))
    return _reference(name, values, present, distinct if discrete else None)


def _plain(value: float) -> float | int:
    return int(value) if value == int(value) else float(value)


def _reference(
    name: str,
    values: npt.NDArray[np.float64],
    present: npt.NDArray[np.float64],
    discrete: npt.NDArray[np.float64] | None,
) -> FeatureReference:
    if discrete is not None:
        edges = discrete
        counts = np.array([np.count_nonzero(present == v) for v in discrete])
    else:
        edges = np.unique(np.quantile(present, _DECILES))
        counts = np.bincount(np.searchsorted(edges, present, side="left"), minlength=len(edges) + 1)
    return FeatureReference(
        name=name,
        kind="continuous" if discrete is None else "discrete",
        count=int(present.size),
        nulls=int(values.size - present.size),
        mean=float(present.mean()),
        std=float(present.std()),
        min=float(present.min()),
        max=float(present.max()),
        quantiles=tuple(float(q) for q in np.quantile(present, _PERCENTILES)),
        edges=tuple(float(e) for e in edges),
        fractions=tuple(float(c) / present.size for c in counts),
    )

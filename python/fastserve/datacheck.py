"""Offline validation: a data file checked against a model's schema by pandera itself.

``fastserve validate`` runs this to gate a training pipeline: pandera's lazy validation
(every failure, not the first) of the whole file, summarized per (feature, check) with a
few failing rows, the way the server's 400 answers are. The file's columns are matched by
name, so extra columns (labels, ids) are ignored; a missing one is a failure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastserve.schema import MAX_EXAMPLES

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["CheckSummary", "TableReport", "validate_frame"]


@dataclass
class CheckSummary:
    """Every failure of one check of one feature."""

    feature: str
    check: str  # pandera's check name: in_range, not_nullable, column_in_dataframe, ...
    detail: str  # pandera's description of the check: in_range(0.0, 10.0)
    failing_rows: int = 0
    rows: list[int] = field(default_factory=list)  # the first few (0-based data rows)
    values: list[Any] = field(default_factory=list)  # their values

    def add(self, row: int | None, value: Any) -> None:
        self.failing_rows += 1
        if row is not None and len(self.rows) < MAX_EXAMPLES:
            self.rows.append(row)
            self.values.append(_plain(value))

    def as_doc(self) -> dict[str, Any]:
        return {
            "feature": self.feature,
            "check": self.check,
            "detail": self.detail,
            "failing_rows": self.failing_rows,
            "rows": self.rows,
            "values": self.values,
        }


@dataclass
class TableReport:
    """The outcome of checking one table."""

    source: str
    rows: int
    failing_rows: int
    checks: list[CheckSummary]

    @property
    def ok(self) -> bool:
        return not self.checks

    def as_doc(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "rows": self.rows,
            "failing_rows": self.failing_rows,
            "ok": self.ok,
            "failures": [c.as_doc() for c in self.checks],
        }

    def render(self) -> str:
        """The report a person reads."""
        if self.ok:
            return f"{self.source}: {self.rows} rows, all pass the schema\n"
        lines = [
            f"{self.source}: {self.failing_rows} of {self.rows} rows fail the schema "
            f"({len(self.checks)} failing checks)",
            "",
        ]
        width = max(len(c.feature) for c in self.checks)
        for c in self.checks:
            if c.check == "column_in_dataframe":
                lines.append(f"  {c.feature:<{width}}  the column is missing")
                continue
            lines.append(f"  {c.feature:<{width}}  {c.detail}: {c.failing_rows} failing")
            if c.rows:
                shown = ", ".join(f"row {r} = {v!r}" for r, v in zip(c.rows, c.values, strict=True))
                more = ", ..." if c.failing_rows > len(c.rows) else ""
                lines.append(f"  {'':<{width}}    {shown}{more}")
        return "\n".join(lines) + "\n"


def validate_frame(schema: Any, frame: pd.DataFrame, *, source: str) -> TableReport:
    """Check ``frame`` against the pandera ``schema`` (every failure, lazily)."""
    import pandera.pandas as pa

    try:
        schema.validate(frame, lazy=True)
    except pa.errors.SchemaErrors as exc:
        return _report(exc.failure_cases, len(frame), source)
    return TableReport(source, len(frame), 0, [])


def _report(cases: pd.DataFrame, rows: int, source: str) -> TableReport:
    checks: dict[tuple[str, str], CheckSummary] = {}
    failing: set[int] = set()
    for case in cases.to_dict("records"):
        detail = str(case["check"])
        column, value, index = case["column"], case["failure_case"], case["index"]
        # a frame-level failure (a missing column) names the column as its failure case
        feature = str(value if _missing(column) else column)
        check = detail.split("(", 1)[0]
        summary = checks.get((feature, check))
        if summary is None:
            summary = checks[feature, check] = CheckSummary(feature, check, detail)
        row = None if _missing(index) else int(index)
        summary.add(row, value)
        if row is not None:
            failing.add(row)
    whole_table = any(c.check == "column_in_dataframe" for c in checks.values())
    ordered = sorted(checks.values(), key=lambda c: (c.feature, c.check))
    return TableReport(source, rows, rows if whole_table else len(failing), ordered)


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _plain(value: Any) -> Any:
    """A failure case as JSON can carry it (NaN: None)."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)
    return value if isinstance(value, (int, float, str, bool)) else str(value)

"""The compiled schema against pandera itself: on generated batches, both find exactly the
same failing (feature, check, rows)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
import pandera.pandas as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastserve.schema import MAX_EXAMPLES, CompiledSchema, SchemaNotCompilable, register_checks

register_checks()  # fastserve's custom checks: pa.Check.finite, pa.Check.multiple_of

FEATURES = ["a", "b", "c"]
# few distinct values, bounds among them: ties with the checks' limits are common
VALUES = st.sampled_from([-1.0, 0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 0.1, math.nan, math.inf, -math.inf])
LIMITS = st.sampled_from([0.0, 1.0, 2.0, 0.1])
CHECKS = st.one_of(
    LIMITS.map(pa.Check.gt),
    LIMITS.map(pa.Check.ge),
    LIMITS.map(pa.Check.lt),
    LIMITS.map(pa.Check.le),
    LIMITS.map(pa.Check.eq),
    LIMITS.map(pa.Check.ne),
    st.tuples(
        st.lists(LIMITS, min_size=2, max_size=2, unique=True), st.booleans(), st.booleans()
    ).map(lambda t: pa.Check.in_range(*sorted(t[0]), include_min=t[1], include_max=t[2])),
    st.lists(LIMITS, min_size=1, max_size=3).map(pa.Check.isin),
    st.lists(LIMITS, min_size=1, max_size=3).map(pa.Check.notin),
    st.just(pa.Check.finite()),
    st.sampled_from([0.5, 1.0, 2.0]).map(lambda step: pa.Check.multiple_of(step=step)),
)


def pandera_failures(schema: Any, batch: np.ndarray) -> dict[tuple[str, str], list[int]]:
    # the frame keeps the batch's dtype: float32 comparisons are float32 in both
    """(feature, check name) -> failing rows, as pandera reports them."""
    try:
        schema.validate(pd.DataFrame(batch, columns=FEATURES), lazy=True)
    except pa.errors.SchemaErrors as exc:
        found: dict[tuple[str, str], list[int]] = {}
        for row in exc.failure_cases.itertuples():
            key = (str(row.column), str(row.check).split("(")[0])
            found.setdefault(key, []).append(int(row.index))
        return {key: sorted(rows) for key, rows in found.items()}
    return {}


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_compiled_checks_find_exactly_what_pandera_finds(data: st.DataObject) -> None:
    dtype = data.draw(st.sampled_from([np.float32, np.float64]))
    columns = {
        name: pa.Column(
            dtype,
            data.draw(st.lists(CHECKS, max_size=3, unique_by=lambda c: c.name)),
            nullable=data.draw(st.booleans()),
        )
        for name in FEATURES
    }
    schema = pa.DataFrameSchema(columns)
    rows = data.draw(st.integers(1, 9))
    batch = np.array(
        data.draw(st.lists(st.lists(VALUES, min_size=3, max_size=3), min_size=rows, max_size=rows)),
        dtype=dtype,
    )
    expected = pandera_failures(schema, batch)
    compiled = CompiledSchema.from_pandera(schema, FEATURES)
    got = compiled.check(batch)
    # the whole-batch pass and the feature-by-feature check agree too
    assert [f.as_doc() for f in got] == [f.as_doc() for f in compiled.check_each(batch)]
    assert {(f.feature, f.check): f.count for f in got} == {k: len(v) for k, v in expected.items()}
    for failure in got:
        failing = expected[failure.feature, failure.check]
        assert list(failure.rows) == failing[:MAX_EXAMPLES]
        column = FEATURES.index(failure.feature)
        shown = batch[failing[:MAX_EXAMPLES], column]
        assert np.array_equal(np.array(failure.values), shown, equal_nan=True)


def test_a_schema_in_panderas_yaml_compiles_and_reports_failures_by_feature() -> None:
    schema = pa.DataFrameSchema(
        {
            "mean_radius": pa.Column(float, pa.Check.in_range(5.0, 30.0)),
            "smoker": pa.Column(float, pa.Check.isin([0.0, 1.0]), nullable=True),
        }
    )
    compiled = CompiledSchema.from_yaml(schema.to_yaml(), ["smoker", "mean_radius"])
    assert compiled.feature_names == ("mean_radius", "smoker")
    batch = np.array([[1.0, 10.0], [np.nan, 40.0], [2.0, np.nan]], dtype=np.float32)
    docs = [f.as_doc() for f in compiled.check(batch)]
    assert docs == [
        {"feature": "mean_radius", "check": "not_nullable", "failing_rows": 1, "rows": [2],
         "values": [None]},
        {"feature": "mean_radius", "check": "in_range", "failing_rows": 1, "rows": [1],
         "values": [40.0]},
        {"feature": "smoker", "check": "isin", "failing_rows": 1, "rows": [2], "values": [2.0]},
    ]  # fmt: skip
    assert compiled.check(np.array([[1.0, 10.0], [np.nan, 29.5]])) == []


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        (pa.DataFrameSchema({"a": pa.Column(float, pa.Check(lambda s: s > 0))}), "check"),
        (pa.DataFrameSchema({"zz": pa.Column(float)}), "column 'zz' is not a feature"),
        (pa.DataFrameSchema({"a": pa.Column(str)}), "column .a.: dtype .* is not numeric"),
        (
            pa.DataFrameSchema({"a": pa.Column(float)}, checks=pa.Check(lambda df: True)),
            "dataframe-wide",
        ),
    ],
)
def test_what_cannot_be_compiled_exactly_is_refused(schema: Any, message: str) -> None:
    with pytest.raises(SchemaNotCompilable, match=message):
        CompiledSchema.from_pandera(schema, FEATURES)

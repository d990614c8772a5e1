"""``fastserve profile`` and ``fastserve validate`` on real files (CSV, Parquet, JSONL),
through the command's own entry point; pandera does the checking."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fastserve.cli import main
from fastserve.demo import load_split
from fastserve.profiling import ReferenceProfile
from fastserve.schema import read_schema

pytestmark = pytest.mark.timeout(120)


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def training(tmp_path: Path) -> pd.DataFrame:
    """The demo's training split with its label, plus a discrete feature (a grade 1..4)."""
    split = load_split("breast_cancer")
    frame = pd.DataFrame(split.x_train.astype(np.float64), columns=list(split.feature_names))
    frame["grade"] = np.arange(len(frame)) % 4 + 1
    frame["diagnosis"] = split.y_train
    return frame


def test_profile_writes_a_schema_its_own_data_passes_and_a_reference(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, training: pd.DataFrame
) -> None:
    data = tmp_path / "train.csv"
    training.to_csv(data, index=False)
    out = tmp_path / "model" / "1"
    code, text, _ = run(capsys, "profile", str(data), "--drop", "diagnosis", "--out", str(out))
    assert code == 0
    assert "31 features (1 discrete) from 426 rows" in text

    schema = read_schema(out / "schema.yaml")
    assert list(schema.columns) == [c for c in training.columns if c != "diagnosis"]
    (grade_check,) = schema.columns["grade"].checks
    assert grade_check.name == "isin" and sorted(grade_check.statistics["allowed_values"]) == [
        1,
        2,
        3,
        4,
    ]
    area = schema.columns["mean area"].checks
    assert {c.name for c in area} == {"greater_than_or_equal_to", "less_than_or_equal_to"}

    reference = ReferenceProfile.model_validate_json((out / "reference.json").read_text())
    assert reference.rows == 426 and reference.source == "train.csv"
    grade = reference.features[-1]
    assert grade.kind == "discrete" and grade.edges == (1.0, 2.0, 3.0, 4.0)
    assert grade.fractions == pytest.approx([0.25] * 4, abs=0.01)

    # the inferred schema accepts the data it came from, through the float round trip
    code, text, _ = run(capsys, "validate", "--schema", str(out / "schema.yaml"), str(data))
    assert code == 0, text
    assert "426 rows, all pass the schema" in text

    # and does not overwrite a reviewed schema unless told to
    code, _, err = run(capsys, "profile", str(data), "--drop", "diagnosis", "--out", str(out))
    assert code == 2 and "--force" in err


def test_profile_refuses_columns_it_cannot_use(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, training: pd.DataFrame
) -> None:
    data = tmp_path / "train.parquet"
    training.assign(site=["north"] * len(training)).to_parquet(data)
    code, _, err = run(capsys, "profile", str(data), "--out", str(tmp_path))
    assert code == 2 and "'site' are not numeric" in err
    code, _, err = run(capsys, "profile", str(data), "--drop", "nope", "--out", str(tmp_path))
    assert code == 2 and "no column 'nope' in the data" in err
    assert not (tmp_path / "schema.yaml").exists()


@pytest.mark.parametrize("suffix", ["csv", "parquet", "jsonl"])
def test_validate_reports_each_failing_check_with_rows_and_exits_1(
    capsys: pytest.CaptureFixture[str], repo: Path, tmp_path: Path, suffix: str
) -> None:
    split = load_split("breast_cancer")
    frame = pd.DataFrame(split.x_test.astype(np.float64), columns=list(split.feature_names))
    frame["diagnosis"] = split.y_test  # not a feature: ignored
    good = tmp_path / f"good.{suffix}"
    bad = tmp_path / f"bad.{suffix}"
    broken = frame.copy()
    broken.loc[[3, 9, 11], "mean area"] = -1.0
    broken.loc[5, "worst radius"] = 1e6
    broken.loc[7, "mean texture"] = np.nan
    for path, table in ((good, frame), (bad, broken)):
        if suffix == "csv":
            table.to_csv(path, index=False)
        elif suffix == "parquet":
            table.to_parquet(path)
        else:
            table.to_json(path, orient="records", lines=True, double_precision=15)

    common = ("validate", "--model", "breast_cancer", "--repository", str(repo))
    code, text, _ = run(capsys, *common, str(good))
    assert code == 0, text
    assert f"{len(frame)} rows, all pass" in text

    code, text, _ = run(capsys, *common, str(bad))
    assert code == 1
    assert f"5 of {len(frame)} rows fail the schema (3 failing checks)" in text
    assert "mean area" in text and "row 3 = -1.0, row 9 = -1.0, row 11 = -1.0" in text
    assert "worst radius" in text and "row 5 = 1000000.0" in text

    code, text, _ = run(capsys, *common, "--json", str(bad))
    assert code == 1
    report = json.loads(text)
    assert report["ok"] is False and report["failing_rows"] == 5
    failures = {(f["feature"], f["check"]): f for f in report["failures"]}
    assert set(failures) == {
        ("mean area", "in_range"),
        ("mean texture", "not_nullable"),
        ("worst radius", "in_range"),
    }
    assert failures["mean area", "in_range"]["rows"] == [3, 9, 11]
    assert failures["mean texture", "not_nullable"]["values"] == [None]


def test_validate_names_a_missing_column(
    capsys: pytest.CaptureFixture[str], repo: Path, tmp_path: Path
) -> None:
    split = load_split("breast_cancer")
    frame = pd.DataFrame(split.x_test, columns=list(split.feature_names))
    data = tmp_path / "short.csv"
    frame.drop(columns=["mean radius"]).to_csv(data, index=False)
    code, text, _ = run(
        capsys, "validate", "--model", "scorecard", "--repository", str(repo), str(data)
    )
    assert code == 1
    assert "mean radius  the column is missing" in text


def test_validate_refuses_what_it_cannot_check(
    capsys: pytest.CaptureFixture[str], repo: Path, tmp_path: Path
) -> None:
    data = tmp_path / "x.csv"
    data.write_text("a,b\n1,2\n")
    common = ("validate", "--repository", str(repo))
    cases = [
        ((*common, "--model", "nope", str(data)), "has no model 'nope'"),
        ((*common, "--model", "digits", str(data)), "version 1 has no schema.yaml"),
        ((*common, "--model", "breast_cancer", "--version", "7", str(data)), "no version 7"),
        ((*common, "--model", "breast_cancer", str(tmp_path / "none.csv")), "no such file"),
        ((*common, "--model", "breast_cancer", str(tmp_path / "x.txt")), "unknown data file"),
    ]
    for args, message in cases:
        code, _, err = run(capsys, *args)
        assert code == 2 and message in err, (args, err)
    garbage = tmp_path / "schema.yaml"
    garbage.write_text("columns: [1, 2\n")
    code, _, err = run(capsys, "validate", "--schema", str(garbage), str(data))
    assert code == 2 and "not a pandera schema" in err
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    schema = repo / "breast_cancer" / "1" / "schema.yaml"
    code, _, err = run(capsys, "validate", "--schema", str(schema), str(tmp_path / "bad.parquet"))
    assert code == 2 and "cannot read as parquet" in err


def test_the_installed_command_exits_1_on_failing_data(repo: Path, tmp_path: Path) -> None:
    data = tmp_path / "bad.csv"
    split = load_split("breast_cancer")
    frame = pd.DataFrame(split.x_test[:4], columns=list(split.feature_names))
    frame.loc[0, "mean area"] = -1
    frame.to_csv(data, index=False)
    result = subprocess.run(
        [sys.executable, "-m", "fastserve", "validate", "--model", "breast_cancer",
         "--repository", str(repo), str(data)],
        capture_output=True, text=True, timeout=100, check=False,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "1 of 4 rows fail the schema" in result.stdout

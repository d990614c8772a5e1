"""The bundled demo repository: layout, configs, accuracy, atomic and idempotent builds."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fastserve import demo
from fastserve.backends.onnxruntime import OnnxRuntimeSession
from fastserve.config import OnnxRuntimeConfig, load_model_config

MODELS = ("breast_cancer", "digits", "scorecard")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    root = tmp_path_factory.mktemp("demo") / "repo"
    started = time.perf_counter()
    demo.build_demo_repository(root)
    return root, time.perf_counter() - started


@pytest.fixture
def repo(built: tuple[Path, float]) -> Path:
    return built[0]


@pytest.fixture
def trainings(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records every model the demo module trains from now on."""
    calls: list[str] = []
    original = demo.train_demo_model

    def counting(model: str) -> demo.TrainedDemoModel:
        calls.append(model)
        return original(model)

    monkeypatch.setattr(demo, "train_demo_model", counting)
    return calls


def files_of(root: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(root)): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


# -- what gets built -----------------------------------------------------------------------


def test_layout(repo: Path) -> None:
    names = set(files_of(repo))
    tabular = ("1/schema.yaml", "1/reference.json")
    assert names == {
        demo.STAMP_FILE,
        *(f"{m}/{f}" for m in MODELS for f in ("config.yaml", "1/model.onnx", "1/metadata.json")),
        *(f"{m}/{f}" for m in ("breast_cancer", "scorecard") for f in tabular),
    }
    # the staging folder was renamed into place: nothing is left beside the repository
    siblings = {path.name for path in repo.parent.iterdir()}
    assert siblings <= {"repo", ".repo.lock"}
    assert repo.stat().st_mode & 0o755 == 0o755


def test_the_reviewed_schema_passes_all_the_data_and_names_every_feature(repo: Path) -> None:
    """Every row of the data set (both splits) passes the shipped schema, in pandera and in
    the compiled form the server runs; its columns are the features in tensor order."""
    import pandas as pd

    from fastserve.datacheck import validate_frame
    from fastserve.protocol import ModelSignature, TensorSpec
    from fastserve.schema import load_input_schema, read_schema

    split = demo.load_split("breast_cancer")
    rows = np.concatenate([split.x_train, split.x_test])
    for model in ("breast_cancer", "scorecard"):
        path = repo / model / "1" / "schema.yaml"
        schema = read_schema(path)
        assert list(schema.columns) == list(split.feature_names)
        frame = pd.DataFrame(rows.astype(np.float64), columns=list(split.feature_names))
        assert validate_frame(schema, frame, source="all").ok
        signature = ModelSignature(
            (TensorSpec("input", "FP32", (-1, 30)),), (TensorSpec("label", "INT64", (-1,)),)
        )
        compiled = load_input_schema(path, signature).compiled
        assert compiled.check(rows) == []
        negative = rows[:3].copy()
        negative[1, 3] = -1.0  # a negative mean area
        (failure,) = compiled.check(negative)
        assert (failure.feature, failure.check, failure.rows) == ("mean area", "in_range", (1,))


def test_the_reference_profile_describes_the_training_split(repo: Path) -> None:
    from fastserve.profiling import ReferenceProfile

    split = demo.load_split("breast_cancer")
    text = (repo / "breast_cancer" / "1" / "reference.json").read_text()
    reference = ReferenceProfile.model_validate_json(text)
    assert reference.rows == len(split.x_train)
    assert [f.name for f in reference.features] == list(split.feature_names)
    area = reference.features[3]
    assert area.min == pytest.approx(float(split.x_train[:, 3].min()))
    assert len(area.quantiles) == 101 and sum(area.fractions) == pytest.approx(1.0)


@pytest.mark.parametrize("model", MODELS)
def test_configs_are_valid(repo: Path, model: str) -> None:
    config = load_model_config(repo / model / "config.yaml")
    assert config.backend == "onnxruntime"
    assert config.batching.max_batch_size == 64
    assert config.batching.preferred_batch_sizes == (64,)
    assert config.batching.max_queue_delay_us == 500
    assert config.instance_count == 1
    assert config.onnxruntime.execution_provider == "auto"
    assert config.warmup is True
    assert config.description


@pytest.mark.parametrize(
    ("model", "features", "classes", "min_accuracy", "first_step"),
    [
        ("breast_cancer", 30, 2, 0.93, "StandardScaler"),
        ("digits", 64, 10, 0.95, "StandardScaler"),
        ("scorecard", 30, 2, 0.9, "ColumnTransformer"),
    ],
)
def test_metadata(
    repo: Path, model: str, features: int, classes: int, min_accuracy: float, first_step: str
) -> None:
    meta = json.loads((repo / model / "1" / "metadata.json").read_text())
    assert meta["model"] == model and meta["version"] == "1"
    assert len(meta["feature_names"]) == features
    assert len(meta["class_names"]) == classes
    assert meta["test_accuracy"] >= min_accuracy
    assert meta["test_rows"] == len(demo.load_split(model).y_test)
    training = meta["training"]
    assert training["split"]["random_state"] == 0 and training["split"]["test_size"] == 0.25
    assert training["estimator"][0]["class"] == first_step
    assert training["onnx_ir_version"] <= 10


def test_scorecard_is_breast_cancer_binned(repo: Path) -> None:
    meta = json.loads((repo / "scorecard/1/metadata.json").read_text())
    plain = json.loads((repo / "breast_cancer/1/metadata.json").read_text())
    assert meta["inputs"] == plain["inputs"] and meta["outputs"] == plain["outputs"]
    assert meta["feature_names"] == plain["feature_names"]
    np.testing.assert_array_equal(
        demo.example_rows("scorecard", 4), demo.example_rows("breast_cancer", 4)
    )
    # one binning branch per feature: a graph of hundreds of nodes, not a single linear op
    model = demo.train_demo_model("scorecard").onnx_model
    assert len(model.graph.node) > 300


def test_breast_cancer_class_names(repo: Path) -> None:
    meta = json.loads((repo / "breast_cancer/1/metadata.json").read_text())
    assert meta["class_names"] == ["malignant", "benign"]
    assert meta["feature_names"][0] == "mean radius"


@pytest.mark.parametrize("model", MODELS)
def test_served_model_scores_its_recorded_accuracy(repo: Path, model: str) -> None:
    session = OnnxRuntimeSession.load(
        repo / model / "1" / "model.onnx",
        OnnxRuntimeConfig(execution_provider="cpu"),
        name=model,
        version="1",
    )
    n = len(demo.load_split(model).y_test)
    label, probabilities = session.run([demo.example_rows(model, n)])
    accuracy = float(np.mean(label == demo.example_labels(model, n)))
    meta = json.loads((repo / model / "1" / "metadata.json").read_text())
    assert accuracy == pytest.approx(meta["test_accuracy"], abs=1e-6)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)


# -- example rows --------------------------------------------------------------------------


def test_example_rows_are_real_test_rows() -> None:
    split = demo.load_split("breast_cancer")
    rows = demo.example_rows("breast_cancer", 5)
    assert rows.dtype == np.float32 and rows.shape == (5, 30)
    np.testing.assert_array_equal(rows, split.x_test[:5])
    np.testing.assert_array_equal(demo.example_labels("breast_cancer", 5), split.y_test[:5])

    images = demo.example_rows("digits", 3)
    assert images.dtype == np.float32 and images.shape == (3, 1, 8, 8)
    assert images.min() >= 0 and images.max() <= 16
    np.testing.assert_array_equal(images.reshape(3, 64), demo.load_split("digits").x_test[:3])
    assert demo.example_labels("digits", 3).dtype == np.int64


def test_example_rows_repeat_past_the_split_and_are_copies() -> None:
    n_test = len(demo.load_split("breast_cancer").y_test)
    rows = demo.example_rows("breast_cancer", n_test + 2)
    np.testing.assert_array_equal(rows[n_test:], rows[:2])
    rows[0, 0] = -1.0  # callers own their copy
    assert demo.example_rows("breast_cancer", 1)[0, 0] != -1.0
    assert demo.example_rows("digits", 0).shape == (0, 1, 8, 8)


def test_example_rows_unknown_model() -> None:
    with pytest.raises(ValueError, match="unknown demo model 'iris'"):
        demo.example_rows("iris", 1)
    with pytest.raises(ValueError, match="n must be >= 0"):
        demo.example_rows("digits", -1)


def test_split_is_reproducible() -> None:
    demo.load_split.cache_clear()
    first = demo.load_split("digits").x_test.copy()
    demo.load_split.cache_clear()
    np.testing.assert_array_equal(demo.load_split("digits").x_test, first)


# -- idempotent and atomic -----------------------------------------------------------------


def copy_of(repo: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(repo, tmp_path / "repo", symlinks=True))


def test_second_build_does_not_rebuild(repo: Path, tmp_path: Path, trainings: list[str]) -> None:
    root = copy_of(repo, tmp_path)
    before = files_of(root)
    assert demo.build_demo_repository(root) == root
    assert trainings == []
    assert files_of(root) == before


def test_force_rebuilds(repo: Path, tmp_path: Path, trainings: list[str]) -> None:
    root = copy_of(repo, tmp_path)
    (root / "digits" / "config.yaml").write_text("description: edited\n")
    demo.build_demo_repository(root, force=True)
    assert sorted(trainings) == sorted(MODELS)
    assert "edited" not in (root / "digits" / "config.yaml").read_text()
    assert {p.name for p in tmp_path.iterdir()} <= {"repo", ".repo.lock"}


def test_stamp_of_another_fastserve_rebuilds(
    repo: Path, tmp_path: Path, trainings: list[str]
) -> None:
    root = copy_of(repo, tmp_path)
    stamp = json.loads((root / demo.STAMP_FILE).read_text())
    (root / demo.STAMP_FILE).write_text(json.dumps({**stamp, "fastserve": "0.0.1"}))
    demo.build_demo_repository(root)
    assert sorted(trainings) == sorted(MODELS)
    assert json.loads((root / demo.STAMP_FILE).read_text())["fastserve"] == stamp["fastserve"]


def test_missing_file_rebuilds(repo: Path, tmp_path: Path, trainings: list[str]) -> None:
    root = copy_of(repo, tmp_path)
    (root / "digits" / "1" / "model.onnx").unlink()
    demo.build_demo_repository(root)
    assert (root / "digits" / "1" / "model.onnx").is_file()
    assert trainings


def failing_on(model: str) -> Callable[[str], Any]:
    original = demo.train_demo_model

    def train(name: str) -> demo.TrainedDemoModel:
        if name == model:
            raise RuntimeError("simulated crash mid-build")
        return original(name)

    return train


def test_crash_mid_build_leaves_no_repository(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(demo, "train_demo_model", failing_on("digits"))
    root = tmp_path / "repo"
    with pytest.raises(RuntimeError, match="simulated crash"):
        demo.build_demo_repository(root)
    assert not root.exists()
    assert {p.name for p in tmp_path.iterdir()} <= {".repo.lock"}


def test_crash_mid_rebuild_keeps_the_old_repository(
    repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = copy_of(repo, tmp_path)
    before = files_of(root)
    monkeypatch.setattr(demo, "train_demo_model", failing_on("digits"))
    with pytest.raises(RuntimeError, match="simulated crash"):
        demo.build_demo_repository(root, force=True)
    assert files_of(root) == before
    assert {p.name for p in tmp_path.iterdir()} <= {"repo", ".repo.lock"}


def test_leftovers_of_a_killed_build_are_removed(
    repo: Path, tmp_path: Path, trainings: list[str]
) -> None:
    root = copy_of(repo, tmp_path)
    (root / demo.STAMP_FILE).write_text("{}")  # stale: forces a build
    half = tmp_path / ".repo.building-abc123"
    (half / "digits").mkdir(parents=True)
    demo.build_demo_repository(root)
    assert not half.exists()
    assert (root / demo.STAMP_FILE).is_file()


def test_never_replaces_a_folder_that_is_not_a_demo_repository(tmp_path: Path) -> None:
    root = tmp_path / "mine"
    root.mkdir()
    (root / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a fastserve demo repository"):
        demo.build_demo_repository(root, force=True)
    assert (root / "notes.txt").read_text() == "keep me"


def test_concurrent_builds_build_once(tmp_path: Path, trainings: list[str]) -> None:
    root = tmp_path / "repo"
    errors: list[BaseException] = []

    def build() -> None:
        try:
            demo.build_demo_repository(root)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=build) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(trainings) == sorted(MODELS)
    assert (root / demo.STAMP_FILE).is_file()


# -- where the default repository lives ----------------------------------------------------


def test_default_dir_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FASTSERVE_DEMO_DIR", str(tmp_path / "explicit"))
    assert demo.default_demo_dir() == tmp_path / "explicit"

    monkeypatch.delenv("FASTSERVE_DEMO_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert demo.default_demo_dir() == tmp_path / "xdg" / "fastserve" / "demo-repo"

    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert demo.default_demo_dir() == tmp_path / "home" / ".cache" / "fastserve" / "demo-repo"


def test_demo_repository_path_uses_the_cache(
    repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, trainings: list[str]
) -> None:
    root = copy_of(repo, tmp_path)
    monkeypatch.setenv("FASTSERVE_DEMO_DIR", str(root))
    assert demo.demo_repository_path() == root
    assert trainings == []

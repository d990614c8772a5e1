"""The bundled demo repository: real models trained on data that ships with scikit-learn.

``fastserve serve`` with no repository serves this. Nothing is downloaded: the data sets
are the ones inside scikit-learn (breast cancer, digits), training takes about a second,
and the result is cached under ``~/.cache/fastserve/demo-repo`` (or ``$XDG_CACHE_HOME``,
or ``$FASTSERVE_DEMO_DIR``).

The repository is built in a temporary folder next to its final place and renamed into
place, so a crash mid-build never leaves half a repository; a stamp file records which
fastserve built it, so a newer fastserve rebuilds it.

Layout::

    demo-repo/
      .fastserve-demo                  stamp: fastserve version and demo format
      breast_cancer/config.yaml
      breast_cancer/1/model.onnx       input FP32 [-1, 30] -> label INT64 [-1],
      breast_cancer/1/metadata.json                           probabilities FP32 [-1, 2]
      breast_cancer/1/schema.yaml      the reviewed value schema (demo_data/), checked per request
      breast_cancer/1/reference.json   the training split's statistics (fastserve profile)
      digits/config.yaml
      digits/1/model.onnx              image FP32 [-1, 1, 8, 8] -> label INT64 [-1],
      digits/1/metadata.json                                     probabilities FP32 [-1, 10]
      scorecard/...                    as breast_cancer (same data, binned features)

``breast_cancer`` costs onnxruntime ~5 µs a call, far less than an HTTP request, so
batching can save little on it. ``scorecard`` is the same diagnosis as a scorecard (every
feature cut into quantile bins, one-hot, then a logistic regression, as credit scorecards
are built): its ~360 graph nodes cost ~190 µs a call at any batch size up to 64, the
kind of model where batching pays.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import tempfile
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import onnx

from fastserve.config import MODEL_CONFIG_FILE
from fastserve.profiling import REFERENCE_FILE, Profile, profile_frame
from fastserve.schema import SCHEMA_FILE

__all__ = [
    "DEMO_MODELS",
    "DemoSplit",
    "TrainedDemoModel",
    "build_demo_repository",
    "default_demo_dir",
    "demo_repository_path",
    "example_labels",
    "example_rows",
    "load_split",
    "train_demo_model",
]

DEMO_MODELS: Final = ("breast_cancer", "digits", "scorecard")
_DATASET: Final = {
    "breast_cancer": "breast_cancer",
    "digits": "digits",
    "scorecard": "breast_cancer",
}
"""The scikit-learn data set each demo model is trained on."""
_SCORECARD_BINS: Final = 8
DEMO_VERSION: Final = "1"
"""The version folder each demo model is written to."""
DEMO_FORMAT: Final = 5
"""Bump when the demo models or their files change, so existing caches are rebuilt."""
STAMP_FILE: Final = ".fastserve-demo"
_REVIEWED_SCHEMA: Final = Path(__file__).parent / "demo_data" / "breast_cancer.schema.yaml"
"""The breast-cancer features' schema: profiled from the training split, then reviewed."""
METADATA_FILE: Final = "metadata.json"

_SEED: Final = 0
_TEST_SIZE: Final = 0.25
# Default domain 17 and ai.onnx.ml 3 load in every onnxruntime since 1.13; IR 9 is what
# onnx writes for them (onnx >= 1.16 would otherwise write an IR newer than many runtimes).
_TARGET_OPSET: Final = {"": 17, "ai.onnx.ml": 3}
_IR_VERSION: Final = 9

_CONFIG_TEMPLATE: Final = """\
# Demo model written by fastserve {fastserve_version} (fastserve.demo). Edits are kept
# until a newer fastserve rebuilds the demo repository.
description: {description}
backend: onnxruntime
batching:
  max_batch_size: 64
  preferred_batch_sizes: [64]
  max_queue_delay_us: 500
  max_queue_size: 1024
instance_count: 1
onnxruntime:
  execution_provider: auto
  intra_op_threads: 1
  inter_op_threads: 1
  graph_optimization: all
warmup: true
"""


_EXTRA_CONFIG: Final = {
    "digits": """\
preprocessing:
  image:               # raw grayscale pixels (UINT8 [N, height, width], any size) accepted too
    input: image
    mean: [0.0]
    std: [0.0625]      # pixel / 255 * 16: the 0..16 scale of the training images
""",
}
"""Config lines only some demo models have."""


@dataclass(frozen=True)
class DemoSplit:
    """A demo data set and its reproducible train/test split (features as float32)."""

    name: str
    x_train: npt.NDArray[np.float32]
    x_test: npt.NDArray[np.float32]
    y_train: npt.NDArray[np.int64]
    y_test: npt.NDArray[np.int64]
    feature_names: tuple[str, ...]
    class_names: tuple[str, ...]
    source: str


@dataclass(frozen=True)
class TrainedDemoModel:
    """A fitted scikit-learn pipeline, its ONNX form and the metadata written beside it."""

    name: str
    estimator: Any
    """The fitted scikit-learn Pipeline; it takes flat rows (digits: 64 pixels)."""
    onnx_model: onnx.ModelProto
    metadata: dict[str, Any] = field(default_factory=dict)
    description: str = ""


# -- data ----------------------------------------------------------------------------------


def _check_name(model: str) -> None:
    if model not in DEMO_MODELS:
        raise ValueError(f"unknown demo model {model!r}; the demo models are {list(DEMO_MODELS)}")


@functools.cache
def load_split(model: str) -> DemoSplit:
    """The data set of demo ``model`` split 75/25, stratified, with a fixed seed."""
    _check_name(model)
    if _DATASET[model] != model:
        return load_split(_DATASET[model])
    from sklearn.datasets import load_breast_cancer, load_digits
    from sklearn.model_selection import train_test_split

    if model == "breast_cancer":
        data = load_breast_cancer()
        feature_names = tuple(str(n) for n in data.feature_names)
        class_names = tuple(str(n) for n in data.target_names)
        source = "sklearn.datasets.load_breast_cancer"
    else:
        data = load_digits()
        feature_names = tuple(f"pixel_{r}_{c}" for r in range(8) for c in range(8))
        class_names = tuple(str(n) for n in data.target_names)
        source = "sklearn.datasets.load_digits"
    x = np.asarray(data.data, dtype=np.float32)
    y = np.asarray(data.target, dtype=np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=_TEST_SIZE, random_state=_SEED, stratify=y
    )
    for array in (x_train, x_test, y_train, y_test):
        array.flags.writeable = False  # cached and shared: callers get copies
    return DemoSplit(model, x_train, x_test, y_train, y_test, feature_names, class_names, source)


def _model_rows(model: str, flat: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """Flat feature rows in the layout the ONNX model takes."""
    rows = flat.reshape(-1, 1, 8, 8) if model == "digits" else flat
    # np.array rather than .copy(): numpy's stubs type .copy() as Any for Python 3.10
    return np.array(rows, copy=True)


def _test_indices(model: str, n: int) -> npt.NDArray[np.intp]:
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rows = len(load_split(model).y_test)
    return np.arange(n) % rows


def example_rows(model: str, n: int) -> npt.NDArray[np.float32]:
    """``n`` real rows from the held-out test split, shaped as the model's input.

    breast_cancer, scorecard: FP32 [n, 30]; digits: FP32 [n, 1, 8, 8] (pixels 0..16). Rows
    repeat in order when ``n`` is larger than the split (143 and 450 rows).
    """
    _check_name(model)
    split = load_split(model)
    return _model_rows(model, split.x_test[_test_indices(model, n)])


def example_labels(model: str, n: int) -> npt.NDArray[np.int64]:
    """The true class of each of the ``n`` rows that ``example_rows`` returns."""
    _check_name(model)
    return np.array(load_split(model).y_test[_test_indices(model, n)], copy=True)


# -- training ------------------------------------------------------------------------------


def train_demo_model(model: str) -> TrainedDemoModel:
    """Train demo ``model`` on its training split and convert it to ONNX (no I/O)."""
    _check_name(model)
    import skl2onnx
    import sklearn
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    split = load_split(model)
    classifier: Any
    features: Any
    if model == "breast_cancer":
        classifier = LogisticRegression(C=1.0, max_iter=1000)
        features = StandardScaler()
        description = (
            "Breast cancer diagnosis (Wisconsin diagnostic data, scikit-learn): 30 cell-nucleus "
            "features -> malignant (0) or benign (1). StandardScaler + LogisticRegression."
        )
        task = "binary classification"
    elif model == "scorecard":
        classifier = LogisticRegression(C=0.1, max_iter=2000)
        features = _per_feature_bins(split.x_train.shape[1])
        description = (
            "Breast cancer diagnosis as a scorecard: each of the 30 features cut into "
            f"{_SCORECARD_BINS} quantile bins (one-hot) + LogisticRegression. Same data and "
            "input as breast_cancer; ~360 ONNX nodes, so each call costs far more than a row."
        )
        task = "binary classification"
    else:
        classifier = MLPClassifier(hidden_layer_sizes=(64,), max_iter=300, random_state=_SEED)
        features = StandardScaler()
        description = (
            "Handwritten digit recognition (scikit-learn digits): 8x8 grey image, values "
            "0..16 -> digit 0-9. StandardScaler + MLPClassifier(64)."
        )
        task = "multiclass image classification"
    estimator = Pipeline([("features", features), ("classifier", classifier)])
    started = time.perf_counter()
    with warnings.catch_warnings():
        # A demo that stops a few iterations short is still a good demo; the iteration
        # count goes into the metadata.
        warnings.simplefilter("ignore", ConvergenceWarning)
        estimator.fit(split.x_train, split.y_train)
    train_seconds = time.perf_counter() - started
    accuracy = float(estimator.score(split.x_test, split.y_test))

    onnx_model = _convert(model, estimator, classifier, n_features=split.x_train.shape[1])
    metadata: dict[str, Any] = {
        "model": model,
        "version": DEMO_VERSION,
        "task": task,
        "description": description,
        "inputs": (
            [{"name": "input", "datatype": "FP32", "shape": [-1, 30]}]
            if model != "digits"
            else [{"name": "image", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
        ),
        "outputs": [
            {"name": "label", "datatype": "INT64", "shape": [-1]},
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, len(split.class_names)]},
        ],
        "feature_names": list(split.feature_names),
        "class_names": list(split.class_names),
        "test_accuracy": round(accuracy, 6),
        "test_rows": len(split.y_test),
        "train_rows": len(split.y_train),
        "training": {
            "dataset": split.source,
            "split": {
                "function": "sklearn.model_selection.train_test_split",
                "test_size": _TEST_SIZE,
                "random_state": _SEED,
                "stratify": "target",
                "features_dtype": "float32",
            },
            "estimator": [
                {"step": step, "class": type(est).__name__, "params": _plain_params(est)}
                for step, est in estimator.steps
            ],
            "iterations": int(np.max(getattr(classifier, "n_iter_", 0))),
            "train_seconds": round(train_seconds, 3),
            "scikit_learn": sklearn.__version__,
            "skl2onnx": skl2onnx.__version__,
            "onnx_opsets": {
                opset.domain or "ai.onnx": int(opset.version) for opset in onnx_model.opset_import
            },
            "onnx_ir_version": int(onnx_model.ir_version),
        },
    }
    return TrainedDemoModel(model, estimator, onnx_model, metadata, description)


def _per_feature_bins(n_features: int) -> Any:
    """Cut every feature on its own into quantile bins, one-hot encoded."""
    from sklearn.compose import ColumnTransformer
    from sklearn.preprocessing import KBinsDiscretizer

    return ColumnTransformer(
        [
            (
                f"bins_{i}",
                KBinsDiscretizer(
                    n_bins=_SCORECARD_BINS,
                    encode="onehot-dense",
                    strategy="quantile",
                    quantile_method="averaged_inverted_cdf",
                ),
                [i],
            )
            for i in range(n_features)
        ]
    )


def _plain_params(estimator: Any) -> dict[str, Any]:
    """The estimator's parameters that JSON can hold (nested estimators are left out)."""
    params = estimator.get_params(deep=False)
    return {key: value for key, value in sorted(params.items()) if _is_plain(value)}


def _is_plain(value: Any) -> bool:
    if value is None or isinstance(value, bool | int | float | str):
        return True
    return isinstance(value, tuple | list) and all(_is_plain(item) for item in value)


def _convert(model: str, estimator: Any, classifier: Any, *, n_features: int) -> onnx.ModelProto:
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    flat_input = "pixels" if model == "digits" else "input"
    onnx_model: onnx.ModelProto = convert_sklearn(
        estimator,
        name=f"fastserve_demo_{model}",
        initial_types=[(flat_input, FloatTensorType([None, n_features]))],
        # ZipMap would turn probabilities into a list of dicts: keep them a tensor.
        options={id(classifier): {"zipmap": False}},
        target_opset=dict(_TARGET_OPSET),
    )
    if model == "digits":
        _prepend_image_input(onnx_model.graph, flat_input)
    _tidy(onnx_model, model)
    onnx.checker.check_model(onnx_model)
    return onnx_model


def _prepend_image_input(graph: onnx.GraphProto, flat_input: str) -> None:
    """Make the graph take ``image`` [N, 1, 8, 8] and flatten it to its old flat input."""
    from onnx import TensorProto, helper

    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, [None, 1, 8, 8])
    flatten = helper.make_node("Flatten", ["image"], [flat_input], name="image_to_pixels", axis=1)
    graph.node.insert(0, flatten)
    del graph.input[:]
    graph.input.append(image)


def _tidy(onnx_model: onnx.ModelProto, model: str) -> None:
    # skl2onnx can list a domain twice; keep the highest version of each.
    opsets: dict[str, int] = {}
    for opset in onnx_model.opset_import:
        opsets[opset.domain] = max(opsets.get(opset.domain, 0), opset.version)
    del onnx_model.opset_import[:]
    for domain, version in sorted(opsets.items()):
        onnx_model.opset_import.append(onnx.helper.make_opsetid(domain, version))
    onnx_model.ir_version = min(onnx_model.ir_version, _IR_VERSION)
    onnx_model.doc_string = f"fastserve demo model '{model}' (fastserve.demo)"
    onnx.helper.set_model_props(onnx_model, {"fastserve.demo": model})


# -- the repository ------------------------------------------------------------------------


def default_demo_dir() -> Path:
    """``$FASTSERVE_DEMO_DIR``, else ``$XDG_CACHE_HOME/fastserve/demo-repo``, else
    ``~/.cache/fastserve/demo-repo``."""
    explicit = os.environ.get("FASTSERVE_DEMO_DIR")
    if explicit:
        return Path(explicit).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME", "")
    # The XDG spec says to ignore a relative XDG_CACHE_HOME.
    base = Path(cache) if cache and os.path.isabs(cache) else Path.home() / ".cache"
    return base / "fastserve" / "demo-repo"


def demo_repository_path() -> Path:
    """The demo repository at its default place, built there on first use."""
    return build_demo_repository(default_demo_dir())


def build_demo_repository(root: Path, *, force: bool = False) -> Path:
    """Build the demo repository at ``root`` unless an up-to-date one is already there.

    ``force`` rebuilds it anyway. The build happens in a temporary folder next to ``root``
    that is renamed into place, and concurrent builders wait for each other. A folder at
    ``root`` that is neither empty nor a demo repository is never replaced.
    """
    root = Path(root).expanduser().absolute()
    root.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(root):
        if not force and _is_current(root):
            return root
        if root.exists() and not _is_replaceable(root):
            raise FileExistsError(
                f"{root} exists and is not a fastserve demo repository; refusing to replace it"
            )
        _remove_leftovers(root)
        staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.building-", dir=root.parent))
        try:
            staging.chmod(0o755)  # mkdtemp makes it private; the repository is not secret
            _write_repository(staging)
            _swap_into_place(staging, root)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
    return root


def _stamp() -> dict[str, Any]:
    from fastserve import __version__

    return {"fastserve": __version__, "format": DEMO_FORMAT}


def _read_stamp(root: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((root / STAMP_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _is_current(root: Path) -> bool:
    stamp = _read_stamp(root)
    if stamp is None or any(stamp.get(key) != value for key, value in _stamp().items()):
        return False
    return all(
        (root / model / name).is_file()
        for model in DEMO_MODELS
        for name in (
            MODEL_CONFIG_FILE,
            f"{DEMO_VERSION}/model.onnx",
            f"{DEMO_VERSION}/{METADATA_FILE}",
        )
    )


def _is_replaceable(root: Path) -> bool:
    if root.is_symlink() or not root.is_dir():
        return False
    return (root / STAMP_FILE).is_file() or not any(root.iterdir())


def _remove_leftovers(root: Path) -> None:
    """Remove staging and retired folders of builds that crashed (the lock is held)."""
    for pattern in (f".{root.name}.building-*", f".{root.name}.old-*"):
        for leftover in root.parent.glob(pattern):
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)


def _swap_into_place(staging: Path, root: Path) -> None:
    if not root.exists():
        os.rename(staging, root)
        return
    retired = root.parent / f".{root.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(root, retired)
    try:
        os.rename(staging, root)
    except BaseException:
        os.rename(retired, root)
        raise
    shutil.rmtree(retired, ignore_errors=True)


def _write_repository(staging: Path) -> None:
    from fastserve import __version__

    for model in DEMO_MODELS:
        trained = train_demo_model(model)
        version_dir = staging / model / DEMO_VERSION
        version_dir.mkdir(parents=True)
        _write_file(version_dir / "model.onnx", trained.onnx_model.SerializeToString())
        _write_file(
            version_dir / METADATA_FILE,
            (json.dumps(trained.metadata, indent=2) + "\n").encode(),
        )
        if _DATASET[model] == "breast_cancer":
            _write_file(version_dir / SCHEMA_FILE, _REVIEWED_SCHEMA.read_bytes())
            profile = _training_profile(model, trained.estimator)
            reference = profile.reference.model_dump_json(indent=1) + "\n"
            _write_file(version_dir / REFERENCE_FILE, reference.encode())
        config = _CONFIG_TEMPLATE.format(
            fastserve_version=__version__, description=json.dumps(trained.description)
        ) + _EXTRA_CONFIG.get(model, "")
        _write_file(staging / model / MODEL_CONFIG_FILE, config.encode())
    # The stamp goes last: a folder with a stamp is a finished build.
    stamp = {**_stamp(), "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    _write_file(staging / STAMP_FILE, (json.dumps(stamp, indent=2) + "\n").encode())


def _training_profile(model: str, estimator: Any) -> Profile:
    """``fastserve profile`` of the training split with the model's answers on it: drift's
    reference, for the inputs and for the predictions."""
    import pandas as pd

    split = load_split(model)
    frame = pd.DataFrame(split.x_train.astype(np.float64), columns=list(split.feature_names))
    return profile_frame(
        frame,
        source=f"{split.source} (training split)",
        predictions=estimator.predict(split.x_train),
    )


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


@contextlib.contextmanager
def _build_lock(root: Path) -> Iterator[None]:
    """An exclusive lock beside ``root`` so two processes never build it at once."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: builds are still atomic, not serialized
        yield
        return
    lock_path = root.parent / f".{root.name}.lock"
    with open(lock_path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

"""The onnxruntime backend: signatures, agreement with scikit-learn, providers, hostile files."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from fastserve.backends import onnxruntime as backend
from fastserve.backends.onnxruntime import BatchRunError, OnnxRuntimeSession
from fastserve.config import OnnxRuntimeConfig
from fastserve.demo import build_demo_repository, load_split, train_demo_model
from fastserve.errors import InferenceFailed, ModelLoadError
from fastserve.protocol import ModelSignature, TensorSpec

CPU = OnnxRuntimeConfig(execution_provider="cpu")
IR_VERSION = 9
OPSET = 17
WEIGHTS = np.array([1.0, 2.0, 3.0], dtype=np.float32)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_repository(tmp_path_factory.mktemp("backend") / "repo")


def load(path: Path, config: OnnxRuntimeConfig = CPU, name: str = "m") -> OnnxRuntimeSession:
    return OnnxRuntimeSession.load(path, config, name=name, version="1")


def make_model(
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    initializers: list[onnx.TensorProto] | None = None,
) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=initializers or [])
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION
    )


def save(model: onnx.ModelProto, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return path


def identity(elem_type: int, shape: list[Any] | None) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", elem_type, shape)
    y = helper.make_tensor_value_info("y", elem_type, shape)
    return make_model([helper.make_node("Identity", ["x"], ["y"])], [x], [y])


def external_tensor(name: str, location: str) -> onnx.TensorProto:
    """3 floats stored in the external file ``location`` (relative to the model's folder)."""
    tensor = helper.make_tensor(name, TensorProto.FLOAT, [3], WEIGHTS.tobytes(), raw=True)
    onnx.external_data_helper.set_external_data(tensor, location=location, offset=0, length=12)
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    return tensor


def external_adder(location: str) -> onnx.ModelProto:
    """y = x + w, with ``w`` (3 floats) stored in the external file ``location``."""
    w = external_tensor("w", location)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])
    return make_model([helper.make_node("Add", ["x", "w"], ["y"])], [x], [y], [w])


def assert_load_error(path: Path, tmp_path: Path, *fragments: str) -> ModelLoadError:
    with pytest.raises(ModelLoadError) as info:
        load(path, name="bad")
    message = str(info.value)
    assert info.value.name == "bad" and info.value.version == "1"
    for absolute in {str(tmp_path), str(tmp_path.resolve())}:
        assert absolute not in message, message
    for fragment in fragments:
        assert fragment in message, message
    return info.value


# -- demo models -------------------------------------------------------------------------


def test_signature_of_breast_cancer(demo: Path) -> None:
    session = load(demo / "breast_cancer/1/model.onnx")
    assert session.signature == ModelSignature(
        inputs=(TensorSpec("input", "FP32", (-1, 30)),),
        outputs=(TensorSpec("label", "INT64", (-1,)), TensorSpec("probabilities", "FP32", (-1, 2))),
    )


def test_signature_of_digits(demo: Path) -> None:
    session = load(demo / "digits/1/model.onnx")
    assert session.signature == ModelSignature(
        inputs=(TensorSpec("image", "FP32", (-1, 1, 8, 8)),),
        outputs=(
            TensorSpec("label", "INT64", (-1,)),
            TensorSpec("probabilities", "FP32", (-1, 10)),
        ),
    )


@pytest.mark.parametrize("model", ["breast_cancer", "digits"])
def test_run_agrees_with_scikit_learn(model: str, tmp_path: Path) -> None:
    trained = train_demo_model(model)
    path = save(trained.onnx_model, tmp_path / model / "1" / "model.onnx")
    session = load(path)
    split = load_split(model)
    rows = split.x_test if model == "breast_cancer" else split.x_test.reshape(-1, 1, 8, 8)

    label, probabilities = session.run([rows])

    assert label.dtype == np.int64 and label.shape == (len(rows),)
    assert probabilities.dtype == np.float32
    assert probabilities.shape == (len(rows), len(split.class_names))
    np.testing.assert_array_equal(label, trained.estimator.predict(split.x_test))
    np.testing.assert_allclose(
        probabilities, trained.estimator.predict_proba(split.x_test), rtol=0, atol=1e-5
    )


def test_run_single_row_and_order_of_outputs(demo: Path) -> None:
    session = load(demo / "digits/1/model.onnx")
    rows = load_split("digits").x_test[:1].reshape(1, 1, 8, 8)
    label, probabilities = session.run([rows])
    assert label.shape == (1,) and probabilities.shape == (1, 10)
    assert label[0] == int(np.argmax(probabilities[0]))


@pytest.mark.parametrize("model", ["breast_cancer", "digits"])
def test_warmup_runs(demo: Path, model: str) -> None:
    session = load(demo / model / "1" / "model.onnx")
    session.warmup(64)
    session.warmup(1)


def test_provider_is_cpu_and_logged(demo: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="fastserve.backends.onnxruntime"):
        session = OnnxRuntimeSession.load(
            demo / "digits/1/model.onnx", OnnxRuntimeConfig(), name="digits", version="1"
        )
    if backend.cuda_device_available():
        pytest.skip("a CUDA device is present: auto picks CUDA")
    assert session.provider == "CPUExecutionProvider"
    messages = [
        record.getMessage()
        for record in caplog.records
        if record.name == "fastserve.backends.onnxruntime" and record.levelno == logging.INFO
    ]
    assert any("digits:1" in m and "CPUExecutionProvider" in m for m in messages), messages


def test_cpu_path_prints_nothing(demo: Path, capfd: pytest.CaptureFixture[str]) -> None:
    session = load(demo / "breast_cancer/1/model.onnx")
    session.warmup(8)
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_cuda_requested_without_device_is_an_error(demo: Path) -> None:
    if backend.cuda_device_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(
        ModelLoadError, match=r"execution_provider 'cuda' was requested but"
    ) as info:
        load(demo / "digits/1/model.onnx", OnnxRuntimeConfig(execution_provider="cuda"))
    assert str(demo) not in str(info.value)


def test_cuda_unknown_to_onnxruntime_is_an_error(
    demo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(backend.ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(ModelLoadError, match="no CUDAExecutionProvider"):
        load(demo / "digits/1/model.onnx", OnnxRuntimeConfig(execution_provider="cuda"))
    # auto quietly takes the CPU
    assert load(demo / "digits/1/model.onnx", OnnxRuntimeConfig()).provider == (
        "CPUExecutionProvider"
    )


def test_missing_native_core_means_no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "fastserve._core", None)  # makes the import fail
    assert backend.cuda_device_available() is False


def test_session_options_are_applied(demo: Path) -> None:
    config = OnnxRuntimeConfig(
        execution_provider="cpu",
        intra_op_threads=2,
        inter_op_threads=0,
        graph_optimization="disable",
    )
    session = load(demo / "breast_cancer/1/model.onnx", config)
    label, _ = session.run([load_split("breast_cancer").x_test[:5]])
    assert label.shape == (5,)


# -- signatures of hand-made models ----------------------------------------------------------


def test_symbolic_and_unknown_dims_are_dynamic(tmp_path: Path) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.INT32, ["batch", "seq", 4])
    y = helper.make_tensor_value_info("y", TensorProto.INT32, [None, None, 4])
    model = make_model([helper.make_node("Identity", ["x"], ["y"])], [x], [y])
    session = load(save(model, tmp_path / "1" / "model.onnx"))
    assert session.signature.inputs == (TensorSpec("x", "INT32", (-1, -1, 4)),)
    assert session.signature.outputs == (TensorSpec("y", "INT32", (-1, -1, 4)),)
    session.warmup(4)


@pytest.mark.parametrize(
    ("elem_type", "datatype"),
    [
        (TensorProto.FLOAT16, "FP16"),
        (TensorProto.DOUBLE, "FP64"),
        (TensorProto.BOOL, "BOOL"),
        (TensorProto.UINT8, "UINT8"),
        (TensorProto.INT64, "INT64"),
    ],
)
def test_datatypes(tmp_path: Path, elem_type: int, datatype: str) -> None:
    session = load(save(identity(elem_type, ["n", 2]), tmp_path / "1" / "model.onnx"))
    assert session.signature.inputs[0].datatype == datatype
    assert session.signature.outputs[0].datatype == datatype
    session.warmup(3)


def test_multiple_inputs_keep_their_order(tmp_path: Path) -> None:
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, ["n", 2])
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, ["n", 2])
    d = helper.make_tensor_value_info("d", TensorProto.FLOAT, ["n", 2])
    s = helper.make_tensor_value_info("s", TensorProto.FLOAT, ["n", 2])
    model = make_model(
        [helper.make_node("Sub", ["b", "a"], ["d"]), helper.make_node("Add", ["a", "b"], ["s"])],
        [b, a],
        [d, s],
    )
    session = load(save(model, tmp_path / "1" / "model.onnx"))
    assert [spec.name for spec in session.signature.inputs] == ["b", "a"]
    assert [spec.name for spec in session.signature.outputs] == ["d", "s"]
    ones = np.ones((3, 2), np.float32)
    d_out, s_out = session.run([ones * 5, ones * 2])
    np.testing.assert_array_equal(d_out, ones * 3)
    np.testing.assert_array_equal(s_out, ones * 7)


# -- run() errors ------------------------------------------------------------------------------


def reducing_model() -> onnx.ModelProto:
    """An output whose first dimension is not the batch's rows."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [0])
    node = helper.make_node("ReduceSum", ["x", "axes"], ["y"], keepdims=1)
    return make_model([node], [x], [y], [axes])


def test_output_rows_must_match(tmp_path: Path) -> None:
    session = load(save(reducing_model(), tmp_path / "1" / "model.onnx"))
    with pytest.raises(RuntimeError, match=r"output 'y' has shape \(1, 3\) for a batch of 4"):
        session.run([np.ones((4, 3), np.float32)])
    with pytest.raises(ModelLoadError, match="warmup at 8 rows failed"):
        session.warmup(8)


def test_run_errors_are_inference_failures(demo: Path) -> None:
    session = load(demo / "breast_cancer/1/model.onnx")
    with pytest.raises(BatchRunError, match="takes 1 inputs, got 2"):
        session.run([np.zeros((1, 30), np.float32)] * 2)
    with pytest.raises(InferenceFailed, match="onnxruntime failed on a batch of 2 rows"):
        session.run([np.zeros((2, 29), np.float32)])
    session.close()
    with pytest.raises(RuntimeError, match="closed"):
        session.run([np.zeros((1, 30), np.float32)])


# -- files that must not load ------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    assert_load_error(tmp_path / "1" / "model.onnx", tmp_path, "does not exist")


def test_directory_instead_of_file(tmp_path: Path) -> None:
    (tmp_path / "model.onnx").mkdir()
    assert_load_error(tmp_path / "model.onnx", tmp_path, "not a regular file")


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"")
    assert_load_error(path, tmp_path, "is empty")


def test_truncated_file(demo: Path, tmp_path: Path) -> None:
    data = (demo / "digits/1/model.onnx").read_bytes()
    path = tmp_path / "model.onnx"
    path.write_bytes(data[: len(data) // 2])
    assert_load_error(path, tmp_path, "not a valid ONNX model")


def test_random_bytes(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(np.random.default_rng(7).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    assert_load_error(path, tmp_path, "not a valid ONNX model")


def test_ir_version_too_new_is_reported_without_path(tmp_path: Path) -> None:
    model = identity(TensorProto.FLOAT, ["n", 2])
    model.ir_version = 99
    path = save(model, tmp_path / "sub" / "model.onnx")
    assert_load_error(path, tmp_path, "onnxruntime could not load the model")


def test_string_input(tmp_path: Path) -> None:
    path = save(identity(TensorProto.STRING, ["n", 1]), tmp_path / "model.onnx")
    assert_load_error(path, tmp_path, "BYTES/string inputs are not supported")


def test_unsupported_element_type(tmp_path: Path) -> None:
    path = save(identity(TensorProto.BFLOAT16, ["n", 1]), tmp_path / "model.onnx")
    assert_load_error(path, tmp_path, "BFLOAT16", "not supported")


def test_fixed_batch_dimension(tmp_path: Path) -> None:
    path = save(identity(TensorProto.FLOAT, [4, 3]), tmp_path / "model.onnx")
    assert_load_error(path, tmp_path, "fixed first dimension of 4", "dynamic")


def test_input_without_shape(tmp_path: Path) -> None:
    path = save(identity(TensorProto.FLOAT, None), tmp_path / "model.onnx")
    assert_load_error(path, tmp_path, "declares no shape", "dynamic")


def test_scalar_input(tmp_path: Path) -> None:
    path = save(identity(TensorProto.FLOAT, []), tmp_path / "model.onnx")
    assert_load_error(path, tmp_path, "is a scalar")


def test_non_tensor_output(tmp_path: Path) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2])
    seq = helper.make_tensor_sequence_value_info("s", TensorProto.FLOAT, None)
    model = make_model([helper.make_node("SequenceConstruct", ["x"], ["s"])], [x], [seq])
    path = save(model, tmp_path / "model.onnx")
    assert_load_error(path, tmp_path, "output 's' is a sequence, not a tensor")


# -- external data -----------------------------------------------------------------------------


def test_external_data_inside_the_folder_loads(tmp_path: Path) -> None:
    folder = tmp_path / "m" / "1"
    path = save(external_adder("weights/w.bin"), folder / "model.onnx")
    (folder / "weights").mkdir()
    (folder / "weights" / "w.bin").write_bytes(WEIGHTS.tobytes())
    (y,) = load(path).run([np.zeros((2, 3), np.float32)])
    np.testing.assert_array_equal(y, np.stack([WEIGHTS, WEIGHTS]))


def test_external_data_escaping_with_dotdot(tmp_path: Path) -> None:
    folder = tmp_path / "m" / "1"
    (tmp_path / "m" / "w.bin").parent.mkdir(parents=True)
    (tmp_path / "m" / "w.bin").write_bytes(WEIGHTS.tobytes())
    path = save(external_adder("../w.bin"), folder / "model.onnx")
    assert_load_error(path, tmp_path, "initializer 'w'", "outside the model folder")


def test_external_data_escaping_with_dotdot_inside_a_path(tmp_path: Path) -> None:
    folder = tmp_path / "m" / "1"
    (tmp_path / "secret.bin").write_bytes(WEIGHTS.tobytes())
    path = save(external_adder("sub/../../../secret.bin"), folder / "model.onnx")
    assert_load_error(path, tmp_path, "outside the model folder")


def test_external_data_with_absolute_path(tmp_path: Path) -> None:
    secret = tmp_path / "secret.bin"
    secret.write_bytes(WEIGHTS.tobytes())
    path = save(external_adder(str(secret)), tmp_path / "m" / "1" / "model.onnx")
    assert_load_error(path, tmp_path, "absolute path")


def test_external_data_through_a_symlink_out_of_the_folder(tmp_path: Path) -> None:
    secret = tmp_path / "secret.bin"
    secret.write_bytes(WEIGHTS.tobytes())
    folder = tmp_path / "m" / "1"
    path = save(external_adder("w.bin"), folder / "model.onnx")
    os.symlink(secret, folder / "w.bin")
    assert_load_error(path, tmp_path, "outside the model folder", "symlink")


def test_external_data_through_a_symlinked_subfolder(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "w.bin").write_bytes(WEIGHTS.tobytes())
    folder = tmp_path / "m" / "1"
    path = save(external_adder("data/w.bin"), folder / "model.onnx")
    os.symlink(outside, folder / "data", target_is_directory=True)
    assert_load_error(path, tmp_path, "outside the model folder")


def test_external_data_file_missing(tmp_path: Path) -> None:
    path = save(external_adder("w.bin"), tmp_path / "m" / "1" / "model.onnx")
    assert_load_error(path, tmp_path, "does not exist")


def test_external_data_in_a_subgraph_is_checked(tmp_path: Path) -> None:
    """A Constant inside an If branch can hold external data too."""
    secret = tmp_path / "secret.bin"
    secret.write_bytes(WEIGHTS.tobytes())
    value = external_tensor("c", "../../secret.bin")
    out = helper.make_tensor_value_info("c_out", TensorProto.FLOAT, [3])
    branch = helper.make_graph(
        [helper.make_node("Constant", [], ["c_out"], value=value)], "branch", [], [out]
    )
    cond = helper.make_tensor_value_info("cond", TensorProto.BOOL, ["n"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])
    node = helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=branch)
    path = save(make_model([node], [cond], [y]), tmp_path / "m" / "1" / "model.onnx")
    assert_load_error(path, tmp_path, "outside the model folder")


def test_scrub_removes_paths() -> None:
    text = "Load model from /srv/models/a/1/model.onnx failed: see C:\\models\\x.onnx"
    scrubbed = backend._scrub(text)
    assert "/srv" not in scrubbed and "C:\\" not in scrubbed
    assert backend._scrub("x" * 1000).endswith("...")

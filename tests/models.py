"""Small ONNX models built in tests with onnx.helper (no training, no downloads)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx
from onnx import TensorProto, helper

IR_VERSION = 9  # onnxruntime 1.31 loads IR <= 13; onnx 1.23 writes 14 by default
OPSET = 17


def save(model: onnx.ModelProto, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def adder(width: int = 4) -> onnx.ModelProto:
    """sum = a + b and diff = a - b, two FP32 inputs [-1, width]: results are checkable per row."""
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, ["batch", width])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, ["batch", width])
    total = helper.make_tensor_value_info("sum", TensorProto.FLOAT, ["batch", width])
    diff = helper.make_tensor_value_info("diff", TensorProto.FLOAT, ["batch", width])
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["a", "b"], ["sum"]),
            helper.make_node("Sub", ["a", "b"], ["diff"]),
        ],
        "adder",
        [a, b],
        [total, diff],
    )
    return helper.make_model(
        graph, ir_version=IR_VERSION, opset_imports=[helper.make_opsetid("", OPSET)]
    )


def add_adder(
    repo: Path, config: str = "batching:\n  max_batch_size: 8\n  max_queue_delay_us: 1000\n"
) -> None:
    save(adder(), repo / "adder" / "1" / "model.onnx")
    (repo / "adder" / "config.yaml").write_text(config)


def reference(model_file: Path, rows: Any) -> dict[str, Any]:
    """The model's own outputs for ``rows``, from a plain onnxruntime session (no server)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {name: rows}), strict=True))


def predict(repo: Path, model: str, rows: Any) -> dict[str, Any]:
    return reference(repo / model / "1" / "model.onnx", rows)


def tabular_body(row: Any, request_id: str | None = None) -> dict[str, Any]:
    """A V2 JSON request of one 30-feature row (breast_cancer, scorecard), with an id."""
    doc: dict[str, Any] = {
        "inputs": [{"name": "input", "shape": [1, 30], "datatype": "FP32", "data": row.tolist()}]
    }
    if request_id is not None:
        doc["id"] = request_id
    return doc


def linear(weights: list[float], bias: float = 0.0) -> onnx.ModelProto:
    """A regressor: y = x @ weights + bias, input ``x`` FP32 [-1, len(weights)], output ``y``
    FP32 [-1, 1]."""
    width = len(weights)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1])
    w = helper.make_tensor("w", TensorProto.FLOAT, [width, 1], weights)
    b = helper.make_tensor("b", TensorProto.FLOAT, [1], [bias])
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["xw"]),
            helper.make_node("Add", ["xw", "b"], ["y"]),
        ],
        "linear",
        [x],
        [y],
        initializer=[w, b],
    )
    return helper.make_model(
        graph, ir_version=IR_VERSION, opset_imports=[helper.make_opsetid("", OPSET)]
    )


def image_identity(
    elem_type: int = TensorProto.FLOAT16, shape: tuple[int, ...] = (3, 4, 4)
) -> onnx.ModelProto:
    """``pixels`` [batch, *shape] of ``elem_type`` in, the same tensor out as ``out``: shows
    exactly what an image pipeline fed the model."""
    x = helper.make_tensor_value_info("pixels", elem_type, ["batch", *shape])
    y = helper.make_tensor_value_info("out", elem_type, ["batch", *shape])
    graph = helper.make_graph([helper.make_node("Identity", ["pixels"], ["out"])], "echo", [x], [y])
    return helper.make_model(
        graph, ir_version=IR_VERSION, opset_imports=[helper.make_opsetid("", OPSET)]
    )


def sequence_model(
    length: int | str = "length", mask_type: int = TensorProto.INT64
) -> onnx.ModelProto:
    """``ids`` INT64 [batch, length] and ``mask`` [batch, length] in; out: ``tokens`` (the ids
    as the model got them), ``count`` (the mask's sum per row) and ``total`` (the sum of the
    masked ids per row), INT64 [batch]."""
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", length])
    mask = helper.make_tensor_value_info("mask", mask_type, ["batch", length])
    tokens = helper.make_tensor_value_info("tokens", TensorProto.INT64, ["batch", length])
    count = helper.make_tensor_value_info("count", TensorProto.INT64, ["batch"])
    total = helper.make_tensor_value_info("total", TensorProto.INT64, ["batch"])
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [1])
    graph = helper.make_graph(
        [
            helper.make_node("Identity", ["ids"], ["tokens"]),
            helper.make_node("Cast", ["mask"], ["mask64"], to=TensorProto.INT64),
            helper.make_node("ReduceSum", ["mask64", "axes"], ["count"], keepdims=0),
            helper.make_node("Mul", ["ids", "mask64"], ["masked"]),
            helper.make_node("ReduceSum", ["masked", "axes"], ["total"], keepdims=0),
        ],
        "sequences",
        [ids, mask],
        [tokens, count, total],
        initializer=[axes],
    )
    return helper.make_model(
        graph, ir_version=IR_VERSION, opset_imports=[helper.make_opsetid("", OPSET)]
    )

"""The benchmark suite's compute-heavy model: an MLP on the demo tabular input, where batching
(not the HTTP path) decides throughput.

    python bench/heavy_model.py [REPO] [--seconds 1.0]

Builds ``REPO/heavy/1/model.onnx`` (default REPO: a temporary folder) and
``REPO/heavy/config.yaml`` (batching on as in ``serving.CONFIGS["batching"]``, batches run on
the event loop), then measures onnxruntime ``session.run`` in-process with one intra-op
thread and prints the cost per row at batch 1, 8 and 64.

The model takes the demo models' input (``input`` FP32 [N, 30]) and answers as they do
(``label`` INT64 [N], ``probabilities`` FP32 [N, 2]), so the suite sends it the same bodies.
It is ``HIDDEN_LAYERS`` dense layers of ``WIDTH`` units with ReLU, then a 2-way layer,
softmax and argmax; the weights are seeded, so every build is byte-identical. At batch 1
each layer is a matrix-vector product that streams all its weights (a few hundred µs a
row in all); at batch 64 the same weights serve 64 rows at once, so a row costs a few
times less: the kind of model where forming batches is what pays.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import serving  # bench/serving.py: the batching config every fastserve bench uses

MODEL_NAME = "heavy"
FEATURES = 30
WIDTH = 768
HIDDEN_LAYERS = 6
SEED = 8
IR_VERSION = 13  # the newest onnxruntime here loads; onnx would write a newer one
OPSET = 17
CONFIG = serving.CONFIGS["batching"] + "execution: event_loop\n"


def build_model(
    width: int = WIDTH, layers: int = HIDDEN_LAYERS, seed: int = SEED
) -> onnx.ModelProto:
    """The MLP: input FP32 [N, 30] -> label INT64 [N], probabilities FP32 [N, 2]."""
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    weights: list[onnx.TensorProto] = []
    previous, fan_in = "input", FEATURES
    for i in range(layers + 1):
        last = i == layers
        units = 2 if last else width
        w = rng.standard_normal((fan_in, units)) * np.sqrt(2.0 / fan_in)  # He: ReLU keeps scale
        b = rng.standard_normal(units) * 0.01
        weights += [
            numpy_helper.from_array(w.astype(np.float32), f"w{i}"),
            numpy_helper.from_array(b.astype(np.float32), f"b{i}"),
        ]
        out = "logits" if last else f"dense{i}"
        nodes.append(helper.make_node("Gemm", [previous, f"w{i}", f"b{i}"], [out]))
        if not last:
            nodes.append(helper.make_node("Relu", [out], [f"relu{i}"]))
            previous, fan_in = f"relu{i}", units
    nodes += [
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        helper.make_node("ArgMax", ["logits"], ["label"], axis=1, keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        MODEL_NAME,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", FEATURES])],
        [
            helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]),
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 2]),
        ],
        weights,
    )
    model = helper.make_model(
        graph, ir_version=IR_VERSION, opset_imports=[helper.make_opsetid("", OPSET)]
    )
    onnx.checker.check_model(model)
    return model


def write_repository(repo: Path) -> Path:
    """Write ``repo/heavy/1/model.onnx`` and ``repo/heavy/config.yaml``; returns the model file."""
    model_file = repo / MODEL_NAME / "1" / "model.onnx"
    model_file.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(build_model(), str(model_file))
    (repo / MODEL_NAME / "config.yaml").write_text(CONFIG)
    return model_file


def per_row_us(model_file: Path, batch_sizes: list[int], seconds: float) -> dict[int, float]:
    """µs per row of in-process ``session.run`` (one thread) at each batch size."""
    rows = np.random.default_rng(0).standard_normal((1, FEATURES)).astype(np.float32)
    rate = serving.ceiling(model_file, rows, batch_sizes, seconds)
    return {size: 1e6 / rows_per_s for size, rows_per_s in rate.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("repo", type=Path, nargs="?", help="where to write (default: a temp dir)")
    parser.add_argument("--seconds", type=float, default=1.0, help="timing per batch size")
    args = parser.parse_args()
    repo = args.repo or Path(tempfile.mkdtemp(prefix="fastserve-heavy-"))
    model_file = write_repository(repo)
    print(f"wrote {model_file} ({model_file.stat().st_size / 1e6:.1f} MB)", flush=True)
    for size, us in per_row_us(model_file, [1, 8, 64], args.seconds).items():
        print(f"batch {size:>3}: {us:8.1f} µs per row, {us * size / 1000:.3f} ms per call")
    sys.stdout.flush()


if __name__ == "__main__":
    main()

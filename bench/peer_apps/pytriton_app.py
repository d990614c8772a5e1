"""PyTriton peer: the Triton server binary from the nvidia-pytriton wheel, dynamic batching
on, the ONNX model run by onnxruntime in this Python process (PyTriton's proxy backend).

    python pytriton_app.py MODEL_FILE --model-name NAME --http-port PORT --metrics-port PORT
                           --workspace DIR --max-batch-size 64 --max-delay-us 200

Triton's gRPC endpoint is off; its metrics endpoint stays on (its default) on its own port.
The python process that runs this is the parent of ``tritonserver``, which starts
Triton's python backend stub; the stub talks to this process over ZeroMQ and shared
memory. Started by bench/peers.py.
"""

from __future__ import annotations

import argparse

import numpy as np
from onnx_session import OnnxModel
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_file")
    parser.add_argument("--model-name", required=True)
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--metrics-port", type=int, required=True)
    parser.add_argument("--workspace", required=True)
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--max-delay-us", type=int, default=200)
    args = parser.parse_args()

    model = OnnxModel(args.model_file)

    # Triton wants at least one dimension per row: a per-row scalar output (the label,
    # [n]) goes out as [n, 1].
    shapes = {name: shape or (1,) for name, _, shape in model.outputs}

    @batch
    def infer(**inputs: np.ndarray) -> dict[str, np.ndarray]:
        outputs = model.run(inputs[model.input_name])
        return {name: value.reshape(-1, *shapes[name]) for name, value in outputs.items()}

    config = TritonConfig(
        http_address="127.0.0.1",
        http_port=args.http_port,
        allow_grpc=False,
        metrics_port=args.metrics_port,
        exit_timeout_secs=2,
    )
    with Triton(config=config, workspace=args.workspace) as triton:
        triton.bind(
            model_name=args.model_name,
            infer_func=infer,
            inputs=[Tensor(name=model.input_name, dtype=np.float32, shape=(model.input_width,))],
            outputs=[
                Tensor(name=name, dtype=dtype, shape=shapes[name])
                for name, dtype, _ in model.outputs
            ],
            config=ModelConfig(
                batching=True,
                max_batch_size=args.max_batch_size,
                batcher=DynamicBatcher(max_queue_delay_microseconds=args.max_delay_us),
            ),
        )
        triton.serve()


if __name__ == "__main__":
    main()

"""What one single-row request costs fastserve in-process, step by step, with no HTTP, next
to the whole path of the plain server of bench/baselines.py (parse, session.run, encode):

    taskset -c 0 python bench/path_cost.py [--model breast_cancer] [--requests 20000]
                                           [--encoding json|binary|msgpack]

Steps, as the server takes a plain request (bench/suite.py's one-row body in ``--encoding``;
binary: Triton's binary extension, binary answer asked for): decode (the body parsed, then
read into the batcher's arrays and checked against the signature by the version's native
``JsonRequestPlan``, ``codecs.decode_with_plan``), validate (the value schema), batcher
(submit, batch, onnxruntime, answer; max batch 1, event loop), encode (the answer). Then
decode and validate the Python way, which every other request takes (``decode_request``,
``validate_inputs``, ``validate_outputs``, the value schema). Prints microseconds per
request, the mean over --requests after a warm-up.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import orjson

import baselines  # bench/baselines.py
import suite  # bench/suite.py: the request bodies


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="breast_cancer")
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--encoding", choices=("json", "binary", "msgpack"), default="json")
    args = parser.parse_args()

    from fastserve.config import ModelConfig
    from fastserve.demo import build_demo_repository, example_rows
    from fastserve.http.codecs import (
        decode_request,
        decode_with_plan,
        encode_every_output_json,
        encode_response,
    )
    from fastserve.model import ServedModel
    from fastserve.protocol import InferenceRequest, InferenceResponse, OutputTensor
    from fastserve.validation import validate_inputs, validate_outputs

    demo = build_demo_repository(Path(tempfile.mkdtemp(prefix="fastserve-path-")) / "demo")
    model_file = demo / args.model / "1" / "model.onnx"
    row = example_rows(args.model, 1)
    body = orjson.dumps(
        {"inputs": [{"name": "input", "shape": list(row.shape), "datatype": "FP32",
                     "data": row.ravel().tolist()}]}
    )  # fmt: skip
    _, request_body, headers = suite.v2_request(args.model, row, args.encoding)
    kind, length = headers["Content-Type"], headers.get(suite.HEADER_LENGTH)
    n = args.requests

    plain = baselines.Model(model_file)
    for _ in range(2):  # warm-up, then measured
        started = time.perf_counter()
        for _ in range(n):
            _, rows = baselines.parse(body)
            outputs = plain.run(rows)
            orjson.dumps([{"data": o.ravel().tolist()} for o in outputs])
        plain_us = (time.perf_counter() - started) / n * 1e6

    async def ours() -> dict[str, float]:
        config = ModelConfig.model_validate(
            {
                "batching": {"max_batch_size": 1, "max_queue_delay_us": 0},
                "onnxruntime": {"intra_op_threads": 1, "execution_provider": "cpu"},
                "execution": "event_loop",
            }
        )
        model = ServedModel.load(args.model, "1", model_file, config)
        model.start(asyncio.get_running_loop())
        plan = model.json_plan
        assert plan is not None, f"{args.model} has no JsonRequestPlan"
        names = ("decode", "validate", "batcher", "encode", "python decode", "python validate")
        steps = dict.fromkeys(names, 0)
        try:
            for _round in range(2):  # warm-up, then measured
                steps = dict.fromkeys(steps, 0)
                for _ in range(n):
                    t0 = time.perf_counter_ns()
                    planned = decode_with_plan(
                        request_body, kind, length, plan, max_elements=len(request_body)
                    )
                    t1 = time.perf_counter_ns()
                    assert not isinstance(planned, InferenceRequest), "the plan gave it back"
                    arrays, _, binary = planned
                    if model.schema is not None:
                        model.schema.compiled.check(arrays[model.schema.input_index])
                    t2 = time.perf_counter_ns()
                    completion = await model.batcher.infer(arrays)
                    t3 = time.perf_counter_ns()
                    if args.encoding == "msgpack":
                        specs, answers = model.signature.outputs, completion.outputs
                        outputs = [
                            OutputTensor(s.name, s.datatype, a)
                            for s, a in zip(specs, answers, strict=True)
                        ]
                        response = InferenceResponse(model.name, model.version, outputs, id="r")
                        encode_response(response, InferenceRequest([], "r"), "msgpack")
                    else:
                        encode_every_output_json(model.name, model.version, "r",
                                                 model.signature.outputs, completion.outputs,
                                                 binary=binary)  # fmt: skip
                    t4 = time.perf_counter_ns()
                    request = decode_request(
                        request_body, kind, length, max_elements=len(request_body)
                    )
                    t5 = time.perf_counter_ns()
                    arrays = validate_inputs(request, model.accepts, max_batch_size=1)
                    validate_outputs(request, model.signature)
                    if model.schema is not None:
                        model.schema.compiled.check(arrays[model.schema.input_index])
                    t6 = time.perf_counter_ns()
                    spent = (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5)
                    for step, ns in zip(steps, spent, strict=True):
                        steps[step] += ns
        finally:
            await model.stop()
        return {step: ns / n / 1000 for step, ns in steps.items()}

    steps = asyncio.run(ours())
    python = {step: steps.pop(step) for step in ("python decode", "python validate")}
    print(f"{args.model}, one row, {args.encoding}, in-process, {n:,} requests (µs per request):")
    for step, us in steps.items():
        print(f"  fastserve {step:<9} {us:6.1f}")
    print(f"  fastserve total     {sum(steps.values()):6.1f}")
    print(
        f"  the Python way: decode {python['python decode']:.1f}, validate "
        f"{python['python validate']:.1f} (every request the plan does not take)"
    )
    print(f"  plain server's path {plain_us:6.1f}  (parse, session.run, encode)")


if __name__ == "__main__":
    main()

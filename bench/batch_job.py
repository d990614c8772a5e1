"""Rows/s of ``fastserve batch`` against its ceiling: a plain loop of ``session.run`` over
the same file in the same chunks, reading and writing with the same libraries.

    taskset -c 0 python bench/batch_job.py [--rows 1000000] [--rounds 5] [--format parquet]

Both sides read the input in chunks of ``--chunk-rows`` (pyarrow), call the demo tabular
model (``breast_cancer``, one onnxruntime thread, as its config says) and write the key and
both outputs to a Parquet (or CSV) file. The ceiling does nothing else: no validation, no
value schema, no reject file, no committed chunks. Model loading is left out of both.
Rounds alternate, and the figure is the median of each side; the ratio is what to read.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from fastserve.demo import build_demo_repository, load_split
from fastserve.offline.job import JobSpec, run_job
from fastserve.offline.predictors import LocalModel

MODEL = "breast_cancer"


def make_input(folder: Path, rows: int, fmt: str) -> Path:
    split = load_split(MODEL)
    rng = np.random.default_rng(0)
    x = split.x_train[rng.integers(0, len(split.x_train), rows)]
    x = (x * rng.normal(1, 0.01, x.shape)).astype(np.float32)
    table = pa.table({"id": np.arange(rows), **{n: x[:, j] for j, n in
                                                enumerate(split.feature_names)}})  # fmt: skip
    path = folder / f"rows.{fmt}"
    if fmt == "parquet":
        pq.write_table(table, path)
    else:
        pacsv.write_csv(table, path)
    return path


def ceiling(session: ort.InferenceSession, data: Path, out: Path, chunk_rows: int) -> float:
    """The plain loop: read a chunk, run the model on it, write the answers."""
    started = time.perf_counter()
    features = [n for n in load_split(MODEL).feature_names]
    if data.suffix == ".parquet":
        batches = pq.ParquetFile(data).iter_batches(batch_size=chunk_rows)
    else:
        batches = pacsv.open_csv(data, read_options=pacsv.ReadOptions(block_size=4 << 20))
    writer = None
    for batch in batches:
        x = np.stack([batch.column(n).to_numpy() for n in features], axis=1).astype(np.float32)
        label, probs = session.run(None, {"input": x})
        offsets = pa.array(np.arange(len(x) + 1, dtype=np.int32) * probs.shape[1])
        table = pa.table({
            "id": batch.column("id"),
            "label": label,
            "probabilities": pa.ListArray.from_arrays(offsets, pa.array(probs.reshape(-1))),
        })  # fmt: skip
        if writer is None:
            writer = pq.ParquetWriter(out, table.schema)
        writer.write_table(table)
    assert writer is not None
    writer.close()
    return time.perf_counter() - started


async def job(model: LocalModel, data: Path, out: Path, chunk_rows: int, fmt: str) -> float:
    spec = JobSpec(
        input=data,
        input_format=fmt,  # type: ignore[arg-type]
        output=out,
        output_format="parquet",
        rejects=out.with_suffix(".rejects.jsonl"),
        model=MODEL,
        source="repo:bench",
        key="id",
        chunk_rows=chunk_rows,
        overwrite=True,
        progress="off",
    )
    summary = await run_job(spec, model)
    assert summary.predicted == summary.rows, summary
    return summary.seconds


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--chunk-rows", type=int, default=65536)
    parser.add_argument("--batch-size", type=int, default=16384)
    parser.add_argument("--format", choices=["parquet", "csv"], default="parquet")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        repo = build_demo_repository(folder / "repo")
        data = make_input(folder, args.rows, args.format)
        options = ort.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(repo / MODEL / "1" / "model.onnx"), options,
                                       providers=["CPUExecutionProvider"])  # fmt: skip
        plain, ours, paired, cpu = [], [], [], []
        async with LocalModel(repo, MODEL, "1", args.batch_size) as model:
            ceiling(session, data, folder / "warm.parquet", args.chunk_rows)  # warm-up
            await job(model, data, folder / "warm-job.parquet", args.chunk_rows, args.format)
            for _ in range(args.rounds):
                cpu_start = time.process_time()
                plain.append(ceiling(session, data, folder / "c.parquet", args.chunk_rows))
                cpu_mid = time.process_time()
                ours.append(await job(model, data, folder / "j.parquet", args.chunk_rows,
                                      args.format))  # fmt: skip
                cpu_end = time.process_time()
                paired.append(plain[-1] / ours[-1])
                cpu.append((cpu_mid - cpu_start) / (cpu_end - cpu_mid))
        ceiling_out = pq.read_table(folder / "c.parquet")
        job_out = pq.read_table(folder / "j.parquet")
        # (a CSV key stays text in the job's output: compare it as text)
        same = all(
            ceiling_out.column(n).equals(job_out.column(n)) for n in ("label", "probabilities")
        ) and ceiling_out.column("id").cast(pa.string()).equals(
            job_out.column("id").cast(pa.string())
        )
        a, b = statistics.median(plain), statistics.median(ours)
        print(
            f"{args.rows:,} rows of {args.format}, chunks of {args.chunk_rows:,}, "
            f"model calls of {args.batch_size:,} rows; median of {args.rounds} rounds"
        )
        print(f"  session.run loop (ceiling): {args.rows / a:12,.0f} rows/s  ({a:.2f} s)")
        print(f"  fastserve batch           : {args.rows / b:12,.0f} rows/s  ({b:.2f} s)")
        print(f"  ratio: {a / b:.2f}x the ceiling (target >= 0.8)")
        shown = ", ".join(f"{r:.2f}" for r in paired)
        print(f"  paired rounds: {shown}; median {statistics.median(paired):.2f}x")
        print(
            f"  CPU time: {statistics.median(cpu):.2f}x the ceiling's (median of the rounds;"
            " the job's includes its model load's warm state, not the load)"
        )
        print(f"  same answers: {'yes' if same else 'NO'}")


if __name__ == "__main__":
    asyncio.run(main())

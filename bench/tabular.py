"""Tabular preprocessing on the CPU: rows of 8 numeric features (standard scaling, NaN filled
with the median) and 2 string categories of 10 values each (one-hot), into one float32
batch of 28 columns, three ways in one run.

    python bench/tabular.py [--rows 100000] [--repeats 7]

- fastserve: the server's path for a request's feature columns (``TabularPreprocessor.apply``:
  float64 conversion, category lookup, then ``_core.TabularKernel``'s one pass per row);
- fastserve kernel: ``_core.TabularKernel`` alone, on codes already looked up;
- scikit-learn: a fitted ``ColumnTransformer`` (``SimpleImputer`` + ``StandardScaler``,
  ``OneHotEncoder``) on a pandas DataFrame, what a user's own server would run.

Each figure is the median of --repeats runs; all three give the same numbers.
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np

from preprocess import timed  # bench/preprocess.py: median of repeats after a warm-up


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    import pandas as pd
    from sklearn.compose import ColumnTransformer
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    from fastserve.config import TabularPipeline
    from fastserve.preprocessing import TabularPreprocessor
    from fastserve.profiling import profile_frame
    from fastserve.protocol import InferenceRequest, InputTensor, ModelSignature, TensorSpec

    rng = np.random.default_rng(0)
    rows = args.rows
    numeric = [f"x{i}" for i in range(8)]
    categories = [f"c{i}" for i in range(10)]
    frame = pd.DataFrame({name: rng.normal(i, 1 + i, rows) for i, name in enumerate(numeric)})
    frame.iloc[::50, 0] = np.nan  # some missing values to fill
    for name in ("colour", "shape"):
        frame[name] = rng.choice(categories, rows)

    reference = profile_frame(frame[numeric], source="bench").reference
    pipeline = TabularPipeline.model_validate(
        {
            "input": "input",
            "features": [{"name": n, "scale": "standard", "fill": "median"} for n in numeric]
            + [{"name": n, "categories": categories} for n in ("colour", "shape")],
        }
    )
    width = len(numeric) + 2 * len(categories)
    signature = ModelSignature(
        (TensorSpec("input", "FP32", (-1, width)),), (TensorSpec("y", "FP32", (-1, 1)),)
    )
    ours = TabularPreprocessor.for_model(pipeline, signature, reference)
    inputs = [InputTensor(n, "FP64", (rows,), frame[n].to_numpy(np.float64)) for n in numeric] + [
        InputTensor(n, "BYTES", (rows,), np.array([v.encode() for v in frame[n]], dtype=object))
        for n in ("colour", "shape")
    ]
    request = InferenceRequest(inputs)
    columns = [t.data for t in inputs[: len(numeric)]] + [
        np.searchsorted(categories, frame[n].to_numpy()).astype(np.int64)
        for n in ("colour", "shape")
    ]

    # scikit-learn doing the same: fill with the reference's median, scale with the
    # statistics of the values present (as the reference has them)
    medians = [f.quantiles[50] for f in reference.features]
    scaler = StandardScaler().fit(frame[numeric])  # ignores NaN when it fits
    sklearn = ColumnTransformer(
        [
            (
                "numbers",
                make_pipeline(SimpleImputer(strategy="constant", fill_value=0.0), scaler),
                numeric,
            ),
            ("categories", OneHotEncoder(categories=[categories] * 2), ["colour", "shape"]),
        ],
        sparse_threshold=0,
    ).fit(frame)
    imputer, fitted = (step for _, step in sklearn.named_transformers_["numbers"].steps)
    imputer.statistics_ = np.asarray(medians)
    fitted.mean_, fitted.scale_ = scaler.mean_, scaler.scale_

    def fastserve() -> Any:
        return ours.apply(request)[0].inputs[-1].data

    def kernel() -> Any:
        return ours.kernel.run(columns, rows)

    def with_sklearn() -> Any:
        return sklearn.transform(frame).astype(np.float32)

    a, b = fastserve(), kernel()
    assert np.array_equal(a, b)
    c = with_sklearn()
    difference = float(np.abs(a - c).max())
    seconds = {
        "fastserve (lookup + kernel)": timed(fastserve, args.repeats),
        "fastserve kernel alone": timed(kernel, args.repeats),
        "scikit-learn ColumnTransformer": timed(with_sklearn, args.repeats),
    }
    print(f"{rows:,} rows: 8 numbers (median fill, standard scale) + 2 one-hot categories "
          f"of 10 -> {width} float32 columns")  # fmt: skip
    print("| pipeline | ms | rows/s |\n|---|---:|---:|")
    for name, s in seconds.items():
        print(f"| {name} | {s * 1000:.1f} | {rows / s:,.0f} |")
    base = seconds["scikit-learn ColumnTransformer"]
    print(f"fastserve / scikit-learn: {base / seconds['fastserve (lookup + kernel)']:.1f}x faster")
    print(f"largest difference from scikit-learn: {difference:.2e}")


if __name__ == "__main__":
    main()

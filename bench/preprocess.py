"""Image preprocessing on the CPU: 64 images 480x640x3 uint8 -> 224x224, normalized with the
ImageNet mean/std, CHW float32, three ways in one run.

    python bench/preprocess.py [--images 64] [--repeats 7] [--threads 0]

- fastserve: ``_core.preprocess_images``, one fused pass per output row (resize, normalize,
  lay out) written into the batch buffer, rows across threads (0: every core), GIL released;
- numpy: the same pipeline in numpy (tests/reference_preprocess.py, float64);
- OpenCV: ``cv2.resize`` (INTER_LINEAR, SIMD, its own threads) per image, then the
  normalization and the HWC -> CHW transpose in float32 numpy, into one batch.

With a CUDA device visible, also the CUDA pipeline (``_core.CudaImagePipeline``): into a
device batch (pinned staging, copy and kernel on its stream), and with the copy back.

Also timed, for scale: the fastserve kernel writing FP16, and a batch of JPEG files (the
same images, quality 90) decoded by Pillow, as the server does for encoded inputs, before the
kernel.

Each figure is the median of --repeats runs. Target (issue 7): >= 5x numpy and not slower
than OpenCV.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from reference_preprocess import preprocess

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def timed(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up
    runs = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - started)
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()

    import cv2
    from PIL import Image

    from fastserve import _core

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (480, 640, 3), dtype=np.uint8) for _ in range(args.images)]
    scale, shift = 1.0 / (255.0 * STD), -MEAN / STD

    def ours() -> np.ndarray:
        return _core.preprocess_images(
            images, 224, 224, MEAN.tolist(), STD.tolist(), threads=args.threads
        )

    def ours_fp16() -> np.ndarray:
        return _core.preprocess_images(
            images, 224, 224, MEAN.tolist(), STD.tolist(), dtype="float16", threads=args.threads
        )

    jpegs = []
    for image in images:
        out = io.BytesIO()
        Image.fromarray(image).save(out, format="JPEG", quality=90)
        jpegs.append(out.getvalue())

    def decode_jpegs() -> list[np.ndarray]:
        return [np.asarray(Image.open(io.BytesIO(j)).convert("RGB")) for j in jpegs]

    def with_numpy() -> np.ndarray:
        return np.stack([preprocess(i, 224, 224, MEAN, STD) for i in images])

    def with_opencv() -> np.ndarray:
        out = np.empty((len(images), 3, 224, 224), np.float32)
        for k, image in enumerate(images):
            resized = cv2.resize(image, (224, 224), interpolation=cv2.INTER_LINEAR)
            out[k] = (resized.astype(np.float32) * scale + shift).transpose(2, 0, 1)
        return out

    agree = np.abs(ours() - with_opencv()).max() * 255 * STD.max()
    cuda = {}
    if _core.cuda_available():
        gpu = _core.CudaImagePipeline(224, 224, MEAN.tolist(), STD.tolist())
        assert np.abs(gpu.run_to_host(images) - ours()).max() < 1e-5
        cuda = {
            "CUDA, into a device batch": timed(lambda: gpu.run(images), args.repeats),
            "CUDA, copied back to the host": timed(lambda: gpu.run_to_host(images), args.repeats),
        }
    seconds = {
        "fastserve": timed(ours, args.repeats),
        "numpy": timed(with_numpy, max(1, args.repeats // 3)),
        "OpenCV + numpy": timed(with_opencv, args.repeats),
        "fastserve, FP16 output": timed(ours_fp16, args.repeats),
        "Pillow JPEG decode (one thread)": timed(decode_jpegs, max(1, args.repeats // 3)),
        **cuda,
    }
    print(f"{args.images} images 480x640x3 -> 224x224 CHW float32, normalized; "
          f"cv2 {cv2.__version__}, {cv2.getNumThreads()} OpenCV threads")  # fmt: skip
    print("| pipeline | ms per batch | images/s |\n|---|---:|---:|")
    for name, s in seconds.items():
        print(f"| {name} | {s * 1000:.1f} | {args.images / s:,.0f} |")
    print(
        f"fastserve / numpy: {seconds['numpy'] / seconds['fastserve']:.1f}x faster (target >= 5x)"
    )
    print(
        f"fastserve / OpenCV: {seconds['OpenCV + numpy'] / seconds['fastserve']:.2f}x (target >= 1)"
    )
    print(f"largest difference from OpenCV: {agree:.2f} pixel levels")
    for name, s in cuda.items():
        print(f"{name} / fastserve CPU kernel: {seconds['fastserve'] / s:.1f}x faster")
    if not cuda:
        print("no CUDA device visible: the CUDA pipeline was not timed")


if __name__ == "__main__":
    main()

"""numpy reference of the native image preprocessing (``_core.preprocess_images``): the
same bilinear resize with half-pixel centers (OpenCV's INTER_LINEAR), aspect policy,
normalization and layout, written for clarity, not speed."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def taps(
    out: int, src: int, offset: float, extent: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    pos = (np.arange(out) + 0.5) * (extent / out) - 0.5 + offset
    pos = np.maximum(pos, 0.0)
    lo = np.floor(pos).astype(np.int64)
    frac = pos - lo
    edge = lo >= src - 1
    lo[edge], frac[edge] = src - 1, 0.0
    return lo, np.minimum(lo + 1, src - 1), frac


def preprocess(
    image: np.ndarray,
    out_h: int,
    out_w: int,
    mean: Sequence[float],
    std: Sequence[float],
    aspect: str = "stretch",
    layout: str = "chw",
) -> np.ndarray:
    pixels = image.reshape(image.shape[0], image.shape[1], -1).astype(np.float64)
    h, w = pixels.shape[:2]
    y0, x0, hh, ww = 0.0, 0.0, float(h), float(w)
    if aspect == "shorter_side":
        scale = max(out_h / h, out_w / w)
        hh, ww = out_h / scale, out_w / scale
        y0, x0 = (h - hh) / 2, (w - ww) / 2
    ylo, yhi, wy = taps(out_h, h, y0, hh)
    xlo, xhi, wx = taps(out_w, w, x0, ww)
    wx = wx[None, :, None]
    top = pixels[ylo][:, xlo] + (pixels[ylo][:, xhi] - pixels[ylo][:, xlo]) * wx
    bottom = pixels[yhi][:, xlo] + (pixels[yhi][:, xhi] - pixels[yhi][:, xlo]) * wx
    value = top + (bottom - top) * wy[:, None, None]
    normalized = (value / 255.0 - np.asarray(mean)) / np.asarray(std)
    out = normalized.transpose(2, 0, 1) if layout == "chw" else normalized
    return np.ascontiguousarray(out, dtype=np.float32)

"""Loss curves and frame strips as PNG, with numpy and zlib only (no plotting library)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189)]


def write_png(path: str | Path, rgb: np.ndarray) -> None:
    """(H, W, 3) uint8 -> an 8-bit RGB PNG."""
    height, width, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(height))  # filter 0 per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9))
    Path(path).write_bytes(png + chunk(b"IEND", b""))


def smooth(values: list[float], window: int) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)
    if len(x) < window or window < 2:
        return x
    kernel = np.ones(window) / window
    return np.convolve(x, kernel, mode="valid")


def write_loss_plot(
    path: str | Path, curves: dict[str, list[float]], width: int = 480, height: int = 160
) -> None:
    """One panel per non-empty curve, side by side: log10(loss), smoothed, on a light grid.
    No text rendering: panel order is the dict's order (left to right), colours COLOURS."""
    panels = [(name, v) for name, v in curves.items() if v]
    if not panels:
        return
    canvas = np.full((height, width * len(panels), 3), 255, dtype=np.uint8)
    for p, (_, values) in enumerate(panels):
        y = np.log10(np.maximum(smooth(values, max(1, len(values) // 100)), 1e-8))
        x0, pad = p * width, 8
        box = canvas[:, x0 : x0 + width]
        box[pad::20, pad:-pad] = 230  # horizontal grid lines
        box[pad:-pad, pad] = 0  # axes
        box[-pad, pad:-pad] = 0
        lo, hi = float(y.min()), float(y.max())
        span = hi - lo or 1.0
        xs = np.linspace(pad, width - pad - 1, num=len(y))
        ys = (height - pad - 1) - (y - lo) / span * (height - 2 * pad - 1)
        # draw densely so the curve is connected
        dense = np.linspace(0, len(y) - 1, num=max(2 * width, len(y)))
        px = np.interp(dense, np.arange(len(y)), xs).astype(int)
        py = np.interp(dense, np.arange(len(y)), ys).astype(int)
        box[np.clip(py, 0, height - 1), np.clip(px, 0, width - 1)] = COLOURS[p % len(COLOURS)]
    write_png(path, canvas)


def frame_strip(frames: np.ndarray, count: int, gap: int = 2) -> np.ndarray:
    """`count` frames evenly spaced over (T, H, W, 3), side by side with white gaps."""
    picks = np.linspace(0, len(frames) - 1, num=count).round().astype(int)
    h, w = frames.shape[1:3]
    strip = np.full((h, count * w + (count - 1) * gap, 3), 255, dtype=np.uint8)
    for i, f in enumerate(picks):
        strip[:, i * (w + gap) : i * (w + gap) + w] = frames[f]
    return strip

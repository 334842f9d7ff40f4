"""Client media in: image and video headers read by hand, pixels decoded with PyAV.

The header probes read only a few bytes (PNG IHDR, JPEG SOF, MP4 stsd), so an image bomb is
refused before any decoder allocates its frame. Decoding runs in the server's thread pool.
"""

from __future__ import annotations

import bisect
import io
from collections import deque
from collections.abc import Iterator

import av
import numpy as np

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers: C0-CF except DHT (C4), JPG (C8) and DAC (CC).
_JPEG_SOF = {m for m in range(0xC0, 0xD0)} - {0xC4, 0xC8, 0xCC}
MAX_VIDEO_FRAMES_DECODED = 24 * 600  # a prefix that decodes to more is refused


class MediaError(ValueError):
    """Unreadable or refused media; the message says why, the caller names the field."""


# ---- header probes (no decoding) --------------------------------------------------------------


def probe_image(data: bytes) -> tuple[str, int, int]:
    """(format, width, height) of a PNG or JPEG from its header."""
    if data.startswith(PNG_SIGNATURE):
        if len(data) < 24 or data[12:16] != b"IHDR":
            raise MediaError("truncated PNG header")
        return "png", int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if data.startswith(b"\xff\xd8"):
        width, height = _jpeg_size(data)
        return "jpeg", width, height
    raise MediaError("not a JPEG or PNG image")


def _jpeg_size(data: bytes) -> tuple[int, int]:
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            raise MediaError("corrupt JPEG header")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
            continue
        if marker in _JPEG_SOF:
            if i + 9 > len(data):
                break
            return int.from_bytes(data[i + 7 : i + 9], "big"), int.from_bytes(
                data[i + 5 : i + 7], "big"
            )
        i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    raise MediaError("JPEG without a frame header")


def _boxes(data: bytes, start: int, end: int) -> Iterator[tuple[bytes, int, int]]:
    """(type, payload start, box end) of the ISO-BMFF boxes in data[start:end]."""
    pos = start
    while pos + 8 <= end:
        size, kind, header = int.from_bytes(data[pos : pos + 4], "big"), data[pos + 4 : pos + 8], 8
        if size == 1 and pos + 16 <= end:
            size, header = int.from_bytes(data[pos + 8 : pos + 16], "big"), 16
        elif size == 0:
            size = end - pos
        if size < header or pos + size > end:
            return
        yield kind, pos + header, pos + size
        pos += size


def _child(data: bytes, start: int, end: int, kind: bytes) -> tuple[int, int] | None:
    return next(((s, e) for k, s, e in _boxes(data, start, end) if k == kind), None)


def probe_mp4(data: bytes) -> tuple[int, int]:
    """(width, height) of the first video track, from its sample description."""
    if _child(data, 0, len(data), b"ftyp") is None:
        raise MediaError("not an MP4 (no ftyp box)")
    moov = _child(data, 0, len(data), b"moov")
    if moov is None:
        raise MediaError("MP4 without a moov box (truncated?)")
    for kind, start, end in _boxes(data, *moov):
        if kind != b"trak":
            continue
        mdia = _child(data, start, end, b"mdia")
        hdlr = mdia and _child(data, *mdia, b"hdlr")
        if not hdlr or data[hdlr[0] + 8 : hdlr[0] + 12] != b"vide":
            continue
        minf = _child(data, *mdia, b"minf")
        stbl = minf and _child(data, *minf, b"stbl")
        stsd = stbl and _child(data, *stbl, b"stsd")
        if stsd and stsd[0] + 8 + 36 <= stsd[1]:
            entry = stsd[0] + 8  # skip version, flags and entry_count
            # VisualSampleEntry: size, type, 6 reserved, data ref, 16 pre-defined, then w, h
            w = int.from_bytes(data[entry + 32 : entry + 34], "big")
            h = int.from_bytes(data[entry + 34 : entry + 36], "big")
            return w, h
    raise MediaError("MP4 without a video track")


# ---- decoding --------------------------------------------------------------------------------


def decode_image(data: bytes, width: int, height: int, max_pixels: int) -> np.ndarray:
    """uint8 (height, width, 3) RGB, scaled without keeping the aspect."""
    try:
        with av.open(io.BytesIO(data)) as container:
            frame = next(container.decode(video=0))
            _check_pixels(frame.width, frame.height, max_pixels)
            return frame.reformat(width, height, format="rgb24").to_ndarray()
    except (av.FFmpegError, StopIteration, IndexError) as e:
        raise MediaError(f"cannot decode the image ({e})") from e


def decode_video_tail(
    data: bytes, width: int, height: int, max_pixels: int, fps: int, frames: int
) -> np.ndarray:
    """The last `frames` frames resampled to `fps`, uint8 (frames, height, width, 3) RGB."""
    try:
        times, images = _decode_tail(data, width, height, max_pixels, (frames + 1) / fps)
    except av.FFmpegError as e:
        raise MediaError(f"cannot decode the video ({e})") from e
    if not images:
        raise MediaError("the video has no frames")
    span = times[-1] - times[0]
    available = int(span * fps + 1e-6) + 1
    if available < frames:
        raise MediaError(
            f"the video gives {available} frames at {fps} fps; at least {frames} "
            f"({frames / fps:.2f} s) are needed"
        )
    targets = [times[-1] - (frames - 1 - k) / fps for k in range(frames)]
    # each output frame shows the newest source frame at or before its time
    picks = [max(0, bisect.bisect_right(times, t + 1e-6) - 1) for t in targets]
    return np.stack([images[i] for i in picks])


def _decode_tail(
    data: bytes, width: int, height: int, max_pixels: int, keep_s: float
) -> tuple[list[float], list[np.ndarray]]:
    """Seek near the end, decode to the last frame, keep those within keep_s of it."""
    kept: deque[tuple[float, np.ndarray]] = deque()
    with av.open(io.BytesIO(data)) as container:
        if not container.streams.video:
            raise MediaError("no video stream")
        stream = container.streams.video[0]
        _check_pixels(stream.codec_context.width, stream.codec_context.height, max_pixels)
        duration_s = container.duration / 1e6 if container.duration else None
        if duration_s is not None and duration_s > keep_s + 1.0:
            target = (duration_s - keep_s - 1.0) / float(stream.time_base or 1)
            container.seek(int(target), stream=stream, backward=True)
        rate = float(stream.average_rate or 24)
        for n, frame in enumerate(container.decode(stream)):
            if n >= MAX_VIDEO_FRAMES_DECODED:
                raise MediaError(
                    f"the video decodes to more than {MAX_VIDEO_FRAMES_DECODED} frames"
                )
            _check_pixels(frame.width, frame.height, max_pixels)
            t = frame.time if frame.time is not None else n / rate
            kept.append((t, frame.reformat(width, height, format="rgb24").to_ndarray()))
            while kept and kept[0][0] < t - keep_s:
                kept.popleft()
    ordered = sorted(kept, key=lambda item: item[0])
    return [t for t, _ in ordered], [img for _, img in ordered]


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise MediaError(
            f"{width}x{height} is {width * height} pixels per frame, more than the "
            f"{max_pixels} this server decodes; send a smaller one"
        )

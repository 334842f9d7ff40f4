"""Client media in: image and video headers read by hand, pixels decoded with PyAV.

The header probes read only a few bytes (PNG IHDR, JPEG SOF, MP4 stsd), so an image bomb is
refused before any decoder allocates its frame. They run on the event loop, so each walk over
segments or boxes is capped. Decoding runs in the server's decode pool, one core per job.

Images are used as a viewer shows them: JPEG EXIF orientation (and a PNG eXIf chunk) is
applied, and the probe reports the size after it. An image with an alpha channel (RGBA or
grey+alpha PNG, a palette or a colour key with transparency) is composited over a WHITE
background, at full size before scaling, so transparent edges do not darken.

A prefix video is read from its end: its packets are demuxed (cheap, no decoding) to find the
last keyframe at or before the tail the continuation needs, and only that keyframe and what
follows are decoded. A video whose tail costs more than MAX_TAIL_DECODE_FRAMES decoded frames
(keyframes too far apart), or whose decode outlasts DECODE_BUDGET_S, is refused with a message
that says what to change.

Decoder errors are reported in our words; FFmpeg's own text goes to the debug log only.
"""

from __future__ import annotations

import io
import logging
import math
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import av
import numpy as np

logger = logging.getLogger(__name__)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers: C0-CF except DHT (C4), JPG (C8) and DAC (CC).
_JPEG_SOF = {m for m in range(0xC0, 0xD0)} - {0xC4, 0xC8, 0xCC}
_EXIF_ORIENTATION_TAG = 0x0112

# Header walks run on the event loop: a crafted 16 MiB run of JPEG fill bytes took 3.3 s and
# 64 MiB of empty MP4 boxes 4.1 s to walk. Real files need a few dozen steps at most.
MAX_JPEG_HEADER_STEPS = 4096  # markers and fill bytes before the frame header
MAX_PNG_CHUNKS_SEARCHED = 64  # chunks searched for eXIf before the image data
MAX_MP4_BOXES = 1024  # boxes at one level walked while looking for one

# Frames decoded for a prefix: from the keyframe at or before the tail to the last frame.
# x264's default keyframe interval (what ffmpeg, PyAV and OBS write unless told otherwise) is
# 250 frames; the worst case is a whole such interval before the tail plus the tail itself
# (33 frames at 24 fps, 83 at 60 fps), which this passes with room. About 1.5 s of one core
# at 720p. A video with one keyframe at its start is refused without decoding anything.
MAX_TAIL_DECODE_FRAMES = 500
KEYFRAME_INTERVAL_HINT = 250  # what the refusal asks for: x264's default, well inside the budget
# Wall clock for one prefix decode, demuxing included: the frame budget at 1080p is ~3.5 s of
# one core, twice that on a busy machine; this catches what a frame count cannot (huge frames,
# slow codecs), so a decode thread is never held much longer.
DECODE_BUDGET_S = 10.0
# Packets demuxed (each costs microseconds, never a decode): an hour at 24 fps.
MAX_VIDEO_PACKETS = 24 * 3600
DECODER_THREADS = 1  # per job: the decode pool's size, not the codec, sets the parallelism

_CORRUPT_IMAGE = "the image data is corrupt or truncated; send a complete JPEG or PNG"
_CORRUPT_VIDEO = "the video data is corrupt or truncated; send a complete MP4"


class MediaError(ValueError):
    """Unreadable or refused media; the message says why, the caller names the field."""


# ---- header probes (no decoding) --------------------------------------------------------------


def probe_image(data: bytes) -> tuple[str, int, int]:
    """(format, width, height) of a PNG or JPEG from its header, as a viewer shows it
    (a 90-degree orientation swaps them; the pixel count is the same either way)."""
    if data.startswith(PNG_SIGNATURE):
        if len(data) < 24 or data[12:16] != b"IHDR":
            raise MediaError("truncated PNG header")
        width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        return "png", *_oriented(width, height, _png_orientation(data))
    if data.startswith(b"\xff\xd8"):
        width, height, orientation = _jpeg_header(data)
        return "jpeg", *_oriented(width, height, orientation)
    raise MediaError("not a JPEG or PNG image")


def image_orientation(data: bytes) -> int:
    """EXIF orientation (1-8, 1 = as stored) of a JPEG or PNG; 1 when it has none."""
    if data.startswith(PNG_SIGNATURE):
        return _png_orientation(data)
    if data.startswith(b"\xff\xd8"):
        return _jpeg_header(data)[2]
    return 1


def _oriented(width: int, height: int, orientation: int) -> tuple[int, int]:
    return (height, width) if orientation >= 5 else (width, height)


def _jpeg_header(data: bytes) -> tuple[int, int, int]:
    """(stored width, stored height, EXIF orientation) from the segments before SOF."""
    i, orientation = 2, 1
    for _ in range(MAX_JPEG_HEADER_STEPS):
        if i + 4 > len(data):
            break
        if data[i] != 0xFF:
            raise MediaError("corrupt JPEG header")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
            continue
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        if marker == 0xE1 and data[i + 4 : i + 10] == b"Exif\x00\x00":
            orientation = _exif_orientation(data[i + 10 : i + 2 + length])
        if marker in _JPEG_SOF:
            if i + 9 > len(data):
                break
            height = int.from_bytes(data[i + 5 : i + 7], "big")
            return int.from_bytes(data[i + 7 : i + 9], "big"), height, orientation
        i += 2 + length
    else:
        raise MediaError(
            f"JPEG without a frame header in its first {MAX_JPEG_HEADER_STEPS} markers; "
            "re-save it as a standard JPEG"
        )
    raise MediaError("JPEG without a frame header")


def _png_orientation(data: bytes) -> int:
    """From an eXIf chunk, which the PNG spec puts before the image data."""
    pos = 8
    for _ in range(MAX_PNG_CHUNKS_SEARCHED):
        if pos + 8 > len(data):
            break
        length, kind = int.from_bytes(data[pos : pos + 4], "big"), data[pos + 4 : pos + 8]
        if kind in (b"IDAT", b"IEND"):
            break
        if kind == b"eXIf":
            return _exif_orientation(data[pos + 8 : pos + 8 + length])
        pos += 12 + length  # length, type, data, CRC
    return 1


def _exif_orientation(tiff: bytes) -> int:
    """The Orientation tag of IFD0 in a TIFF-structured EXIF block; 1 if absent or unreadable
    (a damaged tag must not refuse an image that decodes)."""
    order = {b"II": "little", b"MM": "big"}.get(tiff[:2])
    if order is None or len(tiff) < 8:
        return 1
    ifd = int.from_bytes(tiff[4:8], order)
    count = int.from_bytes(tiff[ifd : ifd + 2], order) if ifd + 2 <= len(tiff) else 0
    for k in range(count):
        entry = ifd + 2 + 12 * k
        if entry + 12 > len(tiff):
            break
        if int.from_bytes(tiff[entry : entry + 2], order) == _EXIF_ORIENTATION_TAG:
            value = int.from_bytes(tiff[entry + 8 : entry + 10], order)  # a SHORT, left-aligned
            return value if 1 <= value <= 8 else 1
    return 1


def _boxes(data: bytes, start: int, end: int) -> Iterator[tuple[bytes, int, int]]:
    """(type, payload start, box end) of the ISO-BMFF boxes in data[start:end]."""
    pos = start
    for _ in range(MAX_MP4_BOXES):
        if pos + 8 > end:
            return
        size, kind, header = int.from_bytes(data[pos : pos + 4], "big"), data[pos + 4 : pos + 8], 8
        if size == 1 and pos + 16 <= end:
            size, header = int.from_bytes(data[pos + 8 : pos + 16], "big"), 16
        elif size == 0:
            size = end - pos
        if size < header or pos + size > end:
            return
        yield kind, pos + header, pos + size
        pos += size
    raise MediaError(
        f"an MP4 with more than {MAX_MP4_BOXES} boxes at one level; remux it with the moov "
        "box first (ffmpeg -c copy -movflags +faststart)"
    )


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


# ---- images ----------------------------------------------------------------------------------


def decode_image(data: bytes, width: int, height: int, max_pixels: int) -> np.ndarray:
    """uint8 (height, width, 3) RGB as a viewer shows it, scaled without keeping the aspect."""
    orientation = image_orientation(data)
    # scale to the stored shape whose orientation gives (width, height), then turn it
    stored_w, stored_h = _oriented(width, height, orientation)
    try:
        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.video[0]
            stream.codec_context.thread_count = DECODER_THREADS
            frame = next(container.decode(stream))
            _check_pixels(frame.width, frame.height, max_pixels)
            rgb = _flatten_alpha(frame)
            scaled = rgb.reformat(stored_w, stored_h, format="rgb24").to_ndarray()
    except (av.FFmpegError, StopIteration, IndexError) as e:
        logger.debug("image decode failed: %s", e)
        raise MediaError(_CORRUPT_IMAGE) from e
    return np.ascontiguousarray(_orient(scaled, orientation))


def _flatten_alpha(frame: av.VideoFrame) -> av.VideoFrame:
    """The frame composited over white if it can carry transparency; else as it is."""
    fmt = frame.format
    if not (fmt.has_palette or any(c.is_alpha for c in fmt.components)):
        return frame
    rgba = frame.to_ndarray(format="rgba")
    rgb = np.empty((*rgba.shape[:2], 3), np.uint8)
    rows = 256  # a block at a time: uint16 temporaries stay small at 8K
    for top in range(0, rgba.shape[0], rows):
        block = rgba[top : top + rows].astype(np.uint16)
        alpha = block[..., 3:]
        # colour*a + white*(255-a), rounded; at most 65152, so uint16 holds it
        mixed = (block[..., :3] * alpha + 255 * (255 - alpha) + 127) // 255
        rgb[top : top + rows] = mixed.astype(np.uint8)
    return av.VideoFrame.from_ndarray(rgb, format="rgb24")


def _orient(rgb: np.ndarray, orientation: int) -> np.ndarray:
    """Stored pixels (H, W, 3) to displayed ones, per the EXIF orientation values."""
    if orientation == 2:
        return rgb[:, ::-1]  # mirrored left-right
    if orientation == 3:
        return rgb[::-1, ::-1]  # upside down
    if orientation == 4:
        return rgb[::-1]  # mirrored top-bottom
    if orientation == 5:
        return rgb.transpose(1, 0, 2)  # transposed
    if orientation == 6:
        return np.rot90(rgb, k=-1)  # turned 90 degrees clockwise to view
    if orientation == 7:
        return rgb.transpose(1, 0, 2)[::-1, ::-1]  # transversed
    if orientation == 8:
        return np.rot90(rgb, k=1)  # turned 90 degrees counter-clockwise to view
    return rgb


# ---- prefix videos ---------------------------------------------------------------------------


def decode_video_tail(
    data: bytes,
    width: int,
    height: int,
    max_pixels: int,
    fps: int,
    frames: int,
    *,
    max_decoded_frames: int = MAX_TAIL_DECODE_FRAMES,
    budget_s: float = DECODE_BUDGET_S,
) -> np.ndarray:
    """The last `frames` frames resampled to `fps`, uint8 (frames, height, width, 3) RGB.

    Output frame k shows the newest source frame at or before (end - (frames-1-k)/fps)."""
    deadline = _Deadline(time.monotonic() + budget_s, budget_s)
    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.video:
                raise MediaError("the MP4 has no video stream")
            stream = container.streams.video[0]
            _check_pixels(stream.codec_context.width, stream.codec_context.height, max_pixels)
            keep_s = (frames + 1) / fps  # a frame of slack on either side of the tail
            packets, end_s = _tail_packets(container, stream, keep_s, max_decoded_frames, deadline)
            targets = [end_s - (frames - 1 - k) / fps for k in range(frames)]
            tail = _Tail(targets, width, height, 1 / float(stream.average_rate or fps))
            stream.codec_context.thread_count = DECODER_THREADS
            for frame in _decode_frames(stream, packets, deadline):
                _check_pixels(frame.width, frame.height, max_pixels)
                tail.add(frame)
    except av.FFmpegError as e:
        logger.debug("video decode failed: %s", e)
        raise MediaError(_CORRUPT_VIDEO) from e
    return tail.result(fps)


@dataclass(frozen=True)
class _Deadline:
    at: float  # time.monotonic() when the decode must be done
    budget_s: float  # what the refusal quotes

    def check(self) -> None:
        if time.monotonic() > self.at:
            raise MediaError(
                f"decoding the video took more than {self.budget_s:g} s; send a smaller video "
                "or only its last few seconds"
            )


@dataclass
class _Gop:
    """A keyframe and the packets after it, in decode order."""

    start_s: float  # the keyframe's presentation time
    count: int = 0  # packets seen, kept or not
    packets: list[av.Packet] | None = field(default_factory=list)  # None: over budget, dropped


def _tail_packets(
    container: av.container.InputContainer,
    stream: av.video.stream.VideoStream,
    keep_s: float,
    max_frames: int,
    deadline: _Deadline,
) -> tuple[list[av.Packet], float]:
    """(the packets from the last keyframe at or before the tail to the end, the end's time).

    Demuxes every packet but decodes none. Memory stays near the budget: a GOP that would put
    more than max_frames in front of the tail is dropped, and refused if it turns out needed."""
    gops: deque[_Gop] = deque()
    newest = -math.inf  # latest presentation time so far: the tail ends there
    kept = 0
    for n, packet in enumerate(container.demux(stream)):
        deadline.check()
        if n >= MAX_VIDEO_PACKETS:
            raise MediaError(
                f"the video has more than {MAX_VIDEO_PACKETS} frames; send only its last few "
                "seconds"
            )
        if packet.size == 0:  # the demuxer's end-of-stream marker
            continue
        stamp = packet.pts if packet.pts is not None else packet.dts
        t = float(stamp * packet.time_base) if stamp is not None else newest + 1e-3
        newest = max(newest, t)
        if packet.is_keyframe:
            gops.append(_Gop(t))
        elif not gops:
            continue  # nothing before the first keyframe can be decoded
        gops[-1].count += 1
        if gops[-1].packets is not None:
            gops[-1].packets.append(packet)
            kept += 1
        # a GOP is not needed once the next one starts at or before the tail (newest only
        # grows, so this holds to the end)
        while len(gops) > 1 and gops[1].start_s <= newest - keep_s:
            kept -= len(gops.popleft().packets or ())
        while kept > max_frames:
            oldest = next(g for g in gops if g.packets)
            kept -= len(oldest.packets)
            oldest.packets = None
    if not gops:
        raise MediaError("the video has no keyframe to start decoding from; send a complete MP4")
    decoded = sum(g.count for g in gops)
    if decoded > max_frames or any(g.packets is None for g in gops):
        raise MediaError(
            f"its last {keep_s:.2f} s would take decoding {decoded} frames from the keyframe "
            f"before them, more than the {max_frames} this server decodes; re-encode it with "
            f"a keyframe at least every {KEYFRAME_INTERVAL_HINT} frames (ffmpeg -g "
            f"{KEYFRAME_INTERVAL_HINT}) or send only its last few seconds"
        )
    return [p for g in gops for p in g.packets or ()], newest


def _decode_frames(
    stream: av.video.stream.VideoStream,
    packets: list[av.Packet],
    deadline: _Deadline,
) -> Iterator[av.VideoFrame]:
    """Every frame the packets give, in presentation order (the decoder reorders)."""
    codec = stream.codec_context
    for packet in [*packets, None]:  # None drains the decoder
        for frame in codec.decode(packet):
            deadline.check()
            yield frame


class _Tail:
    """Picks, for each output time, the newest source frame at or before it. A frame before
    the first output time is held unscaled until a newer one replaces it, so only frames that
    can be shown are scaled, and at most one scaled frame per output time is kept (a 240 fps
    source costs no more memory than a 24 fps one)."""

    def __init__(self, targets: list[float], width: int, height: int, frame_s: float) -> None:
        self.targets, self.width, self.height = targets, width, height
        self.frame_s = frame_s  # for a frame without a timestamp: one after the previous
        self.picks: list[np.ndarray | None] = [None] * len(targets)
        self.held: av.VideoFrame | None = None  # newest frame at or before targets[0]
        self.first_s = self.last_s = math.nan
        self.previous_s = -frame_s

    def add(self, frame: av.VideoFrame) -> None:
        t = frame.time if frame.time is not None else self.previous_s + self.frame_s
        self.previous_s = t
        self.first_s = t if math.isnan(self.first_s) else min(self.first_s, t)
        self.last_s = t if math.isnan(self.last_s) else max(self.last_s, t)
        if t <= self.targets[0] + 1e-6:
            self.held = frame
            return
        self._release_held()
        self._assign(frame, t)

    def _release_held(self) -> None:
        if self.held is not None:
            self._assign(self.held, -math.inf)
            self.held = None

    def _assign(self, frame: av.VideoFrame, t: float) -> None:
        image = frame.reformat(self.width, self.height, format="rgb24").to_ndarray()
        for k, target in enumerate(self.targets):
            if t <= target + 1e-6:
                self.picks[k] = image

    def result(self, fps: int) -> np.ndarray:
        self._release_held()
        if math.isnan(self.first_s):  # packets, but not one frame decoded from them
            raise MediaError(_CORRUPT_VIDEO)
        if any(p is None for p in self.picks):
            available = int((self.last_s - self.first_s) * fps + 1e-6) + 1
            need = len(self.picks)
            raise MediaError(
                f"the video gives {available} frames at {fps} fps; at least {need} "
                f"({need / fps:.2f} s) are needed"
            )
        return np.stack(self.picks)


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise MediaError(
            f"{width}x{height} is {width * height} pixels per frame, more than the "
            f"{max_pixels} this server decodes; send a smaller one"
        )

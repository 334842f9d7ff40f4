"""Writers for what a stream yields. Each takes ChunkEvents in order and is safe to stop at any
chunk: what is on disk then is a complete, playable prefix.

- Fmp4Writer: the server's fragmented MP4 (init segment + one media segment per chunk), appended
  and flushed per chunk, so the file plays at every point while it grows.
- RawMp4Writer: RAW_RGB24 frames encoded here with PyAV, one self-contained fragment per chunk
  (the same layout the server sends), so it too plays at every point.
- PngWriter / NpyWriter: RAW_RGB24 frames as frame_NNNNNN.png / chunk_NNNN.npy files.

PyAV is imported only when a writer that needs it is opened, so `import client` stays light.
numpy is not needed: .npy headers are written by hand.
"""

from __future__ import annotations

import io
from fractions import Fraction
from pathlib import Path
from typing import Protocol

from client.events import ChunkEvent

# empty_moov: samples live in fragments only; default_base_moof: offsets relative to each moof,
# so a fragment is position independent; frag_discont + avoid_negative_ts=disabled: the
# fragment's decode time comes from the first frame's timestamp instead of restarting at 0;
# skip_trailer: no mfra index, which would only be valid at the very end.
_MOVFLAGS = "frag_keyframe+empty_moov+default_base_moof+frag_discont+skip_trailer"


class ChunkWriter(Protocol):
    def write(self, chunk: ChunkEvent) -> None: ...

    def close(self) -> None: ...


class Fmp4Writer:
    """Appends the server's fMP4 payloads to `path` (truncated first)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._file = self.path.open("wb")

    def write(self, chunk: ChunkEvent) -> None:
        if not chunk.payload:
            raise ValueError(f"chunk {chunk.index} has no fMP4 payload (raw stream?)")
        self._file.write(chunk.payload)
        # flushed per chunk: a reader (or a crash) sees whole fragments only
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class RawMp4Writer:
    """Encodes RGB24 chunks to H.264 fMP4 at `path`, one fragment per chunk.

    The MP4 muxer writes a fragment only when the next keyframe arrives and PyAV cannot ask it
    to flush earlier, so each chunk gets its own short-lived muxer; every muxer writes the same
    init segment, and only the first is kept.
    """

    def __init__(self, path: Path, crf: int = 18, preset: str = "veryfast") -> None:
        import av  # noqa: F401 - fail here, before the stream starts, if PyAV is missing

        self.path = Path(path)
        self.crf = crf  # x264 constant rate factor: lower = better quality, larger file
        self.preset = preset  # x264 speed/size trade-off
        self._file = self.path.open("wb")
        self._wrote_init = False

    def write(self, chunk: ChunkEvent) -> None:
        data = _encode_chunk(chunk, self.crf, self.preset)
        if self._wrote_init:
            data = data[_init_length(data) :]
        self._file.write(data)
        self._file.flush()
        self._wrote_init = True

    def close(self) -> None:
        self._file.close()


def _encode_chunk(chunk: ChunkEvent, crf: int, preset: str) -> bytes:
    import av

    if not chunk.frames:
        raise ValueError(f"chunk {chunk.index} has no raw frames (fMP4 stream?)")
    buffer = io.BytesIO()
    options = {
        "movflags": _MOVFLAGS,
        "fragment_index": str(chunk.index + 1),  # fragment sequence numbers grow across chunks
        "avoid_negative_ts": "disabled",
    }
    time_base = Fraction(1, chunk.fps)
    with av.open(buffer, mode="w", format="mp4", options=options) as container:
        stream = container.add_stream("libx264", rate=chunk.fps)
        stream.width, stream.height, stream.pix_fmt = chunk.width, chunk.height, "yuv420p"
        stream.time_base = time_base
        # bf=0: decode order is display order, so no timestamp precedes the chunk's first; a
        # GOP longer than the chunk keeps one keyframe, at its start, per fragment
        stream.options = {
            "preset": preset,
            "crf": str(crf),
            "bf": "0",
            "g": str(max(2 * len(chunk.frames), 48)),
        }
        for k, rgb in enumerate(chunk.frames):
            frame = rgb_frame(rgb, chunk.width, chunk.height)
            frame.pts, frame.time_base = chunk.first_frame + k, time_base
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return buffer.getvalue()


def _init_length(data: bytes) -> int:
    """Bytes of the leading ftyp + moov boxes (the init segment)."""
    pos = 0
    while pos + 8 <= len(data) and data[pos + 4 : pos + 8] in (b"ftyp", b"moov"):
        pos += int.from_bytes(data[pos : pos + 4], "big")
    return pos


def rgb_frame(rgb: bytes, width: int, height: int):
    """An av.VideoFrame from packed RGB24 rows (PyAV pads its rows; we do not)."""
    import av

    row = width * 3
    if len(rgb) != row * height:
        raise ValueError(f"a {width}x{height} RGB24 frame has {row * height} bytes, got {len(rgb)}")
    frame = av.VideoFrame(width, height, "rgb24")
    plane = frame.planes[0]
    if plane.line_size != row:
        pad = bytes(plane.line_size - row)
        rgb = b"".join(rgb[y * row : (y + 1) * row] + pad for y in range(height))
    plane.update(rgb)
    return frame


class PngWriter:
    """One PNG per frame: DIR/frame_NNNNNN.png, numbered by output frame index."""

    def __init__(self, folder: Path) -> None:
        import av  # noqa: F401 - fail before the stream starts if PyAV is missing

        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def write(self, chunk: ChunkEvent) -> None:
        import av

        if not chunk.frames:
            raise ValueError(f"chunk {chunk.index} has no raw frames (fMP4 stream?)")
        codec = av.CodecContext.create("png", "w")
        codec.width, codec.height, codec.pix_fmt = chunk.width, chunk.height, "rgb24"
        for k, rgb in enumerate(chunk.frames):
            packets = codec.encode(rgb_frame(rgb, chunk.width, chunk.height))
            path = self.folder / f"frame_{chunk.first_frame + k:06d}.png"
            path.write_bytes(b"".join(bytes(p) for p in packets))

    def close(self) -> None:
        pass


class NpyWriter:
    """One .npy per chunk: DIR/chunk_NNNN.npy, uint8 of shape (frames, height, width, 3)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def write(self, chunk: ChunkEvent) -> None:
        if not chunk.frames:
            raise ValueError(f"chunk {chunk.index} has no raw frames (fMP4 stream?)")
        shape = (len(chunk.frames), chunk.height, chunk.width, 3)
        with (self.folder / f"chunk_{chunk.index:04d}.npy").open("wb") as f:
            f.write(npy_header(shape))
            for rgb in chunk.frames:
                f.write(rgb)

    def close(self) -> None:
        pass


def npy_header(shape: tuple[int, ...]) -> bytes:
    """NPY format 1.0 header for a C-ordered uint8 array (numpy.lib.format)."""
    text = f"{{'descr': '|u1', 'fortran_order': False, 'shape': {shape!r}, }}"
    # magic (6) + version (2) + length (2) + text + padding + "\n" is a multiple of 64
    pad = -(10 + len(text) + 1) % 64
    text = text + " " * pad + "\n"
    return b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text.encode("latin1")

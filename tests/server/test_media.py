"""Client media: sizes read from headers before decoding, pixels scaled, video tails resampled."""

from __future__ import annotations

import io
import struct
import zlib

import av
import numpy as np
import pytest

from server import media
from tests.server.helpers import encode_image, encode_mp4


def test_headers_give_the_size_without_decoding():
    rgb = np.zeros((30, 50, 3), np.uint8)
    assert media.probe_image(encode_image(rgb, "png")) == ("png", 50, 30)
    assert media.probe_image(encode_image(rgb[:16, :32].copy(), "mjpeg")) == ("jpeg", 32, 16)
    assert media.probe_mp4(encode_mp4(np.zeros((3, 32, 48, 3), np.uint8), 24)) == (48, 32)


def test_an_image_bomb_header_is_read_as_such():
    bomb = media.PNG_SIGNATURE + b"\x00\x00\x00\x0dIHDR" + (100_000).to_bytes(4, "big") * 2
    assert media.probe_image(bomb) == ("png", 100_000, 100_000)


@pytest.mark.parametrize("data", [b"GIF89a....", b"", b"\xff\xd8\xff"])
def test_unknown_or_truncated_images_are_refused(data):
    with pytest.raises(media.MediaError):
        media.probe_image(data)


def test_image_is_scaled_to_the_requested_size():
    rgb = np.full((30, 50, 3), (200, 20, 90), np.uint8)
    out = media.decode_image(encode_image(rgb), 64, 32, max_pixels=10_000)
    assert out.shape == (32, 64, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - (200, 20, 90)).max() <= 2


def test_video_tail_is_the_last_frames_resampled_to_24_fps():
    # 60 frames at 30 fps whose brightness is their index x 4: the last 32 output frames at
    # 24 fps span 31/24 s back from the last source frame (index 59).
    levels = (np.arange(60) * 4).astype(np.uint8)
    video = np.broadcast_to(levels[:, None, None, None], (60, 16, 16, 3)).copy()
    out = media.decode_video_tail(encode_mp4(video, 30), 32, 32, 10_000, fps=24, frames=32)
    assert out.shape == (32, 32, 32, 3)
    got = out.reshape(32, -1).mean(axis=1) / 4
    times = 59 / 30 - (31 - np.arange(32)) / 24
    want = np.floor(times * 30 + 1e-6)
    assert np.abs(got - want).max() < 0.6


def test_a_video_too_short_for_the_prefix_is_refused():
    video = np.zeros((20, 16, 16, 3), np.uint8)
    with pytest.raises(media.MediaError, match="at least 32"):
        media.decode_video_tail(encode_mp4(video, 24), 16, 16, 10_000, fps=24, frames=32)


# ---- prefix videos: read from their end, within a budget ---------------------------------------


def x264_mp4(frames: int, fps: int, keyint: int | str, movflags: str = "") -> bytes:
    """A lossless 48x32 H.264 MP4 whose frame k has brightness (k % 50) * 4, with a keyframe
    exactly every `keyint` frames (scene cuts off, so x264 adds none)."""
    buffer = io.BytesIO()
    with av.open(
        buffer, "w", format="mp4", options={"movflags": movflags} if movflags else {}
    ) as c:
        stream = c.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 48, 32, "yuv420p"
        stream.options = {
            "preset": "ultrafast",
            "qp": "0",
            "x264-params": f"keyint={keyint}:min-keyint={keyint}:scenecut=0",
        }
        for k in range(frames):
            rgb = np.full((32, 48, 3), (k % 50) * 4, np.uint8)
            c.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        c.mux(stream.encode())
    return buffer.getvalue()


@pytest.fixture
def decoded_frames(monkeypatch) -> list[int]:
    """Counts the frames the decoder produces (one element per frame)."""
    seen: list[int] = []
    decode = media._decode_frames

    def counting(*args):
        for frame in decode(*args):
            seen.append(1)
            yield frame

    monkeypatch.setattr(media, "_decode_frames", counting)
    return seen


# our own output's muxing: fragments only, no index at the end (no mfra)
FRAGMENTED = "frag_keyframe+empty_moov+default_base_moof+skip_trailer"


@pytest.mark.parametrize("movflags", ["", FRAGMENTED])
def test_a_long_video_decodes_only_from_the_keyframe_before_its_tail(decoded_frames, movflags):
    # 600 frames at 24 fps, keyframes every 50: the last 33 frames (1.375 s) start at frame
    # 567, so decoding starts at the keyframe at 550 and the 550 frames before it are skipped.
    video = x264_mp4(600, 24, keyint=50, movflags=movflags)
    out = media.decode_video_tail(video, 16, 16, 10_000, fps=24, frames=32)
    assert len(decoded_frames) == 50
    levels = out.reshape(32, -1).mean(axis=1) / 4
    assert np.abs(levels - (np.arange(568, 600) % 50)).max() < 0.6


def test_a_long_video_with_one_keyframe_is_refused_without_decoding(decoded_frames):
    # nothing to seek to: its tail could only be reached by decoding all 600 frames
    video = x264_mp4(600, 24, keyint="infinite")
    with pytest.raises(media.MediaError, match="keyframe at least every 250 frames") as error:
        media.decode_video_tail(video, 16, 16, 10_000, fps=24, frames=32)
    assert "600 frames" in str(error.value) and "last few seconds" in str(error.value)
    assert decoded_frames == []


def test_keyframes_just_inside_the_work_budget_are_decoded(decoded_frames):
    video = x264_mp4(200, 24, keyint=100)  # tail from frame 167: decoded from keyframe 100
    media.decode_video_tail(video, 16, 16, 10_000, fps=24, frames=32, max_decoded_frames=100)
    assert len(decoded_frames) == 100
    with pytest.raises(media.MediaError, match="more than the 99 this server decodes"):
        media.decode_video_tail(video, 16, 16, 10_000, fps=24, frames=32, max_decoded_frames=99)


def test_a_decode_past_its_time_budget_is_refused():
    video = x264_mp4(60, 24, keyint=24)
    with pytest.raises(media.MediaError, match="took more than 0 s; send a smaller video"):
        media.decode_video_tail(video, 16, 16, 10_000, fps=24, frames=32, budget_s=0)


def test_a_video_with_garbage_frames_is_refused_in_our_words():
    video = bytearray(x264_mp4(60, 24, keyint=24))
    start = video.find(b"mdat")
    end = start - 4 + int.from_bytes(video[start - 4 : start], "big")
    video[start + 4 : end] = np.random.default_rng(0).bytes(end - start - 4)
    with pytest.raises(media.MediaError) as error:
        media.decode_video_tail(bytes(video), 16, 16, 10_000, fps=24, frames=32)
    assert "send a complete MP4" in str(error.value)


# ---- images: as a viewer shows them ----------------------------------------------------------


def png(rows: np.ndarray, color_type: int, *chunks: tuple[bytes, bytes]) -> bytes:
    """A hand-made 8-bit PNG: rows (H, W[, C]) of color_type 0/2/3/4/6, extra chunks before
    the image data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body).to_bytes(4, "big")
        return len(body).to_bytes(4, "big") + kind + body + crc

    height, width = rows.shape[:2]
    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)  # filter 0 on every row
    return (
        media.PNG_SIGNATURE
        + chunk(b"IHDR", header)
        + b"".join(chunk(k, b) for k, b in chunks)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def exif(orientation: int, order: str = "big") -> bytes:
    """A TIFF-structured EXIF block whose IFD0 holds only Orientation."""
    mark = b"MM" if order == "big" else b"II"
    entry = (0x0112).to_bytes(2, order) + (3).to_bytes(2, order) + (1).to_bytes(4, order)
    entry += orientation.to_bytes(2, order) + bytes(2)
    return mark + (42).to_bytes(2, order) + (8).to_bytes(4, order) + (1).to_bytes(2, order) + entry


def with_exif(jpeg: bytes, block: bytes) -> bytes:
    app1 = b"Exif\x00\x00" + block
    return jpeg[:2] + b"\xff\xe1" + (len(app1) + 2).to_bytes(2, "big") + app1 + jpeg[2:]


# stored: white mark A at the top left, grey mark B at the top right of a 48x32 black image.
# displayed: the corners (TL, TR, BL, BR) where A and B land, per the EXIF orientation table.
ORIENTATIONS = {
    1: ("TL", "TR"),
    2: ("TR", "TL"),
    3: ("BR", "BL"),
    4: ("BL", "BR"),
    5: ("TL", "BL"),
    6: ("TR", "BR"),
    7: ("BR", "TR"),
    8: ("BL", "TL"),
}


def marked_image() -> np.ndarray:
    rgb = np.zeros((32, 48, 3), np.uint8)
    rgb[:8, :8] = 255
    rgb[:8, -8:] = 128
    return rgb


def corner_levels(rgb: np.ndarray) -> dict[str, float]:
    return {
        "TL": rgb[:8, :8].mean(),
        "TR": rgb[:8, -8:].mean(),
        "BL": rgb[-8:, :8].mean(),
        "BR": rgb[-8:, -8:].mean(),
    }


@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
def test_jpeg_exif_orientation_is_applied(orientation):
    data = with_exif(encode_image(marked_image(), "mjpeg"), exif(orientation))
    shown = (32, 48) if orientation >= 5 else (48, 32)
    assert media.probe_image(data) == ("jpeg", *shown)
    out = media.decode_image(data, *shown, max_pixels=10_000)
    assert out.shape == (shown[1], shown[0], 3)
    levels = corner_levels(out)
    a, b = ORIENTATIONS[orientation]
    assert levels[a] > 230 and abs(levels[b] - 128) < 20
    assert all(v < 25 for k, v in levels.items() if k not in (a, b))


def test_png_exif_orientation_is_applied():
    data = png(marked_image(), 2, (b"eXIf", exif(6, order="little")))
    assert media.probe_image(data) == ("png", 32, 48)
    levels = corner_levels(media.decode_image(data, 32, 48, max_pixels=10_000))
    assert levels["TR"] == 255 and levels["BR"] == 128 and levels["TL"] == levels["BL"] == 0


def test_a_rotated_image_is_scaled_to_the_requested_size_after_turning():
    data = with_exif(encode_image(marked_image(), "mjpeg"), exif(8))
    out = media.decode_image(data, 64, 64, max_pixels=10_000)  # stored 48x32, shown 32x48
    assert out.shape == (64, 64, 3)
    levels = corner_levels(out)  # A at the bottom left, B at the top left
    assert levels["BL"] > 230 and abs(levels["TL"] - 128) < 20
    assert levels["TR"] < 25 and levels["BR"] < 25


@pytest.mark.parametrize(
    ("kind", "data"),
    [
        # red at alpha 0, 128 and 255
        (
            "rgba",
            png(np.array([[[255, 0, 0, 0], [255, 0, 0, 128], [255, 0, 0, 255]]], np.uint8), 6),
        ),
        # grey 0 at alpha 0, 128 and 255
        ("grey+alpha", png(np.array([[[0, 0], [0, 128], [0, 255]]], np.uint8), 4)),
        # palette: entry 0 transparent, 1 half, 2 opaque, all red
        (
            "palette",
            png(
                np.array([[0, 1, 2]], np.uint8),
                3,
                (b"PLTE", bytes([255, 0, 0] * 3)),
                (b"tRNS", bytes([0, 128, 255])),
            ),
        ),
    ],
)
def test_transparent_pixels_are_composited_over_white(kind, data):
    out = media.decode_image(data, 3, 1, max_pixels=10_000)[0].astype(int)
    opaque = (255, 0, 0) if kind != "grey+alpha" else (0, 0, 0)
    half = [round(255 * 127 / 255 + c * 128 / 255) for c in opaque]
    assert np.abs(out - [(255, 255, 255), half, opaque]).max() <= 1, kind


def test_a_colour_key_is_composited_over_white():
    rgb = np.array([[[10, 20, 30], [40, 50, 60]]], np.uint8)
    data = png(rgb, 2, (b"tRNS", struct.pack(">HHH", 10, 20, 30)))
    out = media.decode_image(data, 2, 1, max_pixels=10_000)
    assert out[0].tolist() == [[255, 255, 255], [40, 50, 60]]


@pytest.mark.parametrize(
    "data",
    [
        encode_image(marked_image())[:60],  # PNG cut inside its image data
        encode_image(marked_image())[:33] + bytes(range(256)),  # PNG with garbage after IHDR
        encode_image(marked_image(), "mjpeg").split(b"\xff\xda")[0],  # JPEG without its scan
    ],
    ids=["truncated-png", "garbage-png", "jpeg-without-scan"],
)
def test_a_corrupt_image_is_refused_in_our_words(data):
    media.probe_image(data)  # the header is fine
    with pytest.raises(media.MediaError) as error:
        media.decode_image(data, 16, 16, max_pixels=10_000)
    assert str(error.value) == "the image data is corrupt or truncated; send a complete JPEG or PNG"


# ---- header walks stay short -----------------------------------------------------------------


def test_header_walks_give_up_after_a_bounded_number_of_steps():
    fill = b"\xff\xd8" + b"\xff" * (media.MAX_JPEG_HEADER_STEPS * 4)
    with pytest.raises(media.MediaError, match="first 4096 markers"):
        media.probe_image(fill)
    boxes = b"\x00\x00\x00\x08ftyp" + b"\x00\x00\x00\x08free" * (media.MAX_MP4_BOXES + 1)
    with pytest.raises(media.MediaError, match="faststart"):
        media.probe_mp4(boxes)

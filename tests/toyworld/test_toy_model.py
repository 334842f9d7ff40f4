"""The shipped `toy` world model (models/toy): it loads like an official checkpoint, and its
prompts steer the motion they name."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from engine.engine import Engine
from model.config import preset_name
from model.folder import MagiModel, embedded_folder, load_model
from scheduler.session import SessionParams
from toyworld import ObjectSpec, still_frame
from toyworld.score import centroids

MB = 1 << 20


@pytest.fixture(scope="module")
def toy() -> MagiModel:
    return load_model(embedded_folder("toy"))


def test_shipped_folder_is_an_official_layout_checkpoint(toy: MagiModel) -> None:
    folder = embedded_folder("toy")
    assert preset_name(toy.config) == "toy"
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert size <= 50 * MB
    check = subprocess.run(
        [sys.executable, "-m", "model", "check", str(folder)], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stderr
    assert "preset: toy" in check.stdout


def first_frame(x: float) -> torch.Tensor:
    """A red ball at rest in mid-air (no gravity), centre x, on the toy background."""
    return torch.from_numpy(still_frame(ObjectSpec("ball", "red", 12.0, (x, 32.0))))


def red_x(toy: MagiModel, prompts: tuple[tuple[int, str], ...], chunks: int) -> np.ndarray:
    """Centroid x of the red ball per output frame of an i2v session from a centred ball."""
    engine = Engine(toy)
    engine.open(
        SessionParams("s", prompts, chunks, 64, 64, seed=0, mode="i2v", image=first_frame(32))
    )
    frames = np.concatenate([d.frames.numpy() for d in engine.run_until_idle()])
    return centroids(frames, "red")[:, 0]


def travel(x: np.ndarray, chunk: int) -> float:
    """Net horizontal travel over a chunk: mean x of its last 6 frames - of its first 6."""
    part = x[chunk * 24 : (chunk + 1) * 24]
    return float(np.nanmean(part[-6:]) - np.nanmean(part[:6]))


def test_left_and_right_prompts_move_the_ball_that_way(toy: MagiModel) -> None:
    left = red_x(toy, ((0, "a red ball moves to the left"),), 1)
    right = red_x(toy, ((0, "a red ball moves to the right"),), 1)
    assert travel(left, 0) < -3.0
    assert travel(right, 0) > 3.0


def test_a_prompt_switch_turns_the_ball_from_that_chunk_on(toy: MagiModel) -> None:
    x = red_x(toy, ((0, "a red ball moves to the right"), (1, "a red ball moves to the left")), 2)
    assert travel(x, 0) > 3.0
    assert travel(x, 1) < -3.0

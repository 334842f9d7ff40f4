"""i2v, v2v and other window sizes through the engine."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from engine.engine import Engine
from engine.runner import ModelRunner
from model.config import MagiConfig
from model.vae import encode_frames
from scheduler.session import SessionParams
from tests.engine.test_reference_sampler import engine_latents, official_loop


def frames(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 64, 64, 3), dtype=torch.uint8, generator=gen)


def test_i2v_pastes_the_image_latent_into_chunk_0_before_every_forward(tiny_model, monkeypatch):
    image = frames(1, 0)[0].numpy()
    engine = Engine(tiny_model)
    session = engine.open(SessionParams("i", ((0, "a cat"),), 2, 64, 64, mode="i2v", image=image))
    image_latent = encode_frames(tiny_model.vae, torch.from_numpy(image)[None])[0]
    prefix = engine.runner.sessions["i"].prefix
    assert session.spec.prefix_latent_frames == 1 and session.prefix_chunks == 0
    assert torch.equal(prefix, image_latent.float())
    fed = []
    original = ModelRunner._input_latent

    def spy(self, spec, held, c, prefix_extraction):
        x = original(self, spec, held, c, prefix_extraction)
        fed.append((c, x))
        return x

    monkeypatch.setattr(ModelRunner, "_input_latent", spy)
    done = engine.run_until_idle()
    chunk0 = [x for c, x in fed if c == 0]
    # every denoising step, plus its clean re-forward (whose input is pasted as officially)
    assert len(chunk0) == tiny_model.config.runtime_config.num_steps + 1
    assert all(torch.equal(x[:, 0], prefix[:, 0]) for x in chunk0)
    assert all(not torch.equal(x[:, 0], prefix[:, 0]) for c, x in fed if c == 1)
    assert [len(d.frames) for d in done] == [24, 24]  # the image frame is output (4 frames)


def test_v2v_continues_from_the_end_of_the_video_and_outputs_after_the_prefix(tiny_model):
    video = frames(40, 1)
    engine = Engine(tiny_model)
    session = engine.open(
        SessionParams("v", ((0, "more"),), 2, 64, 64, mode="v2v", video=video.numpy())
    )
    assert session.spec.prefix_latent_frames == 8 and session.prefix_chunks == 1
    want_prefix = encode_frames(tiny_model.vae, video[-32:])[0].float()
    assert torch.equal(engine.runner.sessions["v"].prefix, want_prefix)
    first_plan = session.window.next_forward()
    assert first_plan.prefix_extraction and first_plan.chunk_indices == (0,)
    session.window = type(session.window)(session.window.spec)  # rewind the peek
    done = engine.run_until_idle()
    assert [d.chunk_index for d in done] == [1, 2]
    assert [d.output_index for d in done] == [0, 1]
    assert [len(d.frames) for d in done] == [13, 24]  # latents 8..11, then a full chunk
    assert [d.first_frame for d in done] == [0, 13]


def test_v2v_prefix_kv_is_extracted_before_the_first_denoising_forward(tiny_model):
    engine = Engine(tiny_model)
    session = engine.open(
        SessionParams("v", ((0, "more"),), 1, 64, 64, mode="v2v", video=frames(32, 2).numpy())
    )
    engine.step()  # the extraction forward
    held = engine.runner.sessions["v"]
    assert held.cache.chunk_indices == [0]
    assert session.forwards_served == 1 and not held.latents.get(0)


@pytest.mark.parametrize("window", [1, 2])
def test_other_window_sizes_equal_the_official_loop(tiny_model, window):
    rc = dataclasses.replace(tiny_model.config.runtime_config, window_size=window)
    config = MagiConfig(tiny_model.config.model_config, rc, tiny_model.config.engine_config)
    model = dataclasses.replace(tiny_model, config=config)
    want = official_loop(model, "a red ball rolls", 3, seed=5)
    got = engine_latents(model, "a red ball rolls", 3, seed=5)
    for c in range(3):
        assert (got[c] - want[c]).abs().max() < 1e-5, (window, c)


def test_a_clean_kv_range_longer_than_the_noisy_ones_equals_the_official_loop(tiny_model):
    """clean_chunk_kvrange 5 over noise2clean 5/4/3/2: a clean re-forward reads KV that the
    chunk's last noisy steps no longer did, so the cache must keep it until then."""
    rc = dataclasses.replace(tiny_model.config.runtime_config, clean_chunk_kvrange=5)
    config = MagiConfig(tiny_model.config.model_config, rc, tiny_model.config.engine_config)
    model = dataclasses.replace(tiny_model, config=config)
    want = official_loop(model, "a red ball rolls", 6, seed=5)
    got = engine_latents(model, "a red ball rolls", 6, seed=5)
    for c in range(6):
        assert (got[c] - want[c]).abs().max() < 1e-5, c


def test_generate_command_writes_the_frames_of_one_session(tiny_folder, tmp_path):
    import subprocess
    import sys

    import numpy as np

    out = tmp_path / "v.npy"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "engine",
            "generate",
            "--model",
            str(tiny_folder),
            "--prompt",
            "a red ball",
            "--prompt-at",
            "1:a blue box",
            "--chunks",
            "2",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert result.returncode == 0, result.stderr
    frames = np.load(out)
    assert frames.shape == (48, 64, 64, 3) and frames.dtype == np.uint8
    assert "chunk 1: frames 24..47 prompt v2 'a blue box'" in result.stdout

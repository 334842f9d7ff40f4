"""The toy training command: phases, resume, the folder it writes, and the training examples
matching what the sampler feeds the DiT.

The tests that need a finished run with the default tiny budget share one (`full_run`, read
only): a run is deterministic, so each would train the same weights again."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.sampling import time_grid
from model.__main__ import main as model_cli
from model.folder import load_model
from train import toy as T

# one pytest-xdist worker runs the module, so `full_run` trains once per suite run
pytestmark = pytest.mark.xdist_group("train_toy")


def tiny_run(out: Path, dit_steps: int = 3, decoder_steps: int = 2) -> T.TrainConfig:
    return T.TrainConfig(
        out=out,
        scenes=4,
        vae_steps=3,
        vae_batch=2,
        dit_steps=dit_steps,
        dit_batch=2,
        decoder_steps=decoder_steps,
        decoder_batch=2,
        save_every=2,
        threads=1,
    )


def saved_weights(out: Path) -> dict[str, torch.Tensor]:
    saved = torch.load(out / "train" / "state.pt", weights_only=False)
    return {f"vae.{k}": v for k, v in saved["vae"].items()} | {
        f"dit.{k}": v for k, v in saved["dit"].items()
    }


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, T.TrainState]:
    """A finished run with `tiny_run`'s budget: its folder (tests copy it before they train
    on in it) and the state `train` returned."""
    out = tmp_path_factory.mktemp("full") / "toy"
    return out, T.train(tiny_run(out))


def test_training_smoke_writes_a_loadable_folder_and_resumes(
    full_run: tuple[Path, T.TrainState], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first, state = full_run
    assert (state.phase, len(state.vae_losses), len(state.dit_losses)) == ("done", 3, 3)
    assert len(state.decoder_losses) == 2 and state.decoder_psnr > 0
    assert all(np.isfinite(state.vae_losses + state.dit_losses + state.decoder_losses))
    assert state.scale_factor > 0
    out = tmp_path / "toy"  # resumed below: a copy, the shared run stays as it is
    shutil.copytree(first, out)
    png = (out / "train" / "loss.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and png.endswith(b"IEND\xaeB`\x82")
    model = load_model(out)  # the loader of the official checkpoints, strict
    assert model.config.runtime_config.scale_factor == pytest.approx(state.scale_factor)
    # `python -m model check` on it, in this process (tests/model/test_folder.py runs the
    # command in its own): a new interpreter would cost ~4 s of imports, and load the same way
    assert model_cli(["check", str(out)]) == 0, capsys.readouterr().err
    assert f"folder: {out}" in capsys.readouterr().out
    # the same command with a bigger budget picks up where it stopped: VAE untouched
    state = T.train(tiny_run(out, dit_steps=5))
    assert (len(state.vae_losses), len(state.dit_losses), len(state.decoder_losses)) == (3, 5, 2)
    # more decoder steps train the decoder alone: the encoder (the DiT's latents) and the DiT
    # stay bit for bit
    before = saved_weights(out)
    state = T.train(tiny_run(out, dit_steps=5, decoder_steps=4))
    assert (len(state.dit_losses), len(state.decoder_losses)) == (5, 4)
    after = saved_weights(out)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("vae.decoder.") for k in changed)


def test_vae_from_trains_phase_3_of_the_same_run(
    full_run: tuple[Path, T.TrainState], tmp_path: Path
) -> None:
    full, _ = full_run
    dit_only = tmp_path / "dit-only"
    state = T.train(dataclasses.replace(tiny_run(dit_only), vae_from=full))
    assert state.phase == "done" and not state.vae_losses and not state.decoder_losses
    assert len(state.dit_losses) == 3
    a, b = load_model(full), load_model(dit_only)
    assert b.config.runtime_config.scale_factor == a.config.runtime_config.scale_factor
    # the VAE is the folder's (phase 4's decoder included); the DiT is the one the full run
    # trained on the same encoder's latents
    for part in ("vae", "dit"):
        theirs, ours = getattr(a, part).state_dict(), getattr(b, part).state_dict()
        assert theirs.keys() == ours.keys()
        assert all(torch.equal(theirs[k], ours[k]) for k in theirs), part
    # a rerun with the default decoder budget leaves the finished DiT-only run as it is
    assert T.train(dataclasses.replace(tiny_run(dit_only), vae_from=full)).decoder_losses == []


def test_dit_from_trains_the_folders_decoder_on_and_nothing_else(
    full_run: tuple[Path, T.TrainState], tmp_path: Path
) -> None:
    full, _ = full_run
    decoder = tmp_path / "decoder"
    state = T.train(dataclasses.replace(tiny_run(decoder, decoder_steps=3), dit_from=full))
    assert state.phase == "done" and not state.vae_losses and not state.dit_losses
    assert len(state.decoder_losses) == 3 and state.psnr > 0 and state.decoder_psnr > 0
    a, b = load_model(full), load_model(decoder)
    assert b.config.runtime_config.scale_factor == a.config.runtime_config.scale_factor
    theirs = {f"vae.{k}": v for k, v in a.vae.state_dict().items()}
    theirs |= {f"dit.{k}": v for k, v in a.dit.state_dict().items()}
    ours = {f"vae.{k}": v for k, v in b.vae.state_dict().items()}
    ours |= {f"dit.{k}": v for k, v in b.dit.state_dict().items()}
    assert theirs.keys() == ours.keys()
    moved = {k for k in theirs if not torch.equal(theirs[k], ours[k])}
    assert moved and all(k.startswith("vae.decoder.") for k in moved)
    # a rerun leaves the finished run as it is: no phase 3 starts, no more decoder steps
    again = T.train(dataclasses.replace(tiny_run(decoder, decoder_steps=3), dit_from=full))
    assert (again.dit_losses, len(again.decoder_losses)) == ([], 3)
    with pytest.raises(ValueError, match="not both"):
        T.train(dataclasses.replace(tiny_run(tmp_path / "both"), dit_from=full, vae_from=full))


def test_decoder_latent_noise_changes_phase_4_only(
    full_run: tuple[Path, T.TrainState], tmp_path: Path
) -> None:
    quiet, (noisy, _) = tmp_path / "quiet", full_run
    assert tiny_run(noisy).decoder_latent_noise > 0  # the shared run has the default noise
    T.train(dataclasses.replace(tiny_run(quiet), decoder_latent_noise=0.0))
    a, b = saved_weights(quiet), saved_weights(noisy)
    moved = {k for k in a if not torch.equal(a[k], b[k])}
    assert moved and all(k.startswith("vae.decoder.") for k in moved)


def test_stage_t_lands_on_the_samplers_time_grid() -> None:
    """Chunk at window stage j, k grid steps into it, sees grid[j * N / W + k]."""
    steps, window = 16, 4
    grid = time_grid(steps)
    per_stage = steps // window
    for stage in range(window):
        for k in range(per_stage):
            expected = float(grid[stage * per_stage + k])
            assert T.stage_t(stage, k / per_stage, window) == pytest.approx(expected, abs=1e-6)


@pytest.fixture(scope="module")
def captions(tmp_path_factory: pytest.TempPathFactory) -> T.Captions:
    from model.text import SpecialTokens, TextEncoder, write_special_tokens
    from model.tiny_t5 import write_tiny_t5

    folder = tmp_path_factory.mktemp("text")
    write_tiny_t5(folder / "t5", d_model=64, seed=2)
    write_special_tokens(folder / "tokens.npz", 64, seed=3)
    null = torch.randn(800, 64)
    return T.Captions(TextEncoder(folder / "t5"), SpecialTokens.load(folder / "tokens.npz"), null)


def test_examples_have_rising_noise_causal_keys_and_clean_context(captions: T.Captions) -> None:
    cfg = T.TrainConfig(out=Path("."), alone=0.0, null_sequence=0.0, caption_dropout=0.0)
    rc = T.toy_config().runtime_config
    data = T.LatentSet(torch.randn(3, 16, 24, 8, 8), [("a red ball falls",) * 4] * 3)
    rng = np.random.default_rng(0)
    tokens = 96  # 6 latent frames x 4 x 4 patches
    seen = set()
    for _ in range(60):
        group, targets = T.dit_example(cfg, rc, rng, data, captions)
        total = len(group.chunks)
        ts = [c.t for c in group.chunks]
        clean = [c for c, t in enumerate(ts) if t == rc.clean_t]
        seen.add((len(clean), total))
        assert clean == list(range(len(clean)))  # context first
        noisy = ts[len(clean) :]
        assert noisy and all(
            a > b for a, b in zip(noisy, noisy[1:], strict=False)
        )  # newer: noisier
        assert [c for c, _, _ in targets] == list(range(len(clean), total))
        for c, chunk in enumerate(group.chunks):
            assert chunk.k_range == (0, (c + 1) * tokens)
            assert (chunk.rope_frame, chunk.rope_frames_total) == (6 * c, 6 * total)
            assert chunk.caption_dropped == (c < len(clean))
    assert {n for n, _ in seen} == {0, 1, 2, 3} and {t for _, t in seen} == {1, 2, 3, 4}


def test_window_layouts_are_the_forwards_the_sampler_plans() -> None:
    """Filling (chunk 0 alone at level 0 first), full, draining, and after v2v prefixes."""
    layouts = set(T.sampler_layouts())
    assert (0, (0,)) in layouts and (0, (3, 2, 1, 0)) in layouts and (3, (3,)) in layouts
    assert (0, (3,)) not in layouts  # a lone nearly-clean chunk always has finished ones before
    rng = np.random.default_rng(1)
    drawn = {(n, tuple(levels)) for n, levels in (T.window_layout(rng) for _ in range(2000))}
    assert drawn == layouts


def test_alone_examples_are_the_uncond_branch(captions: T.Captions) -> None:
    cfg = T.TrainConfig(out=Path("."), alone=1.0)
    rc = T.toy_config().runtime_config
    data = T.LatentSet(torch.randn(2, 16, 24, 8, 8), [("a red ball falls",) * 4] * 2)
    group, targets = T.dit_example(cfg, rc, np.random.default_rng(1), data, captions)
    (chunk,) = group.chunks
    assert (chunk.rope_frame, chunk.rope_frames_total, chunk.k_range) == (0, 6, (0, 96))
    assert chunk.caption_dropped and torch.equal(chunk.caption, captions.null())
    assert len(targets) == 1


def test_object_voxels_weigh_more_and_pasted_frames_not_at_all(captions: T.Captions) -> None:
    objects = torch.zeros(1, 24, 8, 8, dtype=torch.bool)
    objects[0, :, 3, 4] = True  # one object voxel per latent frame
    data = T.LatentSet(torch.randn(1, 16, 24, 8, 8), [("a red ball falls",) * 4], objects)
    weights = data.weights(0, 1)
    assert weights[:, 3, 4].eq(1 + T.OBJECT_WEIGHT).all() and weights.sum() == 6 * (64 + 10)
    cfg = T.TrainConfig(out=Path("."), alone=0.0, null_sequence=0.0, prefix_paste=1.0)
    rc = T.toy_config().runtime_config
    for seed in range(10):
        group, targets = T.dit_example(cfg, rc, np.random.default_rng(seed), data, captions)
        first, _, weight = targets[0]
        pasted = int((weight.flatten(1).sum(1) == 0).sum())
        assert pasted in (1, 2)
        assert torch.equal(
            group.chunks[first].latent[:, :pasted], data.latents[0][:, 6 * first :][:, :pasted]
        )

"""The MAGI-1 ViT-VAE: official conformance, frame counts, tiling, uint8, checkpoint I/O."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.vae import (
    CONFIG_FILE,
    SCALE_FACTOR,
    WEIGHTS_FILE,
    VAEConfig,
    ViTVAE,
    decode_chunk_to_uint8,
    encode_frames,
    latent_frames_for,
    load_vae,
    random_vae,
    resize_pos_embed,
    save_vae,
    to_uint8_frames,
    video_frames_for,
)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _ramp(a: torch.Tensor, b: torch.Tensor, dim: int, e: int) -> torch.Tensor:
    """The reference's blend written row by row: b[y] = a[-e+y](1 - y/e) + b[y](y/e)."""
    b = b.clone()
    for y in range(e):
        tail = a.select(dim, a.shape[dim] - e + y)
        b.select(dim, y).copy_(tail * (1 - y / e) + b.select(dim, y) * (y / e))
    return b


@pytest.fixture(scope="module")
def official(conformance_dir):
    folder = conformance_dir / "vae-tiny"
    return load_vae(folder), load_file(folder / "untiled.safetensors")


@pytest.fixture(scope="module")
def tiny() -> ViTVAE:
    return random_vae(VAEConfig.tiny(), seed=0)


# ---- conformance with the official code (fp32) -------------------------------------------------


def test_encoder_matches_official_moments_and_posterior_mean(official):
    vae, t = official
    assert _rel(vae.encoder(t["enc_base.x"]).detach(), t["enc_base.moments"]) < 1e-5
    assert _rel(vae.encode_mean(t["enc_base.x"]), t["enc_base.mean"]) < 1e-5


def test_decoder_matches_official_output(official):
    vae, t = official
    assert _rel(vae.decode(t["dec_base.z"]), t["dec_base.out"]) < 1e-5


def test_config_is_read_from_the_official_json(conformance_dir):
    config = VAEConfig.from_json(conformance_dir / "vae-tiny" / CONFIG_FILE)
    assert (config.embed_dim, config.num_heads, config.depth) == (512, 8, 1)
    assert config.base_grid == (2, 4, 4)
    assert config.unpatch_channels == 2


# ---- config ------------------------------------------------------------------------------------


def test_config_json_round_trips_in_the_official_layout(tmp_path):
    VAEConfig.tiny().to_json(tmp_path / CONFIG_FILE)
    doc = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert doc["_class_name"] == "ViTVAE" and doc["model_type"] == "vit"
    assert len(doc["ddconfig"]) == 18
    assert VAEConfig.from_json(tmp_path / CONFIG_FILE) == VAEConfig.tiny()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_heads": 3}, "multiple of num_heads"),
        ({"embed_dim": 128}, "multiple of patch_length"),
        ({"conv_last_layer": False}, "conv_last_layer"),
        ({"use_rope": True}, "use_rope"),
        ({"double_z": False}, "double_z"),
        ({"video_size": 4}, "base grid is empty"),
    ],
)
def test_config_rejects_unusable_values_with_a_reason(change, message):
    fields = VAEConfig.tiny().to_ddconfig() | change
    with pytest.raises(ValueError, match=message):
        VAEConfig(**fields)


def test_config_rejects_unknown_ddconfig_keys_naming_them(tmp_path):
    doc = {"_class_name": "ViTVAE", "ddconfig": {"embed_dim": 256, "heads": 4}}
    (tmp_path / CONFIG_FILE).write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="unknown ddconfig keys \\['heads'\\]"):
        VAEConfig.from_json(tmp_path / CONFIG_FILE)


def test_optional_modules_follow_the_config_flags():
    config = VAEConfig.tiny().to_ddconfig()
    config |= {"ln_in_attn": False, "use_final_proj": True, "with_cls_token": False}
    keys = ViTVAE(VAEConfig(**config)).state_dict().keys()
    assert "encoder.blocks.0.norm1.weight" in keys and "decoder.final_proj.weight" in keys
    assert "decoder.final_norm.bias" in keys and "encoder.cls_token" not in keys
    assert "encoder.blocks.0.norm1.weight" not in ViTVAE(VAEConfig.tiny()).state_dict()


# ---- frame <-> latent counts (§5.3) ------------------------------------------------------------


@pytest.mark.parametrize(
    ("frames", "fps", "latents"),
    [(1, 24, 1), (4, 24, 1), (13, 24, 4), (24, 24, 6), (32, 24, 8), (96, 24, 24), (30, 30, 6)],
)
def test_latent_frames_for_follows_the_tiled_encode(frames, fps, latents):
    assert latent_frames_for(frames, fps=fps) == latents


@pytest.mark.parametrize("frames", [2, 3, 14, 15, 26, 27])
def test_latent_frames_for_refuses_a_two_or_three_frame_remainder(frames):
    with pytest.raises(ValueError, match="cannot be encoded"):
        latent_frames_for(frames)


def test_video_frames_for_n_latents_at_24_fps():
    expected = [1, 8, 12, 13, 20, 24, 25, 32, 36, 37]
    assert [video_frames_for(n) for n in range(1, 11)] == expected
    assert video_frames_for(7, fps=60) == 28  # 30-frame tiles = 7 latents each


def test_frame_counts_match_what_the_model_produces(tiny):
    for frames in (1, 4, 13, 16, 24):
        video = torch.zeros(1, 3, frames, 8, 8)
        assert tiny.tiled_encode(video).shape[2] == latent_frames_for(frames)
    for n in range(1, 8):
        assert tiny.tiled_decode(torch.zeros(1, 16, n, 1, 1)).shape[2] == video_frames_for(n)


def test_tiled_encode_refuses_a_two_frame_remainder_with_a_clear_message(tiny):
    with pytest.raises(ValueError, match="tile at 12 has 2 frames"):
        tiny.tiled_encode(torch.zeros(1, 3, 14, 8, 8))


def test_pipeline_tiles_need_at_least_eight_fps(tiny):
    with pytest.raises(ValueError, match="fps must be >= 8"):
        decode_chunk_to_uint8(tiny, torch.zeros(1, 16, 1, 1, 1), fps=6)


# ---- single-frame paths ------------------------------------------------------------------------


def test_single_frame_encodes_as_the_frame_repeated_four_times(tiny):
    frame = torch.rand(1, 3, 1, 16, 24) * 2 - 1
    latent = tiny.encode_mean(frame)
    repeated = tiny.encoder(frame.expand(-1, -1, 4, -1, -1)).detach()
    assert latent.shape == (1, 16, 1, 2, 3)
    torch.testing.assert_close(latent, repeated[:, :16, :1], rtol=0, atol=0)


def test_single_latent_decodes_to_one_frame_the_first_of_four(tiny):
    z = torch.randn(1, 16, 1, 2, 3)
    video = tiny.decode(z)
    assert video.shape == (1, 3, 1, 16, 24)
    torch.testing.assert_close(video, tiny.decoder(z)[:, :, :1].detach(), rtol=0, atol=0)


def test_position_embedding_resize_is_trilinear_without_corner_alignment():
    pos = torch.randn(1, 1 + 2 * 4 * 4, 8)
    out = resize_pos_embed(pos, 1, (2, 4, 4), (4, 4, 4))
    grid_in, grid_out = pos[0, 1:].reshape(2, 4, 4, 8), out[0, 1:].reshape(4, 4, 4, 8)
    # Doubling T with align_corners=False samples source t = (j + 0.5) / 2 - 0.5, clamped.
    expected = [grid_in[0], 0.75 * grid_in[0] + 0.25 * grid_in[1],
                0.25 * grid_in[0] + 0.75 * grid_in[1], grid_in[1]]  # fmt: skip
    torch.testing.assert_close(grid_out, torch.stack(expected))
    torch.testing.assert_close(out[:, :1], pos[:, :1], rtol=0, atol=0)
    assert resize_pos_embed(pos, 1, (2, 4, 4), (2, 4, 4)) is pos


# ---- tiling (§5.2) -----------------------------------------------------------------------------


def test_tiled_decode_of_a_chunk_that_fits_one_spatial_tile_is_two_untiled_decodes(tiny):
    z = torch.randn(1, 16, 6, 8, 8)
    halves = torch.cat([tiny.decode(z[:, :, :3]), tiny.decode(z[:, :, 3:])], dim=2)
    torch.testing.assert_close(tiny.tiled_decode(z), halves, rtol=0, atol=0)
    torch.testing.assert_close(tiny.tiled_decode(z[:, :, :3]), tiny.decode(z[:, :, :3]))


def test_tiled_decode_blends_seams_with_a_linear_ramp_over_raw_neighbours(tiny):
    # 32-px tiles = 4 latents, stride 3 latents, 8-px ramp, 24 px kept: a 2 x 2 grid
    z = torch.randn(1, 16, 3, 6, 6)
    out = tiny.tiled_decode(z, tile_px=32)
    raw = {(i, j): tiny.decode(z[:, :, :, 3 * i : 3 * i + 4, 3 * j : 3 * j + 4]) for i in (0, 1)
           for j in (0, 1)}  # fmt: skip
    assert out.shape == (1, 3, 12, 48, 48)
    torch.testing.assert_close(out[..., :24, :24], raw[0, 0][..., :24, :24], rtol=0, atol=0)
    below = _ramp(raw[0, 0], raw[1, 0], dim=3, e=8)
    torch.testing.assert_close(out[..., 24:, :24], below[..., :24, :24])
    right = _ramp(raw[0, 0], raw[0, 1], dim=4, e=8)
    torch.testing.assert_close(out[..., :24, 24:], right[..., :24, :24])
    corner = _ramp(raw[1, 0], _ramp(raw[0, 1], raw[1, 1], dim=3, e=8), dim=4, e=8)
    torch.testing.assert_close(out[..., 24:, 24:], corner[..., :24, :24])


def test_tiled_decode_ramp_is_capped_by_a_small_last_tile(tiny):
    # 64-px tiles: stride 6 latents, nominal ramp 16 px; the last column tile is 1 latent (8 px)
    z = torch.randn(1, 16, 3, 2, 7)
    out = tiny.tiled_decode(z, tile_px=64)
    first, last = tiny.decode(z[..., 0:8]), tiny.decode(z[..., 6:7])
    assert out.shape == (1, 3, 12, 16, 56)
    torch.testing.assert_close(out[..., :48], first[..., :48], rtol=0, atol=0)
    torch.testing.assert_close(out[..., 48:], _ramp(first, last, dim=4, e=8))


def test_tiled_encode_blends_in_place_so_neighbours_are_already_blended(tiny):
    # 64-px tiles = 8 latents, stride 48 px, 2-latent ramp, 6 latents kept: a 2 x 2 grid
    video = torch.rand(1, 3, 4, 96, 96) * 2 - 1
    out = tiny.tiled_encode(video, tile_px=64)
    m = {(i, j): tiny.encode_mean(video[..., 48 * i : 48 * i + 64, 48 * j : 48 * j + 64])
         for i in (0, 1) for j in (0, 1)}  # fmt: skip
    m[0, 1] = _ramp(m[0, 0], m[0, 1], dim=4, e=2)
    m[1, 0] = _ramp(m[0, 0], m[1, 0], dim=3, e=2)
    chained = _ramp(m[1, 0], _ramp(m[0, 1], m[1, 1], dim=3, e=2), dim=4, e=2)
    assert out.shape == (1, 16, 1, 12, 12)
    torch.testing.assert_close(out[..., :6, 6:], m[0, 1][..., :6, :6])
    torch.testing.assert_close(out[..., 6:, :6], m[1, 0][..., :6, :6])
    torch.testing.assert_close(out[..., 6:, 6:], chained[..., :6, :6])


# ---- pixels <-> DiT latents --------------------------------------------------------------------


def test_uint8_conversion_truncates_clamps_and_returns_thwc():
    values = torch.tensor([-2.0, -1.0, 0.0, 0.999, 1.0, 2.0])
    video = torch.stack([values, values, values]).reshape(1, 3, 1, 1, 6)
    video[:, 1] = 0.5  # channel order check: G = 0.5 * 127.5 + 127.5 = 191.25 -> 191
    frames = to_uint8_frames(video)
    assert frames.shape == (1, 1, 6, 3) and frames.dtype == torch.uint8
    assert frames[0, 0, :, 0].tolist() == [0, 0, 127, 254, 255, 255]  # 127.5 -> 127, not 128
    assert frames[0, 0, :, 1].tolist() == [191] * 6


def test_decode_chunk_to_uint8_unscales_decodes_tiled_and_truncates(tiny):
    latent = torch.randn(1, 16, 6, 8, 8) * SCALE_FACTOR
    frames = decode_chunk_to_uint8(tiny, latent)
    assert frames.shape == (24, 64, 64, 3) and frames.dtype == torch.uint8
    expected = to_uint8_frames(tiny.tiled_decode(latent / SCALE_FACTOR))
    torch.testing.assert_close(frames, expected, rtol=0, atol=0)
    assert decode_chunk_to_uint8(tiny, latent[:, :, :4]).shape[0] == 13


def test_encode_frames_normalises_tiles_and_scales(tiny):
    frames = torch.randint(0, 256, (24, 32, 48, 3), dtype=torch.uint8)
    latent = encode_frames(tiny, frames)
    assert latent.shape == (1, 16, 6, 4, 6) and latent.dtype == torch.float32
    video = frames.permute(3, 0, 1, 2).unsqueeze(0).float() / 127.5 - 1
    torch.testing.assert_close(latent, tiny.tiled_encode(video) * SCALE_FACTOR, rtol=0, atol=0)
    with pytest.raises(ValueError, match="14 frames cannot be encoded|2 frames"):
        encode_frames(tiny, frames[:14])


# ---- loading, saving, random weights -----------------------------------------------------------


def test_save_then_load_round_trips_weights_and_outputs(tiny, tmp_path):
    save_vae(tiny, tmp_path)
    loaded = load_vae(tmp_path)
    assert loaded.config == tiny.config
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in tiny.state_dict().items())
    z = torch.randn(1, 16, 2, 3, 3)
    torch.testing.assert_close(loaded.decode(z), tiny.decode(z), rtol=0, atol=0)


def test_load_vae_casts_to_the_requested_dtype(tiny, tmp_path):
    save_vae(tiny, tmp_path)
    bf16 = load_vae(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    z = torch.randn(1, 16, 2, 3, 3)
    assert _rel(bf16.decode(z), tiny.decode(z)) < 0.05


def _break_weights(folder, change) -> None:
    state = load_file(folder / WEIGHTS_FILE)
    change(state)
    save_file(state, folder / WEIGHTS_FILE)


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (lambda s: s.pop("decoder.norm.bias"), "missing keys \\[decoder.norm.bias\\]"),
        (
            lambda s: s.update({"decoder.extra": torch.zeros(1)}),
            "unexpected keys \\[decoder.extra",
        ),
        (
            lambda s: s.update({"encoder.pos_embed": torch.zeros(1, 5, 256)}),
            "encoder.pos_embed: file \\(1, 5, 256\\) vs config \\(1, 33, 256\\)",
        ),
    ],
)
def test_load_vae_names_each_mismatched_key_and_the_file(tiny, tmp_path, breakage, message):
    save_vae(tiny, tmp_path)
    _break_weights(tmp_path, breakage)
    with pytest.raises(ValueError, match=message) as error:
        load_vae(tmp_path)
    assert WEIGHTS_FILE in str(error.value)


@pytest.mark.parametrize("missing", [CONFIG_FILE, WEIGHTS_FILE])
def test_load_vae_names_a_missing_file(tiny, tmp_path, missing):
    save_vae(tiny, tmp_path)
    (tmp_path / missing).unlink()
    with pytest.raises(FileNotFoundError, match=missing):
        load_vae(tmp_path)


def test_random_vae_is_seeded_and_leaves_the_global_rng_alone():
    state = torch.random.get_rng_state()
    a, b = random_vae(VAEConfig.tiny(), seed=1), random_vae(VAEConfig.tiny(), seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    other = random_vae(VAEConfig.tiny(), seed=2)
    assert not torch.equal(other.decoder.proj_in.weight, a.decoder.proj_in.weight)

"""The DiT against the official MAGI-1 code's own outputs (shared/conformance, fp32 CPU)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from model.checkpoint import load_dit
from model.config import MagiConfig
from model.dit import ChunkGroup, ChunkInput

PREFIX = "model.000."


@pytest.fixture(scope="module")
def official(conformance_dir):
    folder = conformance_dir / "dit-tiny-gelu-base"
    config = MagiConfig.from_json(folder / "config.json")
    model = load_dit(folder, config)
    tensors = {k[len(PREFIX) :]: v for k, v in load_file(folder / "forward.safetensors").items()}
    return model, tensors


def _one_chunk(tensors) -> ChunkInput:
    mask = tensors["xattn_mask"][0, 0].bool()
    return ChunkInput(
        latent=tensors["x"][0],
        t=float(tensors["t"][0, 0]),
        caption=tensors["y"][0, 0][mask],
        caption_dropped=bool(tensors["caption_dropout_mask"][0]),
        rope_frame=0,
        rope_frames_total=tensors["x"].shape[2],
        k_range=tuple(int(v) for v in tensors["kv_range"][0]),
    )


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_forward_matches_official_velocity(official):
    model, tensors = official
    out = model([ChunkGroup([_one_chunk(tensors)])])[0][0]
    assert out.shape == tensors["out"][0].shape
    assert _rel(out, tensors["out"][0]) < 1e-5


def test_rope_table_matches_official(official):
    model, tensors = official
    _, _, t, h, w = tensors["x"].shape
    table = model.rope.table(range(0, t), t, h // 2, w // 2)
    assert _rel(table, tensors["mid.rope"]) < 1e-5


def test_timestep_and_condition_match_official(official):
    model, tensors = official
    t_emb = model.t_embedder(tensors["t"].flatten())
    assert _rel(t_emb, tensors["mid.t_embedder.call0"]) < 1e-5
    cond = model._condition([_one_chunk(tensors)])
    assert _rel(cond, tensors["mid.condition"][0]) < 1e-5


def test_layer_outputs_match_official(official):
    """Hook every layer's output (the residual stream) and compare with the intermediates."""
    model, tensors = official
    seen = {}
    hooks = [
        layer.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out))
        for i, layer in enumerate(model.videodit_blocks.layers)
    ]
    try:
        model([ChunkGroup([_one_chunk(tensors)])])
    finally:
        for h in hooks:
            h.remove()
    for i, out in seen.items():
        ref = tensors[f"mid.videodit_blocks.layers.{i}"][:, 0]
        assert _rel(out, ref) < 1e-5, f"layer {i}"

"""The bench's FLOP counter against magi1-reference.md §10, and its windows against §3.13."""

from __future__ import annotations

import pytest
import torch

from bench.model_forward import (
    CAPTION_TOKENS,
    Case,
    build_window,
    chunk_tokens,
    forward_flops,
    gemm_weights_per_layer,
    tiny_dit,
    window_key_ranges,
)
from model.checkpoint import build_dit_meta
from model.config import get_preset

REL = 5e-3  # the reference rounds to 3-4 digits


def per_chunk_step(preset: str, height: int, width: int) -> dict[str, float]:
    """One chunk per denoising step at the steady-state mean k = 3.5, as in §10.4: the four
    in-flight chunks attend to 5, 4, 3, 2 chunks."""
    cfg = get_preset(preset).model_config
    np_ = chunk_tokens(cfg, height, width)
    window = forward_flops(cfg, [(np_, k * np_, CAPTION_TOKENS) for k in (5, 4, 3, 2)])
    return {key: value / 4 for key, value in window.items()}


@pytest.mark.parametrize(
    ("preset", "gflop_per_token", "gemm_tflop", "attn_tflop_per_k", "total_tflop"),
    [("4.5B_base", 8.13, 98.8, 61.7, 315), ("24B_base", 44.69, 543, 174.1, 1154)],
)
def test_flops_match_reference_at_720x720(
    preset, gflop_per_token, gemm_tflop, attn_tflop_per_k, total_tflop
):
    cfg = get_preset(preset).model_config
    np_ = chunk_tokens(cfg, 720, 720)
    assert np_ == 12150
    one_token = forward_flops(cfg, [(1, 0, 0)])
    assert one_token["gemm"] / 1e9 == pytest.approx(gflop_per_token, rel=REL)
    one_chunk_k1 = forward_flops(cfg, [(np_, np_, 0)])
    assert one_chunk_k1["gemm"] / 1e12 == pytest.approx(gemm_tflop, rel=REL)
    assert one_chunk_k1["attention"] / 1e12 == pytest.approx(attn_tflop_per_k, rel=REL)
    assert per_chunk_step(preset, 720, 720)["total"] / 1e12 == pytest.approx(total_tflop, rel=REL)


def test_flops_match_reference_at_1280x720():
    for preset, gemm, attn in (("4.5B_base", 175.6, 682.2), ("24B_base", 965.5, 1926.3)):
        got = per_chunk_step(preset, 720, 1280)
        assert got["gemm"] / 1e12 == pytest.approx(gemm, rel=REL)
        assert got["attention"] / 1e12 == pytest.approx(attn, rel=REL)


def test_attention_is_linear_in_keys_and_cross_attention_counts_caption_tokens():
    cfg = get_preset("4.5B_base").model_config
    base = forward_flops(cfg, [(100, 200, 0)])
    assert forward_flops(cfg, [(100, 400, 0)])["attention"] == 2 * base["attention"]
    assert forward_flops(cfg, [(100, 200, 50)])["attention"] == 1.25 * base["attention"]
    assert base["total"] == base["gemm"] + base["attention"]


@pytest.mark.parametrize("preset", ["tiny", "4.5B_base", "24B_base"])
def test_gemm_weights_equal_the_models_token_wise_linears(preset):
    """The counter's formula against the weight shapes of the DiT itself (meta device)."""
    layer = build_dit_meta(get_preset(preset)).videodit_blocks.layers[0]
    qkv = layer.self_attention.linear_qkv
    linears = [qkv.q, qkv.qx, qkv.k, qkv.v, layer.self_attention.linear_proj]
    linears += [layer.mlp.linear_fc1, layer.mlp.linear_fc2]
    want = sum(m.weight.numel() for m in linears)
    assert gemm_weights_per_layer(get_preset(preset).model_config) == want


def test_window_key_ranges_follow_the_steady_state_table():
    # clean chunk n-4 sees itself; chunks n-3 .. n (stages 3 .. 0) see 2, 3, 4, 5 chunks
    assert window_key_ranges(4, "clean") == [(0, 1), (0, 2), (0, 3), (0, 4), (0, 5)]
    # other sub-steps: the clean chunk is the first entry of the key sequence, from the cache
    assert window_key_ranges(4, "cache") == [(0, 2), (0, 3), (0, 4), (0, 5)]
    # fill phase: no history, so every chunk sees all chunks up to itself
    assert window_key_ranges(3, "none") == [(0, 1), (0, 2), (0, 3)]
    with pytest.raises(ValueError, match="in_flight"):
        window_key_ranges(5, "none")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("history", ["none", "cache", "clean"])
def test_bench_window_runs_on_the_tiny_model(history, dtype):
    config, model = tiny_dit(dtype)
    group = build_window(model, config, Case(64, 4, history, dtype))
    out = model([group])[0]
    assert len(out) == len(group.chunks)
    assert all(v.shape == (16, 6, 8, 8) and torch.isfinite(v).all() for v in out)

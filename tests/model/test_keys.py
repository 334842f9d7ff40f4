"""The DiT built on the meta device has exactly the official state-dict keys and shapes
(reference §3.14 and §7.5, tables written out here by hand)."""

from __future__ import annotations

import pytest

from model.checkpoint import build_dit_meta, expected_shapes
from model.config import get_preset

# (4.5B, 24B) shapes of the top-level keys.
TOP = {
    "x_embedder.weight": ((3072, 16, 1, 2, 2), (6144, 32, 1, 2, 2)),
    "t_embedder.mlp.0.weight": ((768, 256), (1536, 256)),
    "t_embedder.mlp.0.bias": ((768,), (1536,)),
    "t_embedder.mlp.2.weight": ((768, 768), (1536, 1536)),
    "t_embedder.mlp.2.bias": ((768,), (1536,)),
    "y_embedder.y_proj_xattn.0.weight": ((3072, 4096), (6144, 4096)),
    "y_embedder.y_proj_xattn.0.bias": ((3072,), (6144,)),
    "y_embedder.y_proj_adaln.0.weight": ((768, 4096), (1536, 4096)),
    "y_embedder.y_proj_adaln.0.bias": ((768,), (1536,)),
    "y_embedder.null_caption_embedding": ((800, 4096), (800, 4096)),
    "rope.bands": ((16,), (16,)),
    "videodit_blocks.final_layernorm.weight": ((3072,), (6144,)),
    "videodit_blocks.final_layernorm.bias": ((3072,), (6144,)),
    "final_linear.linear.weight": ((64, 3072), (128, 6144)),
}

# (4.5B, 24B) shapes per layer, suffix of `videodit_blocks.layers.{i}.`
LAYER = {
    "ada_modulate_layer.proj.0.weight": ((6144, 768), (12288, 1536)),
    "ada_modulate_layer.proj.0.bias": ((6144,), (12288,)),
    "self_attention.linear_qkv.layer_norm.weight": ((3072,), (6144,)),
    "self_attention.linear_qkv.layer_norm.bias": ((3072,), (6144,)),
    "self_attention.linear_qkv.q.weight": ((3072, 3072), (6144, 6144)),
    "self_attention.linear_qkv.qx.weight": ((3072, 3072), (6144, 6144)),
    "self_attention.linear_qkv.k.weight": ((1024, 3072), (1024, 6144)),
    "self_attention.linear_qkv.v.weight": ((1024, 3072), (1024, 6144)),
    "self_attention.linear_kv_xattn.weight": ((2048, 3072), (2048, 6144)),
    "self_attention.linear_proj.weight": ((3072, 6144), (6144, 12288)),
    "self_attention.q_layernorm.weight": ((128,), (128,)),
    "self_attention.q_layernorm.bias": ((128,), (128,)),
    "self_attention.k_layernorm.weight": ((128,), (128,)),
    "self_attention.k_layernorm.bias": ((128,), (128,)),
    "self_attention.q_layernorm_xattn.weight": ((128,), (128,)),
    "self_attention.q_layernorm_xattn.bias": ((128,), (128,)),
    "self_attention.k_layernorm_xattn.weight": ((128,), (128,)),
    "self_attention.k_layernorm_xattn.bias": ((128,), (128,)),
    "self_attn_post_norm.weight": ((3072,), (6144,)),
    "self_attn_post_norm.bias": ((3072,), (6144,)),
    "mlp.layer_norm.weight": ((3072,), (6144,)),
    "mlp.layer_norm.bias": ((3072,), (6144,)),
    "mlp.linear_fc1.weight": ((12288, 3072), (32768, 6144)),
    "mlp.linear_fc2.weight": ((3072, 12288), (6144, 16384)),
    "mlp_post_norm.weight": ((3072,), (6144,)),
    "mlp_post_norm.bias": ((3072,), (6144,)),
}

PER_TENSOR = [
    "self_attention.linear_qkv.q",
    "self_attention.linear_qkv.qx",
    "self_attention.linear_qkv.k",
    "self_attention.linear_qkv.v",
    "mlp.linear_fc1",
]
PER_CHANNEL = ["self_attention.linear_proj", "mlp.linear_fc2"]

LAYERS = {"4.5B": 34, "24B": 48}
PARAMS = {"4.5B": 4_459_898_128, "24B": 23_899_281_936}


def expected_table(size: str, fp8: bool) -> dict[str, tuple[int, ...]]:
    col = 0 if size == "4.5B" else 1
    table = {k: v[col] for k, v in TOP.items()}
    n = LAYERS[size]
    for i in range(n):
        layer = {k: v[col] for k, v in LAYER.items()}
        if fp8 and 0 < i < n - 1:
            for name in PER_TENSOR + PER_CHANNEL:
                out_f, in_f = layer.pop(f"{name}.weight")
                layer[f"{name}.weight"] = (1, out_f, in_f)
                layer[f"{name}.weight_scale"] = (1,)
                if name in PER_TENSOR:
                    layer[f"{name}.input_scale"] = (in_f,)
                else:
                    layer[f"{name}.input_scale"] = (1,)
                    layer[f"{name}.smooth_scale"] = (1, in_f)
        table.update({f"videodit_blocks.layers.{i}.{k}": v for k, v in layer.items()})
    return table


@pytest.mark.parametrize(
    "preset",
    [
        "4.5B_base",
        "4.5B_distill",
        "4.5B_distill_quant",
        "24B_base",
        "24B_distill",
        "24B_distill_quant",
    ],
)
def test_official_presets_have_exactly_the_reference_keys_and_shapes(preset):
    size = preset.split("_")[0]
    fp8 = preset.endswith("quant")
    got = expected_shapes(build_dit_meta(get_preset(preset)))
    want = expected_table(size, fp8)
    assert sorted(set(want) - set(got)) == []
    assert sorted(set(got) - set(want)) == []
    assert {k: got[k] for k in want} == want


def test_key_counts_match_the_reference_including_fp8():
    assert len(expected_table("4.5B", False)) == 898
    assert len(expected_table("4.5B", True)) == 1410
    assert len(expected_table("24B", False)) == 1262
    assert len(expected_table("24B", True)) == 1998


@pytest.mark.parametrize("size", ["4.5B", "24B"])
def test_parameter_count_matches_the_reference(size):
    model = build_dit_meta(get_preset(f"{size}_base"))
    assert sum(p.numel() for p in model.parameters()) == PARAMS[size]


def test_fp8_weights_are_e4m3_and_scales_fp32_first_and_last_layer_unquantised():
    import torch

    model = build_dit_meta(get_preset("4.5B_distill_quant"))
    state = model.state_dict()
    assert state["videodit_blocks.layers.1.mlp.linear_fc1.weight"].dtype == torch.float8_e4m3fn
    assert state["videodit_blocks.layers.1.mlp.linear_fc1.weight_scale"].dtype == torch.float32
    assert state["videodit_blocks.layers.0.mlp.linear_fc1.weight"].dtype == torch.bfloat16
    assert state["videodit_blocks.layers.33.mlp.linear_fc1.weight"].dtype == torch.bfloat16

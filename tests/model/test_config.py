"""Configs: the official config.json format and the preset values (reference §2.2)."""

from __future__ import annotations

import json

import pytest

from model.config import PRESETS, MagiConfig, get_preset, preset_name


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_round_trips_through_config_json(name, tmp_path):
    PRESETS[name].to_json(tmp_path / "config.json")
    assert MagiConfig.from_json(tmp_path / "config.json") == PRESETS[name]
    assert preset_name(PRESETS[name]) == name


def test_official_values_are_the_released_ones():
    base, distill = get_preset("4.5B_base"), get_preset("24B_distill_quant")
    assert (base.model_config.num_layers, base.model_config.hidden_size) == (34, 3072)
    assert base.runtime_config.num_steps == 64 and base.runtime_config.cfg_number == 3
    assert (base.runtime_config.video_size_h, base.runtime_config.video_size_w) == (720, 720)
    assert base.runtime_config.cfg_t_range == (0.0, 0.0217, 0.1, 0.3, 0.999)
    assert base.runtime_config.noise2clean_kvrange == (5, 4, 3, 2)
    assert base.runtime_config.clean_t == 0.9999 and base.runtime_config.scale_factor == 0.18215
    assert base.weight_subdir == "inference_weight"
    m = distill.model_config
    assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.ffn_hidden_size) == (
        48,
        6144,
        48,
        16384,
    )
    assert m.x_rescale_factor == 0.1 and m.half_channel_vae and m.gated_linear_unit
    assert distill.engine_config.cp_size == 8 and distill.runtime_config.num_steps == 16
    assert distill.weight_subdir == "inference_weight.fp8.distill"


def test_a_config_json_missing_a_field_names_it(tmp_path):
    data = get_preset("tiny").to_dict()
    del data["runtime_config"]["clean_t"]
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="missing fields \\['clean_t'\\]"):
        MagiConfig.from_json(tmp_path / "config.json")


def test_cfg_number_must_match_distill_as_the_official_post_validation_says():
    data = get_preset("4.5B_distill").to_dict()
    data["runtime_config"]["cfg_number"] = 3
    with pytest.raises(ValueError, match="cfg_number must be 1"):
        MagiConfig.from_dict(data)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError, match="known presets: toy, tiny, tiny_distill"):
        get_preset("7B")


def test_num_steps_must_divide_by_the_window():
    data = get_preset("tiny").to_dict()
    data["runtime_config"]["num_steps"] = 10
    with pytest.raises(ValueError, match="divisible by window_size"):
        MagiConfig.from_dict(data)

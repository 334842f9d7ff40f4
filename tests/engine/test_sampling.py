"""Time grid, shortcut steps, CFG scales and KV look-back (magi1-reference.md §3.13, §4.2-§4.8)."""

from __future__ import annotations

import pytest
import torch

from engine.sampling import NEARLY_CLEAN_BLEND, cfg_scales, mix_cfg, time_grid
from model.config import EngineConfig, RuntimeConfig
from scheduler.timegrid import (
    kv_chunk_range,
    kv_lookback,
    nearly_clean,
    step_intervals,
    step_size_value,
)

RT = RuntimeConfig()
T_N = 1.0000001192092896  # fp32 rounding of the official formula at s = 1

# §4.2: the 16-step grid, as listed in the reference (5 significant digits).
GRID_16 = [
    0,
    0.00131,
    0.00526,
    0.0120,
    0.02174,
    0.03482,
    0.05172,
    0.07313,
    0.1,
    0.13366,
    0.17606,
    0.23004,
    0.3,
    0.39302,
    0.52128,
    0.70755,
    1,
]


def _scales(t: float) -> tuple[float, float]:
    return cfg_scales(t, RT.cfg_t_range, RT.prev_chunk_scales, RT.text_scales)


def test_grid_16_steps_matches_reference_values():
    t = time_grid(16)
    assert t.dtype == torch.float32 and t.shape == (17,)
    assert t.tolist() == pytest.approx(GRID_16, abs=6e-6)


@pytest.mark.parametrize("num_steps", [4, 8, 12, 16, 32, 64, 96])
def test_grid_is_fp32_closed_form_with_last_value_above_one(num_steps):
    t = time_grid(num_steps)
    assert float(t[0]) == 0.0
    assert float(t[-1]) == T_N
    assert bool((t[1:] > t[:-1]).all())
    if num_steps != 12:
        s = torch.linspace(0, 1, num_steps + 1, dtype=torch.float64)
        closed = s**2 / (3 - 2 * s**2)
        assert torch.allclose(t.double(), closed, atol=3e-7, rtol=0)


@pytest.mark.parametrize("num_steps", [4, 12, 16, 64])
def test_stage_boundaries_are_the_fp32_quarter_values(num_steps):
    t = time_grid(num_steps)
    quarters = [float(t[num_steps * q // 4]) for q in range(5)]
    assert quarters == [0.0, 0.021739130839705467, 0.10000000894069672, 0.30000001192092896, T_N]


def test_shortcut_grid_8_16_16_takes_the_double_step_first():
    # s = 0, 1/8, 3/16, 1/4, ...: the same fp32 values as the 16-step grid at those s.
    expected = time_grid(16)[[0, 2, 3, 4, 6, 7, 8, 10, 11, 12, 14, 15, 16]]
    assert torch.equal(time_grid(12, "8,16,16"), expected)
    assert torch.equal(time_grid(12), expected)


def test_shortcut_grid_16_16_8_takes_the_double_step_last():
    expected = time_grid(16)[[0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14, 16]]
    assert torch.equal(time_grid(12, "16,16,8"), expected)


def test_unknown_shortcut_mode_is_refused():
    with pytest.raises(ValueError, match="shortcut_mode"):
        time_grid(12, "4,4,4")


def test_step_intervals_follow_init_intervel():
    assert step_intervals(12) == [2, 1, 1] * 4
    assert step_intervals(12, "16,16,8") == [1, 1, 2] * 4
    assert step_intervals(24) == [2, 1, 1] * 8  # any multiple of 3, used only with 12 steps
    assert step_intervals(16) == [1] * 16
    assert step_intervals(64, EngineConfig().shortcut_mode) == [1] * 64


def test_step_size_value_is_half_steps_or_shortcut_interval():
    assert step_size_value(64, 1) == 32.0
    assert step_size_value(16, 1) == 8.0
    assert step_size_value(12, 2) == 4.0
    assert step_size_value(12, 1) == 8.0


@pytest.mark.parametrize("mode", ["8,16,16", "16,16,8"])
def test_shortcut_step_size_equals_half_over_ds_with_window_four(mode):
    # The interval is indexed by the sub-step j; with dps = 3 it lines up with the real step.
    sixteenths = {"8,16,16": [0, 2, 3], "16,16,8": [0, 1, 2]}[mode]
    s = [(4 * q + x) / 16 for q in range(4) for x in sixteenths] + [1.0]
    intervals = step_intervals(12, mode)
    dps = 12 // 4
    for k in range(12):
        assert step_size_value(12, intervals[k % dps]) == 0.5 / (s[k + 1] - s[k])


@pytest.mark.parametrize("num_steps", [16, 64])
def test_cfg_scales_are_full_guidance_below_0_3_and_context_only_in_last_stage(num_steps):
    t = time_grid(num_steps)
    for k in range(num_steps):
        stage = k // (num_steps // 4)
        want = (1.0, 0.0) if stage == 3 else (1.5, 7.5)
        assert _scales(float(t[k])) == want, (k, float(t[k]))
    assert _scales(float(t[-1])) == (1.0, 0.0)


def test_cfg_scale_index_is_the_step_quarter_for_every_n_divisible_by_4():
    index_of = [0.0, 1.0, 2.0, 3.0, 4.0]  # scales that reveal the looked-up index
    for n in range(4, 244, 4):
        t = time_grid(n)
        for k in range(n):
            got = cfg_scales(float(t[k]), RT.cfg_t_range, index_of, index_of)
            assert got[0] == k // (n // 4), (n, k)


def test_cfg_scales_refuse_t_below_the_first_range():
    with pytest.raises(ValueError, match="below"):
        _scales(-0.01)


def test_mix_cfg_uses_the_official_expression_order():
    g = torch.Generator().manual_seed(0)
    v_u, v_c, v_ct = (torch.randn(2, 16, 6, 4, 4, generator=g) for _ in range(3))
    got = mix_cfg(v_u, v_c, v_ct, 1.5, 7.5)
    sp, st = torch.tensor(1.5), torch.tensor(7.5)
    assert torch.equal(got, (1 - sp) * v_u + (sp - st) * v_c + st * v_ct)
    assert torch.allclose(got, -0.5 * v_u - 6 * v_c + 7.5 * v_ct, atol=1e-5)


def test_mix_cfg_in_last_stage_is_the_context_branch_exactly():
    g = torch.Generator().manual_seed(1)
    v_u, v_c, v_ct = (torch.randn(3, 5, generator=g) for _ in range(3))
    assert torch.equal(mix_cfg(v_u, v_c, v_ct, 1.0, 0.0), v_c)


def test_kv_lookback_is_5_4_3_2_per_step_quartile_and_1_when_clean():
    n = 64
    got = [kv_lookback(d, n, RT.noise2clean_kvrange, RT.clean_chunk_kvrange) for d in range(n + 1)]
    assert got == [5] * 16 + [4] * 16 + [3] * 16 + [2] * 16 + [1]


def test_kv_lookback_is_keyed_on_steps_not_window():
    # 16 steps: quartiles of 4 steps, whatever the window size will be.
    got = [kv_lookback(d, 16, (5, 4, 3, 2), 1) for d in range(16)]
    assert got == [5] * 4 + [4] * 4 + [3] * 4 + [2] * 4


def test_kv_lookback_clean_minus_one_means_last_noise_range():
    assert kv_lookback(64, 64, (5, 4, 3, 2), -1) == 2


def test_kv_lookback_refuses_steps_not_divisible_by_quartiles():
    with pytest.raises(ValueError, match="divisible"):
        kv_lookback(0, 10, (5, 4, 3, 2), 1)


def test_kv_chunk_range_is_clamped_at_chunk_zero_and_ends_at_self():
    assert kv_chunk_range(0, 5) == (0, 1)
    assert kv_chunk_range(2, 5) == (0, 3)
    assert kv_chunk_range(7, 5) == (3, 8)
    assert kv_chunk_range(7, 1) == (7, 8)


def test_nearly_clean_holds_for_the_whole_last_stage():
    t = time_grid(16)
    assert [nearly_clean(float(x)) for x in t[:16]] == [False] * 12 + [True] * 4
    assert nearly_clean(float(t[12]), EngineConfig().distill_nearly_clean_chunk_threshold)
    assert NEARLY_CLEAN_BLEND == 0.7

"""Model-free rules of MAGI-1's sampler: time grid, shortcut steps, CFG scales, KV look-back.

Everything here is a pure function of the runtime/engine config, so the window, the batcher and
the runner agree on one copy of each rule. The numbers follow magi1-reference.md §3.13 and §4.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# torch is imported inside the functions that build tensors, so the window and
# `python -m scheduler plan` (which need only the integer rules) start without it.

SHORTCUT_STEPS = 12  # the one step count that uses the non-uniform shortcut s-grid (§4.8)
SHORTCUT_MODES = ("8,16,16", "16,16,8")  # s step sizes within each quarter: 1/8, 1/16, ...

# Weight of the with-context velocity in the distilled "nearly clean" blend (§4.7): the oldest
# chunk's velocity is 0.7 * v_ctx + 0.3 * v_no_ctx. The official code reads it from the
# `prev_chunks_scale` env var with this default; entry points may override it.
NEARLY_CLEAN_BLEND = 0.7

# `searchsorted(cfg_t_range - 1e-7, t)`: the slack makes a grid t that lands a hair under a
# range bound (fp32 rounding) still count as inside the upper range.
_CFG_T_SLACK = 1e-7


def _shortcut_s_grid(shortcut_mode: str) -> torch.Tensor:
    """s-grid of the 12-step shortcut sampler: each quarter of s is cut into 3 steps.

    "8,16,16" steps 1/8, 1/16, 1/16 per quarter (the double step first); "16,16,8" puts it last.
    All values are dyadic, so they are exact in fp32 however they are built.
    """
    import torch

    if shortcut_mode not in SHORTCUT_MODES:
        raise ValueError(f"shortcut_mode must be one of {SHORTCUT_MODES}, got {shortcut_mode!r}")
    sixteenths = (0, 2, 3) if shortcut_mode == "8,16,16" else (0, 1, 2)
    offsets = [4 * quarter + x for quarter in range(4) for x in sixteenths] + [16]
    return torch.tensor(offsets, dtype=torch.float32) / 16


def time_grid(num_steps: int, shortcut_mode: str = "8,16,16") -> torch.Tensor:
    """The fp32 flow-time grid t_0..t_N (0 = noise, 1 = clean) every chunk walks through.

    t = s^2 / (3 - 2 s^2) (SD3 shift 3 on u = s^2, reversed convention), evaluated in fp32 in
    the official form fp32(1/3)*u / (1 + fp32(1/3 - 1)*u): that rounding makes
    t_N = 1.0000001192 rather than 1, and the last Euler step's dt depends on it.
    """
    import torch

    if num_steps < 1:
        raise ValueError(f"num_steps must be positive, got {num_steps}")
    if num_steps == SHORTCUT_STEPS:
        s = _shortcut_s_grid(shortcut_mode)
    else:
        s = torch.linspace(0, 1, num_steps + 1, dtype=torch.float32)
    u = s.square()
    shift_inv = 1.0 / 3.0  # Python scalars: torch rounds them to fp32 against an fp32 tensor
    return shift_inv * u / (1 + (shift_inv - 1) * u)


def step_intervals(num_steps: int, shortcut_mode: str = "8,16,16") -> list[int]:
    """Per-sub-step shortcut interval (in 1/16 of s), indexed by the sub-step j of a stage.

    Mirrors the official `init_intervel`: any step count divisible by 3 gets the repeated
    pattern (only 12 steps actually uses it, via `step_size_value`); others get all ones. The
    sub-step indexing matches the real step size only when steps-per-stage is a multiple of 3.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be positive, got {num_steps}")
    if num_steps % 3:
        return [1] * num_steps
    if shortcut_mode not in SHORTCUT_MODES:
        raise ValueError(f"shortcut_mode must be one of {SHORTCUT_MODES}, got {shortcut_mode!r}")
    pattern = [2, 1, 1] if shortcut_mode == "8,16,16" else [1, 1, 2]
    return pattern * (num_steps // 3)


def step_size_value(num_steps: int, interval: int) -> float:
    """Step-size value fed through the timestep embedder of distilled models (§3.3, §4.8).

    It is 0.5 / ds: num_steps / 2 for uniform grids, and 4 / interval * 2 for the 12-step
    shortcut grid (4 for a 1/8 step, 8 for a 1/16 step). Independent of the window size.
    """
    if num_steps == SHORTCUT_STEPS:
        return 4 / interval * 2
    return num_steps / 4 * 2


def cfg_scales(
    t: float,
    cfg_t_range: Sequence[float],
    prev_chunk_scales: Sequence[float],
    text_scales: Sequence[float],
) -> tuple[float, float]:
    """(s_p, s_t) for a chunk at flow time t: scale index = #{r : r - 1e-7 < t} - 1.

    Compared in fp32 like the official `searchsorted` on fp32 tensors; `t` should be the grid
    value (a Python float of the fp32 number). The scales come back as the fp32 values the
    official tensors hold.
    """
    import torch

    n = len(cfg_t_range)
    if len(prev_chunk_scales) != n or len(text_scales) != n:
        raise ValueError("cfg_t_range, prev_chunk_scales and text_scales must have equal lengths")
    bounds = torch.tensor(cfg_t_range, dtype=torch.float32) - _CFG_T_SLACK
    index = int((bounds < torch.tensor(t, dtype=torch.float32)).sum()) - 1
    if index < 0:
        raise ValueError(f"t={t} lies below cfg_t_range[0]={cfg_t_range[0]}")
    s_p = torch.tensor(prev_chunk_scales, dtype=torch.float32)[index]
    s_t = torch.tensor(text_scales, dtype=torch.float32)[index]
    return float(s_p), float(s_t)


def mix_cfg(
    v_uncond: torch.Tensor,
    v_ctx: torch.Tensor,
    v_ctx_text: torch.Tensor,
    s_p: float,
    s_t: float,
) -> torch.Tensor:
    """Three-branch guidance: (1 - s_p)*v_u + (s_p - s_t)*v_c + s_t*v_ct.

    Kept in exactly this expression order with fp32 scalar coefficients, as the official
    dispatcher computes it, so results match bit for bit rather than only algebraically.
    """
    import torch

    sp = torch.tensor(s_p, dtype=torch.float32, device=v_ctx.device)
    st = torch.tensor(s_t, dtype=torch.float32, device=v_ctx.device)
    return (1 - sp) * v_uncond + (sp - st) * v_ctx + st * v_ctx_text


def kv_lookback(
    denoise_step: int,
    num_steps: int,
    noise2clean_kvrange: Sequence[int],
    clean_chunk_kvrange: int,
) -> int:
    """Chunks (self included) a chunk may attend to, keyed on its own denoising step.

    A clean chunk (denoise_step == num_steps) uses clean_chunk_kvrange (-1 = the last
    noise2clean entry, as officially); a noisy one uses the entry of its step quartile
    (5, 4, 3, 2 shipped), independent of the window size and of its window stage.
    """
    if not noise2clean_kvrange:
        raise ValueError("noise2clean_kvrange must not be empty (full causal history unsupported)")
    if num_steps % len(noise2clean_kvrange):
        raise ValueError(
            f"num_steps ({num_steps}) must be divisible by len(noise2clean_kvrange) "
            f"({len(noise2clean_kvrange)})"
        )
    if not 0 <= denoise_step <= num_steps:
        raise ValueError(f"denoise_step must be in [0, {num_steps}], got {denoise_step}")
    if denoise_step == num_steps:
        return clean_chunk_kvrange if clean_chunk_kvrange != -1 else noise2clean_kvrange[-1]
    steps_per_quartile = num_steps // len(noise2clean_kvrange)
    return noise2clean_kvrange[denoise_step // steps_per_quartile]


def kv_chunk_range(global_index: int, lookback: int) -> tuple[int, int]:
    """[first, end) chunk indices chunk `global_index` attends to; never a later chunk."""
    return max(0, global_index + 1 - lookback), global_index + 1


def nearly_clean(t_oldest: float, threshold: float = 0.3) -> bool:
    """Whether the oldest noisy chunk of a forward is "nearly clean" (§4.4 step 6).

    A Python float compare of the fp32 t: t at index 3N/4 is fp32(0.3) = 0.30000001 > 0.3, so
    the flag holds for the whole last stage. It drives the distilled blend and, for every
    model, leaves the last chunk's KV out of the cache write.
    """
    return float(t_oldest) > threshold

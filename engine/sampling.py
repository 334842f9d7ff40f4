"""The fp32 tensor rules of MAGI-1's sampler: time grid, CFG scales and mixing, chunk noise.

Each is computed in the order and precision the official code uses, so results match it bit for
bit (magi1-reference.md §4). The integer rules (kv ranges, step intervals) are torch-free in
scheduler/timegrid.py.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from scheduler.timegrid import SHORTCUT_MODES, SHORTCUT_STEPS

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
    if shortcut_mode not in SHORTCUT_MODES:
        raise ValueError(f"shortcut_mode must be one of {SHORTCUT_MODES}, got {shortcut_mode!r}")
    sixteenths = (0, 2, 3) if shortcut_mode == "8,16,16" else (0, 1, 2)
    offsets = [4 * quarter + x for quarter in range(4) for x in sixteenths] + [16]
    return torch.tensor(offsets, dtype=torch.float32, device="cpu") / 16


def time_grid(num_steps: int, shortcut_mode: str = "8,16,16") -> torch.Tensor:
    """The fp32 flow-time grid t_0..t_N (0 = noise, 1 = clean) every chunk walks through.

    t = s^2 / (3 - 2 s^2) (SD3 shift 3 on u = s^2, reversed convention), evaluated in fp32 in
    the official form fp32(1/3)*u / (1 + fp32(1/3 - 1)*u): that rounding makes
    t_N = 1.0000001192 rather than 1, and the last Euler step's dt depends on it.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be positive, got {num_steps}")
    if num_steps == SHORTCUT_STEPS:
        s = _shortcut_s_grid(shortcut_mode)
    else:
        s = torch.linspace(0, 1, num_steps + 1, dtype=torch.float32, device="cpu")
    u = s.square()
    shift_inv = 1.0 / 3.0  # Python scalars: torch rounds them to fp32 against an fp32 tensor
    return shift_inv * u / (1 + (shift_inv - 1) * u)


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
    n = len(cfg_t_range)
    if len(prev_chunk_scales) != n or len(text_scales) != n:
        raise ValueError("cfg_t_range, prev_chunk_scales and text_scales must have equal lengths")
    bounds = torch.tensor(cfg_t_range, dtype=torch.float32, device="cpu") - _CFG_T_SLACK
    index = int((bounds < torch.tensor(t, dtype=torch.float32, device="cpu")).sum()) - 1
    if index < 0:
        raise ValueError(f"t={t} lies below cfg_t_range[0]={cfg_t_range[0]}")
    s_p = torch.tensor(prev_chunk_scales, dtype=torch.float32, device="cpu")[index]
    s_t = torch.tensor(text_scales, dtype=torch.float32, device="cpu")[index]
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
    sp = torch.tensor(s_p, dtype=torch.float32, device=v_ctx.device)
    st = torch.tensor(s_t, dtype=torch.float32, device=v_ctx.device)
    return (1 - sp) * v_uncond + (sp - st) * v_ctx + st * v_ctx_text


def chunk_noise(
    seed: int, chunk_index: int, shape: tuple[int, ...], device: torch.device
) -> torch.Tensor:
    """Noise of one chunk from a generator keyed by (seed, chunk index), so a chunk's noise
    depends neither on the other sessions nor on how long this one runs. (The official code
    draws the whole video's noise in one call; a streaming session cannot.) Drawn by the CPU
    generator whatever the device, so a session's noise is the same on every device."""
    key = (seed * 0x9E3779B97F4A7C15 + chunk_index * 0xBF58476D1CE4E5B9) % (1 << 63)
    gen = torch.Generator(device="cpu").manual_seed(key)
    noise = torch.randn(shape, generator=gen, dtype=torch.float32, device="cpu")
    return noise.to(device)

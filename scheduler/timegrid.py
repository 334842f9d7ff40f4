"""Integer and scalar rules of MAGI-1's sampler: shortcut steps, step sizes, KV look-back.

Pure functions of the runtime/engine config (no torch), so the window, the batcher and the
engine's runner agree on one copy of each rule. The fp32 tensor math (the time grid, CFG scales
and mixing, chunk noise) is in engine/sampling.py. The numbers follow magi1-reference.md §3.13
and §4.
"""

from __future__ import annotations

from collections.abc import Sequence

SHORTCUT_STEPS = 12  # the one step count that uses the non-uniform shortcut s-grid (§4.8)
SHORTCUT_MODES = ("8,16,16", "16,16,8")  # s step sizes within each quarter: 1/8, 1/16, ...


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

"""The pipelined window (magi1-reference.md §3.13, §4.3-§4.5, §4.9), driven without a model."""

from __future__ import annotations

import subprocess
import sys

import pytest

from model.config import RuntimeConfig
from scheduler.window import (
    ForwardPlan,
    Window,
    WindowSpec,
    forward_count,
    plan_forward,
    stage_bounds,
)


def _spec(chunks: int | None, window: int = 4, steps: int = 16, prefix: int = 0) -> WindowSpec:
    return WindowSpec(num_steps=steps, window_size=window, num_chunks=chunks, prefix_chunks=prefix)


def _run(window: Window) -> list[ForwardPlan]:
    plans = []
    while (plan := window.next_forward()) is not None:
        plans.append(plan)
    return plans


def _denoising(plans: list[ForwardPlan]) -> list[ForwardPlan]:
    return [p for p in plans if not p.prefix_extraction]


def _clean_visible(plan: ForwardPlan) -> list[int]:
    """Clean chunks each noisy chunk of the forward attends to (those below the window)."""
    oldest_noisy = plan.chunks[0].chunk_index
    return [min(c.kv_end_chunk, oldest_noisy) - c.kv_first_chunk for c in plan.chunks]


def test_stage_table_for_four_chunks_with_window_four():
    plans = _run(Window(_spec(4, window=4, steps=8)))
    levels, cleans = {}, {}
    for p in plans:
        levels.setdefault(p.stage, {c.chunk_index: c.stage_level for c in p.chunks})
        assert levels[p.stage] == {c.chunk_index: c.stage_level for c in p.chunks}
        if p.clean_chunk is not None:
            assert p.sub_step == 0
            cleans[p.stage] = p.clean_chunk
    assert levels == {
        0: {0: 0},
        1: {0: 1, 1: 0},
        2: {0: 2, 1: 1, 2: 0},
        3: {0: 3, 1: 2, 2: 1, 3: 0},
        4: {1: 3, 2: 2, 3: 1},
        5: {2: 3, 3: 2},
        6: {3: 3},
    }
    assert cleans == {4: 0, 5: 1, 6: 2}


def test_grid_index_puts_the_oldest_chunk_furthest_along():
    # Stage 3, sub-step 1 of 64 steps: k = (t_end - 1 - m) * dps + j.
    plan = plan_forward(_spec(4, steps=64), 3 * 16 + 1)
    assert [(c.chunk_index, c.grid_index) for c in plan.chunks] == [
        (0, 49),
        (1, 33),
        (2, 17),
        (3, 1),
    ]


@pytest.mark.parametrize(
    ("chunks", "window", "steps", "prefix", "count"),
    [
        (4, 4, 64, 0, 112),
        (5, 4, 64, 0, 128),
        (4, 1, 64, 0, 256),
        (4, 2, 64, 0, 160),
        (6, 4, 64, 1, 128),
        (8, 4, 16, 2, 36),
        (3, 2, 4, 1, 6),
    ],
)
def test_forward_count_formula_matches_the_window(chunks, window, steps, prefix, count):
    assert forward_count(chunks, window, steps, prefix) == count
    plans = _run(Window(_spec(chunks, window, steps, prefix)))
    assert len(_denoising(plans)) == count
    assert [p.step for p in _denoising(plans)] == list(range(count))
    assert sum(p.prefix_extraction for p in plans) == (1 if prefix else 0)


def test_stage_bounds_follow_the_reference_sequences():
    # chunk_num 8, window 4, chunk_offset 2 (stages 2..10)
    rows = [stage_bounds(i, 8, 4, 2) for i in range(2, 11)]
    assert [r[0] for r in rows] == [2, 2, 2, 2, 3, 4, 5, 6, 7]
    assert [r[1] for r in rows] == [3, 4, 5, 6, 7, 8, 8, 8, 8]
    assert [r[2] for r in rows] == [0, 0, 0, 0, 0, 0, 1, 2, 3]
    assert [r[3] for r in rows] == [1, 2, 3, 4, 4, 4, 4, 4, 4]


@pytest.mark.parametrize(
    ("window", "steps", "prefix"),
    [(4, 16, 0), (2, 16, 0), (1, 8, 0), (4, 16, 1), (4, 12, 0), (8, 16, 0)],
)
def test_each_forward_moves_every_chunk_one_step_along_the_grid(window, steps, prefix):
    chunks = prefix + 6
    seen: dict[int, list[int]] = {}
    finished, entered, cleaned = [], [], []
    for plan in _denoising(_run(Window(_spec(chunks, window, steps, prefix)))):
        for c in plan.chunks:
            seen.setdefault(c.chunk_index, []).append(c.grid_index)
            assert c.denoise_step == c.grid_index
            assert c.kv_end_chunk == c.chunk_index + 1
        finished += plan.finished
        entered += [plan.entered] if plan.entered is not None else []
        cleaned += [plan.clean_chunk] if plan.clean_chunk is not None else []
    generated = list(range(prefix, chunks))
    assert seen == {c: list(range(steps)) for c in generated}
    assert finished == entered == generated
    assert cleaned == generated[:-1]  # the last chunk's KV is never needed


def test_steady_state_window_four_sees_exactly_one_clean_chunk():
    for plan in _denoising(_run(Window(_spec(12, window=4, steps=16)))):
        if 4 <= plan.stage < 12:  # full window, history exists
            assert _clean_visible(plan) == [1, 1, 1, 1]


def test_window_two_sees_three_then_two_then_one_clean_chunks():
    plans = [p for p in _run(Window(_spec(12, window=2, steps=16))) if 5 <= p.stage < 12]
    # Chunk at level 0 (first half: quartiles 0, 1), chunk at level 1 (quartiles 2, 3).
    by_sub = {p.sub_step: _clean_visible(p) for p in plans}
    assert [by_sub[j] for j in range(8)] == [[2, 3]] * 4 + [[1, 2]] * 4


def test_window_one_looks_back_four_three_two_one_clean_chunks():
    plans = [p for p in _run(Window(_spec(10, window=1, steps=16))) if p.stage >= 5]
    assert [_clean_visible(p)[0] for p in plans[:16]] == [4] * 4 + [3] * 4 + [2] * 4 + [1] * 4


def test_v2v_prefix_is_extracted_first_each_chunk_attending_only_to_itself():
    plans = _run(Window(_spec(5, window=4, steps=8, prefix=2)))
    first = plans[0]
    assert first.prefix_extraction and first.step == 0 and first.entered is None
    assert [(c.chunk_index, c.kv_first_chunk, c.kv_end_chunk) for c in first.chunks] == [
        (0, 0, 1),
        (1, 1, 2),
    ]
    second = plans[1]
    assert not second.prefix_extraction and second.stage == 2 and second.entered == 2
    assert second.clean_chunk is None  # the prefix is never re-forwarded
    assert second.chunks[0].kv_first_chunk == 0  # the first generated chunk sees the prefix


def test_i2v_needs_no_special_handling():
    plans = _run(Window(_spec(5, window=4, steps=8, prefix=0)))
    assert not any(p.prefix_extraction for p in plans)
    assert plans[0].entered == 0


def test_unbounded_window_runs_50_chunks_then_drains_after_set_last_chunk():
    window = Window(_spec(None, window=4, steps=8))
    plans, finished = [], []
    while len(finished) < 50:
        plan = window.next_forward()
        assert plan is not None
        plans.append(plan)
        finished += plan.finished
    assert finished == list(range(50)) and not window.done
    last = window.next_entering_chunk() - 1  # the newest chunk in flight
    window.set_last_chunk(last)
    assert window.next_entering_chunk() is None
    plans += _run(window)
    assert window.done and window.next_forward() is None
    assert plans == _run(Window(_spec(last + 1, window=4, steps=8)))


def test_unbounded_window_can_be_told_its_last_chunk_ahead_of_time():
    window = Window(_spec(None, window=4, steps=8))
    for _ in range(7):
        window.next_forward()
    window.set_last_chunk(9)
    assert _run(window) == _run(Window(_spec(10, window=4, steps=8)))[7:]


# dps 2: after 8 forwards stage 4 has not begun (chunks 0..3 entered); after 9 chunk 4 has.
@pytest.mark.parametrize(("forwards", "newest"), [(8, 3), (9, 4), (10, 4), (15, 7)])
def test_stop_admitting_keeps_the_chunks_already_in_flight(forwards, newest):
    window = Window(_spec(None, window=4, steps=8))
    for _ in range(forwards):
        window.next_forward()
    window.stop_admitting()
    assert window.num_chunks == newest + 1
    assert window.next_entering_chunk() is None
    assert max(c for p in _run(window) for c in p.chunk_indices) == newest


def test_stop_admitting_before_the_first_chunk_ends_the_session_at_once():
    window = Window(_spec(None, prefix=1))
    window.stop_admitting()
    assert window.done and window.next_forward() is None


def test_set_last_chunk_refuses_to_drop_a_chunk_in_flight():
    window = Window(_spec(None, window=4, steps=8))
    for _ in range(5):  # stage 2, sub-step 1: chunk 2 has entered
        window.next_forward()
    with pytest.raises(ValueError, match="already entered"):
        window.set_last_chunk(1)


def test_a_draining_window_cannot_grow_again():
    window = Window(_spec(4, window=4, steps=8))
    for _ in range(9):  # stage 4 began without chunk 4
        window.next_forward()
    with pytest.raises(ValueError, match="draining"):
        window.set_last_chunk(5)


def test_next_entering_chunk_advances_once_the_chunk_entered():
    window = Window(_spec(None, window=4, steps=8))  # dps 2
    assert window.next_entering_chunk() == 0
    assert window.next_forward().entered == 0
    assert window.next_entering_chunk() == 1
    window.next_forward()
    assert window.next_entering_chunk() == 1  # chunk 1 enters at the next forward
    assert window.next_forward().entered == 1


def test_reachable_cached_chunks_in_steady_state_are_the_last_clean_chunk():
    window = Window(_spec(None, window=4, steps=16))
    for _ in range(10 * 4):
        plan = window.next_forward()
        if plan.stage >= 5:
            newest_clean = plan.stage - 4  # re-forwarded at this stage's sub-step 0
            if window.steps_done % 4:  # sub-steps 1..3 of the stage follow
                assert window.reachable_cached_chunks() == range(newest_clean, newest_clean + 1)
            else:  # the next forward re-forwards a fresher clean chunk and reads none
                assert window.reachable_cached_chunks() == range(newest_clean + 1, newest_clean + 1)


@pytest.mark.parametrize(
    ("window_size", "prefix", "clean_kvrange"),
    [(4, 0, 1), (2, 0, 1), (1, 0, 1), (4, 2, 1), (3, 0, 1), (4, 0, 5), (4, 2, 5), (2, 1, -1)],
)
def test_oldest_needed_chunk_is_the_smallest_kv_start_still_to_come(
    window_size, prefix, clean_kvrange
):
    """Also when a clean re-forward looks back further than the chunk's last noisy steps
    (clean_chunk_kvrange 5 over 5/4/3/2): that KV must not be dropped before it."""
    spec = WindowSpec(
        num_steps=12,
        window_size=window_size,
        num_chunks=prefix + 7,
        prefix_chunks=prefix,
        noise2clean_kvrange=(5, 4, 3, 2),
        clean_chunk_kvrange=clean_kvrange,
    )
    plans = _run(Window(spec))
    window = Window(spec)
    for i in range(len(plans)):
        future = [c.kv_first_chunk for p in plans[i:] for c in p.chunks]
        future += [p.clean_kv_first_chunk for p in plans[i:] if p.clean_kv_first_chunk is not None]
        if not plans[i].prefix_extraction:  # extraction reads no cache
            assert window.oldest_needed_chunk() == min(future)
        window.next_forward()


def test_window_spec_refuses_steps_not_divisible_by_window():
    with pytest.raises(ValueError, match="window_size"):
        WindowSpec(num_steps=10, window_size=4, num_chunks=4)
    with pytest.raises(ValueError, match="prefix"):
        WindowSpec(num_steps=8, window_size=4, num_chunks=1, prefix_chunks=2)


def test_window_spec_from_runtime_config():
    spec = WindowSpec.from_runtime(RuntimeConfig(), num_chunks=6, prefix_chunks=1)
    assert (spec.num_steps, spec.window_size, spec.steps_per_stage) == (64, 4, 16)
    assert spec.noise2clean_kvrange == (5, 4, 3, 2) and spec.clean_chunk_kvrange == 1


def _plan_cli(*args: str) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-m", "scheduler", "plan", *args],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return out.splitlines()


def test_plan_cli_prints_one_line_per_forward():
    lines = _plan_cli("--chunks", "4", "--window", "4", "--steps", "64")
    assert len(lines) == 112
    assert lines[0] == "step 0 stage 0 sub 0: c0:k0/d0/L0/kv[0,1)"
    assert lines[64] == (
        "step 64 stage 4 sub 0: c1:k48/d48/L3/kv[0,2) c2:k32/d32/L2/kv[0,3) "
        "c3:k16/d16/L1/kv[0,4) +clean c0"
    )


def test_plan_cli_v2v_prints_the_prefix_extraction_first():
    lines = _plan_cli("--chunks", "6", "--window", "4", "--steps", "64", "--prefix-chunks", "1")
    assert lines[0] == "extract prefix: c0:clean/kv[0,1)"
    assert sum(line.startswith("step ") for line in lines) == 128

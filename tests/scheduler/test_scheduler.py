"""ChunkScheduler driven alone with hand-made outputs, as vLLM's tests/v1/core/test_scheduler.py
drives its scheduler: admission, queueing, fairness, backpressure, cancel, prompts, unbounded
sessions and the plan itself. No model and no torch: every test runs in milliseconds.

The windows here have num_steps=8 and window_size=4, so a stage is 2 forwards: chunk c enters at
forward 2c and finishes at forward 2c + 7, and a finite session of n chunks takes 2(n + 3).
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from scheduler.plan import FinishedChunk, StepOutput, StepPlan
from scheduler.scheduler import (
    AdmissionRefused,
    ChunkScheduler,
    RequestTooLarge,
    SchedulerConfig,
)
from scheduler.session import ChunkOut, PromptTimeline, Session, SessionSpec, SessionState
from scheduler.window import Window, WindowSpec, forward_count

REPO = Path(__file__).resolve().parents[2]
STEPS, WINDOW = 8, 4  # 2 forwards a stage
DPS = STEPS // WINDOW
UNIT = 1 << 20  # a session's fake estimated_bytes
FRAMES = 24  # video frames per decoded chunk
BRANCHES = 3  # cfg 3: a session's forward takes (window + 1) * 3 = 15 chunk slots at most
SLOTS = (WINDOW + 1) * BRANCHES


def make_scheduler(**config) -> ChunkScheduler:
    config.setdefault("memory_budget_bytes", 64 * UNIT)
    return ChunkScheduler(SchedulerConfig(**config), branches=BRANCHES)


def make_session(
    sid: str,
    chunks: int | None = 2,
    *,
    prompts: tuple[tuple[int, str], ...] = ((0, "a red ball rolls"),),
    prefix_chunks: int = 0,
    units: int = 1,
    seed: int = 0,
) -> Session:
    """A session as Engine.open builds it: SessionSpec + Window + PromptTimeline + bytes."""
    spec = SessionSpec(
        session_id=sid,
        seed=seed,
        mode="v2v" if prefix_chunks else "t2v",
        height=64,
        width=64,
        num_steps=STEPS,
        shortcut_mode="8,16,16",
        text_scales=None,
        prev_chunk_scales=None,
        generated_total=chunks,
        prefix_latent_frames=6 * prefix_chunks,
        prefix_chunks=prefix_chunks,
    )
    window = WindowSpec(
        num_steps=STEPS,
        window_size=WINDOW,
        num_chunks=None if chunks is None else prefix_chunks + chunks,
        prefix_chunks=prefix_chunks,
    )
    return Session(
        spec=spec,
        window=Window(window),
        timeline=PromptTimeline(prompts, first_chunk=prefix_chunks),
        estimated_bytes=units * UNIT,
    )


def fake_output(plan: StepPlan) -> StepOutput:
    """What a runner returns: every chunk that finished in the plan, decoded to FRAMES frames."""
    return StepOutput(
        finished={
            (step.session_id, c): FinishedChunk(frame_count=FRAMES, decode_s=0.0)
            for step in plan.forwards
            for c in step.forward.finished
        }
    )


def step(sched: ChunkScheduler, consume: bool = True) -> tuple[StepPlan, list[ChunkOut]]:
    """One engine step; the consumer takes every chunk at once unless `consume` is False."""
    plan = sched.schedule()
    done = sched.update_from_output(plan, fake_output(plan))
    if consume:
        for out in done:
            sched.consumed(out.session_id)
    return plan, done


def run_until_idle(sched: ChunkScheduler, limit: int = 1000) -> tuple[list[StepPlan], list]:
    plans, done = [], []
    while sched.has_work():
        assert len(plans) < limit, "the scheduler never went idle"
        plan, produced = step(sched)
        plans.append(plan)
        done += produced
    plans.append(sched.schedule())  # the plan that frees what ended last
    return plans, done


def scheduled(plan: StepPlan) -> list[str]:
    return [s.session_id for s in plan.forwards]


def test_scheduler_modules_import_no_torch():
    code = (
        "import scheduler.scheduler, scheduler.session, scheduler.plan, scheduler.window, "
        "scheduler.timegrid, scheduler.__main__; import sys; assert 'torch' not in sys.modules"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


# ---- admission -------------------------------------------------------------------------------


def test_sessions_start_while_they_fit_the_memory_budget_and_the_rest_queue_in_order():
    sched = make_scheduler(memory_budget_bytes=2 * UNIT, max_queued=4)
    for sid in "abcd":
        sched.add(make_session(sid, chunks=1))
    states = {sid: sched.get(sid).state for sid in "abcd"}
    assert states == {
        "a": SessionState.RUNNING,
        "b": SessionState.RUNNING,
        "c": SessionState.QUEUED,
        "d": SessionState.QUEUED,
    }
    assert (sched.running_count(), sched.queued_count(), sched.reserved_bytes()) == (2, 2, 2 * UNIT)
    assert [sched.queue_position(sid) for sid in "abcd"] == [None, None, 0, 1]
    plan = sched.schedule()
    assert scheduled(plan) == ["a", "b"]
    sched.update_from_output(plan, fake_output(plan))
    started = []
    while sched.has_work():
        plan, _ = step(sched)
        started += [sid for sid in scheduled(plan) if sid not in started]
    assert started == ["a", "b", "c", "d"]
    assert all(sched.get(sid).state is SessionState.FINISHED for sid in "abcd")
    assert sched.reserved_bytes() == 0


def test_the_queue_head_is_admitted_as_soon_as_a_session_frees_its_memory():
    sched = make_scheduler(memory_budget_bytes=UNIT)
    sched.add(make_session("a", chunks=1))
    sched.add(make_session("b", chunks=1))
    for _ in range(forward_count(1, WINDOW, STEPS)):
        plan, _ = step(sched)
        assert scheduled(plan) == ["a"]
    assert sched.get("a").state is SessionState.FINISHED
    plan = sched.schedule()
    assert scheduled(plan) == ["b"] and plan.freed == ("a",)
    assert sched.get("b").state is SessionState.RUNNING and sched.queued_count() == 0


def test_a_small_request_waits_behind_the_queue_head_even_if_it_fits():
    sched = make_scheduler(memory_budget_bytes=3 * UNIT)
    sched.add(make_session("a", chunks=1, units=2))
    sched.add(make_session("big", chunks=1, units=2))  # does not fit beside a: queued
    sched.add(make_session("small", chunks=1, units=1))  # would fit, but FIFO
    assert sched.get("small").state is SessionState.QUEUED
    assert [sched.queue_position(s) for s in ("big", "small")] == [0, 1]
    assert scheduled(sched.schedule()) == ["a"]


def test_admission_refuses_past_the_queue_bound_and_says_how_full():
    sched = make_scheduler(memory_budget_bytes=UNIT, max_queued=1)
    sched.add(make_session("a"))
    sched.add(make_session("b"))
    message = r"server full: 1 sessions running, 1 queued \(queue bound 1\)"
    with pytest.raises(AdmissionRefused, match=message):
        sched.add(make_session("c"))
    assert "c" not in sched.sessions and sched.queued_count() == 1


def test_admission_with_a_zero_queue_bound_refuses_whatever_does_not_fit_now():
    sched = make_scheduler(memory_budget_bytes=UNIT, max_queued=0)
    sched.add(make_session("a"))
    with pytest.raises(AdmissionRefused, match=r"queue bound 0"):
        sched.add(make_session("b"))


def test_a_request_larger_than_the_whole_budget_is_refused_even_when_idle():
    sched = make_scheduler(memory_budget_bytes=2 * UNIT)
    with pytest.raises(RequestTooLarge, match="more than the whole budget") as refused:
        sched.add(make_session("big", units=3))
    assert isinstance(refused.value, AdmissionRefused)
    assert "ask for a smaller size" in str(refused.value)
    assert "big" not in sched.sessions and not sched.has_work()


def test_an_id_in_use_is_refused_and_an_ended_ones_id_may_be_reused():
    sched = make_scheduler()
    sched.add(make_session("a"))
    with pytest.raises(ValueError, match="already in use"):
        sched.add(make_session("a"))
    run_until_idle(sched)
    sched.add(make_session("a"))
    assert sched.get("a").state is SessionState.RUNNING


def test_max_running_caps_sessions_generating_at_once():
    sched = make_scheduler(max_running=1, max_queued=2)
    sched.add(make_session("a", chunks=1))
    sched.add(make_session("b", chunks=1))
    assert sched.get("b").state is SessionState.QUEUED
    plans, _ = run_until_idle(sched)
    assert all(len(plan.forwards) <= 1 for plan in plans)
    assert [scheduled(p) for p in plans].count(["a"]) == forward_count(1, WINDOW, STEPS)
    assert sched.get("b").state is SessionState.FINISHED


# ---- fairness and backpressure ---------------------------------------------------------------


def test_sessions_over_the_chunk_slot_limit_take_turns_and_advance_at_the_same_rate():
    sched = make_scheduler(max_chunk_slots=2 * SLOTS)  # two sessions' forwards per step
    for sid in "xyz":
        sched.add(make_session(sid, chunks=None))
    chunks = dict.fromkeys("xyz", 0)
    for _ in range(90):
        plan, done = step(sched)
        assert len(plan.forwards) == 2
        for out in done:
            chunks[out.session_id] += 1
        assert max(chunks.values()) - min(chunks.values()) <= 1
    assert min(chunks.values()) >= 25
    served = [sched.get(sid).forwards_served for sid in "xyz"]
    assert max(served) - min(served) <= 1


def test_a_session_larger_than_the_chunk_slot_limit_still_runs_alone():
    sched = make_scheduler(max_chunk_slots=1)
    sched.add(make_session("a", chunks=1))
    sched.add(make_session("b", chunks=1))
    plan = sched.schedule()
    assert scheduled(plan) == ["a"]


def test_a_session_whose_consumer_lags_pauses_at_the_output_queue_bound_and_resumes():
    sched = make_scheduler(output_queue_chunks=2)
    sched.add(make_session("slow", chunks=None))
    sched.add(make_session("fast", chunks=None))
    slow = sched.get("slow")
    paused_at = None
    for i in range(40):
        plan = sched.schedule()
        if slow.unconsumed == 2:
            paused_at = i if paused_at is None else paused_at
            assert scheduled(plan) == ["fast"]
        for out in sched.update_from_output(plan, fake_output(plan)):
            if out.session_id == "fast":
                sched.consumed("fast")
    assert paused_at is not None and slow.unconsumed == 2
    assert slow.chunks_out == 2 and sched.get("fast").chunks_out > 10
    steps_done = slow.window.steps_done
    sched.consumed("slow")
    plan = sched.schedule()
    assert "slow" in scheduled(plan)
    resumed = plan.forwards[scheduled(plan).index("slow")].forward
    assert resumed.step == steps_done  # it goes on where it stopped
    assert slow.state is SessionState.RUNNING


def test_consumed_never_counts_below_zero():
    sched = make_scheduler()
    sched.add(make_session("a"))
    sched.consumed("a")
    assert sched.get("a").unconsumed == 0


# ---- cancel ----------------------------------------------------------------------------------


def test_a_cancelled_session_leaves_the_next_plan_and_is_freed_in_it():
    sched = make_scheduler()
    sched.add(make_session("a", chunks=4))
    sched.add(make_session("b", chunks=4))
    for _ in range(5):
        step(sched)
    assert sched.get("a").in_flight
    sched.cancel("a")
    a = sched.get("a")
    assert a.state is SessionState.CANCELLED and a.finished
    assert not a.in_flight and not a.bound_prompts and not a.entered_at
    assert sched.running_count() == 1 and sched.reserved_bytes() == UNIT
    plan, _ = step(sched)
    assert scheduled(plan) == ["b"] and plan.freed == ("a",)
    later, _ = step(sched)
    assert scheduled(later) == ["b"] and later.freed == ()


def test_cancel_records_the_state_and_error_it_is_given_and_twice_is_a_no_op():
    sched = make_scheduler()
    sched.add(make_session("a"))
    sched.cancel("a", SessionState.FAILED, error="out of memory")
    sched.cancel("a")
    a = sched.get("a")
    assert (a.state, a.error) == (SessionState.FAILED, "out of memory")
    assert sched.schedule().freed == ("a",)


def test_a_session_cancelled_while_its_step_runs_hands_up_nothing_from_it():
    sched = make_scheduler()
    sched.add(make_session("a", chunks=1))
    for _ in range(forward_count(1, WINDOW, STEPS) - 1):
        step(sched)
    plan = sched.schedule()
    assert plan.forwards[0].forward.finished == (0,)
    sched.cancel("a")
    assert sched.update_from_output(plan, fake_output(plan)) == []
    assert sched.get("a").state is SessionState.CANCELLED and sched.get("a").chunks_out == 0


def test_cancel_while_queued_frees_its_queue_slot():
    sched = make_scheduler(memory_budget_bytes=UNIT, max_queued=1)
    sched.add(make_session("a", chunks=1))
    sched.add(make_session("b", chunks=1))
    sched.cancel("b")
    assert sched.queued_count() == 0 and sched.queue_position("b") is None
    sched.add(make_session("c", chunks=1))  # would be refused if b still held its slot
    assert sched.queue_position("c") == 0
    plans, _ = run_until_idle(sched)
    assert plans[0].freed == ("b",)
    assert "b" not in {sid for plan in plans for sid in scheduled(plan)}
    assert sched.get("c").state is SessionState.FINISHED


def test_a_plan_never_frees_a_session_it_schedules():
    sched = make_scheduler()
    sched.add(make_session("a"))
    step(sched)
    sched.cancel("a")
    sched.add(make_session("a"))  # the client re-opens under the same id
    plan = sched.schedule()
    assert not set(plan.freed) & set(scheduled(plan))


# ---- the prompt timeline ---------------------------------------------------------------------


def bound_prompts(plans: list[StepPlan], sid: str) -> dict[int, set[tuple[str, int]]]:
    """Chunk -> every (text, version) the plans carried for it."""
    seen: dict[int, set[tuple[str, int]]] = {}
    for plan in plans:
        for s in plan.forwards:
            if s.session_id == sid:
                for c, entry in s.prompts:
                    seen.setdefault(c, set()).add((entry.text, entry.version))
    return seen


def test_update_prompt_lands_on_the_first_chunk_that_has_not_entered_the_window():
    sched = make_scheduler()
    sched.add(make_session("p", chunks=4))
    plans = [step(sched)[0] for _ in range(2 * DPS - 1)]  # chunks 0 and 1 have entered
    entry = sched.update_prompt("p", "a green cube jumps")
    assert (entry.from_chunk, entry.version, entry.text) == (2, 2, "a green cube jumps")
    more, done = run_until_idle(sched)
    first = ("a red ball rolls", 1)
    second = ("a green cube jumps", 2)
    assert bound_prompts(plans + more, "p") == {0: {first}, 1: {first}, 2: {second}, 3: {second}}
    assert [(d.prompt.text, d.prompt.version) for d in done] == [first, first, second, second]


def test_update_prompt_for_a_chunk_already_in_the_window_moves_to_the_first_free_chunk():
    sched = make_scheduler()
    sched.add(make_session("p", chunks=4))
    for _ in range(DPS + 1):  # chunk 1 entered at forward DPS
        step(sched)
    assert sched.update_prompt("p", "too late", from_chunk=0).from_chunk == 2


def test_update_prompt_for_a_later_chunk_waits_for_that_chunk():
    sched = make_scheduler()
    sched.add(make_session("p", chunks=4))
    assert sched.update_prompt("p", "later", from_chunk=3).from_chunk == 3
    plans, done = run_until_idle(sched)
    assert [d.prompt.text for d in done] == ["a red ball rolls"] * 3 + ["later"]
    assert bound_prompts(plans, "p")[3] == {("later", 2)}


def test_update_prompt_past_the_last_chunk_is_refused():
    sched = make_scheduler()
    sched.add(make_session("p", chunks=4))
    with pytest.raises(ValueError, match="chunk 4 is past the session's last chunk 3"):
        sched.update_prompt("p", "never", from_chunk=4)
    assert len(sched.get("p").timeline.entries) == 1


def test_update_prompt_is_refused_once_every_chunk_has_entered_or_the_session_ended():
    sched = make_scheduler()
    sched.add(make_session("p", chunks=2))
    for _ in range(DPS + 1):  # both chunks have entered
        step(sched)
    with pytest.raises(ValueError, match="admits no further chunks"):
        sched.update_prompt("p", "nothing left to steer")
    sched.cancel("p")
    with pytest.raises(ValueError, match="has ended"):
        sched.update_prompt("p", "gone")


def test_update_prompt_with_replace_later_drops_the_entries_scheduled_after_it():
    timeline = ((0, "a"), (2, "b"), (3, "c"))
    for replace_later, want in ((False, ["a", "d", "b", "c"]), (True, ["a", "d", "d", "d"])):
        sched = make_scheduler()
        sched.add(make_session("p", chunks=4, prompts=timeline))
        entry = sched.update_prompt("p", "d", from_chunk=1, replace_later=replace_later)
        assert entry.version == 4  # after the request's three entries
        _, done = run_until_idle(sched)
        assert [d.prompt.text for d in done] == want


def test_update_prompt_counts_chunks_after_a_v2v_prefix_as_global_indices():
    sched = make_scheduler()
    sched.add(make_session("v", chunks=2, prefix_chunks=1))
    with pytest.raises(ValueError, match="chunk 2 is past the session's last chunk 1"):
        sched.update_prompt("v", "x", from_chunk=3)
    assert sched.update_prompt("v", "y", from_chunk=2).from_chunk == 2
    _, done = run_until_idle(sched)
    assert [(d.chunk_index, d.prompt.text) for d in done] == [(1, "a red ball rolls"), (2, "y")]


# ---- unbounded and finite sessions -----------------------------------------------------------


def test_an_unbounded_session_keeps_producing_chunks_while_its_kept_kv_stays_bounded():
    sched = make_scheduler()
    sched.add(make_session("u", chunks=None))
    session = sched.get("u")
    keep, done = [], []
    for _ in range(400):
        plan, produced = step(sched)
        (forward,) = plan.forwards
        keep.append(forward.kv_keep_from)
        newest = forward.forward.chunk_indices[-1]
        assert newest - forward.kv_keep_from <= WINDOW  # KV below the window is dropped
        assert len(session.in_flight) <= WINDOW and len(session.bound_prompts) <= WINDOW
        assert len(session.entered_at) <= WINDOW
        done += produced
    assert [d.chunk_index for d in done] == list(range(len(done)))
    assert len(done) == (400 - (STEPS - 1) + DPS - 1) // DPS
    assert keep == sorted(keep) and keep[-1] >= done[-1].chunk_index - 1 > 150
    assert session.state is SessionState.RUNNING and sched.has_work()


def test_a_finite_session_outputs_exactly_its_chunks_in_order_then_finishes():
    sched = make_scheduler()
    sched.add(make_session("s", chunks=3))
    plans, done = run_until_idle(sched)
    assert [scheduled(p) for p in plans].count(["s"]) == forward_count(3, WINDOW, STEPS)
    assert [(d.chunk_index, d.output_index, d.first_frame) for d in done] == [
        (0, 0, 0),
        (1, 1, FRAMES),
        (2, 2, 2 * FRAMES),
    ]
    assert all(d.frame_count == FRAMES and d.session_id == "s" for d in done)
    assert all(d.prompt.text == "a red ball rolls" and d.prompt.version == 1 for d in done)
    assert all(d.decode_s == 0.0 and d.denoise_s >= 0.0 for d in done)
    session = sched.get("s")
    assert session.state is SessionState.FINISHED
    assert (session.chunks_out, session.frames_out, session.unconsumed) == (3, 3 * FRAMES, 0)
    assert not session.in_flight and not session.bound_prompts
    assert (sched.running_count(), sched.reserved_bytes(), sched.chunks_in_flight()) == (0, 0, 0)
    assert plans[-1].forwards == () and plans[-1].freed == ("s",)


def test_a_v2v_session_extracts_its_prefix_first_and_counts_outputs_from_zero():
    sched = make_scheduler()
    sched.add(make_session("v", chunks=2, prefix_chunks=1))
    plans, done = run_until_idle(sched)
    first = plans[0].forwards[0]
    assert first.forward.prefix_extraction and first.prompts == ()
    assert first.forward.chunk_indices == (0,)
    assert [(d.chunk_index, d.output_index, d.first_frame) for d in done] == [
        (1, 0, 0),
        (2, 1, FRAMES),
    ]


def test_a_finished_session_is_listed_in_freed_exactly_once():
    sched = make_scheduler()
    sched.add(make_session("a", chunks=1))
    sched.add(make_session("b", chunks=3))
    plans, _ = run_until_idle(sched)
    sched.cancel("a")  # already finished: no second free
    plans += [sched.schedule() for _ in range(3)]
    freed = [sid for plan in plans for sid in plan.freed]
    assert sorted(freed) == ["a", "b"]
    a_done = next(i for i, p in enumerate(plans) if "a" in p.freed)
    assert all("a" not in scheduled(p) for p in plans[a_done:])


def test_forget_drops_only_ended_sessions():
    sched = make_scheduler()
    sched.add(make_session("a", chunks=1))
    sched.forget("a")
    assert "a" in sched.sessions
    run_until_idle(sched)
    sched.forget("a")
    sched.forget("never-added")
    assert "a" not in sched.sessions


# ---- the plan --------------------------------------------------------------------------------


def test_each_plan_is_frozen_and_carries_all_the_runner_needs():
    sched = make_scheduler()
    session = make_session("s", chunks=2, seed=7, prompts=((0, "one"), (1, "two")))
    sched.add(session)
    plan = sched.schedule()
    (forward,) = plan.forwards
    assert forward.spec is session.spec and forward.session_id == "s"
    assert forward.spec.seed == 7  # the noise key the runner draws the entering chunk from
    assert forward.forward.entered == 0 and forward.forward.chunk_indices == (0,)
    ((chunk, entry),) = forward.prompts
    assert (chunk, entry.text, entry.version) == (0, "one", 1)
    assert forward.kv_keep_from == session.window.oldest_needed_chunk()
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.freed = ("s",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        forward.kv_keep_from = 5
    with pytest.raises(dataclasses.FrozenInstanceError):
        forward.forward.chunks[0].grid_index = 3


def test_a_plan_does_not_change_when_the_scheduler_moves_on():
    sched = make_scheduler()
    sched.add(make_session("s", chunks=4))
    plans = []
    for _ in range(2 * DPS + 1):
        plans.append(step(sched)[0])
    snapshot = [dataclasses.astuple(p) for p in plans]
    sched.update_prompt("s", "changed")
    sched.cancel("s")
    sched.schedule()
    assert [dataclasses.astuple(p) for p in plans] == snapshot


def test_the_entering_chunk_carries_its_bound_prompt_and_every_noisy_chunk_has_one():
    sched = make_scheduler()
    sched.add(make_session("s", chunks=3, prompts=((0, "zero"), (2, "two"))))
    plans, _ = run_until_idle(sched)
    for plan in plans:
        for s in plan.forwards:
            prompts = dict(s.prompts)
            assert tuple(prompts) == s.forward.chunk_indices
            if s.forward.entered is not None:
                assert prompts[s.forward.entered].from_chunk <= s.forward.entered
            for c, entry in prompts.items():
                assert entry.text == ("two" if c >= 2 else "zero")


def test_a_chunk_carries_the_wait_before_it_entered_admission_first_then_pauses():
    sched = make_scheduler(max_running=1, max_queued=1)
    sched.add(make_session("a", chunks=1))
    sched.add(make_session("b", chunks=2))  # waits for a's slot
    b = sched.get("b")
    b.wait_checked_at = 0.0
    now = 0.0
    while sched.get("a").state is SessionState.RUNNING:
        step(sched)
        now += 1.0
        sched.account_waits(now)  # one second per step, as the engine loop would account it
    queued_for = b.waited_s
    assert queued_for == now  # never served while a ran
    outs = []
    while sched.has_work():
        _, done = step(sched)
        outs += [o for o in done if o.session_id == "b"]
        now += 1.0
        sched.account_waits(now)
    assert [o.output_index for o in outs] == [0, 1]
    assert outs[0].queue_s == queued_for  # the admission wait
    assert outs[1].queue_s == 0.0  # served every step since: no pause

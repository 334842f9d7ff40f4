"""Batch invariance (issue 19): a session's latents and frames are bit-identical whether it runs
alone or batched with any others. Each session runs in the packed step with others of different
modes, step counts, prompts and lengths, joining and leaving at different steps, and is compared
with torch.equal against the same request run alone in its own engine."""

from __future__ import annotations

import numpy as np
import torch

from engine.engine import Engine
from scheduler.session import SessionParams

RNG = np.random.default_rng(0)
IMAGE = RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)
VIDEO = RNG.integers(0, 256, (40, 64, 64, 3), dtype=np.uint8)


def params(sid: str, chunks: int | None, seed: int, prompts=((0, "a red ball rolls"),), **kw):
    return SessionParams(sid, tuple(prompts), chunks, 64, 64, seed=seed, **kw)


def outputs(done, sid: str) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    return {d.chunk_index: (d.latent, d.frames) for d in done if d.session_id == sid}


def run_alone(model, p: SessionParams, chunks_before_cancel: int | None = None):
    """The request in an engine of its own; an unbounded one is cancelled after that many
    chunks, as the batched run cancels it."""
    engine = Engine(model)
    engine.open(p)
    done = []
    while engine.scheduler.has_work():
        produced = engine.step()
        for d in produced:
            engine.consumed(d.session_id)
        done += produced
        if chunks_before_cancel is not None and len(done) >= chunks_before_cancel:
            engine.cancel(p.session_id)
    return outputs(done, p.session_id)


def run_batched(model, schedule: dict[int, list], cancel_at: dict[str, int], steps: int):
    """One engine: at step i open the requests of schedule[i]; cancel a session once it has
    output cancel_at[sid] chunks; run on until every session is done."""
    engine = Engine(model)
    done: list = []
    step = 0
    while step < steps or engine.scheduler.has_work():
        for p in schedule.get(step, []):
            engine.open(p)
        produced = engine.step()
        for d in produced:
            engine.consumed(d.session_id)
        done += produced
        for sid, n in cancel_at.items():
            session = engine.scheduler.sessions.get(sid)
            if session is not None and not session.finished and len(outputs(done, sid)) >= n:
                engine.cancel(sid)
        step += 1
    return done


def assert_identical(got: dict, want: dict, sid: str) -> None:
    assert sorted(got) == sorted(want), sid
    for c in want:
        assert torch.equal(got[c][0], want[c][0]), f"{sid} chunk {c}: latents differ"
        assert torch.equal(got[c][1], want[c][1]), f"{sid} chunk {c}: frames differ"


def test_cfg3_sessions_of_every_kind_batched_equal_each_alone(tiny_model):
    schedule = {
        0: [params("t2v", 3, 1)],
        1: [params("switch", 2, 2, prompts=((0, "a blue box slides"), (1, "it stops")))],
        2: [params("i2v", 2, 3, mode="i2v", image=IMAGE)],
        3: [params("steps4", 2, 4, num_steps=4)],
        5: [params("v2v", 2, 5, mode="v2v", video=VIDEO), params("unbounded", None, 6)],
        9: [params("late", 1, 7, prompts=((0, "a yellow kite"),))],
    }
    cancel_at = {"unbounded": 2}
    done = run_batched(tiny_model, schedule, cancel_at, steps=10)
    for p in [p for ps in schedule.values() for p in ps]:
        want = run_alone(tiny_model, p, cancel_at.get(p.session_id))
        assert want, p.session_id
        assert_identical(outputs(done, p.session_id), want, p.session_id)


def test_distilled_sessions_with_the_nearly_clean_copy_batched_equal_each_alone(
    tiny_distill_model,
):
    schedule = {
        0: [params("a", 3, 1)],
        2: [params("b", 2, 2, prompts=((0, "a green cube"), (1, "it jumps")))],
        3: [params("c", 2, 3, mode="i2v", image=IMAGE)],
    }
    done = run_batched(tiny_distill_model, schedule, {}, steps=4)
    for p in [p for ps in schedule.values() for p in ps]:
        assert_identical(
            outputs(done, p.session_id), run_alone(tiny_distill_model, p), p.session_id
        )


def test_a_prompt_pushed_mid_stream_equals_the_same_timeline_alone(tiny_model):
    """The pushed prompt lands on the chunk its ack names; a session given that timeline from
    the start, alone, makes the same frames."""
    engine = Engine(tiny_model)
    engine.open(params("pushed", 4, 9))
    engine.open(params("other", 4, 10))
    done = []
    for _ in range(3):
        produced = engine.step()
        for d in produced:
            engine.consumed(d.session_id)
        done += produced
    entry = engine.scheduler.update_prompt("pushed", "a green cube jumps")
    done += engine.run_until_idle()
    timeline = ((0, "a red ball rolls"), (entry.from_chunk, "a green cube jumps"))
    want = run_alone(tiny_model, params("pushed", 4, 9, prompts=timeline))
    assert_identical(outputs(done, "pushed"), want, "pushed")


def test_the_packed_forward_without_invariance_stays_within_rounding(tiny_model):
    """--batch-invariant off: one packed forward and one decode per latent shape for all
    sessions; a session's latents then differ from its solo run by rounding only."""
    requests = [params("a", 2, 1), params("b", 2, 2), params("c", 2, 3, mode="i2v", image=IMAGE)]
    engine = Engine(tiny_model, batch_invariant=False)
    assert not engine.runner.batch_invariant
    for p in requests:
        engine.open(p)
    done = engine.run_until_idle()
    for p in requests:
        want = run_alone(tiny_model, p)
        got = outputs(done, p.session_id)
        assert sorted(got) == sorted(want)
        for c in want:
            assert (got[c][0] - want[c][0]).abs().max() < 1e-5, (p.session_id, c)
            assert (got[c][1].int() - want[c][1].int()).abs().max() <= 1, (p.session_id, c)


def test_batch_invariance_is_on_by_default_on_the_cpu(tiny_model):
    assert Engine(tiny_model).runner.batch_invariant
    assert not Engine(tiny_model, batch_invariant=False).runner.batch_invariant

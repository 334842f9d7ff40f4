"""Fork and rewind in the engine (issue 19): a session continues another from one of its recent
chunks. Its chunks equal the source's bit for bit for as long as their timelines agree, and
differ after; a fork of a fork and of an ended session work alike; a chunk outside the fork
history is refused with a clear error; the history is accounted and let go."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from engine.engine import Engine
from scheduler.scheduler import ForkUnavailable, SchedulerConfig
from scheduler.session import ForkSource, SessionParams

RNG = np.random.default_rng(0)
IMAGE = RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)
VIDEO = RNG.integers(0, 256, (40, 64, 64, 3), dtype=np.uint8)
PROMPT = "a red ball rolls"


def params(sid: str, chunks: int | None = 6, seed: int = 1, **kw) -> SessionParams:
    return SessionParams(sid, ((0, PROMPT),), chunks, 64, 64, seed=seed, **kw)


def fork(sid: str, source: str, at: int, prompts=()) -> SessionParams:
    # what the server sends: the source's fields filled in, the fork's own timeline
    return SessionParams(sid, tuple(prompts), 6, 64, 64, seed=1, fork=ForkSource(source, at))


def step(engine: Engine, done: list) -> None:
    produced = engine.step()
    for d in produced:
        engine.consumed(d.session_id)
    done += produced


def until_entered(engine: Engine, sid: str, chunk: int, done: list) -> None:
    """Step until chunk `chunk` (output index) of the session has entered its window."""
    session = engine.scheduler.get(sid)
    while session.to_global(chunk) not in {m.chunk for m in session.fork_marks}:
        step(engine, done)


def by_chunk(done: list, sid: str) -> dict[int, object]:
    return {d.output_index: d for d in done if d.session_id == sid}


def assert_same(a, b) -> None:
    assert torch.equal(a.latent, b.latent) and torch.equal(a.frames, b.frames)
    assert a.first_frame == b.first_frame and a.chunk_index == b.chunk_index


@pytest.mark.parametrize("mode", ["t2v", "v2v"])  # (i2v: tests/engine/test_snapshot.py)
def test_a_fork_with_the_same_timeline_equals_its_source_from_the_fork_chunk(tiny_model, mode):
    extra = {"i2v": {"image": IMAGE}, "v2v": {"video": VIDEO}}.get(mode, {})
    engine = Engine(tiny_model)
    engine.open(params("o", mode=mode, **extra))
    engine.open(params("other", chunks=3, seed=5))  # batched beside both
    done: list = []
    until_entered(engine, "o", 4, done)
    forked = engine.open(fork("f", "o", 2))
    assert forked.spec.output_from == forked.to_global(2)
    done += engine.run_until_idle()
    source, copy = by_chunk(done, "o"), by_chunk(done, "f")
    assert sorted(copy) == [2, 3, 4, 5]  # it streams from the fork chunk on
    for c in copy:
        assert_same(copy[c], source[c])
        assert copy[c].prompt == source[c].prompt


def test_a_fork_with_another_prompt_differs_from_that_prompts_chunk_on(tiny_model):
    engine = Engine(tiny_model)
    engine.open(params("o"))
    done: list = []
    until_entered(engine, "o", 3, done)
    engine.open(fork("f", "o", 2, prompts=[(3, "a green cube jumps")]))
    done += engine.run_until_idle()
    source, copy = by_chunk(done, "o"), by_chunk(done, "f")
    assert_same(copy[2], source[2])  # before the new prompt: the same
    for c in (3, 4, 5):
        assert not torch.equal(copy[c].latent, source[c].latent), c
    assert copy[3].prompt.text == "a green cube jumps" and copy[3].prompt.version == 2
    assert copy[2].prompt == source[2].prompt


def test_rewind_a_fork_of_a_fork_and_a_fork_of_an_ended_session(tiny_model):
    engine = Engine(tiny_model)
    engine.open(params("o"))
    done: list = []
    until_entered(engine, "o", 2, done)
    engine.open(fork("f1", "o", 1))
    engine.cancel("o")  # rewind: fork, then cancel the original
    until_entered(engine, "f1", 3, done)
    engine.open(fork("f2", "f1", 3))  # a fork of a fork
    done += engine.run_until_idle()
    engine.scheduler.forget("f1")  # its stream closed: it stays forkable for fork_ttl_s
    assert "f1" in engine.scheduler.histories
    engine.open(fork("f3", "f1", 4))  # a fork of an ended session
    done += engine.run_until_idle()
    alone = Engine(tiny_model)
    alone.open(params("ref"))
    want = by_chunk(alone.run_until_idle(), "ref")
    for sid, first in (("f1", 1), ("f2", 3), ("f3", 4)):
        got = by_chunk(done, sid)
        assert sorted(got) == list(range(first, 6)), sid
        for c in got:
            assert_same(got[c], want[c])


def test_a_distilled_fork_equals_its_source(tiny_distill_model):
    engine = Engine(tiny_distill_model)
    engine.open(params("o", chunks=5))
    done: list = []
    until_entered(engine, "o", 3, done)
    engine.open(dataclasses.replace(fork("f", "o", 3), num_chunks=5))
    done += engine.run_until_idle()
    source, copy = by_chunk(done, "o"), by_chunk(done, "f")
    assert sorted(copy) == [3, 4]
    for c in copy:
        assert_same(copy[c], source[c])


def test_forks_outside_the_history_are_refused_with_what_is_held(tiny_model):
    engine = Engine(tiny_model, SchedulerConfig(fork_history=2))
    engine.open(params("o"))
    done: list = []
    until_entered(engine, "o", 4, done)
    with pytest.raises(ForkUnavailable, match=r"chunk 1: its fork history holds chunks 3\.\.4"):
        engine.open(fork("f", "o", 1))
    with pytest.raises(ForkUnavailable, match="chunk 5"):  # not entered yet
        engine.open(fork("f", "o", 5))
    with pytest.raises(ForkUnavailable, match="'nobody' cannot be forked"):
        engine.open(fork("f", "nobody", 0))
    assert "f" not in engine.runner.sessions and "f" not in engine.scheduler.sessions
    engine.open(fork("f", "o", 3))  # the history itself still works


def test_the_fork_history_is_accounted_and_let_go(tiny_model):
    config = SchedulerConfig(fork_history=3, fork_ttl_s=3600)
    engine = Engine(tiny_model, config)
    session = engine.open(params("o", chunks=4))
    without = Engine(tiny_model, SchedulerConfig(fork_history=0)).open(params("x", chunks=4))
    assert session.history_bytes > 0 and without.history_bytes == 0
    assert session.estimated_bytes == without.estimated_bytes + session.history_bytes
    engine.run_until_idle()
    assert len(engine.runner.marks["o"]) == 3  # the last three chunks to enter
    assert 0 < engine.runner.marks_bytes() <= session.history_bytes
    engine.scheduler.forget("o")
    # an ended session's history stays reserved, and yields to new work when memory is short
    assert engine.scheduler.reserved_bytes() == 0
    assert engine.scheduler.history_bytes() == session.history_bytes
    tight = dataclasses.replace(config, memory_budget_bytes=session.estimated_bytes)
    engine.scheduler.config = tight
    engine.open(params("n", chunks=1))
    assert engine.scheduler.get("n").state.value == "running"
    assert "o" not in engine.scheduler.histories
    engine.step()  # the plan forgets it on the runner too
    assert "o" not in engine.runner.marks
    # and an ended session's history expires after fork_ttl_s
    engine.run_until_idle()
    engine.scheduler.forget("n")
    engine.scheduler.config = dataclasses.replace(config, fork_ttl_s=0.0)
    engine.scheduler.schedule()
    assert not engine.scheduler.histories

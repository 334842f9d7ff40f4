"""overlap_decode in the worker loop: a step's chunks are sent after the next step is enqueued
(on CUDA the device decodes them meanwhile). Forced on here, on the CPU, where nothing runs
beside the host: the deferred sends are what is checked, against the same worker with it off."""

from __future__ import annotations

import multiprocessing
import threading

import numpy as np
import pytest

from engine import ipc
from engine.process import WorkerLoop, _load_engine
from scheduler.session import SessionParams, SessionState
from server.config import WorkerConfig

PROMPTS = ((0, "a red ball rolls"),)


def _params(sid: str, chunks: int | None, **fields) -> SessionParams:
    return SessionParams(sid, PROMPTS, chunks, 32, 32, seed=3, **fields)


def _run(folder, overlap: bool) -> tuple[list, list]:
    """Drive a worker loop over a real Pipe: a t2v session of 3 chunks, an i2v one of 2, and an
    endless one that is never consumed (it pauses after 2 chunks) and is then cancelled.
    (messages the server end got, the worker's own log of engine steps and sends)."""
    config = WorkerConfig(model_folder=folder, max_sessions=3, queue_size=1)
    engine = _load_engine(config)
    assert engine.runner.overlap_decode is False  # the CPU's default
    engine.runner.overlap_decode = overlap  # what Engine(..., overlap_decode=True) sets
    server_end, worker_end = multiprocessing.Pipe()
    loop = WorkerLoop(worker_end, engine, config)
    log: list[tuple] = []  # in the worker thread's order
    step, send = engine.step, worker_end.send

    def logged_step():
        log.append(("step",))
        done = step()
        log.append(("done", [(d.session_id, d.output_index) for d in done]))
        return done

    def logged_send(message):
        if isinstance(message, ipc.ChunkReady):
            log.append(("chunk", message.session_id, message.chunk_index))
        send(message)

    engine.step, worker_end.send = logged_step, logged_send
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    image = np.full((32, 32, 3), 200, np.uint8)
    server_end.send(ipc.OpenSession(_params("t", 3)))
    server_end.send(ipc.OpenSession(_params("i", 2, mode="i2v", image=image)))
    server_end.send(ipc.OpenSession(_params("c", None)))
    seen, ended = [], set()
    try:
        while ended != {"t", "i", "c"}:
            assert server_end.poll(20), f"the worker went quiet; got {seen}"
            message = server_end.recv()
            seen.append(message)
            if isinstance(message, ipc.ChunkReady) and message.session_id != "c":
                server_end.send(ipc.Consumed(message.session_id))
            if isinstance(message, ipc.ChunkReady) and message.session_id == "c":
                if message.chunk_index == 1:  # it pauses here: two chunks not consumed
                    server_end.send(ipc.CancelSession("c"))
            if isinstance(message, ipc.SessionEnded):
                ended.add(message.session_id)
    finally:
        server_end.send(ipc.Shutdown())
        thread.join(10)
    return seen, log


@pytest.fixture(scope="module")
def runs(tiny_folder):
    return {overlap: _run(tiny_folder, overlap) for overlap in (False, True)}


def _chunks(seen: list) -> dict[tuple[str, int], bytes]:
    return {(m.session_id, m.chunk_index): m.frames for m in seen if isinstance(m, ipc.ChunkReady)}


def test_overlapped_sends_give_the_same_frames_as_direct_ones(runs):
    direct, overlapped = _chunks(runs[False][0]), _chunks(runs[True][0])
    assert (
        sorted(direct)
        == sorted(overlapped)
        == [
            ("c", 0),
            ("c", 1),
            ("i", 0),
            ("i", 1),
            ("t", 0),
            ("t", 1),
            ("t", 2),
        ]
    )
    assert all(overlapped[k] == direct[k] for k in direct)


@pytest.mark.parametrize("overlap", [False, True])
def test_each_session_gets_its_chunks_in_order_and_all_before_its_end(runs, overlap):
    seen, _ = runs[overlap]
    states = {}
    for sid in ("t", "i", "c"):
        mine = [m for m in seen if getattr(m, "session_id", None) == sid]
        ends = [k for k, m in enumerate(mine) if isinstance(m, ipc.SessionEnded)]
        assert len(ends) == 1
        before, after = mine[: ends[0]], mine[ends[0] + 1 :]
        indices = [m.chunk_index for m in before if isinstance(m, ipc.ChunkReady)]
        assert indices == list(range(len(indices)))
        assert not [m for m in after if isinstance(m, ipc.ChunkReady)]
        states[sid] = mine[ends[0]].state
    assert states == {
        "t": SessionState.FINISHED,
        "i": SessionState.FINISHED,
        "c": SessionState.CANCELLED,
    }


def _deferred(log: list[tuple]) -> set[tuple[str, int]]:
    """The chunks sent only after another engine step had begun than the one they finished
    in."""
    finished_in, began, deferred = {}, 0, set()
    for entry in log:
        if entry[0] == "step":
            began += 1
        elif entry[0] == "done":
            finished_in.update(dict.fromkeys(entry[1], began))
        elif began > finished_in[entry[1:]]:
            deferred.add(entry[1:])
    return deferred


def test_chunks_wait_for_the_next_step_only_with_overlap_and_never_a_sessions_last(runs):
    assert not _deferred(runs[False][1])
    deferred = _deferred(runs[True][1])
    assert ("t", 0) in deferred and ("i", 0) in deferred  # sent after the next step began
    assert not deferred & {("t", 2), ("i", 1)}  # the session ended in that step: sent at once

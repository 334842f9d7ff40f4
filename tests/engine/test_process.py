"""The worker loop in-process (a thread on one end of a real Pipe): its commands and events,
output indices, backpressure, cancel and a failing step."""

from __future__ import annotations

import multiprocessing
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from engine import ipc
from engine.process import WorkerLoop, _load_engine, engine_device, exact_fp32
from scheduler.session import SessionParams, SessionState
from server.config import WorkerConfig

PROMPTS = ((0, "a red ball rolls"),)


@pytest.fixture
def worker(tiny_folder):
    """(server end of the Pipe, the loop) with the loop running in a thread."""
    config = WorkerConfig(model_folder=tiny_folder, max_sessions=2, queue_size=1)
    server_end, worker_end = multiprocessing.Pipe()
    loop = WorkerLoop(worker_end, _load_engine(config), config)
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    yield server_end, loop
    server_end.send(ipc.Shutdown())
    thread.join(10)


def until(conn, kind, timeout_s: float = 20.0, **match):
    """Events up to and including the first `kind` event whose fields match."""
    seen = []
    while conn.poll(timeout_s):
        message = conn.recv()
        seen.append(message)
        if isinstance(message, kind) and all(getattr(message, k) == v for k, v in match.items()):
            return seen
    raise AssertionError(f"no {kind.__name__} {match}; got {[type(m).__name__ for m in seen]}")


def for_a_while(conn, seconds: float) -> list:
    deadline = time.monotonic() + seconds
    seen = []
    while (left := deadline - time.monotonic()) > 0:
        if conn.poll(left):
            seen.append(conn.recv())
    return seen


def of(kind, events):
    return [e for e in events if isinstance(e, kind)]


def open_cmd(sid: str, chunks: int | None, mode: str = "t2v", **fields) -> ipc.OpenSession:
    return ipc.OpenSession(SessionParams(sid, PROMPTS, chunks, 32, 32, seed=1, mode=mode, **fields))


def test_a_session_streams_its_chunks_as_bytes_then_ends(worker):
    conn, _ = worker
    conn.send(open_cmd("s", 2))
    events = until(conn, ipc.SessionOpened)
    assert events[-1].queue_position == 0
    events = until(conn, ipc.ChunkReady, chunk_index=0)
    conn.send(ipc.Consumed("s"))
    events += until(conn, ipc.SessionEnded, session_id="s")
    chunks = of(ipc.ChunkReady, events)
    assert [(c.chunk_index, c.first_frame, c.frame_count) for c in chunks] == [
        (0, 0, 24),
        (1, 24, 24),
    ]
    assert all(len(c.frames) == 24 * 32 * 32 * 3 and c.prompt_version == 1 for c in chunks)
    assert events[-1].state is SessionState.FINISHED
    assert of(ipc.StepDone, events) and of(ipc.SessionProgress, events)


def test_an_unconsumed_session_pauses_after_two_chunks_and_resumes(worker):
    conn, loop = worker
    conn.send(open_cmd("p", None))
    until(conn, ipc.ChunkReady, chunk_index=1)
    assert not of(ipc.ChunkReady, for_a_while(conn, 1.0))  # two chunks wait: it paused
    assert loop.stalled
    conn.send(ipc.Consumed("p"))
    until(conn, ipc.ChunkReady, chunk_index=2)
    conn.send(ipc.CancelSession("p"))
    events = until(conn, ipc.SessionEnded, session_id="p")
    assert events[-1].state is SessionState.CANCELLED
    beat = until(conn, ipc.Heartbeat)[-1]
    assert beat.running == 0 and beat.reserved_bytes == 0 and beat.kv_cache_bytes == 0


def test_v2v_chunks_and_prompts_use_output_indices(worker):
    conn, _ = worker
    video = np.zeros((32, 32, 32, 3), np.uint8)
    conn.send(open_cmd("v", 3, video=video, mode="v2v"))
    until(conn, ipc.SessionOpened)
    conn.send(ipc.UpdatePrompt(7, "v", "now blue", from_chunk=2, replace_later=False))
    applied = until(conn, ipc.PromptApplied, request_id=7)[-1]
    assert applied.from_chunk == 2 and applied.version == 2
    assert applied.timeline == ((0, "a red ball rolls", 1), (2, "now blue", 2))
    events = []
    for k in range(3):
        events += until(conn, ipc.ChunkReady, chunk_index=k)
        conn.send(ipc.Consumed("v"))
    chunks = of(ipc.ChunkReady, events)
    assert [(c.chunk_index, c.frame_count, c.prompt_version) for c in chunks] == [
        (0, 13, 1),
        (1, 24, 1),
        (2, 24, 2),
    ]
    conn.send(ipc.UpdatePrompt(8, "v", "too late", from_chunk=None, replace_later=False))
    assert until(conn, ipc.PromptRejected, request_id=8)[-1].unknown_session


def test_sessions_past_the_cap_wait_and_past_the_queue_are_refused(worker):
    conn, _ = worker
    for sid in ("a", "b"):
        conn.send(open_cmd(sid, None))
        assert until(conn, ipc.SessionOpened, session_id=sid)[-1].queue_position == 0
    conn.send(open_cmd("c", None))
    assert until(conn, ipc.SessionOpened, session_id="c")[-1].queue_position == 1
    conn.send(open_cmd("d", None))
    refused = until(conn, ipc.OpenRefused, session_id="d")[-1]
    assert refused.reason == "full" and "queue bound 1" in refused.message
    conn.send(ipc.CancelSession("a"))
    until(conn, ipc.SessionProgress, session_id="c", state=SessionState.RUNNING)
    for sid in "bc":
        conn.send(ipc.CancelSession(sid))


def test_a_failing_step_fails_the_running_sessions_not_the_worker(worker, monkeypatch):
    conn, loop = worker
    monkeypatch.setattr(loop.engine, "step", lambda: (_ for _ in ()).throw(RuntimeError("boom")))
    conn.send(open_cmd("f", 2))
    ended = until(conn, ipc.SessionEnded, session_id="f")[-1]
    assert ended.state is SessionState.FAILED and "boom" in ended.error
    until(conn, ipc.Heartbeat)  # still alive


def test_a_request_that_can_never_fit_is_invalid_not_full(tiny_folder):
    config = WorkerConfig(model_folder=tiny_folder, memory_budget_bytes=1024)
    server_end, worker_end = multiprocessing.Pipe()
    WorkerLoop(worker_end, _load_engine(config), config)._apply(open_cmd("big", 1))
    refused = server_end.recv()
    assert refused.reason == "invalid" and "whole budget" in refused.message


def test_neg_prompt_in_the_worker_config_reaches_the_null_caption(tiny_folder):
    plain = _load_engine(WorkerConfig(model_folder=tiny_folder)).runner
    negative = _load_engine(WorkerConfig(model_folder=tiny_folder, neg_prompt=True)).runner
    assert negative.text_conditioning.neg_prompt and not plain.text_conditioning.neg_prompt
    # the 4 negative-prompt tokens shift the visible null rows (tests/engine/test_neg_prompt.py)
    assert negative._null_tokens.shape == plain._null_tokens.shape
    assert not negative._null_tokens[:4].equal(plain._null_tokens[:4])
    assert negative._null_tokens[4:].equal(plain._null_tokens[:-4])


def test_device_auto_is_the_cpu_here_and_cuda_fails_at_start_saying_why():
    assert engine_device("auto") == torch.device("cpu") == engine_device("cpu")
    with pytest.raises(RuntimeError, match="--device cuda: no CUDA device here"):
        engine_device("cuda")
    with pytest.raises(RuntimeError, match="--device cuda:1: no CUDA device here"):
        engine_device("cuda:1", local_rank=0)
    with pytest.raises(ValueError, match="use auto, cpu, cuda or cuda:N"):
        WorkerConfig(model_folder=Path("m"), device="gpu")


def test_a_cuda_engine_keeps_fp32_out_of_tf32():
    """What engine_device sets when it picks a CUDA device (runnable without one: the flags
    are plain settings)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
        exact_fp32()
        assert not torch.backends.cudnn.allow_tf32
        assert not torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved

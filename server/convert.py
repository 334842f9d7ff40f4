"""Server-side records to proto messages (and nothing else)."""

from __future__ import annotations

import time

from engine import ipc
from proto import video_generation_pb2 as pb
from scheduler.session import SessionState
from server.config import Limits
from server.sessions import LiveSession, SessionManager
from server.validation import MIN_SIZE_PX, MODES, SHORTCUT_MODES, SIZE_MULTIPLE_PX, ServedModel

STATES = {
    SessionState.QUEUED: pb.SESSION_STATE_QUEUED,
    SessionState.RUNNING: pb.SESSION_STATE_RUNNING,
    SessionState.FINISHED: pb.SESSION_STATE_FINISHED,
    SessionState.CANCELLED: pb.SESSION_STATE_CANCELLED,
    SessionState.FAILED: pb.SESSION_STATE_FAILED,
}
_MODE_ENUM = {name: value for value, name in MODES.items()}
_SHORTCUT_ENUM = {name: value for value, name in SHORTCUT_MODES.items()}


def timeline(entries: tuple[tuple[int, str, int], ...]) -> list[pb.TimelineEntry]:
    return [pb.TimelineEntry(from_chunk=f, text=t, version=v) for f, t, v in entries]


def sampling(
    model: ServedModel,
    num_steps: int,
    shortcut_mode: str,
    text_scales: tuple[float, ...] | None = None,
    prev_chunk_scales: tuple[float, ...] | None = None,
) -> pb.Sampling:
    rc = model.config.runtime_config
    return pb.Sampling(
        num_steps=num_steps,
        text_guidance_scales=text_scales or rc.text_scales,
        prev_chunk_guidance_scales=prev_chunk_scales or rc.prev_chunk_scales,
        shortcut_mode=_SHORTCUT_ENUM.get(shortcut_mode, pb.SHORTCUT_MODE_UNSPECIFIED),
    )


def session_params(session: LiveSession, model: ServedModel) -> pb.SessionParams:
    spec = session.spec
    fork = None
    if spec.fork is not None:  # the engine's key of the source: OWNER/ID; its owner says ID
        fork = pb.ForkSource(
            session_id=spec.fork.session_id.rpartition("/")[2], at_chunk=spec.fork.at_chunk
        )
    return pb.SessionParams(
        model=model.name,
        mode=_MODE_ENUM[spec.mode],
        num_chunks=spec.num_chunks or 0,
        width_px=spec.width,
        height_px=spec.height,
        fps=model.fps,
        frames_per_chunk=model.frames_per_chunk,
        seed=session.seed,
        sampling=sampling(
            model, spec.num_steps, spec.shortcut_mode, spec.text_scales, spec.prev_chunk_scales
        ),
        cfg_number=model.config.runtime_config.cfg_number,
        output_encoding=spec.output_encoding,
        timeline=timeline(session.initial_timeline),
        fork=fork,
    )


def started(session: LiveSession, model: ServedModel) -> pb.GenerateEvent:
    return pb.GenerateEvent(
        started=pb.SessionStarted(
            session_id=session.id,
            params=session_params(session, model),
            queue_position=session.queue_position,
        )
    )


def chunk(
    c: ipc.ChunkReady,
    fps: int,
    encode_ms: float,
    init_segment: bytes = b"",
    media_segment: bytes = b"",
) -> pb.GenerateEvent:
    return pb.GenerateEvent(
        chunk=pb.Chunk(
            chunk_index=c.chunk_index,
            first_frame_index=c.first_frame,
            frame_count=c.frame_count,
            width_px=c.width,
            height_px=c.height,
            fps=fps,
            prompt_text=c.prompt_text,
            prompt_version=c.prompt_version,
            timings=pb.ChunkTimings(
                queue_ms=c.queue_s * 1e3,
                denoise_ms=c.denoise_s * 1e3,
                decode_ms=c.decode_s * 1e3,
                encode_ms=encode_ms,
            ),
            init_segment=init_segment,
            media_segment=media_segment,
            init_segment_size=len(init_segment),
            media_segment_size=len(media_segment),
        )
    )


def raw_frames(c: ipc.ChunkReady, frames: list[bytes]) -> list[pb.GenerateEvent]:
    return [
        pb.GenerateEvent(
            frame=pb.RawFrame(
                chunk_index=c.chunk_index,
                frame_index=c.first_frame + k,
                last_in_chunk=k == len(frames) - 1,
                rgb24=rgb,
            )
        )
        for k, rgb in enumerate(frames)
    ]


def stats(session: LiveSession) -> pb.SessionStats:
    return pb.SessionStats(
        chunks_done=session.chunks_done,
        frames_done=session.frames_done,
        wall_time_s=session.wall_time_s,
        time_to_first_chunk_s=session.time_to_first_chunk_s or 0.0,
    )


def finished(session: LiveSession) -> pb.GenerateEvent:
    end = session.end
    return pb.GenerateEvent(
        finished=pb.SessionFinished(
            state=STATES[end.state],
            status_code=end.code.value[0],
            status_message=end.message,
            stats=stats(session),
        )
    )


def prompt_ack(applied: ipc.PromptApplied, session_id: str) -> pb.PromptAck:
    """`session_id`: the client's name for the session (the engine's is its key)."""
    return pb.PromptAck(
        session_id=session_id, prompt_version=applied.version, from_chunk=applied.from_chunk
    )


def session_info(session: LiveSession, model: ServedModel) -> pb.SessionInfo:
    end = session.end
    return pb.SessionInfo(
        session_id=session.id,
        owner=session.owner,
        state=STATES[session.state],
        queue_position=session.queue_position if session.state is SessionState.QUEUED else 0,
        stats=stats(session),
        prompt_version=session.prompt_version,
        timeline=timeline(session.timeline),
        next_steerable_chunk=_next_steerable(session),
        params=session_params(session, model),
        status_code=end.code.value[0] if end else 0,
        status_message=end.message if end else "",
        worker_memory=device_memory(session.worker.memory),
        fork_history=fork_history(session.fork_history, time.time()),
        detached=detached(session),
    )


def detached(session: LiveSession) -> pb.Detached | None:
    """None (the field unset) unless it waits, paused, for an Attach."""
    if session.detached_at is None:
        return None
    left_s = session.detached_at + session.detach_grace_s - time.monotonic()
    first, nxt = SessionManager.attach_range(session)
    return pb.Detached(
        attach_by_unix_ms=int((time.time() + max(left_s, 0.0)) * 1000),
        from_chunk=first,
        next_chunk=nxt,
    )


def fork_history(held: ipc.ForkHistory | None, now_unix_s: float) -> pb.ForkHistory | None:
    """None (the field unset) when it holds no fork point, or when an ended session's history
    is past its time (an idle worker drops it only at its next step)."""
    if held is None or held.first_chunk is None or held.last_chunk is None:
        return None
    if held.held_until_unix_ms and held.held_until_unix_ms <= now_unix_s * 1000:
        return None
    return pb.ForkHistory(
        first_chunk=held.first_chunk,
        last_chunk=held.last_chunk,
        held_until_unix_ms=held.held_until_unix_ms,
    )


def device_memory(memory: ipc.DeviceMemory | None) -> pb.DeviceMemory | None:
    """None (the field unset) while the worker (re)starts; allocated and reserved unset on CPU."""
    if memory is None:
        return None
    return pb.DeviceMemory(
        device=memory.device,
        total_bytes=memory.total_bytes,
        free_bytes=memory.free_bytes,
        allocated_bytes=memory.allocated_bytes,
        reserved_bytes=memory.reserved_bytes,
        worker_resident_bytes=memory.worker_resident_bytes,
        budget_bytes=memory.budget_bytes,
    )


def _next_steerable(session: LiveSession) -> int:
    """None (no chunk left to steer) reads as the chunk past the last one."""
    if session.next_steerable_chunk is not None:
        return session.next_steerable_chunk
    return session.spec.num_chunks or 0


def model_info(model: ServedModel, limits: Limits) -> pb.ModelInfo:
    rc, ec = model.config.runtime_config, model.config.engine_config
    return pb.ModelInfo(
        name=model.name,
        preset=model.preset,
        distill=ec.distill,
        fp8_quant=ec.fp8_quant,
        cfg_number=rc.cfg_number,
        default_sampling=sampling(model, rc.num_steps, ec.shortcut_mode),
        cfg_t_range=rc.cfg_t_range,
        resolution=pb.ResolutionLimits(
            default_width_px=rc.video_size_w,
            default_height_px=rc.video_size_h,
            min_width_px=MIN_SIZE_PX,
            min_height_px=MIN_SIZE_PX,
            max_width_px=limits.max_width_px,
            max_height_px=limits.max_height_px,
            multiple_of_px=SIZE_MULTIPLE_PX,
            max_pixels_per_frame=0,
        ),
        fps=model.fps,
        frames_per_chunk=model.frames_per_chunk,
        window_size=rc.window_size,
        modes=list(MODES),
        max_chunks=limits.max_chunks,
        unbounded_allowed=limits.allow_unbounded,
    )

"""What a stream yields: proto GenerateEvents folded into one event per chunk.

With RAW_RGB24 a chunk arrives as a header then `frame_count` RawFrame messages; the Assembler
collects them so both encodings give the caller one ChunkEvent per chunk, in chunk order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc

from proto import video_generation_pb2 as pb

STATE_NAMES = {
    pb.SESSION_STATE_UNSPECIFIED: "UNSPECIFIED",
    pb.SESSION_STATE_QUEUED: "QUEUED",
    pb.SESSION_STATE_RUNNING: "RUNNING",
    pb.SESSION_STATE_FINISHED: "FINISHED",
    pb.SESSION_STATE_CANCELLED: "CANCELLED",
    pb.SESSION_STATE_FAILED: "FAILED",
}
_CODES = {code.value[0]: code for code in grpc.StatusCode}
# A draining server ends a snapshotted session's stream (UNAVAILABLE) with these trailers:
# the token GenerateRequest.resume takes, and the first chunk a resume streams.
RESUME_TOKEN_HEADER = "x-resume-token"
RESUME_FROM_HEADER = "x-resume-from-chunk"


class MagiError(Exception):
    """A call that ended with a non-OK status (or broke the protocol); message as the server
    gave it. `session_id` is set when the call had a session; `resume_token` (and
    `resume_from_chunk`) when the server snapshotted the session as it went away:
    `GenerateOptions.resume(token, session_id=...)` continues it."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        session_id: str | None = None,
        resume_token: str | None = None,
        resume_from_chunk: int | None = None,
    ):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.session_id = session_id
        self.resume_token = resume_token
        self.resume_from_chunk = resume_from_chunk

    @classmethod
    def from_rpc(cls, error: grpc.RpcError, session_id: str | None = None) -> MagiError:
        # Both faces raise call objects that carry code() and details(); a bare RpcError
        # (no status) is a transport problem.
        code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
        details = error.details() if hasattr(error, "details") else str(error)
        token, from_chunk = resume_trailers(error)
        return cls(code or grpc.StatusCode.UNKNOWN, details or "", session_id, token, from_chunk)


def resume_trailers(error: grpc.RpcError) -> tuple[str | None, int | None]:
    """The resume token and first chunk a failed call's trailing metadata carries, if any."""
    try:
        trailers = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    except Exception:  # a call that never got a status has no trailers to read
        trailers = None
    found = dict(trailers or ())
    token = found.get(RESUME_TOKEN_HEADER) or None
    from_chunk = found.get(RESUME_FROM_HEADER, "")
    return token, int(from_chunk) if token and from_chunk.isdigit() else None


@dataclass(frozen=True)
class Started:
    session_id: str
    params: pb.SessionParams  # the request with every default resolved
    queue_position: int  # 1-based place in the admission queue; 0 = admitted at once


@dataclass(frozen=True)
class ChunkEvent:
    """One finished chunk. `payload` is what to append to an .mp4 (fMP4: the init segment on
    the first chunk, then its media segment); `frames` holds RGB24 frames (raw encoding)."""

    index: int  # 0-based output chunk
    first_frame: int  # output frame index of the chunk's first frame
    frame_count: int
    width: int  # pixels
    height: int  # pixels
    fps: int
    prompt_text: str  # the timeline text that steered this chunk
    prompt_version: int
    timings: pb.ChunkTimings
    payload: bytes = b""  # FMP4_H264: init_segment + media_segment
    frames: tuple[bytes, ...] = ()  # RAW_RGB24: height x width x 3 bytes each


@dataclass(frozen=True)
class Ack:
    """The server's answer to a pushed prompt."""

    text: str  # the prompt as pushed (the server does not echo it)
    version: int  # the prompt's version; 0 = rejected
    from_chunk: int  # the first chunk it steers
    rejection: str = ""  # Interact only: why it was not applied

    @property
    def accepted(self) -> bool:
        return self.version > 0


@dataclass(frozen=True)
class Finished:
    state: str  # FINISHED, CANCELLED or FAILED
    code: grpc.StatusCode
    message: str
    stats: pb.SessionStats


def started_of(message: pb.GenerateEvent) -> Started:
    s = message.started
    return Started(s.session_id, s.params, s.queue_position)


def finished_of(message: pb.GenerateEvent) -> Finished:
    f = message.finished
    code = _CODES.get(f.status_code, grpc.StatusCode.UNKNOWN)
    return Finished(STATE_NAMES.get(f.state, str(f.state)), code, f.status_message, f.stats)


def ack_of(ack: pb.PromptAck, text: str) -> Ack:
    return Ack(text, ack.prompt_version, ack.from_chunk, ack.rejection)


@dataclass
class Assembler:
    """Turns the messages after `started` into ChunkEvents (and passes acks and the end on)."""

    raw: bool  # RAW_RGB24: chunk headers are followed by their frames
    session_id: str | None = None
    # fMP4: the init segment the caller already has (a resumed stream sends it again,
    # identical): left out of the payloads, so appending them still makes one file
    init_segment: bytes | None = None
    finished: Finished | None = None
    _header: pb.Chunk | None = None
    _frames: list[bytes] = field(default_factory=list)

    def feed(self, message: pb.GenerateEvent) -> ChunkEvent | pb.PromptAck | None:
        kind = message.WhichOneof("event")
        if kind == "chunk":
            return self._chunk(message.chunk)
        if kind == "frame":
            return self._frame(message.frame)
        if kind == "prompt_ack":
            return message.prompt_ack
        if kind == "finished":
            self.finished = finished_of(message)
            return None
        raise self._broken(f"unexpected {kind or 'empty'} event after the stream started")

    def _chunk(self, chunk: pb.Chunk) -> ChunkEvent | None:
        if self._header is not None:
            raise self._broken(
                f"chunk {chunk.chunk_index} began before chunk "
                f"{self._header.chunk_index} had all its frames"
            )
        if not self.raw:
            init = chunk.init_segment
            if init and self.init_segment is not None:
                if init != self.init_segment:  # a second moov would make the file invalid
                    raise self._broken(f"chunk {chunk.chunk_index} came with another init segment")
                init = b""
            elif init:
                self.init_segment = init
            return _chunk_event(chunk, payload=init + chunk.media_segment)
        self._header = chunk  # raw: frames follow
        return None

    def _frame(self, frame: pb.RawFrame) -> ChunkEvent | None:
        header = self._header
        if header is None or frame.chunk_index != header.chunk_index:
            raise self._broken(f"frame {frame.frame_index} arrived outside its chunk")
        self._frames.append(frame.rgb24)
        if not frame.last_in_chunk:
            return None
        if len(self._frames) != header.frame_count:
            raise self._broken(
                f"chunk {header.chunk_index} announced {header.frame_count} "
                f"frames but sent {len(self._frames)}"
            )
        event = _chunk_event(header, frames=tuple(self._frames))
        self._header, self._frames = None, []
        return event

    def _broken(self, why: str) -> MagiError:
        return MagiError(grpc.StatusCode.INTERNAL, f"protocol error: {why}", self.session_id)


def _chunk_event(
    chunk: pb.Chunk, payload: bytes = b"", frames: tuple[bytes, ...] = ()
) -> ChunkEvent:
    return ChunkEvent(
        index=chunk.chunk_index,
        first_frame=chunk.first_frame_index,
        frame_count=chunk.frame_count,
        width=chunk.width_px,
        height=chunk.height_px,
        fps=chunk.fps,
        prompt_text=chunk.prompt_text,
        prompt_version=chunk.prompt_version,
        timings=chunk.timings,
        payload=payload,
        frames=frames,
    )

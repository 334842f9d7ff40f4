"""The one request builder both faces share: proto messages, call metadata, channel settings."""

from __future__ import annotations

import uuid

import grpc

from client.options import ConnectOptions, GenerateOptions, TlsOptions
from proto import video_generation_pb2 as pb

SESSION_ID_HEADER = "x-session-id"  # the server names the stream's session in this header
# Codes worth another try before a call's first response: the server (or the way to it) is
# down or restarting. Anything else is an answer, and retrying would get the same one.
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE})


def generate_request(options: GenerateOptions) -> pb.GenerateRequest:
    if options.fork_of or options.resume_token:  # only the id, timeline and output go
        request = pb.GenerateRequest(
            model=options.model,
            timeline=[pb.TimelineEntry(from_chunk=c, text=t) for c, t in options.prompts],
            output_encoding=(
                pb.OUTPUT_ENCODING_RAW_RGB24 if options.raw else pb.OUTPUT_ENCODING_FMP4_H264
            ),
            session_id=options.session_id or uuid.uuid4().hex,
            resume=options.resume_token,
            detach_grace_s=options.detach_grace_s,
        )
        if options.fork_of:
            request.fork.session_id, request.fork.at_chunk = options.fork_of, options.fork_at
        return request
    request = pb.GenerateRequest(
        model=options.model,
        timeline=[pb.TimelineEntry(from_chunk=c, text=t) for c, t in options.prompts],
        num_chunks=options.chunks,
        width_px=options.width,
        height_px=options.height,
        sampling=pb.Sampling(num_steps=options.steps),
        output_encoding=(
            pb.OUTPUT_ENCODING_RAW_RGB24 if options.raw else pb.OUTPUT_ENCODING_FMP4_H264
        ),
        # chosen here when the user gives none, so every call of the session (this one
        # included) can carry it in x-session-id for a session-routing proxy
        session_id=options.session_id or uuid.uuid4().hex,
        unbounded=options.unbounded,
        detach_grace_s=options.detach_grace_s,
    )
    if options.seed is not None:
        request.seed = options.seed
    if options.image is not None:
        request.image = options.image
    if options.video is not None:
        request.prefix_video = options.video
    return request


def resume_request(
    token: str, session_id: str, output_encoding: int, detach_grace_s: float = 0.0
) -> pb.GenerateRequest:
    """The request that continues a session its server snapshotted as it went away: the same
    id (so a session-routing proxy and the caller's logs still name it) and encoding."""
    return pb.GenerateRequest(
        resume=token,
        session_id=session_id,
        output_encoding=output_encoding,
        detach_grace_s=detach_grace_s,
    )


def prompt_update(
    session_id: str, text: str, from_chunk: int | None = None, replace_later: bool = False
) -> pb.PromptUpdate:
    """from_chunk None = as soon as possible (the first chunk not yet being denoised)."""
    if not text.strip():
        raise ValueError("the prompt is empty")
    if from_chunk is not None and from_chunk < 0:
        raise ValueError(f"from_chunk must be >= 0, got {from_chunk}")
    update = pb.PromptUpdate(session_id=session_id, text=text, replace_later=replace_later)
    if from_chunk is not None:
        update.from_chunk = from_chunk
    return update


def start_event(options: GenerateOptions) -> pb.ClientEvent:
    return pb.ClientEvent(start=generate_request(options))


def prompt_event(
    text: str, from_chunk: int | None = None, replace_later: bool = False
) -> pb.ClientEvent:
    # session_id left empty: on Interact it means the stream's own session
    return pb.ClientEvent(prompt=prompt_update("", text, from_chunk, replace_later))


def cancel_event() -> pb.ClientEvent:
    return pb.ClientEvent(cancel=pb.CancelSessionRequest())


def call_metadata(options: ConnectOptions) -> tuple[tuple[str, str], ...]:
    if options.token:
        return (("authorization", f"Bearer {options.token}"),)
    return ()


def with_session(
    metadata: tuple[tuple[str, str], ...], session_id: str | None
) -> tuple[tuple[str, str], ...]:
    """The call metadata plus x-session-id, which a proxy in front of several replicas hashes
    to reach the replica that holds the session (deploy/nginx)."""
    return (*metadata, (SESSION_ID_HEADER, session_id)) if session_id else metadata


def channel_options(options: ConnectOptions) -> list[tuple[str, object]]:
    settings: list[tuple[str, object]] = [
        ("grpc.max_receive_message_length", options.max_receive_bytes),
        # our own retry loop decides what is retried (never a stream that already streamed)
        ("grpc.enable_retries", 0),
    ]
    if options.tls is not None and options.tls.server_name:
        settings.append(("grpc.ssl_target_name_override", options.tls.server_name))
    return settings


def channel_credentials(tls: TlsOptions) -> grpc.ChannelCredentials:
    def read(path) -> bytes | None:
        return path.read_bytes() if path is not None else None

    return grpc.ssl_channel_credentials(
        root_certificates=read(tls.ca_file),
        private_key=read(tls.key_file),
        certificate_chain=read(tls.cert_file),
    )


def session_id_from(metadata) -> str | None:
    """The x-session-id header of a stream's initial metadata, if the server sent one."""
    for key, value in metadata or ():
        if key == SESSION_ID_HEADER:
            return value
    return None

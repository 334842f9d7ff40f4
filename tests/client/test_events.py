"""Folding a stream's messages into chunk events, and the shared request builder."""

from __future__ import annotations

import grpc
import pytest

from client.events import Assembler, ChunkEvent, MagiError
from client.options import ConnectOptions, GenerateOptions, TlsOptions
from client.requests import (
    call_metadata,
    channel_options,
    generate_request,
    prompt_event,
    session_id_from,
)
from proto import video_generation_pb2 as pb


def chunk(index: int, **fields) -> pb.GenerateEvent:
    return pb.GenerateEvent(
        chunk=pb.Chunk(chunk_index=index, frame_count=2, width_px=1, height_px=1, fps=24, **fields)
    )


def frame(index: int, k: int, last: bool) -> pb.GenerateEvent:
    return pb.GenerateEvent(
        frame=pb.RawFrame(
            chunk_index=index, frame_index=2 * index + k, last_in_chunk=last, rgb24=bytes([k]) * 3
        )
    )


def test_fmp4_chunk_payload_is_init_then_media_so_appending_needs_no_special_case():
    assembler = Assembler(raw=False)
    first = assembler.feed(chunk(0, init_segment=b"INIT", media_segment=b"M0"))
    second = assembler.feed(chunk(1, media_segment=b"M1"))
    assert first.payload == b"INITM0" and second.payload == b"M1"


def test_raw_frames_are_collected_into_one_event_at_last_in_chunk():
    assembler = Assembler(raw=True)
    assert assembler.feed(chunk(0)) is None
    assert assembler.feed(frame(0, 0, last=False)) is None
    event = assembler.feed(frame(0, 1, last=True))
    assert isinstance(event, ChunkEvent) and event.frames == (b"\0" * 3, b"\1" * 3)


def test_raw_chunk_with_missing_frames_is_a_protocol_error():
    assembler = Assembler(raw=True, session_id="s")
    assembler.feed(chunk(0))
    with pytest.raises(MagiError, match="announced 2 frames but sent 1") as caught:
        assembler.feed(frame(0, 0, last=True))
    assert caught.value.code == grpc.StatusCode.INTERNAL and caught.value.session_id == "s"


def test_finished_is_kept_with_its_status_code():
    assembler = Assembler(raw=False)
    message = pb.GenerateEvent(
        finished=pb.SessionFinished(
            state=pb.SESSION_STATE_FAILED, status_code=14, status_message="worker died"
        )
    )
    assert assembler.feed(message) is None
    assert assembler.finished.state == "FAILED"
    assert assembler.finished.code == grpc.StatusCode.UNAVAILABLE


def test_generate_request_sets_only_what_was_asked():
    request = generate_request(
        GenerateOptions(
            prompts=((0, "a"), (2, "b")), chunks=3, width=64, seed=0, image=b"png", raw=True
        )
    )
    assert [(e.from_chunk, e.text) for e in request.timeline] == [(0, "a"), (2, "b")]
    assert request.HasField("seed") and request.seed == 0
    assert request.WhichOneof("prefix") == "image"
    assert request.output_encoding == pb.OUTPUT_ENCODING_RAW_RGB24
    assert not generate_request(GenerateOptions.of("a")).HasField("seed")


def test_prompt_without_chunk_is_as_soon_as_possible():
    assert not prompt_event("x").prompt.HasField("from_chunk")
    assert prompt_event("x", from_chunk=0).prompt.from_chunk == 0
    with pytest.raises(ValueError, match="empty"):
        prompt_event("  ")


def test_options_refuse_what_no_server_would_accept():
    with pytest.raises(ValueError, match="start at chunk 0"):
        GenerateOptions(prompts=((1, "a"),))
    with pytest.raises(ValueError, match="past the last chunk"):
        GenerateOptions(prompts=((0, "a"), (3, "b")), chunks=3)
    with pytest.raises(ValueError, match="not both"):
        GenerateOptions.of("a", image=b"i", video=b"v")
    with pytest.raises(ValueError, match="cert_file and key_file"):
        TlsOptions(cert_file="c.pem")
    # unbounded: any later chunk
    GenerateOptions(prompts=((0, "a"), (9, "b")), chunks=0, unbounded=True)
    with pytest.raises(ValueError, match=r"chunks must be >= 1, got 0 \(or unbounded=True"):
        GenerateOptions.of("a", chunks=0)
    with pytest.raises(ValueError, match="drop chunks=5 or unbounded=True"):
        GenerateOptions.of("a", chunks=5, unbounded=True)


def test_bounded_by_default_and_unbounded_only_when_asked():
    bounded = generate_request(GenerateOptions.of("a"))
    assert (bounded.num_chunks, bounded.unbounded) == (1, False)
    endless = generate_request(GenerateOptions.of("a", unbounded=True))
    assert (endless.num_chunks, endless.unbounded) == (0, True)


def test_connection_settings_carry_token_and_tls_name():
    options = ConnectOptions(target="h:1", token="t", tls=TlsOptions(server_name="magi.test"))
    assert call_metadata(options) == (("authorization", "Bearer t"),)
    assert ("grpc.ssl_target_name_override", "magi.test") in channel_options(options)
    assert session_id_from((("x-session-id", "abc"),)) == "abc"

"""The magistream.v1 API: generated modules, service shape, message round trips, fresh gencode."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from proto import video_generation_pb2 as pb
from proto import video_generation_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parents[2]
GENERATED = ["video_generation_pb2.py", "video_generation_pb2.pyi", "video_generation_pb2_grpc.py"]
GRPC_DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024

# name -> (request, response, client_streaming, server_streaming)
API = {
    "StreamGenerate": ("GenerateRequest", "GenerateEvent", False, True),
    "UpdatePrompt": ("PromptUpdate", "PromptAck", False, False),
    "Interact": ("ClientEvent", "GenerateEvent", True, True),
    "CancelSession": ("CancelSessionRequest", "CancelSessionResponse", False, False),
    "GetSession": ("GetSessionRequest", "SessionInfo", False, False),
    "ListModels": ("ListModelsRequest", "ListModelsResponse", False, False),
    "ListSessions": ("ListSessionsRequest", "ListSessionsResponse", False, False),
    "Attach": ("AttachRequest", "GenerateEvent", False, True),
    "SnapshotSession": ("SnapshotRequest", "SnapshotResponse", False, False),
}


def _timeline() -> list[pb.TimelineEntry]:
    return [
        pb.TimelineEntry(from_chunk=0, text="a red ball rolls across a table", version=1),
        pb.TimelineEntry(from_chunk=3, text="the ball falls off the edge", version=2),
    ]


def _sampling() -> pb.Sampling:
    return pb.Sampling(
        num_steps=64,
        text_guidance_scales=[7.5, 7.5, 7.5, 0.0, 0.0],
        prev_chunk_guidance_scales=[1.5, 1.5, 1.5, 1.0, 1.0],
        shortcut_mode=pb.SHORTCUT_MODE_UNSPECIFIED,
    )


def _params() -> pb.SessionParams:
    return pb.SessionParams(
        model="tiny",
        mode=pb.GENERATION_MODE_T2V,
        num_chunks=4,
        width_px=64,
        height_px=64,
        fps=24,
        frames_per_chunk=24,
        seed=1234,
        sampling=_sampling(),
        cfg_number=3,
        output_encoding=pb.OUTPUT_ENCODING_FMP4_H264,
        timeline=_timeline(),
    )


def _device_memory() -> pb.DeviceMemory:
    return pb.DeviceMemory(
        device="cuda:0",
        total_bytes=85_899_345_920,
        free_bytes=10_737_418_240,
        allocated_bytes=64_424_509_440,
        reserved_bytes=68_719_476_736,
        worker_resident_bytes=3_221_225_472,
        budget_bytes=8_589_934_592,
    )


def _stats() -> pb.SessionStats:
    return pb.SessionStats(
        chunks_done=4, frames_done=96, wall_time_s=12.5, time_to_first_chunk_s=3.25
    )


def _chunk() -> pb.Chunk:
    return pb.Chunk(
        chunk_index=0,
        first_frame_index=0,
        frame_count=24,
        width_px=64,
        height_px=64,
        fps=24,
        prompt_text="a red ball rolls across a table",
        prompt_version=1,
        timings=pb.ChunkTimings(queue_ms=1.5, denoise_ms=900.0, decode_ms=40.0, encode_ms=30.0),
        init_segment=b"\x00\x00\x00\x18ftypiso5",
        media_segment=b"\x00\x00\x00\x10moof",
    )


def _model() -> pb.ModelInfo:
    return pb.ModelInfo(
        name="tiny",
        preset="tiny",
        distill=False,
        fp8_quant=False,
        cfg_number=3,
        default_sampling=_sampling(),
        cfg_t_range=[0.0, 0.0217, 0.1, 0.3, 0.999],
        resolution=pb.ResolutionLimits(
            default_width_px=64,
            default_height_px=64,
            min_width_px=16,
            min_height_px=16,
            max_width_px=1280,
            max_height_px=1280,
            multiple_of_px=16,
            max_pixels_per_frame=1280 * 720,
        ),
        fps=24,
        frames_per_chunk=24,
        window_size=4,
        modes=[pb.GENERATION_MODE_T2V, pb.GENERATION_MODE_I2V, pb.GENERATION_MODE_V2V],
    )


def _request() -> pb.GenerateRequest:
    return pb.GenerateRequest(
        model="tiny",
        mode=pb.GENERATION_MODE_I2V,
        timeline=_timeline(),
        image=b"\x89PNG\r\n\x1a\n",
        num_chunks=0,
        width_px=64,
        height_px=64,
        seed=7,
        sampling=pb.Sampling(num_steps=16),
        output_encoding=pb.OUTPUT_ENCODING_RAW_RGB24,
        session_id="demo-1",
        detach_grace_s=30.0,
    )


def _ack() -> pb.PromptAck:
    return pb.PromptAck(session_id="demo-1", prompt_version=3, from_chunk=5)


def _update() -> pb.PromptUpdate:
    return pb.PromptUpdate(session_id="demo-1", text="it bounces", from_chunk=5, replace_later=True)


def _finished() -> pb.SessionFinished:
    return pb.SessionFinished(
        state=pb.SESSION_STATE_CANCELLED,
        status_code=1,
        status_message="cancelled by CancelSession",
        stats=_stats(),
    )


# One realistic example per message of the file (test_examples_cover_every_message checks it).
EXAMPLES: dict[str, Message] = {
    "GenerateRequest": _request(),
    "ForkSource": pb.ForkSource(session_id="demo-1", at_chunk=3),
    "Sampling": _sampling(),
    "TimelineEntry": _timeline()[1],
    "PromptUpdate": _update(),
    "CancelSessionRequest": pb.CancelSessionRequest(session_id="demo-1"),
    "GetSessionRequest": pb.GetSessionRequest(session_id="demo-1"),
    "AttachRequest": pb.AttachRequest(session_id="demo-1", from_chunk=5),
    "SnapshotRequest": pb.SnapshotRequest(session_id="demo-1"),
    "SnapshotResponse": pb.SnapshotResponse(
        token="0123456789abcdef0123456789abcdef." + "ab" * 32, from_chunk=3, size_bytes=4_000_000
    ),
    "ListModelsRequest": pb.ListModelsRequest(),
    "ClientEvent": pb.ClientEvent(start=_request()),
    "PromptAck": _ack(),
    "CancelSessionResponse": pb.CancelSessionResponse(state=pb.SESSION_STATE_CANCELLED),
    "GenerateEvent": pb.GenerateEvent(chunk=_chunk()),
    "SessionStarted": pb.SessionStarted(session_id="demo-1", params=_params(), queue_position=2),
    "SessionParams": _params(),
    "Chunk": _chunk(),
    "ChunkTimings": _chunk().timings,
    "RawFrame": pb.RawFrame(chunk_index=1, frame_index=47, last_in_chunk=True, rgb24=b"\x01" * 12),
    "SessionFinished": _finished(),
    "SessionStats": _stats(),
    "Detached": pb.Detached(attach_by_unix_ms=1_767_225_600_000, from_chunk=1, next_chunk=4),
    "ForkHistory": pb.ForkHistory(
        first_chunk=4, last_chunk=11, held_until_unix_ms=1_767_225_600_000
    ),
    "SessionInfo": pb.SessionInfo(
        session_id="demo-1",
        state=pb.SESSION_STATE_RUNNING,
        queue_position=0,
        stats=_stats(),
        prompt_version=2,
        timeline=_timeline(),
        next_steerable_chunk=6,
        params=_params(),
        status_code=0,
        status_message="",
        owner="alice",
        worker_memory=_device_memory(),
        fork_history=pb.ForkHistory(first_chunk=2, last_chunk=9),
        detached=pb.Detached(attach_by_unix_ms=1_767_225_600_000, from_chunk=3, next_chunk=5),
    ),
    "DeviceMemory": _device_memory(),
    "ListSessionsRequest": pb.ListSessionsRequest(),
    "ListModelsResponse": pb.ListModelsResponse(models=[_model()], default_model="tiny"),
    "ModelInfo": _model(),
    "ResolutionLimits": _model().resolution,
}
EXAMPLES["ListSessionsResponse"] = pb.ListSessionsResponse(sessions=[EXAMPLES["SessionInfo"]])

EVENTS = {
    "started": pb.GenerateEvent(started=EXAMPLES["SessionStarted"]),
    "chunk": pb.GenerateEvent(chunk=_chunk()),
    "frame": pb.GenerateEvent(frame=EXAMPLES["RawFrame"]),
    "prompt_ack": pb.GenerateEvent(prompt_ack=_ack()),
    "finished": pb.GenerateEvent(finished=_finished()),
}

CLIENT_EVENTS = {
    "start": pb.ClientEvent(start=_request()),
    "prompt": pb.ClientEvent(prompt=pb.PromptUpdate(text="it bounces")),
    "cancel": pb.ClientEvent(cancel=pb.CancelSessionRequest()),
}


def _round_trip(message: Message) -> Message:
    data = message.SerializeToString()
    return type(message).FromString(data)


def _oneof_members(message_type: type[Message], oneof: str) -> set[str]:
    return {f.name for f in message_type.DESCRIPTOR.oneofs_by_name[oneof].fields}


def test_generated_modules_import_with_the_package_and_service_names():
    assert pb.DESCRIPTOR.package == "magistream.v1"
    assert pb.DESCRIPTOR.name == "proto/video_generation.proto"
    # `-I.` makes the grpc module import `proto.video_generation_pb2`, i.e. this very module.
    assert pb_grpc.proto_dot_video__generation__pb2 is pb
    for name in ("VideoGenerationStub", "VideoGenerationServicer"):
        assert hasattr(pb_grpc, name)
    assert callable(pb_grpc.add_VideoGenerationServicer_to_server)


def test_service_has_exactly_the_api_methods_with_their_streaming_kinds():
    service = pb.DESCRIPTOR.services_by_name["VideoGeneration"]
    assert service.full_name == "magistream.v1.VideoGeneration"
    got = {
        m.name: (m.input_type.name, m.output_type.name, m.client_streaming, m.server_streaming)
        for m in service.methods
    }
    assert got == API
    assert list(pb.DESCRIPTOR.services_by_name) == ["VideoGeneration"]


def test_examples_cover_every_message():
    assert set(EXAMPLES) == set(pb.DESCRIPTOR.message_types_by_name)
    assert set(EVENTS) == _oneof_members(pb.GenerateEvent, "event")
    assert set(CLIENT_EVENTS) == _oneof_members(pb.ClientEvent, "event")


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_each_message_round_trips(name):
    message = EXAMPLES[name]
    assert _round_trip(message) == message


@pytest.mark.parametrize("kind", sorted(EVENTS))
def test_each_generate_event_kind_round_trips(kind):
    back = _round_trip(EVENTS[kind])
    assert back.WhichOneof("event") == kind
    assert back == EVENTS[kind]


@pytest.mark.parametrize("kind", sorted(CLIENT_EVENTS))
def test_each_client_event_kind_round_trips(kind):
    back = _round_trip(CLIENT_EVENTS[kind])
    assert back.WhichOneof("event") == kind
    assert back == CLIENT_EVENTS[kind]


def _filled_fields(descriptor: Descriptor) -> list[FieldDescriptor]:
    """Every field, but only the first member of each oneof (setting another would clear it)."""
    return [
        f
        for f in descriptor.fields
        if f.containing_oneof is None or f.containing_oneof.fields[0] is f
    ]


def _fill(message: Message) -> None:
    """Give every field of `_filled_fields` a non-default value, recursively."""
    for field in _filled_fields(message.DESCRIPTOR):
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            if field.is_repeated:
                _fill(getattr(message, field.name).add())
            else:
                getattr(message, field.name).SetInParent()
                _fill(getattr(message, field.name))
        elif field.is_repeated:
            getattr(message, field.name).extend([_value(field)] * 2)
        else:
            setattr(message, field.name, _value(field))


def _value(field: FieldDescriptor) -> object:
    if field.type == FieldDescriptor.TYPE_ENUM:
        return field.enum_type.values[-1].number
    if field.type == FieldDescriptor.TYPE_BOOL:
        return True
    if field.type == FieldDescriptor.TYPE_STRING:
        return f"{field.name}-value"
    if field.type == FieldDescriptor.TYPE_BYTES:
        return b"\x00\xff" + field.name.encode()
    if field.cpp_type in (FieldDescriptor.CPPTYPE_FLOAT, FieldDescriptor.CPPTYPE_DOUBLE):
        return 2.5
    return 7


@pytest.mark.parametrize("name", sorted(pb.DESCRIPTOR.message_types_by_name))
def test_every_field_round_trips(name):
    message = getattr(pb, name)()
    _fill(message)
    back = _round_trip(message)
    assert back == message
    want = {f.name for f in _filled_fields(message.DESCRIPTOR)}
    assert {f.name for f, _ in back.ListFields()} == want


def test_seed_zero_is_distinguished_from_unset():
    assert not _round_trip(pb.GenerateRequest()).HasField("seed")
    assert _round_trip(pb.GenerateRequest(seed=0)).HasField("seed")
    assert not _round_trip(pb.PromptUpdate(text="x")).HasField("from_chunk")
    assert _round_trip(pb.PromptUpdate(text="x", from_chunk=0)).HasField("from_chunk")


def test_image_and_prefix_video_are_exclusive():
    request = pb.GenerateRequest(image=b"jpeg")
    request.prefix_video = b"mp4"
    assert request.WhichOneof("prefix") == "prefix_video"
    assert request.image == b""


def test_every_enum_starts_with_an_unspecified_zero():
    for name, enum in pb.DESCRIPTOR.enum_types_by_name.items():
        zero = enum.values_by_number[0].name
        assert zero.endswith("_UNSPECIFIED"), (name, zero)
        assert all(v.name.startswith(zero.removesuffix("UNSPECIFIED")) for v in enum.values)


def test_a_720p_raw_frame_event_fits_the_default_grpc_message_limit():
    width, height = 1280, 720
    event = pb.GenerateEvent(
        frame=pb.RawFrame(
            chunk_index=2**32 - 1,
            frame_index=2**64 - 1,
            last_in_chunk=True,
            rgb24=bytes(width * height * 3),
        )
    )
    assert event.ByteSize() < GRPC_DEFAULT_MAX_MESSAGE_BYTES


def test_regenerating_gives_the_committed_files(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    subprocess.run(
        ["bash", str(REPO / "proto" / "generate.sh"), str(tmp_path)],
        check=True,
        env=env,
        capture_output=True,
    )
    stale = [
        name
        for name in GENERATED
        if (tmp_path / "proto" / name).read_bytes() != (REPO / "proto" / name).read_bytes()
    ]
    assert not stale, f"stale generated code {stale}: run `make proto` and commit the result"

"""The request surface fuzzed with Hypothesis against one real server (tiny model, loopback).

GenerateRequests, PromptUpdates, Interact event sequences and raw bytes, with arbitrary field
values (garbage image and video bytes, huge numbers, odd Unicode), each sent with a short
deadline; the valid ones start real sessions, which are cancelled after their first events.
Asserted: no call ends UNKNOWN or INTERNAL (nor anything but the codes the proto documents),
the worker never restarts, the server stays SERVING, and a good session that streams while
the fuzzing goes on gives frames identical to the same request run alone.

Derandomized, so CI runs the same examples every time (rounds of them until the good session
has ended); MAX_EXAMPLES keeps a round to a few seconds.
"""

from __future__ import annotations

import re
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from proto import video_generation_pb2 as pb
from server import media
from tests.server.conftest import wait_for
from tests.server.helpers import PROMPT, encode_image, encode_mp4, stub
from tests.serverproc import SERVING, health_status

# the module shares one server: one xdist worker runs it all (make test: --dist loadgroup)
pytestmark = pytest.mark.xdist_group("test_fuzz")

MAX_EXAMPLES = 200
CALL_TIMEOUT_S = 1.5  # each fuzzed call's deadline: a valid session is cancelled before
EVENTS_READ = 2  # events read from a valid stream before it is cancelled
# What a call may end with: the codes the proto documents for a client's mistakes, and the
# client's own cancel or deadline. UNAVAILABLE would mean the worker died.
ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}
# The good session: fixed seed, a few chunks, raw frames, so equal frames mean equal pixels.
GOOD = dict(
    timeline=[pb.TimelineEntry(text=PROMPT)],
    num_chunks=3,
    width_px=32,
    height_px=32,
    seed=20240607,
    output_encoding=pb.OUTPUT_ENCODING_RAW_RGB24,
)
GOOD_IDS = ("good-alone", "good-beside")
SERVICE = "/magistream.v1.VideoGeneration/"


@pytest.fixture(scope="module")
def fuzz_server(start_server):
    server = start_server(
        *("--max-sessions", "4", "--queue-size", "4", "--max-chunks", "16"),
        *("--allow-unbounded", "1", "--max-width", "64", "--max-height", "64"),
        *("--max-prompt-chars", "300", "--max-image-bytes", "100000", "--max-pixels", "100000"),
    )
    yield server
    server.stop()


# ---- inputs ---------------------------------------------------------------------------------

_GRADIENT = np.add.outer(np.arange(32), np.arange(32)).astype(np.uint8)[..., None] * [3, 5, 7]
PNG = encode_image(_GRADIENT.astype(np.uint8))
MP4 = encode_mp4(np.stack([_GRADIENT.astype(np.uint8) + k for k in range(40)]), fps=24)
# an 8x8 PNG that claims 60000x60000: refused from its header, before any decoding
PNG_BOMB = PNG[:16] + (60000).to_bytes(4, "big") * 2 + PNG[24:]


def _mutated(data: bytes) -> st.SearchStrategy[bytes]:
    """Truncated, or with a few bytes overwritten."""
    cut = st.integers(0, len(data)).map(lambda n: data[:n])
    flips = st.lists(st.tuples(st.integers(0, len(data) - 1), st.integers(0, 255)), max_size=8)
    return cut | flips.map(lambda changes: _overwrite(data, changes))


def _overwrite(data: bytes, changes: list[tuple[int, int]]) -> bytes:
    out = bytearray(data)
    for at, value in changes:
        out[at] = value
    return bytes(out)


# small values (that pass) most often, then the edges, then anything the wire type holds
U32 = st.integers(0, 20) | st.sampled_from([2**31, 2**32 - 1]) | st.integers(0, 2**32 - 1)
U64 = st.integers(0, 100) | st.sampled_from([2**63 - 1, 2**63]) | st.integers(0, 2**64 - 1)
ENUM = st.integers(0, 4) | st.integers(-(2**31), 2**31 - 1)  # proto3 enums are open
SIZE = st.sampled_from([0, 16, 32, 48, 64, 65, 1280]) | U32
FLOAT = st.floats(width=32)  # nan, inf, -0.0, huge and tiny included
TEXT = st.sampled_from(
    [
        PROMPT,
        "",
        " \t\n",
        "\u200b",
        "\ufeff\u2060\u200d",
        "\u3164",
        "e\u0301",
        "\x00\x1b[2J",
        "\U0001f388" * 20,
        "x" * 301,
        "\u202egnp.exe",
        "\ud7ff\ue000\uffff",
    ]
) | st.text(max_size=40)
# fuzzed ids never name the good sessions (on loopback without credentials every caller is
# the same principal, so a lucky id could steer them)
SESSION_ID = (st.from_regex(r"[a-z0-9]{1,8}", fullmatch=True) | st.text(max_size=70)).filter(
    lambda s: not s.startswith("good")
)
IMAGE = (
    st.binary(max_size=300)
    | st.sampled_from([PNG, PNG_BOMB])
    | st.binary(max_size=200).map(lambda b: media.PNG_SIGNATURE + b)
    | st.binary(max_size=200).map(lambda b: b"\xff\xd8\xff" + b)
    | _mutated(PNG)
)
VIDEO = (
    st.binary(max_size=300)
    | st.just(MP4)
    | st.binary(max_size=300).map(lambda b: b"\x00\x00\x00\x18ftypisom" + b)
    | _mutated(MP4)
)
SAMPLING = st.builds(
    pb.Sampling,
    num_steps=st.sampled_from([0, 4, 8, 12, 16]) | U32,
    text_guidance_scales=st.lists(FLOAT, max_size=6),
    prev_chunk_guidance_scales=st.lists(FLOAT, max_size=6),
    shortcut_mode=ENUM,
)
TIMELINE = st.lists(
    st.builds(pb.TimelineEntry, from_chunk=U32, text=TEXT, version=U32), max_size=4
) | st.lists(TEXT, min_size=1, max_size=3).map(
    lambda texts: [pb.TimelineEntry(from_chunk=i, text=t) for i, t in enumerate(texts)]
)


def _generate_request(changes: dict) -> pb.GenerateRequest:
    """A valid request (2 chunks of 32x32) with some fields replaced by fuzzed values."""
    fields = dict(GOOD, num_chunks=2, seed=3, output_encoding=pb.OUTPUT_ENCODING_FMP4_H264)
    prefix = changes.pop("prefix", None)
    fields.update(changes)
    request = pb.GenerateRequest(**fields)
    if prefix is not None:
        setattr(request, *prefix)
    return request


GENERATE_REQUEST = st.fixed_dictionaries(
    {},
    optional={
        "model": st.sampled_from(["", "tiny"]) | st.text(max_size=50),
        "mode": ENUM,
        "timeline": TIMELINE,
        "prefix": st.tuples(st.just("image"), IMAGE) | st.tuples(st.just("prefix_video"), VIDEO),
        "num_chunks": U32,
        "width_px": SIZE,
        "height_px": SIZE,
        "seed": U64,
        "sampling": SAMPLING,
        "output_encoding": ENUM,
        "session_id": SESSION_ID,
        "unbounded": st.booleans(),
    },
).map(_generate_request)
# only the input changed, so more of them reach the decoders
MEDIA_REQUEST = st.fixed_dictionaries(
    {"prefix": st.tuples(st.just("image"), IMAGE) | st.tuples(st.just("prefix_video"), VIDEO)},
    optional={"width_px": st.sampled_from([16, 64]), "height_px": st.sampled_from([16, 64])},
).map(_generate_request)
PROMPT_UPDATE = st.builds(
    pb.PromptUpdate,
    session_id=SESSION_ID | st.just(""),
    text=TEXT,
    from_chunk=st.none() | U32,
    replace_later=st.booleans(),
)
CLIENT_EVENT = st.one_of(
    st.builds(pb.ClientEvent, start=GENERATE_REQUEST),
    st.builds(pb.ClientEvent, prompt=PROMPT_UPDATE),
    st.builds(pb.ClientEvent, cancel=st.builds(pb.CancelSessionRequest, session_id=SESSION_ID)),
    st.just(pb.ClientEvent()),  # no event set
)
# sessions that start, so the events after them reach a running session
VALID_STARTS = (
    _generate_request({}),
    _generate_request({"num_chunks": 0, "unbounded": True}),
    _generate_request({"prefix": ("prefix_video", MP4)}),
)
RAW_METHODS = ("GetSession", "UpdatePrompt", "CancelSession", "ListModels", "StreamGenerate")
CASES = st.one_of(
    st.tuples(st.just("generate"), GENERATE_REQUEST | MEDIA_REQUEST),
    st.tuples(
        st.just("interact"),
        st.tuples(
            st.sampled_from(VALID_STARTS).map(lambda r: pb.ClientEvent(start=r))
            | GENERATE_REQUEST.map(lambda r: pb.ClientEvent(start=r))
            | CLIENT_EVENT,
            st.lists(CLIENT_EVENT, max_size=5),
        ).map(lambda first_rest: [first_rest[0], *first_rest[1]]),
    ),
    st.tuples(st.just("update"), PROMPT_UPDATE),
    st.tuples(st.just("cancel"), SESSION_ID),
    st.tuples(st.just("get"), SESSION_ID),
    st.tuples(st.just("raw"), st.tuples(st.sampled_from(RAW_METHODS), st.binary(max_size=200))),
    st.tuples(st.just("raw_interact"), st.lists(st.binary(max_size=100), max_size=3)),
)


# ---- calls ----------------------------------------------------------------------------------


def _streamed(call, events: int) -> grpc.StatusCode:
    """Read up to `events` events of a stream, then cancel it; the code it ended with."""
    try:
        for n, _ in enumerate(call, 1):
            if n >= events:
                call.cancel()
                return grpc.StatusCode.CANCELLED
        return call.code()
    except grpc.RpcError as e:
        return e.code()


def _unary(fn, *args) -> grpc.StatusCode:
    try:
        fn(*args, timeout=CALL_TIMEOUT_S)
        return grpc.StatusCode.OK
    except grpc.RpcError as e:
        return e.code()


def _send(channel: grpc.Channel, case: tuple) -> grpc.StatusCode:
    kind, value = case
    api = stub(channel)
    if kind == "generate":
        return _streamed(api.StreamGenerate(value, timeout=CALL_TIMEOUT_S), EVENTS_READ)
    if kind == "interact":
        # started, then one answer per prompt: enough to see each handled
        return _streamed(api.Interact(iter(value), timeout=CALL_TIMEOUT_S), 2 + len(value))
    if kind == "update":
        return _unary(api.UpdatePrompt, value)
    if kind == "cancel":
        return _unary(api.CancelSession, pb.CancelSessionRequest(session_id=value))
    if kind == "get":
        return _unary(api.GetSession, pb.GetSessionRequest(session_id=value))
    if kind == "raw":
        method, data = value
        multi = channel.unary_stream if method == "StreamGenerate" else channel.unary_unary
        call = multi(SERVICE + method, request_serializer=None, response_deserializer=None)
        if method == "StreamGenerate":
            return _streamed(call(data, timeout=CALL_TIMEOUT_S), EVENTS_READ)
        return _unary(call, data)
    call = channel.stream_stream(
        SERVICE + "Interact", request_serializer=None, response_deserializer=None
    )
    return _streamed(call(iter(value), timeout=CALL_TIMEOUT_S), 2 + len(value))


def _good_frames(address: str, session_id: str, started: threading.Event) -> list[bytes]:
    with grpc.insecure_channel(address) as channel:
        frames = []
        for event in stub(channel).StreamGenerate(
            pb.GenerateRequest(**GOOD, session_id=session_id), timeout=120
        ):
            started.set()
            if event.HasField("frame"):
                frames.append(event.frame.rgb24)
        return frames


def _bad_calls(server) -> dict[str, float]:
    """magistream_grpc_calls samples that ended UNKNOWN or INTERNAL, by method."""
    found = re.findall(
        r'^magistream_grpc_calls_total\{(?=[^}]*code="(?:UNKNOWN|INTERNAL)")([^}]*)\} (\S+)$',
        server.metrics_text(),
        re.M,
    )
    return {labels: float(value) for labels, value in found if float(value) > 0}


# ---- the test -------------------------------------------------------------------------------


def test_fuzzed_requests_get_client_errors_and_leave_a_concurrent_session_unchanged(fuzz_server):
    address = fuzz_server.address
    alone = _good_frames(address, GOOD_IDS[0], threading.Event())
    assert len(alone) == 3 * 24 and len(set(alone)) > 1  # real, moving frames

    codes: Counter = Counter()
    with grpc.insecure_channel(address) as channel:

        @settings(
            max_examples=MAX_EXAMPLES,
            deadline=None,
            derandomize=True,
            database=None,
            phases=(Phase.explicit, Phase.generate),  # a failure is reported, not shrunk
            suppress_health_check=list(HealthCheck),
        )
        @given(case=CASES)
        def fuzz(case):
            code = _send(channel, case)
            codes[code.name] += 1
            assert code in ALLOWED, f"{case[0]} ended {code.name}"

        started = threading.Event()
        with ThreadPoolExecutor(1) as pool:
            beside = pool.submit(_good_frames, address, GOOD_IDS[1], started)
            assert started.wait(60), "the good session did not start"
            fuzz()
            while not beside.done():  # the good session streams beside fuzzing to its end
                fuzz()
            frames = beside.result()

    print(f"fuzzed calls by code: {dict(codes)}")
    assert frames == alone, "the good session's frames changed while the server was fuzzed"
    assert not _bad_calls(fuzz_server), fuzz_server.log_tail()
    assert "rpc.internal_error" not in fuzz_server.logs()
    assert fuzz_server.metric("magistream_worker_restarts_total") == 0
    assert health_status(address) == SERVING
    wait_for(
        lambda: fuzz_server.metric("magistream_sessions_active") == 0,
        30,
        what="every fuzzed session freed",
    )

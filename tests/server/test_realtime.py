"""The WebSocket realtime API end to end: a real server's HTTP port, a real WebSocket client.

It mirrors Interact: a session with a prompt pushed mid-stream, cancel, a disconnect that frees
the session, bad first messages and bad controls answered with gRPC's own codes and messages,
a session visible to GetSession under the same id; and the page's plain HTTP side.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request

import grpc
import pytest
from google.protobuf import json_format

from proto import video_generation_pb2 as pb
from proto import video_generation_pb2_grpc as pb_grpc
from server.realtime import authorization_of, close_reason
from tests.server.conftest import wait_for
from tests.server.helpers import (
    WsEnd,
    ffprobe_frames,
    request,
    ws_connect,
    ws_first,
    ws_next,
    ws_start,
    ws_until_closed,
)

INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(scope="module")
def grpc_stub(server):
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.VideoGenerationStub(channel)


def test_a_session_with_a_prompt_pushed_mid_stream(server, grpc_stub, tmp_path):
    before = server.metric("magistream_realtime_calls_total", 'code="OK"')
    end = WsEnd()
    with ws_connect(server.http_address) as ws:
        assert ws.subprotocol == "magistream.v1"
        ws.send(json.dumps(ws_start(request(chunks=8))))
        started = ws_next(ws, end)["started"]
        session_id = started["sessionId"]
        assert started["params"]["numChunks"] == 8
        assert started["params"]["timeline"] == [
            {"fromChunk": 0, "text": "a red ball rolls", "version": 1}
        ]
        # the same session, seen over gRPC under the same id
        info = grpc_stub.GetSession(pb.GetSessionRequest(session_id=session_id))
        assert info.session_id == session_id and info.owner == "anonymous"
        assert ws_next(ws, end)["chunk"]["chunkIndex"] == 0
        ws.send(json.dumps({"prompt": {"text": "a blue cube slides"}}))
        end = ws_until_closed(ws, end)
    assert end.close_code == 1000 and end.error is None
    assert end.kinds()[0] == "started" and end.kinds()[-1] == "finished"
    (ack,) = end.of("promptAck")
    assert ack["promptVersion"] == 2 and ack["rejection"] == "" and ack["sessionId"] == session_id
    chunks = end.of("chunk")
    assert [c["chunkIndex"] for c in chunks] == list(range(8))
    for c in chunks:  # the chunks the ack names, and only those, follow the new prompt
        steered = c["chunkIndex"] >= ack["fromChunk"]
        assert c["promptVersion"] == (2 if steered else 1), c
        assert c["promptText"] == ("a blue cube slides" if steered else "a red ball rolls")
        assert c["firstFrameIndex"] == str(24 * c["chunkIndex"])  # 64-bit ints are strings
        assert "mediaSegment" not in c and "initSegment" not in c  # they came as binary
    assert [c["initSegmentSize"] > 0 for c in chunks] == [True] + [False] * 7
    finished = end.of("finished")[0]
    assert finished["state"] == "SESSION_STATE_FINISHED" and finished["statusCode"] == 0
    assert finished["stats"]["chunksDone"] == 8
    video = tmp_path / "ws.mp4"
    video.write_bytes(end.mp4())
    assert ffprobe_frames(video) == (8 * 24, 64, 64)
    info = grpc_stub.GetSession(pb.GetSessionRequest(session_id=session_id))
    assert info.state == pb.SESSION_STATE_FINISHED and info.prompt_version == 2
    wait_for(lambda: server.metric("magistream_realtime_calls_total", 'code="OK"') == before + 1)


def test_cancel_ends_the_session(server):
    with ws_connect(server.http_address) as ws:
        end = WsEnd()
        ws.send(json.dumps(ws_start(request(chunks=0))))  # until cancelled
        ws_next(ws, end)
        ws_next(ws, end)  # its first chunk
        ws.send(json.dumps({"cancel": {}}))
        end = ws_until_closed(ws, end)
    assert end.close_code == 1000 and end.error is None
    finished = end.of("finished")[0]
    assert finished["state"] == "SESSION_STATE_CANCELLED"
    assert finished["statusMessage"] == "cancelled by the client"


def test_a_lost_connection_frees_the_session(server, grpc_stub):
    with ws_connect(server.http_address) as ws:
        end = WsEnd()
        ws.send(json.dumps(ws_start(request(chunks=0))))
        session_id = ws_next(ws, end)["started"]["sessionId"]
        ws_next(ws, end)
        ws.socket.close()  # no close frame: the connection is simply gone

    def state() -> pb.SessionInfo:
        return grpc_stub.GetSession(pb.GetSessionRequest(session_id=session_id))

    wait_for(lambda: state().state == pb.SESSION_STATE_CANCELLED, 10, "the session to be freed")
    assert state().status_message == "client disconnected"
    assert "never retrieved" not in server.logs()  # no task of the connection left behind
    assert "unexpected error in the realtime API" not in server.logs()
    wait_for(
        lambda: server.metric("magistream_realtime_calls_total", 'code="CANCELLED"') >= 1,
        what="the lost connection counted",
    )


def grpc_interact_error(stub, *events: pb.ClientEvent) -> tuple[grpc.StatusCode, str]:
    """The status an Interact call with these events ends with."""
    try:
        for _ in stub.Interact(iter(events), timeout=30):
            pass
    except grpc.RpcError as e:
        return e.code(), e.details()
    raise AssertionError("the call succeeded")


START = pb.ClientEvent(start=request(chunks=1))
BAD_FIRST = {
    "a prompt first": pb.ClientEvent(prompt=pb.PromptUpdate(text="x")),
    "a cancel first": pb.ClientEvent(cancel=pb.CancelSessionRequest()),
    "an empty event": pb.ClientEvent(),
    "too many chunks": pb.ClientEvent(start=request(chunks=100000)),
    "a size off the grid": pb.ClientEvent(start=request(size=20)),
    "an image that is not one": pb.ClientEvent(start=request(image=b"not an image at all")),
    "an empty prompt": pb.ClientEvent(start=request(text="")),
}


@pytest.mark.parametrize("case", BAD_FIRST)
def test_bad_first_messages_get_the_grpc_status_and_message(server, grpc_stub, case):
    event = BAD_FIRST[case]
    code, details = grpc_interact_error(grpc_stub, event)
    with ws_connect(server.http_address) as ws:
        end = ws_first(ws, json.dumps(json_of(event)))
    assert end.events == []
    assert end.error["code"] == code.name and end.error["codeNumber"] == code.value[0]
    assert end.error["message"] == details
    assert end.close_code == 4000 + code.value[0] == 4003
    assert end.close_reason == close_reason(details)


def json_of(event: pb.ClientEvent) -> dict:
    return json_format.MessageToDict(event)


BAD_LATER = {
    "a second start": START,
    "another session's prompt": pb.ClientEvent(prompt=pb.PromptUpdate(session_id="x", text="y")),
    "another session's cancel": pb.ClientEvent(cancel=pb.CancelSessionRequest(session_id="x")),
}


@pytest.mark.parametrize("case", BAD_LATER)
def test_bad_controls_after_start_get_the_grpc_status_and_message(server, grpc_stub, case):
    long = pb.ClientEvent(start=request(chunks=0))
    code, details = grpc_interact_error(grpc_stub, long, BAD_LATER[case])
    with ws_connect(server.http_address) as ws:
        ws.send(json.dumps(json_of(long)))
        ws.send(json.dumps(json_of(BAD_LATER[case])))
        end = ws_until_closed(ws)
    assert end.kinds()[0] == "started"
    assert end.error["code"] == code.name and end.error["codeNumber"] == code.value[0]
    # the same words; each names its own session
    session_id = end.of("started")[0]["sessionId"]
    assert end.error["message"] == re.sub("[0-9a-f]{32}", session_id, details)
    assert end.close_code == 4003


@pytest.mark.parametrize(
    "message, says",
    [
        ("{not json", "not a ClientEvent in protobuf's JSON mapping"),
        ('{"begin": {}}', 'has no field named "begin"'),
        ('{"start": {"numChunks": "many"}}', "numChunks"),
        (b"\x00\x01", "a binary message (2 bytes) arrived; send each ClientEvent as a text"),
    ],
)
def test_messages_that_are_not_client_events(server, message, says):
    with ws_connect(server.http_address) as ws:
        end = ws_first(ws, message)
    assert end.error["code"] == "INVALID_ARGUMENT" and says in end.error["message"]
    assert end.close_code == 4003


def test_the_page_and_plain_http(server):
    base = f"http://{server.http_address}"
    with urllib.request.urlopen(base + "/", timeout=10) as reply:
        page = reply.read().decode()
        assert reply.headers["Content-Type"] == "text/html; charset=utf-8"
        csp = reply.headers["Content-Security-Policy"]
        assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    assert "playground.js" in page
    with urllib.request.urlopen(base + "/playground.js", timeout=10) as reply:
        assert reply.headers["Content-Type"] == "text/javascript; charset=utf-8"
    for path, status in (("/nothing-here", 404), ("/v1/realtime", 426)):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(base + path, timeout=10)
        assert refused.value.code == status, path


def test_other_origins_and_rebound_names_are_refused(server):
    """A page of another site may not drive this server from a user's browser, nor may a name
    that resolves to 127.0.0.1 (DNS rebinding) in protected mode."""
    with pytest.raises(Exception) as refused:
        ws_connect(server.http_address, origin="http://evil.example")
    assert "HTTP 403" in str(refused.value)
    with ws_connect(server.http_address, origin=f"http://{server.http_address}") as ws:
        assert ws.subprotocol == "magistream.v1"  # the page's own origin is fine
    port = server.http_address.rsplit(":", 1)[1]
    rebound = urllib.request.Request(
        f"http://{server.http_address}/", headers={"Host": f"rebound.example:{port}"}
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(rebound, timeout=10)
    assert refused.value.code == 403 and b"not this machine" in refused.value.read()
    localhost = urllib.request.Request(
        f"http://{server.http_address}/", headers={"Host": f"localhost:{port}"}
    )
    with urllib.request.urlopen(localhost, timeout=10) as reply:
        assert reply.status == 200


def test_authorization_sources():
    header = authorization_of("Bearer abc", ["magistream.bearer.eHl6"], "/v1/realtime")
    assert header == "Bearer abc"
    assert authorization_of(None, ["magistream.v1, magistream.bearer.eHl6"], "/") == "Bearer xyz"
    assert authorization_of(None, [], "/v1/realtime?access_token=q%2Bq") == "Bearer q+q"
    assert authorization_of(None, ["magistream.bearer.!!"], "/") == "Bearer !invalid"
    assert authorization_of(None, ["magistream.v1"], "/v1/realtime") is None


def test_close_reasons_fit_a_close_frame():
    assert close_reason("short") == "short"
    long = "é" * 100  # 200 bytes
    cut = close_reason(long)
    assert len(cut.encode()) <= 123 and cut.endswith("...") and cut.startswith("é" * 50)


def test_the_server_prints_the_page_address(server):
    assert f"playground: http://{server.http_address}/" in server.logs()


def test_a_bad_http_port_stops_the_server_at_start(capsys, tmp_path):
    from server.__main__ import main

    assert main(["--model", "tiny", "--http-port", "70000", "--cache", str(tmp_path)], env={}) == 2
    assert "ports must be in 0..65535" in capsys.readouterr().err

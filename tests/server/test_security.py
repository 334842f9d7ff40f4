"""Security end to end: real servers, real TLS (openssl-made certificates), real tokens.

- tokens + TLS: every RPC refuses a missing or wrong token (UNAUTHENTICATED, counted by
  reason), health stays open, plaintext cannot connect; sessions are their owner's only (another
  principal gets NOT_FOUND, worded as for an unknown id), an admin sees and cancels any; the
  per-principal limits; the metrics port wants TLS and a token; a rewritten tokens file applies
  without a restart.
- mutual TLS: the client certificate's common name is the principal; a certificate from another
  CA or none cannot connect; a new server certificate applies after SIGHUP.
- protected mode (no credentials): loopback is served; a non-loopback peer is refused (the
  deciding function, and a real connection to this machine's own non-loopback address).
"""

from __future__ import annotations

import shutil
import signal
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from proto import video_generation_pb2 as pb
from proto import video_generation_pb2_grpc as pb_grpc
from server.auth import ANONYMOUS, Credentials, Denied, TokenFileError, TokenTable, is_loopback_peer
from server.config import Security
from tests.server.conftest import wait_for
from tests.server.helpers import request, ws_connect, ws_first, ws_start
from tests.serverproc import ServerProcess
from tests.tls import make_pki

TOKENS = {
    "alice": "alice-token-0123456789abcdef",
    "bob": "bob-token-0123456789abcdef01",
    "admin": "admin-token-0123456789abcdef",
    "carol": "carol-token-0123456789abcdef",
    "prometheus": "prometheus-token-0123456789ab",
}
UNAUTH = grpc.StatusCode.UNAUTHENTICATED
# the module shares its servers: one xdist worker runs it all (make test: --dist loadgroup)
pytestmark = pytest.mark.xdist_group("security")


def bearer(who: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {TOKENS[who]}"),)


def long_request(**fields) -> pb.GenerateRequest:
    """A session that outlives the test's calls: many chunks, and nobody reads them (a
    session whose client lags leaves the batch), so it stays RUNNING until cancelled."""
    return request(chunks=200, size=16, **fields)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def token_server(pki, tiny_folder, tmp_path_factory):
    """TLS + tokens (alice, bob, admin; carol comes later), one session and one waiting
    request per principal."""
    folder = tmp_path_factory.mktemp("token-server")
    tokens = folder / "tokens"
    principals = ("alice", "bob", "admin", "prometheus")
    tokens.write_text("".join(f"{TOKENS[p]} {p}\n" for p in principals))
    server = ServerProcess(
        folder,
        *("--auth-tokens", str(tokens)),
        *("--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key)),
        *("--principal-max-sessions", "1", "--principal-max-queued", "1"),
        *("--http-port", "0"),
        model=tiny_folder,
        ca=pki.ca,
        token=TOKENS["admin"],
    )
    server.tokens_file = tokens
    with server:
        server.wait_serving()
        yield server


def call_every_rpc(stub: pb_grpc.VideoGenerationStub, metadata) -> dict[str, grpc.StatusCode]:
    """The status each RPC ends with (OK where it succeeds)."""
    calls = {
        "ListModels": lambda: stub.ListModels(pb.ListModelsRequest(), metadata=metadata),
        "ListSessions": lambda: stub.ListSessions(pb.ListSessionsRequest(), metadata=metadata),
        "GetSession": lambda: stub.GetSession(
            pb.GetSessionRequest(session_id="nope"), metadata=metadata
        ),
        "CancelSession": lambda: stub.CancelSession(
            pb.CancelSessionRequest(session_id="nope"), metadata=metadata
        ),
        "UpdatePrompt": lambda: stub.UpdatePrompt(
            pb.PromptUpdate(session_id="nope", text="x"), metadata=metadata
        ),
        "StreamGenerate": lambda: next(
            stub.StreamGenerate(request(chunks=1, size=16), metadata=metadata, timeout=10)
        ),
        "Interact": lambda: next(
            stub.Interact(
                iter([pb.ClientEvent(start=request(chunks=1, size=16))]),
                metadata=metadata,
                timeout=10,
            )
        ),
        "Attach": lambda: next(
            stub.Attach(pb.AttachRequest(session_id="nope"), metadata=metadata, timeout=10)
        ),
        "SnapshotSession": lambda: stub.SnapshotSession(
            pb.SnapshotRequest(session_id="nope"), metadata=metadata
        ),
    }
    codes = {}
    for name, call in calls.items():
        try:
            call()
            codes[name] = grpc.StatusCode.OK
        except grpc.RpcError as e:
            codes[name] = e.code()
    return codes


def test_every_rpc_needs_a_valid_token_and_health_stays_open(token_server):
    before = token_server.metric("magistream_auth_failures_total", 'reason="missing"')
    with token_server.channel() as channel:
        stub = pb_grpc.VideoGenerationStub(channel)
        for metadata in (None, (("authorization", "Bearer not-a-known-token-at-all"),)):
            codes = call_every_rpc(stub, metadata)
            assert set(codes.values()) == {UNAUTH}, codes
        # a known token passes authentication (the unknown session is then NOT_FOUND)
        codes = call_every_rpc(stub, bearer("bob"))
        assert codes["ListModels"] == codes["ListSessions"] == grpc.StatusCode.OK
        assert codes["GetSession"] == codes["UpdatePrompt"] == grpc.StatusCode.NOT_FOUND
        assert codes["Attach"] == codes["SnapshotSession"] == grpc.StatusCode.NOT_FOUND
        assert codes["StreamGenerate"] == grpc.StatusCode.OK
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert token_server.metric("magistream_auth_failures_total", 'reason="missing"') == before + 9
    assert token_server.metric("magistream_auth_failures_total", 'reason="invalid_token"') >= 9
    unauthenticated = token_server.metric(
        "magistream_grpc_calls_total",
        'code="UNAUTHENTICATED",method="/magistream.v1.VideoGeneration/GetSession"',
    )
    assert unauthenticated == 2
    assert TOKENS["alice"] not in token_server.logs()  # tokens are never logged


def list_services(channel: grpc.Channel, metadata=None) -> list[str]:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    replies = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
        metadata=metadata,
        timeout=10,
    )
    return [s.name for reply in replies for s in reply.list_services_response.service]


def test_reflection_needs_credentials_by_default(token_server):
    with token_server.channel() as channel:
        with pytest.raises(grpc.RpcError) as e:
            list_services(channel)
        assert e.value.code() == UNAUTH
        assert "magistream.v1.VideoGeneration" in list_services(channel, bearer("bob"))


def test_plaintext_cannot_talk_to_a_tls_server(token_server):
    with grpc.insecure_channel(token_server.address) as channel:
        with pytest.raises(grpc.RpcError) as e:
            pb_grpc.VideoGenerationStub(channel).ListModels(
                pb.ListModelsRequest(), metadata=bearer("alice"), timeout=5
            )
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_only_the_owner_and_admins_see_and_control_a_session(token_server):
    with token_server.channel() as channel:
        stub = pb_grpc.VideoGenerationStub(channel)
        stream = stub.StreamGenerate(long_request(), metadata=bearer("alice"))
        sid = next(stream).started.session_id
        # bob: every control call says the session does not exist, as for an unknown id
        for call in (
            lambda: stub.GetSession(pb.GetSessionRequest(session_id=sid), metadata=bearer("bob")),
            lambda: stub.UpdatePrompt(
                pb.PromptUpdate(session_id=sid, text="bob steers"), metadata=bearer("bob")
            ),
            lambda: stub.CancelSession(
                pb.CancelSessionRequest(session_id=sid), metadata=bearer("bob")
            ),
            lambda: next(  # nor may bob fork it
                stub.StreamGenerate(
                    pb.GenerateRequest(fork=pb.ForkSource(session_id=sid, at_chunk=0)),
                    metadata=bearer("bob"),
                )
            ),
        ):
            with pytest.raises(grpc.RpcError) as e:
                call()
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
            assert e.value.details() == (
                f"session {sid!r} is unknown (never started here, or ended long enough ago "
                "to be forgotten)"
            )
        listed = stub.ListSessions(pb.ListSessionsRequest(), metadata=bearer("bob")).sessions
        assert sid not in [s.session_id for s in listed]
        # alice sees her session, untouched by bob
        info = stub.GetSession(pb.GetSessionRequest(session_id=sid), metadata=bearer("alice"))
        assert info.owner == "alice" and info.prompt_version == 1
        assert info.state == pb.SESSION_STATE_RUNNING
        # admin lists and cancels it
        listed = stub.ListSessions(pb.ListSessionsRequest(), metadata=bearer("admin")).sessions
        assert sid in [s.session_id for s in listed]
        cancelled = stub.CancelSession(
            pb.CancelSessionRequest(session_id=sid), metadata=bearer("admin")
        )
        assert cancelled.state == pb.SESSION_STATE_CANCELLED
        last = list(stream)[-1]
        assert last.finished.state == pb.SESSION_STATE_CANCELLED


def test_session_ids_are_per_principal(token_server):
    """Two principals may both call a session `demo`: neither is refused nor learns of the
    other's. An admin names one as OWNER/ID when the id alone is ambiguous."""
    with token_server.channel() as channel:
        stub = pb_grpc.VideoGenerationStub(channel)
        streams = {
            who: stub.StreamGenerate(long_request(session_id="demo"), metadata=bearer(who))
            for who in ("alice", "bob")
        }
        for stream in streams.values():
            assert next(stream).started.session_id == "demo"

        def get(who: str, session_id: str) -> pb.SessionInfo:
            request = pb.GetSessionRequest(session_id=session_id)
            return stub.GetSession(request, metadata=bearer(who))

        assert get("alice", "demo").owner == "alice" and get("bob", "demo").owner == "bob"
        with pytest.raises(grpc.RpcError) as e:
            get("bob", "alice/demo")
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as e:
            get("admin", "demo")
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "OWNER/demo (owners: alice, bob)" in e.value.details()
        assert get("admin", "alice/demo").owner == "alice"
        for who in ("alice", "bob"):
            request = pb.CancelSessionRequest(session_id=f"{who}/demo")
            state = stub.CancelSession(request, metadata=bearer("admin")).state
            assert state == pb.SESSION_STATE_CANCELLED
            assert list(streams[who])[-1].finished.state == pb.SESSION_STATE_CANCELLED


def test_per_principal_limits(token_server):
    """One session open and one request waiting per principal; a third is refused, and the
    waiting one starts when the first ends. Other principals are not held up."""
    with token_server.channel() as channel:
        stub = pb_grpc.VideoGenerationStub(channel)
        first = stub.StreamGenerate(long_request(), metadata=bearer("bob"))
        first_id = next(first).started.session_id
        second = stub.StreamGenerate(long_request(), metadata=bearer("bob"))
        got: list[pb.GenerateEvent] = []
        reader = threading.Thread(target=lambda: got.append(next(second)), daemon=True)
        reader.start()
        wait_for(
            lambda: "magistream" in token_server.metrics_text(), what="metrics"
        )  # the second request has reached the server by the time a third is refused
        time.sleep(0.5)
        with pytest.raises(grpc.RpcError) as e:
            next(stub.StreamGenerate(long_request(), metadata=bearer("bob"), timeout=10))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--principal-max-sessions 1" in e.value.details()
        assert not got  # still waiting for bob's first session to end
        # alice is not limited by bob's sessions
        alice = stub.StreamGenerate(long_request(), metadata=bearer("alice"))
        alice_id = next(alice).started.session_id
        stub.CancelSession(pb.CancelSessionRequest(session_id=first_id), metadata=bearer("bob"))
        reader.join(timeout=30)
        assert got and got[0].started.session_id
        for sid, who in ((got[0].started.session_id, "bob"), (alice_id, "alice")):
            stub.CancelSession(pb.CancelSessionRequest(session_id=sid), metadata=bearer(who))
        for stream in (first, second, alice):
            stream.cancel()


def test_metrics_port_wants_tls_and_a_token(token_server, pki):
    url = f"https://{token_server.metrics_address}/metrics"
    context = ssl.create_default_context(cafile=str(pki.ca))
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(url, timeout=5, context=context)
    assert e.value.code == 401
    wrong = urllib.request.Request(url, headers={"Authorization": "Bearer wrong-token-xxxxxxxx"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(wrong, timeout=5, context=context)
    assert e.value.code == 401
    with pytest.raises(OSError):  # plain HTTP on the TLS port: reset or refused
        urllib.request.urlopen(f"http://{token_server.metrics_address}/metrics", timeout=5)
    assert "magistream_grpc_calls_total" in token_server.metrics_text()  # admin's token

    def scrape(who: str) -> int:
        request = urllib.request.Request(url, headers=dict(bearer(who)))
        try:
            with urllib.request.urlopen(request, timeout=5, context=context) as reply:
                return reply.status
        except urllib.error.HTTPError as e:
            return e.code

    # only --metrics-principals (default prometheus) and admins read metrics
    assert scrape("prometheus") == 200 and scrape("bob") == 403


def test_a_metrics_principal_may_only_scrape(token_server):
    with token_server.channel() as channel:
        with pytest.raises(grpc.RpcError) as e:
            pb_grpc.VideoGenerationStub(channel).ListModels(
                pb.ListModelsRequest(), metadata=bearer("prometheus"), timeout=5
            )
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "may only read the metrics port" in e.value.details()
    assert token_server.metric("magistream_auth_failures_total", 'reason="scrape_only"') == 1


def test_a_rewritten_tokens_file_applies_without_restart(token_server):
    with token_server.channel() as channel:
        stub = pb_grpc.VideoGenerationStub(channel)

        def code(who: str) -> grpc.StatusCode:
            try:
                stub.ListModels(pb.ListModelsRequest(), metadata=bearer(who), timeout=5)
                return grpc.StatusCode.OK
            except grpc.RpcError as e:
                return e.code()

        assert code("carol") == UNAUTH
        original = token_server.tokens_file.read_text()
        # bob's token revoked, carol's added: the file watch picks it up
        token_server.tokens_file.write_text(
            original.replace(f"{TOKENS['bob']} bob\n", "") + f"{TOKENS['carol']} carol\n"
        )
        wait_for(lambda: code("carol") == grpc.StatusCode.OK, 15, "carol's token to apply")
        assert code("bob") == UNAUTH and code("alice") == grpc.StatusCode.OK
        # a broken file leaves the last good tokens in force
        token_server.tokens_file.write_text("short alice\n")
        token_server.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "auth.reload_failed" in token_server.logs(), 15, "the failed reload")
        assert code("carol") == grpc.StatusCode.OK
        token_server.tokens_file.write_text(original)
        token_server.proc.send_signal(signal.SIGHUP)  # at once, not at the next file check
        wait_for(lambda: code("bob") == grpc.StatusCode.OK, 15, "bob's token to return")
    assert "short alice" not in token_server.logs()


# ---- the WebSocket realtime API: the same callers as gRPC -----------------------------------


def wss(pki, who: str | None = None) -> ssl.SSLContext:
    """A client TLS context trusting the test CA (with `who`'s client certificate)."""
    context = ssl.create_default_context(cafile=str(pki.ca))
    if who:
        context.load_cert_chain(str(pki.client_cert(who)), str(pki.client_key(who)))
    return context


def test_realtime_takes_the_same_tokens_and_owner_rules(token_server, pki):
    tls = wss(pki)
    address = token_server.http_address
    # refused callers still complete the handshake, so a browser can read why
    for token, code in (
        (None, "UNAUTHENTICATED"),
        ("not-a-known-token-at-all", "UNAUTHENTICATED"),
        (TOKENS["prometheus"], "PERMISSION_DENIED"),
    ):
        with ws_connect(address, token, tls=tls) as ws:
            end = ws_first(ws, ws_start(request(chunks=1, size=16)))
        assert end.events == [] and end.error["code"] == code, (token, end.error)
        assert end.close_code == 4000 + getattr(grpc.StatusCode, code).value[0]
    assert "may only read the metrics port" in end.error["message"]
    with ws_connect(address, tls=tls) as ws:
        end = ws_first(ws, ws_start(request(chunks=1, size=16)))
    assert end.error["message"].startswith("this server requires credentials: send a bearer")
    assert "magistream.bearer." in end.error["message"]
    # a token as a header, a subprotocol (the page's way) or a query parameter
    with token_server.channel() as channel:
        stub = pb_grpc.VideoGenerationStub(channel)
        for via in ("header", "protocol", "query"):
            with ws_connect(address, TOKENS["alice"], via=via, tls=tls) as ws:
                end = ws_first(ws, ws_start(request(chunks=1, size=16)))
            assert end.close_code == 1000 and end.kinds()[-1] == "finished", (via, end.error)
            sid = end.of("started")[0]["sessionId"]
            info = stub.GetSession(pb.GetSessionRequest(session_id=sid), metadata=bearer("alice"))
            assert info.owner == "alice", via
            with pytest.raises(grpc.RpcError) as e:
                stub.GetSession(pb.GetSessionRequest(session_id=sid), metadata=bearer("bob"))
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
    # the page itself is served over the same TLS
    with urllib.request.urlopen(f"https://{address}/", context=tls, timeout=10) as reply:
        assert reply.status == 200
    # plaintext cannot talk to it
    with pytest.raises(Exception):  # noqa: B017 - any failure to connect will do
        ws_connect(address, TOKENS["alice"])


# ---- mutual TLS ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mtls_server(pki, tiny_folder, tmp_path_factory):
    folder = tmp_path_factory.mktemp("mtls-server")
    cert, key = folder / "server.pem", folder / "server.key"
    shutil.copy(pki.server_cert, cert)
    shutil.copy(pki.server_key, key)
    server = ServerProcess(
        folder,
        *("--tls-cert", str(cert), "--tls-key", str(key), "--tls-client-ca", str(pki.ca)),
        *("--http-port", "0"),
        model=tiny_folder,
        ca=pki.ca,
        client_cert=(pki.client_cert("admin"), pki.client_key("admin")),
    )
    server.cert_files = (cert, key)
    with server:
        server.wait_serving()
        yield server


def mtls_channel(server: ServerProcess, pki, who: str | None, ca: Path | None = None):
    cert = (pki.client_cert(who).read_bytes(), pki.client_key(who).read_bytes()) if who else None
    credentials = grpc.ssl_channel_credentials(
        (ca or pki.ca).read_bytes(), cert[1] if cert else None, cert[0] if cert else None
    )
    return grpc.secure_channel(server.address, credentials)


def test_mutual_tls_principal_is_the_certificate_common_name(mtls_server, pki):
    with mtls_channel(mtls_server, pki, "alice") as channel:
        stub = pb_grpc.VideoGenerationStub(channel)
        stream = stub.StreamGenerate(long_request())
        sid = next(stream).started.session_id
        info = stub.GetSession(pb.GetSessionRequest(session_id=sid))
        assert info.owner == "alice"
        with mtls_channel(mtls_server, pki, "bob") as other:
            with pytest.raises(grpc.RpcError) as e:
                pb_grpc.VideoGenerationStub(other).GetSession(pb.GetSessionRequest(session_id=sid))
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
        stub.CancelSession(pb.CancelSessionRequest(session_id=sid))
        stream.cancel()
    # the metrics port wants a client certificate too
    assert "magistream_sessions_active" in mtls_server.metrics_text()
    context = ssl.create_default_context(cafile=str(pki.ca))
    with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
        urllib.request.urlopen(
            f"https://{mtls_server.metrics_address}/", timeout=5, context=context
        )


def test_mutual_tls_refuses_unknown_or_missing_certificates(mtls_server, pki):
    for who in ("mallory", None):  # signed by another CA; no certificate at all
        with mtls_channel(mtls_server, pki, who) as channel:
            with pytest.raises(grpc.RpcError) as e:
                pb_grpc.VideoGenerationStub(channel).ListModels(pb.ListModelsRequest(), timeout=5)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_realtime_over_mutual_tls_names_the_certificate(mtls_server, pki):
    with ws_connect(mtls_server.http_address, tls=wss(pki, "alice")) as ws:
        end = ws_first(ws, ws_start(request(chunks=1, size=16)))
    assert end.close_code == 1000 and end.kinds()[-1] == "finished", end.error
    sid = end.of("started")[0]["sessionId"]
    with mtls_channel(mtls_server, pki, "alice") as channel:
        info = pb_grpc.VideoGenerationStub(channel).GetSession(pb.GetSessionRequest(session_id=sid))
    assert info.owner == "alice"
    with pytest.raises(Exception):  # noqa: B017 - no client certificate: no TLS session
        ws_connect(mtls_server.http_address, tls=wss(pki)).recv(timeout=10)


def test_a_new_certificate_applies_after_sighup(mtls_server, pki, tmp_path):
    """Replace the server certificate by one from a new CA: after SIGHUP, new connections get
    it (clients trusting only the new CA connect), without a restart."""
    renewed = make_pki(tmp_path / "renewed")
    cert, key = mtls_server.cert_files
    shutil.copy(renewed.server_cert, cert)
    shutil.copy(renewed.server_key, key)
    mtls_server.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "auth.reloaded" in mtls_server.logs(), 15, "the reload")

    def models(ca: Path) -> grpc.StatusCode:
        with mtls_channel(mtls_server, pki, "alice", ca=ca) as channel:
            try:
                pb_grpc.VideoGenerationStub(channel).ListModels(pb.ListModelsRequest(), timeout=5)
                return grpc.StatusCode.OK
            except grpc.RpcError as e:
                return e.code()

    assert models(renewed.ca) == grpc.StatusCode.OK
    assert models(pki.ca) == grpc.StatusCode.UNAVAILABLE  # the old certificate is gone


# ---- protected mode ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("peer", "loopback"),
    [
        ("ipv4:127.0.0.1:5000", True),
        ("ipv4:127.8.9.10:1", True),
        ("ipv6:[::1]:5000", True),
        ("ipv6:%5B::1%5D:34238", True),  # as gRPC writes it
        ("ipv6:[::ffff:127.0.0.1]:5000", True),
        ("ipv6:%5B::ffff:127.0.0.1%5D:5000", True),
        ("ipv6:%5B2001:db8::1%5D:5000", False),
        ("ipv6:%5Bfe80::1%25eth0%5D:5000", False),
        ("unix:/tmp/magistream.sock", True),
        ("ipv4:10.0.0.7:5000", False),
        ("ipv4:0.0.0.0:5000", False),
        ("ipv6:[2001:db8::1]:5000", False),
        ("ipv6:[::ffff:10.0.0.1]:5000", False),
        ("ipv6:[fe80::1%eth0]:5000", False),
        ("garbage", False),
    ],
)
def test_is_loopback_peer(peer, loopback):
    assert is_loopback_peer(peer) is loopback


def fake_call(peer: str, metadata=(), common_name: str | None = None):
    auth = {"x509_common_name": [common_name.encode()]} if common_name else {}
    return SimpleNamespace(
        peer=lambda: peer, invocation_metadata=lambda: metadata, auth_context=lambda: auth
    )


def test_protected_mode_decides_by_the_peer(tmp_path):
    protected = Credentials(Security())
    assert protected.protected
    assert protected.check_grpc("/m", fake_call("ipv4:127.0.0.1:1")) == ANONYMOUS
    refused = protected.check_grpc("/m", fake_call("ipv4:192.0.2.1:1"))
    assert isinstance(refused, Denied) and refused.reason == "not_loopback"
    assert "--auth-tokens" in refused.message and "--insecure" in refused.message
    assert protected.check_http("192.0.2.1", None, None) == refused
    assert protected.check_http("::1", None, None) == ANONYMOUS
    insecure = Credentials(Security(insecure=True))
    assert insecure.check_grpc("/m", fake_call("ipv4:192.0.2.1:1")) == ANONYMOUS
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{TOKENS['alice']} alice\n")
    with_tokens = Credentials(Security(auth_tokens=tokens))
    assert not with_tokens.protected
    missing = with_tokens.check_grpc("/m", fake_call("ipv4:127.0.0.1:1"))
    assert isinstance(missing, Denied) and missing.reason == "missing"  # loopback is no pass
    call = fake_call("ipv4:192.0.2.1:1", (("authorization", f"bearer {TOKENS['alice']}"),))
    assert with_tokens.check_grpc("/m", call) == "alice"


def own_address() -> str | None:
    """This machine's address on its default route (no packet is sent), if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))
            address = s.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


def test_protected_mode_end_to_end(tiny_folder, tmp_path):
    """No credentials: the server says it is in protected mode; a loopback client is served,
    a client reaching it on this machine's non-loopback address is refused."""
    address = own_address()
    server = ServerProcess(tmp_path, "--host", "0.0.0.0", "--reflection", "off", model=tiny_folder)
    with server:
        assert "protected mode" in server.logs()
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            with pytest.raises(grpc.RpcError) as e:  # --reflection off: not served at all
                list_services(channel)
            assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
        # `localhost` reaches a 0.0.0.0 listener over IPv6 where the machine has ::1 (the README
        # examples dial it), IPv4 elsewhere: loopback either way
        for host in ("127.0.0.1", "localhost"):
            with grpc.insecure_channel(f"{host}:{server.port}") as channel:
                stub = pb_grpc.VideoGenerationStub(channel)
                assert stub.ListModels(pb.ListModelsRequest(), timeout=30).default_model
        if address is None:
            pytest.skip("this machine has no non-loopback IPv4 address to connect from")
        with grpc.insecure_channel(f"{address}:{server.port}") as channel:
            stub = pb_grpc.VideoGenerationStub(channel)
            with pytest.raises(grpc.RpcError) as e:
                stub.ListModels(pb.ListModelsRequest(), timeout=30)
            assert e.value.code() == UNAUTH and "protected mode" in e.value.details()
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert health.status in (
                health_pb2.HealthCheckResponse.SERVING,
                health_pb2.HealthCheckResponse.NOT_SERVING,
            )


# ---- configuration ------------------------------------------------------------------------


def test_tokens_file_errors_name_the_line_not_the_token():
    secret = "s3cr3t-but-short"[:10]
    for text, words in (
        ("", "no tokens"),
        (f"{secret} alice\n", "line 1: the token is shorter"),
        (f"# comment\n\n{TOKENS['alice']}\n", "line 3: expected `TOKEN PRINCIPAL`"),
        (f"{TOKENS['alice']} al/ice\n", "line 1: principal 'al/ice'"),
        (f"{TOKENS['alice']} alice\n{TOKENS['alice']} bob\n", "line 2: the same token"),
    ):
        with pytest.raises(TokenFileError) as e:
            TokenTable.parse(text, "tokens")
        assert words in str(e.value) and secret not in str(e.value)
    table = TokenTable.parse(f"{TOKENS['alice']} alice\n{TOKENS['bob']} bob\n", "tokens")
    assert table.principal(TOKENS["bob"]) == "bob" and table.principal("x" * 30) is None


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--tls-cert", "/nonexistent.pem"), "--tls-cert and --tls-key go together"),
        (("--tls-client-ca", "/ca.pem"), "--tls-client-ca (mutual TLS) needs --tls-cert"),
        (("--reflection", "maybe"), "--reflection must be one of auth, open, off"),
        (
            ("--tls-cert", "/nonexistent.pem", "--tls-key", "/nonexistent.key"),
            "cannot load them",
        ),
        (("--auth-tokens", "/nonexistent-tokens"), "cannot read /nonexistent-tokens"),
    ],
)
def test_bad_security_flags_stop_the_server_at_start(flags, message, capsys):
    from server.__main__ import main

    assert main(["--model", "tiny", *flags], env={}) == 2
    assert message in capsys.readouterr().err


def test_the_sdk_and_cli_speak_tls_and_tokens(token_server, pki, capsys):
    """The shipped client, as a user runs it: a video over TLS with alice's token; her
    `sessions` lists it, bob's does not; without a token the CLI exits with the auth code."""
    from client import Client, ConnectOptions, TlsOptions
    from client.cli import main as cli

    options = ConnectOptions(
        token_server.address, tls=TlsOptions(ca_file=pki.ca), token=TOKENS["alice"]
    )
    with Client(options) as client:
        with client.generate("a red ball rolls", chunks=1, width=16, height=16) as stream:
            sid = stream.start().session_id
            assert len(list(stream)) == 1
        assert sid in [s.session_id for s in client.list_sessions()]
    connect = ["--server", token_server.address, "--ca", str(pki.ca)]
    assert cli(["sessions", *connect, "--token", TOKENS["alice"]]) == 0
    assert f"{sid} FINISHED owner alice chunks 1/1" in capsys.readouterr().out
    assert cli(["sessions", *connect, "--token", TOKENS["bob"]]) == 0
    assert sid not in capsys.readouterr().out
    code = cli(["sessions", *connect])
    assert code != 0 and "UNAUTHENTICATED" in capsys.readouterr().err


def test_open_reflection_skips_authentication_for_reflection_only(tmp_path):
    from prometheus_client import CollectorRegistry

    from server.auth import AuthInterceptor
    from server.metrics import Metrics

    tokens = tmp_path / "tokens"
    tokens.write_text(f"{TOKENS['alice']} alice\n")
    credentials = Credentials(Security(auth_tokens=tokens, reflection="open"))
    metrics = Metrics(CollectorRegistry())
    opened = AuthInterceptor(credentials, metrics, open_reflection=True).open_prefixes
    closed = AuthInterceptor(credentials, metrics, open_reflection=False).open_prefixes
    reflection = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
    health = "/grpc.health.v1.Health/Check"
    service = "/magistream.v1.VideoGeneration/ListModels"
    assert reflection.startswith(opened) and not reflection.startswith(closed)
    assert health.startswith(opened) and health.startswith(closed)
    assert not service.startswith(opened)

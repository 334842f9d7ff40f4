"""deploy/nginx/magistream.conf with Debian's nginx: `nginx -t` accepts it, and two real
`magi-server` replicas behind it on loopback keep every call of a session on the replica that
holds it, including while one replica drains after SIGTERM; and in a rolling restart, the
SDK (client/) resumes a session whose replica drained through the same nginx address, its
video identical to an uninterrupted run.

The routing tests run the shipped config with its TLS taken out (`plaintext`, each removal
counted), on plaintext replicas; tests/deploy/test_secured.py runs it with its TLS, in front
of a replica that asks for tokens.

Clients send the session id as `x-session-id` on every call (docs/deploy.md, "Session
routing"); here plain grpc stubs do that by hand, and the SDK on its own. Which replica owns
an id depends on the replicas' ports (nginx hashes them into its ring), so the test asks
nginx: a GetSession for a not-yet-existing id is answered NOT_FOUND by the owner, and nginx's
access log names it.
"""

from __future__ import annotations

import getpass
import itertools
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from client import Client, ConnectOptions, GenerateOptions, RetryPolicy
from engine.launch import free_port
from proto import video_generation_pb2 as pb
from proto import video_generation_pb2_grpc as pb_grpc
from tests.deploy.conftest import DEPLOY, run, tool
from tests.serverproc import SERVING, ServerProcess
from tests.serverproc import health_status as health
from tests.tls import make_pki

# the routing tests share one cluster, and the last ones use what the drain test left: one
# xdist worker runs the module in order (make test: --dist loadgroup)
pytestmark = pytest.mark.xdist_group("nginx")

SHIPPED = DEPLOY / "nginx" / "magistream.conf"
HEADER = "x-session-id"
# The replicas' --grace-period-s: short, so the drain test is quick, yet long enough for the
# test to act on a draining replica on a busy machine.
GRACE_S = 4.0
START_TIMEOUT_S = 120.0  # writing the tiny model and starting a worker, on 2 busy cores
PROMPT = "a red ball rolls"


# ---- nginx config: the shipped file, moved onto loopback ----------------------------------


def render(
    conf: str, backends: list[str], listen: str, access_log: Path, tls: Path | None = None
) -> str:
    """The shipped config with its example replicas, listen address and log path replaced,
    and its certificate folder moved to `tls` (None: TLS taken out, see `plaintext`). Each
    pattern must match as often as the shipped file says, so a reshaped file fails here
    rather than silently testing something else."""
    servers = re.findall(r"^\s*server\s+[\d.]+:\d+(.*);$", conf, re.M)
    assert len(servers) == 2, "the shipped upstream lists two example replicas"
    lines = "".join(f"    server {b}{servers[0]};\n" for b in backends)
    conf, n_upstream = re.subn(r"(?:^\s*server\s+[\d.]+:\d+.*;\n)+", lines, conf, flags=re.M)
    conf, n_listen = re.subn(r"listen 50050 ssl http2;", f"listen {listen} ssl http2;", conf)
    conf, n_log = re.subn(
        r"access_log \S+ magistream_grpc;", f"access_log {access_log} magistream_grpc;", conf
    )
    assert (n_upstream, n_listen, n_log) == (1, 1, 1)
    return plaintext(conf) if tls is None else move_certificates(conf, tls)


def move_certificates(conf: str, folder: Path) -> str:
    """/etc/nginx/tls/ -> folder: the listener's certificate and key, the replicas' CA."""
    conf, n = re.subn(r"^(\s*\w+\s+)/etc/nginx/tls/", rf"\g<1>{folder}/", conf, flags=re.M)
    assert n == 3, n
    return conf


def plaintext(conf: str) -> str:
    """The shipped config without TLS on either side (h2c listener, grpc:// to replicas), for
    the routing tests' plaintext replicas: everything but the TLS lines stays as shipped."""
    conf, n_ssl = re.subn(r"^\s*(?:grpc_)?ssl_\w+ .*;\n", "", conf, flags=re.M)
    conf, n_listen = re.subn(r"(listen \S+) ssl http2;", r"\1 http2;", conf)
    conf, n_pass = re.subn(r"grpc_pass grpcs://", "grpc_pass grpc://", conf)
    assert (n_ssl, n_listen, n_pass) == (8, 1, 1), (n_ssl, n_listen, n_pass)
    return conf


def main_config(tmp: Path, site: Path) -> Path:
    """A main nginx.conf that keeps pid, logs and temp files under tmp (never /var, /run)."""
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (tmp / "temp" / sub).mkdir(parents=True, exist_ok=True)
    # pytest's tmp dirs are private to this user; workers must be able to write them.
    user = f"user {getpass.getuser()};\n" if os.geteuid() == 0 else ""
    path = tmp / "nginx.conf"
    path.write_text(
        f"{user}worker_processes 1;\ndaemon off;\npid {tmp}/nginx.pid;\n"
        f"error_log {tmp}/error.log info;\nevents {{ worker_connections 512; }}\n"
        "http {\n"
        + "".join(
            f"    {kind}_temp_path {tmp}/temp/{sub};\n"
            for kind, sub in (
                ("client_body", "body"),
                ("proxy", "proxy"),
                ("fastcgi", "fastcgi"),
                ("uwsgi", "uwsgi"),
                ("scgi", "scgi"),
            )
        )
        + f"    include {site};\n}}\n"
    )
    return path


def nginx_test(conf: Path) -> None:
    run(tool("nginx"), "-t", "-q", "-c", str(conf), "-p", str(conf.parent), "-e", "stderr")


def test_the_shipped_config_passes_nginx_t(tmp_path):
    site = tmp_path / "magistream.conf"
    # Only the access log and the certificates move (nginx -t opens them); everything else
    # exactly as shipped.
    certs = make_pki(tmp_path / "tls")
    for shipped, made in (
        ("magistream.crt", certs.server_cert),
        ("magistream.key", certs.server_key),
        ("magistream-ca.crt", certs.ca),
    ):
        (tmp_path / shipped).symlink_to(made)
    conf = SHIPPED.read_text().replace("/var/log/nginx/", f"{tmp_path}/")
    site.write_text(move_certificates(conf, tmp_path))
    nginx_test(main_config(tmp_path, site))


def test_the_shipped_config_speaks_tls_and_never_touches_credentials():
    conf = SHIPPED.read_text()
    assert re.search(r"^\s*listen 50050 ssl http2;", conf, re.M)
    assert re.search(r"^\s*grpc_pass grpcs://magistream;", conf, re.M)
    assert re.search(r"^\s*grpc_ssl_verify on;", conf, re.M)
    # grpc_pass forwards every request header: nothing may tell it to drop or replace the
    # caller's `authorization` (the replica authenticates the call).
    setters = re.findall(r"^\s*(grpc_set_header|grpc_hide_header)\s+(\S+)", conf, re.M)
    assert not [s for s in setters if s[1].lower() == "authorization"], setters


def test_the_config_on_loopback_ports_passes_nginx_t(tmp_path):
    site = tmp_path / "magistream.conf"
    site.write_text(
        render(
            SHIPPED.read_text(),
            ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"],
            "127.0.0.1:4",
            tmp_path / "access.log",
        )
    )
    nginx_test(main_config(tmp_path, site))


# ---- two replicas behind nginx ------------------------------------------------------------


class Replica(ServerProcess):
    """A `python -m server --model tiny` process on loopback port 0 that drains for GRACE_S
    after SIGTERM and serves unbounded sessions."""

    def __init__(self, tmp: Path, *extra_flags: str, **options) -> None:
        """options: ServerProcess's (`ca`, `token`... for a replica with credentials)."""
        super().__init__(
            tmp,
            "--grace-period-s",
            str(GRACE_S),
            "--allow-unbounded",
            "1",
            *extra_flags,
            model="tiny",
            start_timeout_s=START_TIMEOUT_S,
            stop_timeout_s=GRACE_S + 20,
            **options,
        )

    def wait_started(self) -> None:
        """Until its worker answers: gRPC health SERVING."""
        self.wait_serving()


@dataclass
class Cluster:
    replicas: list[Replica]
    address: str  # nginx
    access_log: Path
    channel: grpc.Channel
    snapshots: Path  # replica 1's --snapshot-dir (replica 0 has none: see `cluster`)
    owners: dict[str, int] = field(default_factory=dict)  # session id -> replica index

    @property
    def api(self) -> pb_grpc.VideoGenerationStub:
        return pb_grpc.VideoGenerationStub(self.channel)

    def upstreams(self, session_id: str) -> list[str]:
        """The replica (upstream address) of every call of this session in nginx's log; a
        call that failed over lists each address it tried, as "A, B"."""
        pattern = rf"session={re.escape(session_id)} upstream=(.+?) http="
        return re.findall(pattern, self.access_log.read_text())

    def calls(self, session_id: str) -> list[tuple[str, str]]:
        """(upstream, gRPC status) of every call of this session in nginx's log."""
        pattern = rf"session={re.escape(session_id)} upstream=(.+?) http=\S+ grpc=(\S*) "
        return re.findall(pattern, self.access_log.read_text())

    def owner(self, session_id: str) -> int:
        """Which replica nginx sends this id to, learned with one NOT_FOUND GetSession."""
        if session_id not in self.owners:
            with pytest.raises(grpc.RpcError) as error:
                self.api.GetSession(
                    pb.GetSessionRequest(session_id=session_id),
                    metadata=((HEADER, session_id),),
                    timeout=5,
                )
            assert error.value.code() == grpc.StatusCode.NOT_FOUND
            wait_for(lambda: self.upstreams(session_id), "nginx to log the probe")
            (upstream,) = self.upstreams(session_id)
            addresses = [r.address for r in self.replicas]
            self.owners[session_id] = addresses.index(upstream)
        return self.owners[session_id]

    def ids_owned_by(self, replica: int, count: int, prefix: str) -> list[str]:
        found = []
        for i in range(64):  # each replica owns about half the ring: a few probes suffice
            if self.owner(f"{prefix}-{i}") == replica:
                found.append(f"{prefix}-{i}")
                if len(found) == count:
                    return found
        raise AssertionError(f"replica {replica} owns none of 64 ids: is nginx hashing?")


def store_flags(snapshots: Path) -> tuple[str, ...]:
    """A replica that shares the snapshot store `snapshots` and, on SIGTERM, snapshots every
    session with chunks left (grace 0: none is let finish), so its client resumes elsewhere."""
    return ("--snapshot-dir", str(snapshots), "--grace-period-s", "0")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """nginx in front of two replicas. Replica 0, which the drain test drains, has no
    snapshot store, so its sessions run on for the grace period; replica 1 has one, for the
    rolling restart test (the last one: it replaces replica 0 and drains replica 1)."""
    nginx = tool("nginx")
    snapshots = tmp_path_factory.mktemp("snapshots")
    replicas = [
        Replica(tmp_path_factory.mktemp("replica0")),
        Replica(tmp_path_factory.mktemp("replica1"), *store_flags(snapshots)),
    ]
    proxy = None
    try:
        for replica in replicas:  # both started at once: the model loads overlap
            replica.wait_started()
        tmp = tmp_path_factory.mktemp("nginx")
        port = free_port()
        site = tmp / "magistream.conf"
        site.write_text(
            render(
                SHIPPED.read_text(),
                [r.address for r in replicas],
                f"127.0.0.1:{port}",
                tmp / "access.log",
            )
        )
        conf = main_config(tmp, site)
        proxy = subprocess.Popen(
            [nginx, "-c", str(conf), "-p", str(tmp), "-e", "stderr"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        wait_for(lambda: can_connect(port) or proxy.poll() is not None, "nginx to listen")
        assert proxy.poll() is None, proxy.stderr.read().decode()
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield Cluster(replicas, f"127.0.0.1:{port}", tmp / "access.log", channel, snapshots)
    finally:
        if proxy is not None:
            proxy.terminate()
            proxy.wait(10)
        for replica in replicas:
            replica.stop()


def test_sessions_spread_and_every_control_call_reaches_the_replica_holding_it(cluster):
    ids = cluster.ids_owned_by(0, 2, "route") + cluster.ids_owned_by(1, 2, "route")
    accepted = 'magistream_prompt_updates_total{result="accepted"}'
    before = [replica.metric(accepted) for replica in cluster.replicas]
    with ThreadPoolExecutor(len(ids)) as pool:
        runs = pool.map(lambda sid: steered_session(cluster, sid), ids)
        results = dict(zip(ids, runs, strict=True))
    for sid, r in results.items():
        assert r.echoed == sid  # the server names the session in the stream's metadata
        assert r.ack.session_id == sid and r.ack.prompt_version == 2
        # The prompt steered exactly the chunks from the one the ack named.
        for chunk in r.chunks:
            steered = chunk.chunk_index >= r.ack.from_chunk
            assert chunk.prompt_version == (2 if steered else 1), (sid, chunk.chunk_index)
            assert chunk.prompt_text == (f"steer {sid}" if steered else PROMPT)
        assert r.chunks[-1].chunk_index >= r.ack.from_chunk
        assert r.info.state == pb.SESSION_STATE_RUNNING and r.info.prompt_version == 2
        assert r.cancelled == pb.SESSION_STATE_CANCELLED == r.finished
        # The session lives on the replica nginx hashed its id to, and only there.
        owner = cluster.owners[sid]
        for i, replica in enumerate(cluster.replicas):
            with grpc.insecure_channel(replica.address) as direct:
                api = pb_grpc.VideoGenerationStub(direct)
                try:
                    info = api.GetSession(pb.GetSessionRequest(session_id=sid), timeout=5)
                except grpc.RpcError as e:
                    assert i != owner and e.code() == grpc.StatusCode.NOT_FOUND
                else:
                    assert i == owner and info.state == pb.SESSION_STATE_CANCELLED
                    assert [e.text for e in info.timeline] == [PROMPT, f"steer {sid}"]
        # probe, StreamGenerate, UpdatePrompt, GetSession, CancelSession: all to the owner
        calls = cluster.upstreams(sid)
        assert calls == [cluster.replicas[owner].address] * 5, calls
    # Each replica accepted exactly its own sessions' prompts.
    for replica, count in zip(cluster.replicas, before, strict=True):
        assert replica.metric(accepted) - count == 2


def test_interact_streams_through_nginx(cluster):
    (sid,) = cluster.ids_owned_by(1, 1, "interact")
    outbox: queue.Queue = queue.Queue()
    outbox.put(pb.ClientEvent(start=request(sid)))
    events = cluster.api.Interact(iter(outbox.get, None), metadata=((HEADER, sid),), timeout=60)
    acks, chunks, finished = [], [], None
    try:
        for event in events:
            kind = event.WhichOneof("event")
            if kind == "started":
                outbox.put(pb.ClientEvent(prompt=pb.PromptUpdate(text="steer on the stream")))
            elif kind == "prompt_ack":
                acks.append(event.prompt_ack)
            elif kind == "chunk":
                chunks.append(event.chunk)
                if acks and event.chunk.chunk_index == acks[0].from_chunk:
                    outbox.put(pb.ClientEvent(cancel=pb.CancelSessionRequest()))
            elif kind == "finished":
                finished = event.finished
    finally:
        outbox.put(None)  # ends the request iterator, whatever happened
    assert [a.prompt_version for a in acks] == [2]
    assert chunks[-1].prompt_text == "steer on the stream"
    assert finished.state == pb.SESSION_STATE_CANCELLED
    assert set(cluster.upstreams(sid)) == {cluster.replicas[1].address}


def test_one_replica_drains_on_sigterm_while_the_other_keeps_serving(cluster):
    draining, serving = cluster.replicas
    a_id, a_late = cluster.ids_owned_by(0, 2, "drain")
    (b_id,) = cluster.ids_owned_by(1, 1, "drain")
    a_stream, b_stream = Stream(cluster, a_id), Stream(cluster, b_id)
    wait_for(lambda: a_stream.chunks and b_stream.chunks, "both sessions to stream")

    draining.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: health(draining.address) != SERVING, "the drained replica's health")
    # While it drains, the replica refuses new sessions (the client retries elsewhere later)...
    # (one chunk: were it served by mistake, the call would end instead of running on)
    with pytest.raises(grpc.RpcError) as refused:
        one_chunk = request(a_late, chunks=1)
        list(cluster.api.StreamGenerate(one_chunk, metadata=((HEADER, a_late),), timeout=10))
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    # ...and the other replica goes on: its session streams and is steered through nginx.
    during_drain = len(b_stream.chunks)
    ack = cluster.api.UpdatePrompt(
        pb.PromptUpdate(session_id=b_id, text="still here"), metadata=((HEADER, b_id),), timeout=10
    )
    assert ack.prompt_version == 2
    assert health(serving.address) == SERVING

    # The grace period runs out: the drained replica's unbounded session fails UNAVAILABLE
    # (with its `finished` event), and the process exits 0.
    a_stream.thread.join(GRACE_S + 15)
    assert a_stream.finished is not None and a_stream.finished.state == pb.SESSION_STATE_FAILED
    assert a_stream.code == grpc.StatusCode.UNAVAILABLE
    assert draining.proc.wait(15) == 0
    assert len(b_stream.chunks) > during_drain
    wait_for(
        lambda: any(c.prompt_text == "still here" for c in b_stream.chunks),
        "the steered chunk on the serving replica",
    )

    # With the drained replica gone, nginx sends its ids to the next replica on the ring,
    # the same one for every call, so a new session there is whole again.
    late = Stream(cluster, a_late)
    wait_for(lambda: late.chunks, "the re-routed session to stream")
    ack = cluster.api.UpdatePrompt(
        pb.PromptUpdate(session_id=a_late, text="moved"), metadata=((HEADER, a_late),), timeout=10
    )
    assert ack.prompt_version == 2
    for stream in (late, b_stream):
        state = cluster.api.CancelSession(
            pb.CancelSessionRequest(session_id=stream.sid),
            metadata=((HEADER, stream.sid),),
            timeout=10,
        ).state
        assert state == pb.SESSION_STATE_CANCELLED
        stream.thread.join(10)
        assert stream.finished.state == pb.SESSION_STATE_CANCELLED
    a, b = draining.address, serving.address
    late_calls = cluster.upstreams(a_late)
    # probe and refused start on the draining replica; after it exited, each call tried it
    # first (or skipped it once nginx marked it failed) and ended on the serving one
    assert late_calls[:2] == [a, a]
    assert all(call in (b, f"{a}, {b}") for call in late_calls[2:]), late_calls
    assert set(cluster.upstreams(b_id)) == {b}


def test_the_container_health_check_follows_grpc_health(cluster):
    """deploy/healthcheck.py, the Dockerfile's HEALTHCHECK: 0 for a SERVING replica, 1 where
    nothing serves."""
    serving = cluster.replicas[1]  # the one the drain test left running
    for port, expected in ((serving.address.rsplit(":", 1)[1], 0), (str(free_port()), 1)):
        result = run(
            sys.executable,
            str(DEPLOY / "healthcheck.py"),
            check=False,
            env={**os.environ, "MAGISTREAM_PORT": port},
        )
        assert result.returncode == expected, result.stderr


def test_a_rolling_restart_costs_an_sdk_client_a_pause_not_its_session(cluster, tmp_path_factory):
    """Replica 0 is replaced (on its address, sharing replica 1's snapshot store), then
    replica 1 gets SIGTERM while the SDK streams a session from it through nginx: the drain
    snapshots the session and ends its stream UNAVAILABLE with a resume token, and the SDK
    resumes it through the same nginx address, with the same x-session-id, on replica 0. The
    caller's video has every chunk once, each identical to an uninterrupted run."""
    old, draining = cluster.replicas
    old.stop()  # the drain test's SIGTERM ended it already; run alone, this does
    survivor = Replica(
        tmp_path_factory.mktemp("replica0-new"),
        *store_flags(cluster.snapshots),
        *("--cache", str(old.cache)),  # the same model files, as a restart has (none to write)
        port=old.port,
    )
    cluster.replicas[0] = survivor  # the fixture stops it
    survivor.wait_started()
    # nginx marks a replica down for 10 s after a failed connection (the drain test's last
    # calls): wait until ids reach the replacement, so the probes below see the whole ring
    probes = (f"back-{i}" for i in itertools.count())
    wait_for(lambda: cluster.owner(next(probes)) == 0, "nginx to route to the replacement")
    (sid,) = cluster.ids_owned_by(1, 1, "rolling")

    # the uninterrupted run: on the survivor directly, while the session streams from replica 1
    with ThreadPoolExecutor(1) as pool:
        solo = pool.submit(frames_of, survivor.address, sdk_options("rolling-solo"))
        order, got = [], {}
        with Client(ConnectOptions(cluster.address, retry=FAST)) as client:
            with client.generate(sdk_options(sid)) as stream:
                for chunk in stream:
                    order.append(chunk.index)
                    got[chunk.index] = chunk.frames
                    if len(order) == 1:
                        draining.terminate()
            resumes, finished = stream.resumes, stream.finished.state
            # the resumed session's control calls, hashed on its id, reach it too: with
            # replica 1 gone, nginx sends its ids to replica 0
            after = client.get_session(sid)
        want = solo.result(60)

    assert resumes == 1 and finished == "FINISHED"
    assert order == list(range(SDK_CHUNKS))  # each chunk once, in order
    for index in range(SDK_CHUNKS):
        assert got[index] == want[index], f"chunk {index} differs from the uninterrupted run"
    assert after.state == pb.SESSION_STATE_FINISHED
    assert f"event=session.snapshot session=anonymous/{sid}" in draining.logs()
    # nginx's log: the probe (NOT_FOUND) and the stream (UNAVAILABLE, with the token) on
    # replica 1. The resume carries the same x-session-id, so nginx sends it to replica 1
    # too, and the SDK tries again while it fails there: refused while replica 1 still
    # drains (grpc=14), or nginx's own 502 (grpc= empty; the client reads UNAVAILABLE) when
    # replica 1 reset the kept-alive connection the request went out on (nginx never passes
    # a sent POST on). Replica 1 closes its port as soon as its streams end: the next try
    # fails to connect and nginx fails over to the next replica on the ring ("B, A"), or
    # goes there straight, having marked replica 1 down ("A"). Both have been seen here.
    a, b = survivor.address, draining.address
    calls = cluster.calls(sid)
    assert calls[:2] == [(b, "5"), (b, "14")], calls
    *refused, resumed, status = calls[2:]
    assert all(upstream == b and code != "0" for upstream, code in refused), calls
    assert resumed in ((a, "0"), (f"{b}, {a}", "0")), calls
    assert status in ((a, "0"), (f"{b}, {a}", "0")), calls


# ---- helpers ------------------------------------------------------------------------------

SDK_CHUNKS = 6
# quick retries: the resume waits only for the drained replica to close its port
FAST = RetryPolicy(initial_backoff_s=0.05, max_backoff_s=0.5, resume_for_s=20.0)


def sdk_options(session_id: str) -> GenerateOptions:
    """A small raw session for the SDK, slow enough (twice the tiny model's steps) that it
    still has chunks left when its replica gets SIGTERM after the first one."""
    return GenerateOptions(
        prompts=((0, PROMPT), (3, "the ball falls")),
        chunks=SDK_CHUNKS,
        width=32,
        height=32,
        seed=5,
        steps=16,
        raw=True,
        session_id=session_id,
    )


def frames_of(address: str, options: GenerateOptions) -> dict[int, bytes]:
    """An uninterrupted SDK run: chunk index -> raw frames."""
    with Client(address) as client:
        return {c.index: c.frames for c in client.generate(options)}


def request(session_id: str, chunks: int = 0) -> pb.GenerateRequest:
    """A 64x64 session, by default unbounded: it runs until cancelled, so a test never races
    its end (the replicas allow unbounded sessions)."""
    return pb.GenerateRequest(
        session_id=session_id,
        timeline=[pb.TimelineEntry(from_chunk=0, text=PROMPT)],
        num_chunks=chunks,
        unbounded=chunks == 0,
        width_px=64,
        height_px=64,
        seed=1,
    )


@dataclass
class SteerResult:
    echoed: str
    ack: pb.PromptAck
    info: pb.SessionInfo
    cancelled: int
    chunks: list[pb.Chunk]
    finished: int


def steered_session(cluster: Cluster, sid: str) -> SteerResult:
    """Start a session through nginx, steer it, read it back, cancel it once the steered
    chunk arrived: every call carries the session's id header."""
    api, md = cluster.api, ((HEADER, sid),)
    call = api.StreamGenerate(request(sid), metadata=md, timeout=60)
    echoed = dict(call.initial_metadata()).get(HEADER, "")
    ack = info = cancelled = finished = None
    chunks = []
    for event in call:
        kind = event.WhichOneof("event")
        if kind == "started":
            ack = api.UpdatePrompt(
                pb.PromptUpdate(session_id=sid, text=f"steer {sid}"), metadata=md, timeout=10
            )
        elif kind == "chunk":
            chunks.append(event.chunk)
            if event.chunk.chunk_index == ack.from_chunk:
                info = api.GetSession(pb.GetSessionRequest(session_id=sid), metadata=md, timeout=10)
                cancelled = api.CancelSession(
                    pb.CancelSessionRequest(session_id=sid), metadata=md, timeout=10
                ).state
        elif kind == "finished":
            finished = event.finished.state
    return SteerResult(echoed, ack, info, cancelled, chunks, finished)


class Stream:
    """A StreamGenerate through nginx read on a thread, for tests that act while it runs."""

    def __init__(self, cluster: Cluster, sid: str) -> None:
        self.sid = sid
        self.chunks: list[pb.Chunk] = []
        self.finished: pb.SessionFinished | None = None
        self.code = grpc.StatusCode.OK
        self.call = cluster.api.StreamGenerate(request(sid), metadata=((HEADER, sid),), timeout=60)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for event in self.call:
                if event.HasField("chunk"):
                    self.chunks.append(event.chunk)
                elif event.HasField("finished"):
                    self.finished = event.finished
        except grpc.RpcError as e:
            self.code = e.code()


def can_connect(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def wait_for(predicate, what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")

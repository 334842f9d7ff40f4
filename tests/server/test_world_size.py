"""`magi-server --world-size 2` on loopback: a worker group of two CPU ranks (gloo). It streams
what one rank computes; a follower killed mid-stream fails the stream with UNAVAILABLE and the
whole group is restarted; flags and the torch.distributed environment make the group config."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2

from engine.engine import Engine
from engine.launch import free_port
from model.folder import load_model
from proto import video_generation_pb2 as pb
from scheduler.session import SessionParams
from server.__main__ import _configure, build_parser
from tests.server.conftest import REPO, health_status
from tests.server.helpers import PROMPT, kinds, request, stub


def group_pids(server) -> list[int]:
    """Every rank's pid of the newest group, in rank order."""
    found = re.findall(r"event=worker.ready pid=\d+ pids=([\d,]+)", server.logs())
    return [int(p) for p in found[-1].split(",")]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie until its parent reaps it: dead for our purposes
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


@pytest.fixture(scope="module")
def group_server(start_server):
    server = start_server("--world-size", "2")
    yield server
    server.stop()


async def test_a_two_rank_group_streams_what_one_rank_computes(group_server, tiny_folder):
    req = request(chunks=2, size=32, output_encoding=pb.OUTPUT_ENCODING_RAW_RGB24)
    async with grpc.aio.insecure_channel(group_server.address) as channel:
        events = [e async for e in stub(channel).StreamGenerate(req)]
    assert kinds(events)[-1] == "finished"
    assert events[-1].finished.state == pb.SESSION_STATE_FINISHED
    got = np.frombuffer(b"".join(e.frame.rgb24 for e in events if e.HasField("frame")), np.uint8)
    engine = Engine(load_model(tiny_folder))
    engine.open(SessionParams("x", ((0, PROMPT),), 2, 32, 32, seed=1))
    want = np.concatenate([d.frames.numpy() for d in engine.run_until_idle()])
    assert got.shape == (want.size,)
    assert np.abs(got.astype(int) - want.reshape(-1).astype(int)).max() <= 1
    assert len(group_pids(group_server)) == 2


async def test_a_killed_follower_fails_the_stream_and_the_group_restarts(group_server):
    old = group_pids(group_server)
    restarts = group_server.metric("magistream_worker_restarts_total")
    async with grpc.aio.insecure_channel(group_server.address) as channel:
        api = stub(channel)
        call = api.StreamGenerate(request(chunks=0))
        async for event in call:
            if event.HasField("chunk"):
                break
        os.kill(old[1], signal.SIGKILL)
        with pytest.raises(grpc.aio.AioRpcError) as error:
            async for _ in call:
                pass
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE
        # the follower's end, or rank 0 failing its next collective first (exit code 3)
        details = error.value.details()
        assert re.search(r"worker process died \(rank [01] of 2, exit code (-9|3)\)", details)
        await asyncio.to_thread(group_server.wait_serving)
        events = [e async for e in api.StreamGenerate(request(chunks=1))]
        assert kinds(events) == ["started", "chunk", "finished"]
    new = group_pids(group_server)
    assert not set(new) & set(old) and not alive(old[0])  # rank 0 was killed with its group
    assert group_server.metric("magistream_worker_restarts_total") == restarts + 1
    assert group_server.metric("magistream_worker_up") == 1


async def test_two_nodes_on_loopback_form_one_group(start_server):
    """Two servers as two hosts would run them (one rank each, torch.distributed env vars):
    node 0 serves, node 1 runs its follower rank only and answers health."""
    env = {"NNODES": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    follower = start_server("--world-size", "2", env={**env, "NODE_RANK": "1"}, wait=False)
    leader = start_server("--world-size", "2", env={**env, "NODE_RANK": "0"})
    async with grpc.aio.insecure_channel(leader.address) as channel:
        events = [e async for e in stub(channel).StreamGenerate(request(chunks=1, size=32))]
    assert kinds(events) == ["started", "chunk", "finished"]
    follower.wait_serving()
    assert health_status(follower.address) == health_pb2.HealthCheckResponse.SERVING
    async with grpc.aio.insecure_channel(follower.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            async for _ in stub(channel).StreamGenerate(request(chunks=1)):
                pass
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "follower ranks only" in error.value.details()
    leader.stop()
    follower.stop()


def test_flags_and_the_torch_environment_make_the_group(tiny_folder):
    env = {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "node-0", "MASTER_PORT": "29500"}
    args = build_parser(env).parse_args(["--model", str(tiny_folder), "--world-size", "8"])
    group = _configure(args)[0].worker.group
    assert (group.world_size, group.nnodes, group.node_rank) == (8, 2, 1)
    assert (group.master_addr, group.master_port) == ("node-0", 29500)
    assert list(group.local_ranks) == [4, 5, 6, 7] and not group.leads
    # MAGISTREAM_* wins over the standard variable, the command line over both
    env["MAGISTREAM_NODE_RANK"] = "0"
    args = build_parser(env).parse_args(["--model", str(tiny_folder), "--world-size", "4"])
    assert _configure(args)[0].worker.group.local_ranks == range(0, 2)
    args = build_parser(env).parse_args(["--model", str(tiny_folder), "--world-size", "6"])
    with pytest.raises(ValueError, match="query heads do not split over 6 ranks"):
        _configure(args)  # tiny: 8 query heads
    args = build_parser({}).parse_args(["--model", str(tiny_folder), "--nnodes", "2"])
    with pytest.raises(ValueError, match="multiple of --nnodes"):
        _configure(args)


def test_a_world_size_the_model_cannot_split_exits_2(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "server", "--world-size", "3", "--model", "tiny"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "MAGISTREAM_CACHE": str(tmp_path), "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 2
    assert "--world-size 3" in result.stderr and "do not split" in result.stderr

"""The server process as operators see it: admission, worker death, SIGTERM, health,
metrics, flags."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess

import grpc
import pytest
from grpc_health.v1 import health_pb2

from proto import video_generation_pb2 as pb
from tests.server.conftest import health_status, wait_for
from tests.server.helpers import (
    WsEnd,
    kinds,
    request,
    stub,
    ws_connect,
    ws_next,
    ws_start,
    ws_until_closed,
)

SERVING, NOT_SERVING = (
    health_pb2.HealthCheckResponse.SERVING,
    health_pb2.HealthCheckResponse.NOT_SERVING,
)


async def first_chunk(call) -> pb.Chunk:
    async for event in call:
        if event.HasField("chunk"):
            return event.chunk
    raise AssertionError("no chunk")


async def test_a_full_server_queues_then_refuses_with_a_retry_hint(start_server):
    server = start_server("--max-sessions", "1", "--queue-size", "1")
    async with grpc.aio.insecure_channel(server.address) as channel:
        api = stub(channel)
        running = api.StreamGenerate(request(chunks=0, session_id="a"))
        await first_chunk(running)
        queued = api.StreamGenerate(request(chunks=0, session_id="b"))
        started = (await anext(queued.__aiter__())).started
        assert started.queue_position == 1
        info = await api.GetSession(pb.GetSessionRequest(session_id="b"))
        assert info.state == pb.SESSION_STATE_QUEUED and info.queue_position == 1
        assert server.metric("magistream_sessions_queued") == 1
        refused = api.StreamGenerate(request(chunks=1, session_id="c"))
        with pytest.raises(grpc.aio.AioRpcError) as error:
            async for _ in refused:
                pass
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        retry = dict(error.value.trailing_metadata())["retry-after-ms"]
        assert int(retry) > 0
        running.cancel()  # frees the slot: the queued session is admitted and runs
        chunk = await first_chunk(queued)
        assert chunk.chunk_index == 0 and chunk.timings.queue_ms > 0
        queued.cancel()
    server.stop()


async def test_a_killed_worker_fails_its_sessions_and_is_replaced(start_server):
    server = start_server()
    old_pid = server.worker_pid()
    async with grpc.aio.insecure_channel(server.address) as channel:
        api = stub(channel)
        call = api.StreamGenerate(request(chunks=0))
        await first_chunk(call)
        os.kill(old_pid, signal.SIGKILL)
        events = []
        with pytest.raises(grpc.aio.AioRpcError) as error:
            async for event in call:
                events.append(event)
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "worker process died" in error.value.details()
        finished = events[-1].finished
        assert finished.state == pb.SESSION_STATE_FAILED
        assert finished.status_code == grpc.StatusCode.UNAVAILABLE.value[0]
        assert health_status(server.address) == NOT_SERVING  # until the new worker answers
        await asyncio.to_thread(server.wait_serving)
        events = [e async for e in api.StreamGenerate(request(chunks=1))]
        assert kinds(events) == ["started", "chunk", "finished"]
    assert server.worker_pid() != old_pid
    assert server.metric("magistream_worker_restarts_total") == 1
    assert server.metric("magistream_worker_up") == 1
    server.stop()


async def test_sigterm_drains_running_sessions_and_exits_zero(start_server):
    server = start_server("--grace-period-s", "5", "--http-port", "0")
    # a WebSocket realtime session drains like a gRPC one
    ws_end = WsEnd()
    with ws_connect(server.http_address) as ws:
        ws.send(json.dumps(ws_start(request(chunks=0))))
        await asyncio.to_thread(ws_next, ws, ws_end)  # started
        async with grpc.aio.insecure_channel(server.address) as channel:
            api = stub(channel)
            short = api.StreamGenerate(request(chunks=3))
            endless = api.StreamGenerate(request(chunks=0))
            await first_chunk(short)
            await first_chunk(endless)
            server.terminate()
            await asyncio.to_thread(
                wait_for, lambda: health_status(server.address) == NOT_SERVING, 5, "NOT_SERVING"
            )
            with pytest.raises(grpc.aio.AioRpcError) as error:
                async for _ in api.StreamGenerate(request(chunks=1)):
                    pass
            assert error.value.code() == grpc.StatusCode.UNAVAILABLE
            rest = [e async for e in short]  # finishes within the grace period
            assert rest[-1].finished.state == pb.SESSION_STATE_FINISHED
            assert rest[-1].finished.stats.chunks_done == 3
            with pytest.raises(grpc.aio.AioRpcError) as error:
                async for _ in endless:  # still running when the grace period ends
                    pass
            assert error.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "grace period" in error.value.details()
        ws_end = await asyncio.to_thread(ws_until_closed, ws, ws_end)
        assert ws_end.of("finished")[0]["state"] == "SESSION_STATE_FAILED"
        assert ws_end.error["code"] == "UNAVAILABLE" and "grace period" in ws_end.error["message"]
        assert ws_end.close_code == 4014
    assert await asyncio.to_thread(server.proc.wait, 30) == 0
    assert "event=server.stopped" in server.logs()


def test_the_server_process_never_loads_torch_only_its_worker_does(server):
    # the server validates, streams and encodes; the model lives in the engine process
    def maps(pid: int) -> str:
        with open(f"/proc/{pid}/maps") as f:
            return f.read()

    assert "libtorch" not in maps(server.pid)
    assert "libtorch" in maps(server.worker_pid())


def test_health_is_serving_for_the_server_and_the_service(server):
    assert health_status(server.address) == SERVING
    assert health_status(server.address, "magistream.v1.VideoGeneration") == SERVING


def test_metrics_pass_promtool_and_cover_the_service(server):
    with grpc.insecure_channel(server.address) as channel:
        events = list(stub(channel).StreamGenerate(request(chunks=1)))
    assert events[-1].finished.state == pb.SESSION_STATE_FINISHED
    text = server.metrics_text()
    check = subprocess.run(
        ["promtool", "check", "metrics"], input=text, text=True, capture_output=True
    )
    assert check.returncode == 0, check.stdout + check.stderr
    for name in (
        "magistream_sessions_active",
        "magistream_sessions_queued",
        "magistream_sessions_finished_total",
        "magistream_time_to_first_chunk_seconds_bucket",
        "magistream_inter_chunk_latency_seconds_bucket",
        "magistream_chunks_generated_total",
        "magistream_frames_generated_total",
        "magistream_engine_step_seconds_bucket",
        "magistream_engine_batch_chunks_bucket",
        "magistream_chunks_in_flight",
        "magistream_kv_cache_bytes",
        "magistream_encode_seconds_bucket",
        "magistream_worker_restarts_total",
        "magistream_grpc_calls_total",
    ):
        assert f"\n{name}" in text, name
    assert server.metric("magistream_chunks_generated_total") >= 1
    calls = 'code="OK",method="/magistream.v1.VideoGeneration/StreamGenerate"'
    assert server.metric("magistream_grpc_calls_total", calls) >= 1


def test_reflection_lists_the_services(server):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(server.address) as channel:
        replies = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        names = {s.name for s in next(replies).list_services_response.service}
    assert {"magistream.v1.VideoGeneration", "grpc.health.v1.Health"} <= names


async def test_the_default_model_is_the_shipped_toy_world(start_server):
    server = start_server(model=None)
    async with grpc.aio.insecure_channel(server.address) as channel:
        reply = await stub(channel).ListModels(pb.ListModelsRequest())
    assert reply.default_model == "toy"
    # served from the repository's models/toy: nothing is written to the cache
    assert not (server.log_path.parent / "cache" / "models").exists()
    server.stop()


async def test_a_random_preset_is_written_to_the_cache_on_first_start(start_server):
    server = start_server(model="tiny")
    async with grpc.aio.insecure_channel(server.address) as channel:
        reply = await stub(channel).ListModels(pb.ListModelsRequest())
    assert reply.default_model == "tiny"
    cache = server.log_path.parent / "cache" / "models" / "tiny"
    assert (cache / "config.json").is_file()
    server.stop()


def test_device_cuda_without_cuda_stops_the_server_at_start_saying_why(start_server):
    server = start_server("--device", "cuda", wait=False)
    assert server.proc.wait(timeout=120) == 1
    assert "--device cuda: no CUDA device here" in server.logs()

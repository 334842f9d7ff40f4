"""The worker's device memory as operators see it (issue 22): the start-up log line of the
admission budget, the Prometheus gauges and GetSession's worker_memory. On this CPU machine the
device is the host: total and free are its MemTotal and MemAvailable, the budget is the CPU
default, and torch's allocator figures (CUDA only) are absent rather than zero."""

from __future__ import annotations

import re
from pathlib import Path

import grpc
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from engine import ipc
from engine.launch import CPU_MEMORY_BUDGET_BYTES
from proto import video_generation_pb2 as pb
from server import convert
from server.metrics import Metrics
from tests.server.conftest import wait_for
from tests.server.helpers import request, stub

DEVICE_GAUGES = (
    "magistream_device_memory_total_bytes",
    "magistream_device_memory_free_bytes",
    "magistream_device_memory_allocated_bytes",
    "magistream_device_memory_reserved_bytes",
    "magistream_memory_budget_bytes",
)


def meminfo(field: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/meminfo")


def vm_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def samples(text: str) -> dict[str, dict[tuple, float]]:
    """{metric name: {sorted label pairs: value}} of an exposition."""
    found: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            found.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return found


def test_the_worker_logs_its_budget_and_where_it_came_from(server):
    line = re.search(r"event=worker\.memory_budget .*", server.logs())
    assert line is not None, server.log_tail()
    assert "device=cpu" in line[0] and f"budget_mib={CPU_MEMORY_BUDGET_BYTES >> 20}" in line[0]
    assert "CPU default" in line[0]


def test_the_metrics_port_shows_the_workers_device_memory(server):
    wait_for(lambda: server.metric("magistream_worker_resident_bytes") > 0, what="a report")
    found = samples(server.metrics_text())
    cpu = (("device", "cpu"),)
    assert found["magistream_device_memory_total_bytes"] == {cpu: meminfo("MemTotal")}
    assert 0 < found["magistream_device_memory_free_bytes"][cpu] <= meminfo("MemTotal")
    assert found["magistream_memory_budget_bytes"] == {cpu: CPU_MEMORY_BUDGET_BYTES}
    # the CPU has no allocator counts: no samples at all, not zeros
    assert "magistream_device_memory_allocated_bytes" not in found
    assert "magistream_device_memory_reserved_bytes" not in found
    # the worker's own RSS (rank 0), not the server's: within a factor of two of /proc's now
    reported = found["magistream_worker_resident_bytes"][()]
    assert vm_rss(server.worker_pid()) / 2 < reported < 2 * vm_rss(server.worker_pid())
    assert reported != vm_rss(server.pid)  # not the server process's


async def test_get_session_carries_the_workers_device_memory(server):
    async with grpc.aio.insecure_channel(server.address) as channel:
        api = stub(channel)
        async for _ in api.StreamGenerate(request(chunks=1, session_id="device-memory")):
            pass
        info = await api.GetSession(pb.GetSessionRequest(session_id="device-memory"))
    assert info.HasField("worker_memory"), info
    memory = info.worker_memory
    assert memory.device == "cpu" and memory.budget_bytes == CPU_MEMORY_BUDGET_BYTES
    assert memory.total_bytes == meminfo("MemTotal") and 0 < memory.free_bytes
    assert memory.worker_resident_bytes > 0
    assert not memory.HasField("allocated_bytes") and not memory.HasField("reserved_bytes")


def cuda_report(device: str = "cuda:0") -> ipc.DeviceMemory:
    return ipc.DeviceMemory(
        device=device,
        total_bytes=80 << 30,
        free_bytes=10 << 30,
        allocated_bytes=60 << 30,
        reserved_bytes=64 << 30,
        worker_resident_bytes=3 << 30,
        budget_bytes=8 << 30,
    )


def test_a_cuda_report_sets_every_gauge_and_a_lost_worker_removes_them():
    metrics = Metrics(CollectorRegistry())

    def exposition() -> dict[str, dict[tuple, float]]:
        from prometheus_client import generate_latest

        return samples(generate_latest(metrics.registry).decode())

    metrics.observe_device_memory(cuda_report())
    found = exposition()
    gpu = (("device", "cuda:0"),)
    assert found["magistream_device_memory_allocated_bytes"] == {gpu: 60 << 30}
    assert found["magistream_device_memory_reserved_bytes"] == {gpu: 64 << 30}
    assert found["magistream_device_memory_free_bytes"] == {gpu: 10 << 30}
    metrics.observe_device_memory(None)  # the worker died: no stale figures
    found = exposition()
    assert not any(name in found for name in DEVICE_GAUGES)
    assert found["magistream_worker_resident_bytes"] == {(): 0}
    metrics.observe_device_memory(cuda_report("cuda:1"))  # restarted elsewhere: one device only
    assert set(exposition()["magistream_device_memory_total_bytes"]) == {(("device", "cuda:1"),)}


def test_a_cuda_report_fills_every_session_info_field():
    memory = convert.device_memory(cuda_report())
    assert memory.HasField("allocated_bytes") and memory.allocated_bytes == 60 << 30
    assert memory.reserved_bytes == 64 << 30 and memory.device == "cuda:0"
    assert convert.device_memory(None) is None


def test_the_memory_and_group_flags_and_their_env_twins(tiny_folder, tmp_path):
    from server.__main__ import _configure, build_parser

    env = {"MAGISTREAM_MEMORY_RESERVE_MB": "512", "MAGISTREAM_GROUP_JOIN_TIMEOUT_S": "900"}
    args = build_parser(env).parse_args(["--model", str(tiny_folder), "--cache", str(tmp_path)])
    worker = _configure(args)[0].worker
    # no budget given: the worker chooses (CPU: the 8 GiB default, as before; CUDA: free - reserve)
    assert worker.memory_budget_bytes is None and worker.memory_reserve_bytes == 512 << 20
    assert (worker.group.timeout_s, worker.group.join_timeout_s) == (60.0, 900.0)

"""Device memory and the group's failure settings (issue 22), checked on the CPU: admission's
budget arithmetic for a GPU, the CPU budget unchanged, what the worker reports of its memory,
the NCCL variables and timeouts a rank's group is made with, and that a group waits its join
timeout for a late rank while a stalled collective fails after the collective timeout."""

from __future__ import annotations

import multiprocessing
import threading
import time
from pathlib import Path

import pytest
import torch

from engine import ipc
from engine.launch import CPU_MEMORY_BUDGET_BYTES, RankSpec, WorkerConfig, free_port
from engine.process import (
    MemoryBudgetError,
    WorkerLoop,
    _load_engine,
    admission_budget,
    device_budget,
    device_memory,
)
from engine.ranks import GroupSettings, group_settings

MIB, GIB = 1 << 20, 1 << 30


def meminfo(field: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/meminfo")


# ---- the budget -------------------------------------------------------------------------


def test_a_gpu_budget_is_its_free_memory_after_loading_less_the_reserve():
    budget = device_budget("cuda:0", 70 * GIB, 80 * GIB, 2 * GIB, None)
    assert budget.bytes == 68 * GIB and not budget.capped
    assert "cuda:0 has 71680 MiB free of 81920 MiB" in budget.source
    assert "2048 MiB reserve" in budget.source


def test_an_explicit_budget_is_kept_when_the_device_has_it_and_lowered_when_not():
    smaller = device_budget("cuda:1", 70 * GIB, 80 * GIB, 2 * GIB, 10 * GIB)
    assert smaller.bytes == 10 * GIB and not smaller.capped
    assert smaller.source.startswith("--memory-budget-mb")
    larger = device_budget("cuda:1", 70 * GIB, 80 * GIB, 2 * GIB, 100 * GIB)
    assert larger.bytes == 68 * GIB and larger.capped
    assert "--memory-budget-mb 102400 is more, lowered to 69632" in larger.source


@pytest.mark.parametrize("free", [2 * GIB, GIB, 0])
def test_no_memory_left_after_loading_is_a_start_error_that_says_what_to_lower(free):
    with pytest.raises(MemoryBudgetError) as error:
        device_budget("cuda:0", free, 24 * GIB, 2 * GIB, 8 * GIB)
    message = str(error.value)
    assert f"cuda:0 has {free // MIB} MiB free of 24576 MiB" in message
    assert "Lower --memory-reserve-mb (now 2048)" in message and "--world-size" in message


def test_the_cpu_keeps_the_configured_budget(tiny_folder):
    cpu = torch.device("cpu")
    default = admission_budget(WorkerConfig(model_folder=tiny_folder), cpu)
    assert default.bytes == CPU_MEMORY_BUDGET_BYTES == 8 * GIB  # as before issue 22
    given = WorkerConfig(model_folder=tiny_folder, memory_budget_bytes=64 * MIB)
    # the reserve is a GPU figure: the CPU never subtracts it
    assert admission_budget(given, cpu).bytes == 64 * MIB


def test_worker_config_refuses_a_non_positive_budget_or_a_negative_reserve(tiny_folder):
    for bad in ({"memory_budget_bytes": 0}, {"memory_reserve_bytes": -1}):
        with pytest.raises(ValueError):
            WorkerConfig(model_folder=tiny_folder, **bad)


# ---- the report -------------------------------------------------------------------------


def test_on_cpu_the_report_is_the_hosts_memory_and_the_workers_rss():
    report = device_memory(torch.device("cpu"), 123)
    assert report.device == "cpu" and report.budget_bytes == 123
    assert report.total_bytes == meminfo("MemTotal")
    assert 0 < report.free_bytes <= report.total_bytes
    # torch counts no CPU tensors: absent, not a made-up zero
    assert report.allocated_bytes is None and report.reserved_bytes is None
    # this test process has torch loaded: well over 50 MB resident
    assert 50 * MIB < report.worker_resident_bytes < report.total_bytes


def test_the_worker_sends_its_device_memory_with_its_heartbeat(tiny_folder):
    config = WorkerConfig(model_folder=tiny_folder)
    server_end, worker_end = multiprocessing.Pipe()
    loop = WorkerLoop(worker_end, _load_engine(config), config)
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    try:
        seen = []
        while server_end.poll(20) and not any(isinstance(m, ipc.DeviceMemory) for m in seen):
            seen.append(server_end.recv())
    finally:
        server_end.send(ipc.Shutdown())
        thread.join(10)
    kinds = [type(m).__name__ for m in seen]
    assert kinds[-2:] == ["Heartbeat", "DeviceMemory"], kinds
    report = seen[-1]
    assert report.device == "cpu" and report.budget_bytes == CPU_MEMORY_BUDGET_BYTES


# ---- the group's settings ---------------------------------------------------------------


def test_a_cuda_rank_gets_nccl_async_error_handling_and_the_collective_timeout():
    settings = group_settings("cuda", 60.0, 600.0, env={})
    assert settings == GroupSettings(
        backend="nccl",
        timeout=settings.timeout,
        join_timeout=settings.join_timeout,
        environment={"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"},
    )
    assert settings.timeout.total_seconds() == 60 and settings.join_timeout.total_seconds() == 600


def test_the_operators_nccl_setting_is_kept():
    env = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "3", "TORCH_NCCL_BLOCKING_WAIT": "1"}
    assert group_settings("cuda", 60.0, 600.0, env).environment == {}


def test_a_cpu_rank_uses_gloo_with_the_same_timeouts_and_no_nccl_variables():
    settings = group_settings("cpu", 30.0, 10.0, env={})
    assert settings.backend == "gloo" and settings.environment == {}
    assert settings.timeout.total_seconds() == 30
    assert settings.join_timeout.total_seconds() == 30  # joining never waits less than a collective
    with pytest.raises(ValueError):
        group_settings("cpu", 0.0, 600.0, env={})


# ---- a real two-rank group --------------------------------------------------------------

COLLECTIVE_S = 1.0  # the group's collective timeout in the test below
LATE_S = 1.5  # how much later than the collective timeout rank 1 starts, and loads


def _rank(rank: int, port: int, results, release) -> None:
    import torch.distributed as dist

    from engine.ranks import join_group, leave_group, wait_loaded

    torch.set_num_threads(1)
    spec = RankSpec(rank, 2, rank, "127.0.0.1", port, timeout_s=COLLECTIVE_S)
    if rank == 1:
        time.sleep(LATE_S)  # a node started later
    group = join_group(spec, "cpu", join_timeout_s=60.0)
    if rank == 1:
        time.sleep(LATE_S)  # a slow load
    wait_loaded(group)
    if rank == 1:
        release.wait(60)  # stalled: never joins the broadcast below
        results.put((1, "released"))
        return
    t0 = time.monotonic()
    try:
        dist.broadcast(torch.zeros(1), 0, group=group.control)
        outcome = "sent"
    except RuntimeError as e:
        outcome = f"failed: {e}"
    results.put((0, outcome, time.monotonic() - t0))
    release.set()
    leave_group()


def test_a_group_waits_for_a_late_rank_but_a_stalled_collective_fails_at_its_timeout():
    context = multiprocessing.get_context("spawn")
    results, release = context.Queue(), context.Event()
    port = free_port()
    ranks = [context.Process(target=_rank, args=(r, port, results, release)) for r in (0, 1)]
    for p in ranks:
        p.start()
    try:
        got = {r[0]: r[1:] for r in (results.get(timeout=90) for _ in ranks)}
    finally:
        release.set()
        for p in ranks:
            p.join(10)
            if p.is_alive():
                p.kill()
    # rank 1 joined and loaded LATE_S after rank 0 each time, beyond the collective timeout:
    # both waits used the join timeout, or rank 0 would have failed before the broadcast
    outcome, waited_s = got[0]
    assert outcome.startswith("failed") and "Timed out" in outcome, outcome
    # rank 1 stays stalled until rank 0 gives up: only the collective timeout ended the wait
    assert waited_s < 30, waited_s
    assert got[1] == ("released",)

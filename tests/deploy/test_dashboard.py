"""The Grafana dashboard against a real Prometheus (Debian's, loopback only) scraping a real
magi-server through a short load that includes a refusal and a worker crash: every panel's
query is evaluated through Prometheus' HTTP API and returns data."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import grpc
import pytest

from engine.launch import free_port
from proto import video_generation_pb2 as pb
from proto import video_generation_pb2_grpc as pb_grpc
from tests.deploy.conftest import DEPLOY, start_prometheus, tool
from tests.deploy.test_nginx import SERVING, START_TIMEOUT_S, Replica, health

NAMESPACE = "magistream"
RATE_INTERVAL = "5m"


def dashboard_queries() -> list[tuple[str, str]]:
    board = json.loads((DEPLOY / "monitoring" / "grafana-dashboard.json").read_text())
    return [
        (panel.get("title", "?"), target["expr"])
        for panel in board["panels"]
        for target in panel.get("targets", [])
    ]


def query(prometheus: str, expr: str) -> dict:
    url = f"http://{prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as reply:
        return json.loads(reply.read())


def request(chunks: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        timeline=[pb.TimelineEntry(text="a red ball")],
        num_chunks=chunks,
        unbounded=chunks == 0,  # the Replica allows it
        width_px=64,
        height_px=64,
        sampling=pb.Sampling(num_steps=4),
    )


def load(replica: Replica) -> None:
    """Finished sessions, a prompt update, an invalid request, a refusal (queue full), and a
    worker killed under a running session (a failed session and a restart)."""
    with grpc.insecure_channel(replica.address) as channel:
        api = pb_grpc.VideoGenerationStub(channel)
        for _ in range(2):
            list(api.StreamGenerate(request(2)))
        running = api.StreamGenerate(request(0))
        started = next(running).started
        next(running)  # its first chunk
        api.UpdatePrompt(pb.PromptUpdate(session_id=started.session_id, text="it turns blue"))
        with pytest.raises(grpc.RpcError):  # --max-sessions 1 --queue-size 0: full
            list(api.StreamGenerate(request(1)))
        with pytest.raises(grpc.RpcError):
            list(api.StreamGenerate(pb.GenerateRequest(width_px=100)))
        worker = max(_children(replica.proc.pid), key=_rss)
        os.kill(worker, signal.SIGKILL)
        with pytest.raises(grpc.RpcError):
            for _ in running:
                pass
    deadline = time.monotonic() + START_TIMEOUT_S
    while health(replica.address) != SERVING:
        assert time.monotonic() < deadline, "the worker did not come back"
        time.sleep(0.2)
    with grpc.insecure_channel(replica.address) as channel:
        list(pb_grpc.VideoGenerationStub(channel).StreamGenerate(request(1)))


def _children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def test_every_dashboard_query_returns_data_from_a_real_prometheus(tmp_path):
    tool("prometheus")  # fails first, saying how to install it, when it is missing
    (tmp_path / "server").mkdir()
    replica = Replica(tmp_path / "server", "--max-sessions", "1", "--queue-size", "0")
    prometheus = None
    try:
        replica.wait_started()
        address = f"127.0.0.1:{free_port()}"
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            "scrape_configs:\n"
            "  - job_name: magistream\n"
            f"    static_configs: [{{targets: ['{replica.metrics_address}'], "
            f"labels: {{namespace: {NAMESPACE}}}}}]\n"
        )
        prometheus = start_prometheus(config, tmp_path, address, stderr=subprocess.DEVNULL)
        load(replica)
        deadline = time.monotonic() + 30
        while not query(address, "magistream_worker_restarts_total > 0")["data"]["result"]:
            assert time.monotonic() < deadline, "prometheus never scraped the restart"
            time.sleep(0.5)
        time.sleep(3)  # a few more scrapes so rates have two points after the load
        empty = []
        for title, expr in dashboard_queries():
            expr = expr.replace("$namespace", NAMESPACE).replace("$__rate_interval", RATE_INTERVAL)
            reply = query(address, expr)
            assert reply["status"] == "success", (title, expr, reply)
            if not reply["data"]["result"]:
                empty.append(f"{title}: {expr}")
        assert not empty, "panels without data:\n" + "\n".join(empty)
    finally:
        if prometheus is not None:
            prometheus.terminate()
            prometheus.wait(30)
        replica.stop()

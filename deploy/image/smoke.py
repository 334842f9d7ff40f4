"""`make image-test`: run the built image and check it from outside, as a user would.

`buildah run --isolation chroot` starts `magi-server` inside the image (as its user 10001, with
the image's environment, on the host's network: `podman run` cannot start containers in this
sandbox), with the embedded toy model on free loopback ports. From outside: health SERVING,
ListModels, a 2-chunk StreamGenerate whose fMP4 ffprobe reads as 48 frames, then SIGTERM: the
server drains and the container's process exits 0.

    .venv/bin/python deploy/image/smoke.py [--image localhost/magistream:cpu]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from proto import video_generation_pb2 as pb  # noqa: E402
from proto import video_generation_pb2_grpc as pb_grpc  # noqa: E402

BUILDAH = ("buildah", "--storage-driver", "vfs")
START_TIMEOUT_S = 180.0
SERVING = health_pb2.HealthCheckResponse.SERVING


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check(condition: bool, what: str) -> None:
    if not condition:
        raise SystemExit(f"image smoke test FAILED: {what}")
    print(f"ok: {what}", flush=True)


def frames(mp4: bytes) -> int:
    with tempfile.NamedTemporaryFile(suffix=".mp4") as f:
        f.write(mp4)
        f.flush()
        out = subprocess.run(
            ["ffprobe", "-v", "error", "-count_frames", "-select_streams", "v:0",
             "-show_entries", "stream=nb_read_frames", "-of", "csv=p=0", f.name],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
    return int(out.stdout.strip())


def server_pid(parent: int, port: int) -> int | None:
    """The container's magi-server: a descendant of `buildah run` (chroot isolation shares the
    host's process table) whose command line has our port."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"--port" in cmdline and str(port).encode() in cmdline and _descends(entry, parent):
            # python3.11 /opt/venv/bin/magi-server ..., not buildah's `buildah-chroot-exec
            # /opt/venv/bin/magi-server ...` that waits for it
            if b"python" in cmdline[0] and cmdline[1].endswith(b"magi-server"):
                return int(entry.name)
    return None


def _descends(entry: Path, ancestor: int) -> bool:
    pid = int(entry.name)
    while pid > 1:
        if pid == ancestor:
            return True
        try:
            stat = (Path("/proc") / str(pid) / "stat").read_text()
        except OSError:
            return False
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--image", default=os.environ.get("IMAGE", "localhost/magistream:cpu"))
    args = parser.parse_args()
    port, metrics_port = free_port(), free_port()
    container = subprocess.run(
        [*BUILDAH, "from", "--pull-never", "--quiet", args.image],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    log = tempfile.NamedTemporaryFile(prefix="image-smoke-", suffix=".log", delete=False)
    started = time.monotonic()
    run = subprocess.Popen(
        [*BUILDAH, "run", "--isolation", "chroot", "--user", "10001:10001", container, "--",
         "magi-server", "--host", "127.0.0.1", "--port", str(port),
         "--metrics-host", "127.0.0.1", "--metrics-port", str(metrics_port),
         "--grace-period-s", "5", "--x264-preset", "ultrafast"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + START_TIMEOUT_S
            status = None
            while time.monotonic() < deadline and run.poll() is None:
                try:
                    status = health.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                except grpc.RpcError:
                    status = None
                if status == SERVING:
                    break
                time.sleep(0.5)
            check(status == SERVING, f"health SERVING ({time.monotonic() - started:.1f} s)")
            api = pb_grpc.VideoGenerationStub(channel)
            models = api.ListModels(pb.ListModelsRequest(), timeout=10)
            check(models.default_model == "toy", f"ListModels: {[m.name for m in models.models]}")
            request = pb.GenerateRequest(
                timeline=[pb.TimelineEntry(text="a red ball moves to the right")],
                num_chunks=2,
                seed=0,
            )
            events = list(api.StreamGenerate(request, timeout=120))
            mp4 = b"".join(
                e.chunk.init_segment + e.chunk.media_segment for e in events if e.HasField("chunk")
            )
            finished = events[-1].finished
            check(finished.state == pb.SESSION_STATE_FINISHED, "the stream finished")
            check(frames(mp4) == 48, "ffprobe reads the 2-chunk fMP4 as 48 frames")
        pid = server_pid(run.pid, port)
        check(pid is not None, f"magi-server runs in the container as host pid {pid}")
        os.kill(pid, signal.SIGTERM)
        code = run.wait(timeout=60)
        check(code == 0, f"SIGTERM: drained and exited {code}")
        check("event=server.stopped" in Path(log.name).read_text(), "the log says it stopped")
        return 0
    except BaseException:
        print(Path(log.name).read_text()[-4000:], file=sys.stderr)
        raise
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
        subprocess.run([*BUILDAH, "rm", container], capture_output=True)


if __name__ == "__main__":
    sys.exit(main())

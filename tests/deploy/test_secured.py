"""The secured deployment end to end on loopback: one real `magi-server` replica configured as
the manifests configure it (TLS from a CA-signed certificate named `magistream`, as
components/tls issues it; bearer tokens from a file laid out the way the kubelet mounts a
Secret), and in front of and around it the shipped pieces:

- deploy/nginx/magistream.conf with its TLS on both sides: a caller's token passes through
  to the replica; no token, or a wrong one, is UNAUTHENTICATED (answered by the replica);
- deploy/healthcheck.py over TLS, as the exec probes run it, with no credentials;
- Prometheus with deploy/monitoring/prometheus-scrape.yaml scraping the https metrics port
  with its own token;
- a Secret update (the kubelet's symlink swap) taking effect without a restart.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import yaml

from engine.launch import free_port
from proto import video_generation_pb2 as pb
from proto import video_generation_pb2_grpc as pb_grpc
from tests.deploy.conftest import DEPLOY, run, start_prometheus, tool
from tests.deploy.test_nginx import (
    SHIPPED,
    Replica,
    can_connect,
    main_config,
    render,
    wait_for,
)
from tests.tls import Pki, make_pki

# the module shares one server: one xdist worker runs it all (make test: --dist loadgroup)
pytestmark = pytest.mark.xdist_group("test_secured")

ALICE, ADMIN, PROMETHEUS = (secrets.token_hex(32) for _ in range(3))
NAMESPACE = "magistream-test"
RELOAD_TIMEOUT_S = 30.0  # the server checks its files every couple of seconds; busy CI


class SecretVolume:
    """A folder laid out as the kubelet lays out a mounted Secret: each key is a symlink
    `key -> ..data/key`, `..data` a symlink to a timestamped folder, and an update writes a
    new folder and swaps `..data` with one rename (so readers never see half an update)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self._version = 0

    def write(self, files: dict[str, str]) -> None:
        self._version += 1
        stamp = f"..2026_01_01_00_00_{self._version:02d}.000000000"
        (self.folder / stamp).mkdir()
        for key, text in files.items():
            (self.folder / stamp / key).write_text(text)
        swap = self.folder / "..data_tmp"
        swap.symlink_to(stamp)
        old = os.readlink(self.folder / "..data") if (self.folder / "..data").exists() else None
        swap.rename(self.folder / "..data")
        for key in files:
            link = self.folder / key
            if not link.is_symlink():
                link.symlink_to(Path("..data") / key)
        if old:
            for child in (self.folder / old).iterdir():
                child.unlink()
            (self.folder / old).rmdir()


def tokens_file(alice: str) -> str:
    return f"# TOKEN PRINCIPAL\n{alice} alice\n{ADMIN} admin\n\n{PROMETHEUS} prometheus\n"


@dataclass
class Secured:
    certs: Pki
    auth: SecretVolume
    replica: Replica
    nginx: str  # address
    access_log: Path

    def channel(self) -> grpc.Channel:
        """A client's TLS channel to nginx, trusting the deployment's CA."""
        credentials = grpc.ssl_channel_credentials(self.certs.ca.read_bytes())
        return grpc.secure_channel(self.nginx, credentials)


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    nginx = tool("nginx")
    tmp = tmp_path_factory.mktemp("secured")
    certs = make_pki(tmp / "tls")
    auth = SecretVolume(tmp / "auth")
    auth.write({"tokens": tokens_file(ALICE), "metrics-token": PROMETHEUS})
    replica = Replica(
        tmp / "replica",
        *("--grace-period-s", "0.5"),  # nothing to drain at the end: stop quickly
        *("--auth-tokens", str(auth.folder / "tokens")),
        *("--tls-cert", str(certs.server_cert), "--tls-key", str(certs.server_key)),
        ca=certs.ca,
        token=PROMETHEUS,
    )
    proxy = None
    try:
        replica.wait_started()
        # nginx's own listener shows the same certificate; its CA checks the replica.
        for shipped, made in (
            ("magistream.crt", certs.server_cert),
            ("magistream.key", certs.server_key),
            ("magistream-ca.crt", certs.ca),
        ):
            (tmp / shipped).symlink_to(made)
        port = free_port()
        site = tmp / "magistream.conf"
        # The shipped upstream lists two replicas: both entries are this one.
        backends = [replica.address, replica.address]
        site.write_text(
            render(SHIPPED.read_text(), backends, f"127.0.0.1:{port}", tmp / "access.log", tmp)
        )
        proxy = subprocess.Popen(
            [nginx, "-c", str(main_config(tmp, site)), "-p", str(tmp), "-e", "stderr"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        wait_for(lambda: can_connect(port) or proxy.poll() is not None, "nginx to listen")
        assert proxy.poll() is None, proxy.stderr.read().decode()
        yield Secured(certs, auth, replica, f"127.0.0.1:{port}", tmp / "access.log")
    finally:
        if proxy is not None:
            proxy.terminate()
            proxy.wait(10)
        replica.stop()


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def test_a_token_passes_through_nginx_and_a_call_without_one_is_unauthenticated(secured):
    with secured.channel() as channel:
        api = pb_grpc.VideoGenerationStub(channel)
        models = api.ListModels(pb.ListModelsRequest(), metadata=bearer(ALICE), timeout=10)
        assert [m.name for m in models.models] == ["tiny"]
        # A whole session over TLS on both hops, with the caller's token on the stream.
        one_chunk = pb.GenerateRequest(
            timeline=[pb.TimelineEntry(text="a red ball rolls")],
            num_chunks=1,
            width_px=64,
            height_px=64,
        )
        events = list(api.StreamGenerate(one_chunk, metadata=bearer(ALICE), timeout=60))
        assert events[-1].finished.state == pb.SESSION_STATE_FINISHED
        refused = []
        for metadata in ((), bearer("not-a-token-" + secrets.token_hex(16))):
            with pytest.raises(grpc.RpcError) as error:
                api.ListModels(pb.ListModelsRequest(), metadata=metadata, timeout=10)
            refused.append((error.value.code(), error.value.details()))
    assert [code for code, _ in refused] == [grpc.StatusCode.UNAUTHENTICATED] * 2, refused
    # The replica refused them (nginx passed both on), and said so in gRPC terms.
    wait_for(lambda: secured.access_log.read_text().count("grpc=16") == 2, "nginx's log")
    assert secured.access_log.read_text().count(f"upstream={secured.replica.address}") == 4


def test_the_health_check_speaks_tls_without_credentials_as_the_probes_run_it(secured, tmp_path):
    """deploy/healthcheck.py with the environment components/tls gives the container: 0 for
    the SERVING replica; 1 when it would speak plaintext or trust another CA."""
    probe_env = {
        "MAGISTREAM_PORT": str(secured.replica.port),
        "MAGISTREAM_TLS_CERT": str(secured.certs.server_cert),
        "MAGISTREAM_HEALTHCHECK_CA": str(secured.certs.ca),
        "MAGISTREAM_HEALTHCHECK_SERVER_NAME": "magistream",
    }
    other = make_pki(tmp_path / "other", name="other")
    cases = (
        (probe_env, 0),
        ({k: v for k, v in probe_env.items() if k == "MAGISTREAM_PORT"}, 1),
        ({**probe_env, "MAGISTREAM_HEALTHCHECK_CA": str(other.ca)}, 1),
    )
    for env, expected in cases:
        script = str(DEPLOY / "healthcheck.py")
        result = run(sys.executable, script, check=False, env={"PATH": os.environ["PATH"], **env})
        assert result.returncode == expected, (env, result.stderr)


def test_prometheus_scrapes_the_https_metrics_port_with_its_own_token(secured, tmp_path):
    tool("prometheus")  # fails first, saying how to install it, when it is missing
    (tmp_path / "right").write_text(PROMETHEUS)
    (tmp_path / "wrong").write_text(secrets.token_hex(32))
    address = f"127.0.0.1:{free_port()}"
    config = tmp_path / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s"},
                "scrape_configs": [
                    scrape_job(secured, tmp_path / "right", "magistream"),
                    scrape_job(secured, tmp_path / "wrong", "wrong-token"),
                ],
            }
        )
    )
    prometheus = start_prometheus(config, tmp_path, address, stderr=subprocess.PIPE)
    try:
        wait_for(
            lambda: (
                prometheus.poll() is not None or len(targets(address, "up == 0 or up == 1")) == 2
            ),
            "prometheus to scrape both jobs",
            timeout_s=30,
        )
        assert prometheus.poll() is None, prometheus.stderr.read().decode()
        up = {t["metric"]["job"]: t["value"][1] for t in targets(address, "up")}
        assert up == {"magistream": "1", "wrong-token": "0"}
        # The relabelling gave the series the labels the rules and the autoscaler query by.
        (active,) = targets(address, "magistream_sessions_active")
        assert active["metric"]["namespace"] == NAMESPACE
        assert active["metric"]["pod"] == "magistream-0"
    finally:
        prometheus.terminate()
        prometheus.wait(30)


def test_a_secret_update_rotates_tokens_without_a_restart(secured):
    """Runs last: it replaces alice's token the way a Secret update reaches the pod."""
    new_alice = secrets.token_hex(32)
    pid = secured.replica.pid
    secured.auth.write({"tokens": tokens_file(new_alice), "metrics-token": PROMETHEUS})

    def answers(token: str) -> grpc.StatusCode:
        with secured.channel() as channel:
            api = pb_grpc.VideoGenerationStub(channel)
            try:
                api.ListModels(pb.ListModelsRequest(), metadata=bearer(token), timeout=10)
            except grpc.RpcError as e:
                return e.code()
            return grpc.StatusCode.OK

    wait_for(lambda: answers(new_alice) == grpc.StatusCode.OK, "the new token", RELOAD_TIMEOUT_S)
    assert answers(ALICE) == grpc.StatusCode.UNAUTHENTICATED
    assert answers(ADMIN) == grpc.StatusCode.OK
    assert secured.replica.proc.poll() is None and secured.replica.pid == pid


# ---- helpers ------------------------------------------------------------------------------


def scrape_job(secured: Secured, token_file: Path, name: str) -> dict:
    """The shipped scrape job, with its pod discovery replaced by the one pod's target and
    the labels Kubernetes discovery would give it (Debian's Prometheus has no Kubernetes
    discovery), and its mounted files moved to the test's."""
    shipped = yaml.safe_load((DEPLOY / "monitoring" / "prometheus-scrape.yaml").read_text())
    (job,) = shipped["scrape_configs"]
    assert job.pop("kubernetes_sd_configs") == [{"role": "pod"}]
    host, port = secured.replica.metrics_address.rsplit(":", 1)
    pod = "__meta_kubernetes_pod_"
    job["static_configs"] = [
        {
            # the pod IP with the container's first port, as discovery gives it
            "targets": [f"{host}:50051"],
            "labels": {
                f"{pod}label_app_kubernetes_io_name": "magistream",
                f"{pod}annotation_prometheus_io_scrape": "true",
                f"{pod}annotation_prometheus_io_port": port,
                f"{pod}annotation_prometheus_io_path": "/metrics",
                f"{pod}annotation_prometheus_io_scheme": "https",
                f"{pod}name": "magistream-0",
                "__meta_kubernetes_namespace": NAMESPACE,
            },
        }
    ]
    assert Path(job["authorization"]["credentials_file"]).name == "metrics-token"
    job["authorization"]["credentials_file"] = str(token_file)
    assert Path(job["tls_config"]["ca_file"]).name == "ca.crt"
    job["tls_config"]["ca_file"] = str(secured.certs.ca)
    job["job_name"] = name
    return job


def targets(prometheus: str, expr: str) -> list[dict]:
    url = f"http://{prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return json.loads(reply.read())["data"]["result"]
    except OSError:  # not listening yet
        return []

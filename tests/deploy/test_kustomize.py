"""The Kubernetes manifests: every overlay renders offline, every rendered object validates
against its schema, and the settings that must agree with the server's flags do."""

from __future__ import annotations

import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from server.__main__ import _FLAGS, env_name
from tests.deploy.conftest import DEPLOY, OVERLAYS, REPO, find, run, tool

SCHEMAS = Path(__file__).parent / "schemas"
# The oldest Kubernetes the manifests target (preStop `sleep`, unhealthyPodEvictionPolicy,
# the pod-index label), and the newest schemas kubernetes-validate bundles.
KUBERNETES_VERSIONS = ("1.31", "1.37")
# Kinds no Kubernetes schema covers, each checked against its own published CRD schema below.
CRD_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): SCHEMAS / "keda.sh_scaledobjects.yaml",
    ("cert-manager.io/v1", "Certificate"): SCHEMAS / "cert-manager.io_certificates.yaml",
}
# Overlays that serve TLS from cert-manager (components/tls); the others say why not.
TLS_OVERLAYS = {"gpu-4.5b", "gpu-24b"}
HEALTHCHECK = "deploy/healthcheck.py"
# After SIGTERM the server waits the grace period, then gives open streams 5 s to send their
# `finished` event (server/app.py `_drain`); the pod needs that plus some slack.
STREAM_CLOSE_S = 5
SLACK_S = 5


def test_every_overlay_renders(rendered):
    assert set(rendered) == {"cpu-demo", "gpu-4.5b", "gpu-24b", "gpu-24b-multinode"}
    for overlay, objects in rendered.items():
        kinds = {o["kind"] for o in objects}
        assert {"Namespace", "ConfigMap", "Service", "PodDisruptionBudget"} <= kinds, overlay
        assert kinds & {"Deployment", "StatefulSet"}, overlay


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_rendered_manifests_validate_against_the_kubernetes_schemas(rendered, tmp_path, version):
    validate = tool("kubernetes-validate")
    files = []
    for overlay, objects in rendered.items():
        core = [o for o in objects if (o["apiVersion"], o["kind"]) not in CRD_SCHEMAS]
        path = tmp_path / f"{overlay}.yaml"
        path.write_text(yaml.safe_dump_all(core))
        files.append(str(path))
    # --strict: an unknown field (a typo) fails, as `kubectl apply` would reject it.
    run(validate, "--strict", "--quiet", "--kubernetes-version", version, *files)


def test_custom_resources_validate_against_their_published_crd_schemas(rendered):
    checked = 0
    for overlay, objects in rendered.items():
        for obj in objects:
            key = (obj["apiVersion"], obj["kind"])
            if key[0].split("/")[0].endswith(".k8s.io") or "." not in key[0].split("/")[0]:
                continue  # a built-in group: the test above covers it
            assert key in CRD_SCHEMAS, f"{overlay}: no schema for {key}; vendor its CRD"
            schema = _crd_schema(CRD_SCHEMAS[key], key[0].split("/")[1])
            errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(obj), key=str)
            assert not errors, f"{overlay} {key}: " + "; ".join(e.message for e in errors)
            checked += 1
    assert checked == 4  # the ScaledObjects and Certificates of gpu-4.5b and gpu-24b


def test_configmaps_set_only_real_server_flags(rendered):
    known = {env_name(flag) for flag, *_ in _FLAGS}
    for overlay, objects in rendered.items():
        (configmap,) = find(objects, "ConfigMap")
        unknown = set(configmap["data"]) - known
        assert not unknown, f"{overlay}: {sorted(unknown)} are not magi-server flags"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_ports_and_grace_period_match_the_server_flags(rendered, overlay):
    objects = rendered[overlay]
    flags = find(objects, "ConfigMap")[0]["data"]
    (workload,) = find(objects, "Deployment") + find(objects, "StatefulSet")
    pod = workload["spec"]["template"]["spec"]
    (server,) = [c for c in pod["containers"] if c["name"] == "server"]
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    assert ports["grpc"] == int(flags["MAGISTREAM_PORT"])
    assert ports["metrics"] == int(flags["MAGISTREAM_METRICS_PORT"])
    annotations = workload["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == flags["MAGISTREAM_METRICS_PORT"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        if "MAGISTREAM_TLS_CERT" in flags:  # healthcheck.py reads MAGISTREAM_PORT itself
            assert "grpc" not in server[probe], f"{probe}: the kubelet's probe has no TLS"
            assert server[probe]["exec"]["command"] == healthcheck_command(), probe
        else:
            assert server[probe]["grpc"]["port"] == ports["grpc"], probe
    # The whole drain fits before the kubelet's SIGKILL.
    pre_stop = server["lifecycle"]["preStop"]["sleep"]["seconds"]
    drain = float(flags["MAGISTREAM_GRACE_PERIOD_S"]) + STREAM_CLOSE_S
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + drain + SLACK_S
    # Liveness must outlast a worker restart, which is at most a model load (the startup
    # probe's budget): otherwise a replaced worker would get the whole pod killed.
    live = server["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] >= 300
    for service in find(objects, "Service", "magistream"):
        by_name = {p["name"]: p for p in service["spec"]["ports"]}
        assert by_name["grpc"]["targetPort"] == "grpc"
        # h2c is a promise to gateways: only where the port is plaintext.
        tls = "MAGISTREAM_TLS_CERT" in flags
        assert by_name["grpc"].get("appProtocol") == (None if tls else "kubernetes.io/h2c")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_model_folder_is_a_read_only_volume_unless_an_embedded_preset(rendered, overlay):
    objects = rendered[overlay]
    model = find(objects, "ConfigMap")[0]["data"]["MAGISTREAM_MODEL"]
    (workload,) = find(objects, "Deployment") + find(objects, "StatefulSet")
    (server,) = workload["spec"]["template"]["spec"]["containers"]
    if not model.startswith("/"):
        assert model == "toy" or model.startswith("tiny"), "only toy and tiny* are embedded"
        return
    mounts = {m["mountPath"]: m for m in server["volumeMounts"]}
    assert model in mounts and mounts[model].get("readOnly"), f"{model} is not a mounted volume"


def test_gpu_overlays_request_their_gpus_and_world_size(rendered):
    expected = {"cpu-demo": 0, "gpu-4.5b": 1, "gpu-24b": 8, "gpu-24b-multinode": 8}
    for overlay, gpus in expected.items():
        objects = rendered[overlay]
        flags = find(objects, "ConfigMap")[0]["data"]
        (workload,) = find(objects, "Deployment") + find(objects, "StatefulSet")
        pod = workload["spec"]["template"]["spec"]
        limits = pod["containers"][0]["resources"]["limits"]
        assert int(limits.get("nvidia.com/gpu", 0)) == gpus, overlay
        nodes = workload["spec"]["replicas"] if workload["kind"] == "StatefulSet" else 1
        assert int(flags["MAGISTREAM_WORLD_SIZE"]) == max(gpus, 1) * nodes, overlay
        if gpus > 1:  # NCCL between ranks: /dev/shm must be a memory volume, not 64 MiB
            shm = [v for v in pod["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"]
            mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
            assert [mounts[v["name"]] for v in shm] == ["/dev/shm"], overlay


def test_autoscaling_targets_sessions_per_replica_of_its_own_namespace(rendered):
    for overlay, objects in rendered.items():
        for scaled in find(objects, "ScaledObject"):
            namespace = scaled["metadata"]["namespace"]
            flags = find(objects, "ConfigMap")[0]["data"]
            (trigger,) = scaled["spec"]["triggers"]
            query = trigger["metadata"]["query"]
            assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
            assert re.findall(r"magistream_\w+", query) == [
                "magistream_sessions_active",
                "magistream_sessions_queued",
            ]
            assert set(re.findall(r'namespace="([^"]*)"', query)) == {namespace}, overlay
            # Scale before a replica is full: the target is below its session capacity.
            threshold = float(trigger["metadata"]["threshold"])
            assert 0 < threshold < int(flags["MAGISTREAM_MAX_SESSIONS"]), overlay
            assert scaled["spec"]["scaleTargetRef"]["name"] == "magistream"
            (deployment,) = find(objects, "Deployment", "magistream")
            assert "replicas" not in deployment["spec"], f"{overlay}: the HPA owns replicas"


def test_multinode_clients_reach_rank_zero_only(rendered):
    objects = rendered["gpu-24b-multinode"]
    (service,) = find(objects, "Service", "magistream")
    assert service["spec"]["selector"]["apps.kubernetes.io/pod-index"] == "0"
    (ranks,) = find(objects, "Service", "magistream-ranks")
    (statefulset,) = find(objects, "StatefulSet")
    assert ranks["spec"]["clusterIP"] == "None"
    assert statefulset["spec"]["serviceName"] == "magistream-ranks"
    env = {e["name"]: e for e in statefulset["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["MASTER_ADDR"]["value"] == "magistream-0.magistream-ranks"
    assert int(env["NNODES"]["value"]) == statefulset["spec"]["replicas"]


# ---- security (docs/deploy.md, "Securing a deployment") -----------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_overlay_authenticates_callers_with_tokens_from_an_operator_made_secret(
    rendered, overlay
):
    objects = rendered[overlay]
    flags = find(objects, "ConfigMap")[0]["data"]
    # Credentials always: never protected mode's loopback-only refusal, never --insecure.
    assert "MAGISTREAM_INSECURE" not in flags and "MAGISTREAM_ALLOW_UNBOUNDED" not in flags
    tokens = Path(flags["MAGISTREAM_AUTH_TOKENS"])
    volume, mount = secret_volume(objects, tokens.parent)
    assert volume["secret"]["secretName"] == "magistream-auth"
    assert not volume["secret"].get("optional"), "a missing Secret must stop the pod"
    # No Secret comes out of the manifests: the operator makes it (no committed token).
    assert not find(objects, "Secret"), overlay
    # Admins named, per-caller caps below the replica's, sessions bounded by default.
    assert flags["MAGISTREAM_ADMIN_PRINCIPALS"].strip()
    max_sessions = int(flags["MAGISTREAM_PRINCIPAL_MAX_SESSIONS"])
    assert 0 < max_sessions < int(flags["MAGISTREAM_MAX_SESSIONS"]), overlay
    max_queued = int(flags["MAGISTREAM_PRINCIPAL_MAX_QUEUED"])
    assert 0 < max_queued < int(flags["MAGISTREAM_QUEUE_SIZE"]), overlay
    assert 0 < int(flags["MAGISTREAM_MAX_CHUNKS"])
    assert flags["MAGISTREAM_REFLECTION"] in ("auth", "off")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_tls_overlays_mount_a_renewed_certificate_and_probe_over_tls(rendered, overlay):
    objects = rendered[overlay]
    flags = find(objects, "ConfigMap")[0]["data"]
    assert ("MAGISTREAM_TLS_CERT" in flags) == (overlay in TLS_OVERLAYS)
    if overlay not in TLS_OVERLAYS:
        return
    cert, key = Path(flags["MAGISTREAM_TLS_CERT"]), Path(flags["MAGISTREAM_TLS_KEY"])
    assert cert.parent == key.parent
    volume, _ = secret_volume(objects, cert.parent)
    (certificate,) = find(objects, "Certificate")
    assert volume["secret"]["secretName"] == certificate["spec"]["secretName"]
    assert (cert.name, key.name) == ("tls.crt", "tls.key")  # a kubernetes.io/tls Secret
    # The names clients (the Service's), the health check and Prometheus check it under.
    (workload,) = find(objects, "Deployment")
    (server,) = workload["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in server["env"]}
    namespace = certificate["metadata"]["namespace"]
    names = set(certificate["spec"]["dnsNames"])
    assert {f"magistream.{namespace}.svc", env["MAGISTREAM_HEALTHCHECK_SERVER_NAME"]} <= names
    assert Path(env["MAGISTREAM_HEALTHCHECK_CA"]) == cert.parent / "ca.crt"
    scrape = yaml.safe_load((DEPLOY / "monitoring" / "prometheus-scrape.yaml").read_text())
    (job,) = scrape["scrape_configs"]
    assert job["tls_config"]["server_name"] in names
    annotations = workload["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scheme"] == "https"
    assert "client auth" in certificate["spec"]["usages"]  # presented by the probe under mTLS


def test_the_health_check_command_runs_the_images_python_and_script():
    """The exec probes name paths inside the image: the venv `make install` fills and the
    source folder, both from the Dockerfile."""
    python, script = healthcheck_command()
    text = (REPO / "Dockerfile").read_text()
    venv = re.search(r"VENV=(\S+)", text).group(1)
    workdir = re.findall(r"^WORKDIR (\S+)$", text, re.M)[-1]
    assert (python, script) == (f"{venv}/bin/python", f"{workdir}/{HEALTHCHECK}")
    assert (REPO / HEALTHCHECK).is_file()


def test_no_credentials_are_committed_under_deploy():
    files = run("git", "-C", str(REPO), "ls-files", "deploy").stdout.split()
    assert files, "git sees no deploy/ files"
    named = [f for f in files if re.search(r"(^|/)(tokens|metrics-token)$|\.(key|pem|p12)$", f)]
    assert not named, f"credentials in the repository: {named}"
    # ...and the files the docs tell operators to make next to the manifests stay out.
    ignored = run(
        "git", "-C", str(REPO), "check-ignore", "deploy/overlays/cpu-demo/tokens",
        "deploy/overlays/cpu-demo/metrics-token", "deploy/components/tls/tls.key",
    ).stdout.split()  # fmt: skip
    assert len(ignored) == 3


def secret_volume(objects: list[dict], folder: Path) -> tuple[dict, dict]:
    """The Secret volume mounted at `folder` in the server container, and its mount. A whole
    folder (no subPath): the kubelet updates such a mount in place when the Secret changes,
    which is what lets the server reload without a restart."""
    (workload,) = find(objects, "Deployment") + find(objects, "StatefulSet")
    pod = workload["spec"]["template"]["spec"]
    (server,) = [c for c in pod["containers"] if c["name"] == "server"]
    (mount,) = [m for m in server["volumeMounts"] if Path(m["mountPath"]) == folder]
    assert mount.get("readOnly") and "subPath" not in mount and "subPathExpr" not in mount
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert "secret" in volume, f"{folder} is not a Secret volume"
    return volume, mount


def healthcheck_command() -> list[str]:
    patch = yaml.safe_load((DEPLOY / "components" / "tls" / "deployment-patch.yaml").read_text())
    (server,) = patch["spec"]["template"]["spec"]["containers"]
    commands = [server[p]["exec"]["command"] for p in ("startupProbe", "readinessProbe")]
    assert commands[0] == commands[1] == server["livenessProbe"]["exec"]["command"]
    return commands[0]


def _crd_schema(path: Path, version: str) -> dict:
    (crd,) = [d for d in yaml.safe_load_all(path.read_text()) if d]
    (entry,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    return _strict(entry["schema"]["openAPIV3Schema"])


def _strict(schema: dict) -> dict:
    """The API server rejects unknown fields (kubectl's default field validation is Strict);
    the CRD schema only lists the known ones, so close every object that lists properties."""
    out = dict(schema)
    if "properties" in out:
        out["properties"] = {k: _strict(v) for k, v in out["properties"].items()}
        if "additionalProperties" not in out and not out.get(
            "x-kubernetes-preserve-unknown-fields"
        ):
            out["additionalProperties"] = False
    for key in ("items", "additionalProperties"):
        if isinstance(out.get(key), dict):
            out[key] = _strict(out[key])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in out:
            out[key] = [_strict(s) for s in out[key]]
    return out

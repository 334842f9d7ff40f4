"""The Dockerfile: hadolint passes, and the image agrees with the rest of the project (it
installs through `make install`, runs as the user the manifests expect, exposes the ports the
server listens on). Building and running the image takes minutes, so it is not part of `make
test`: `make image-test` (deploy/image/) builds it here with buildah and smoke-tests it, and
.ci/run runs that after the tests."""

from __future__ import annotations

import re
import tomllib

from tests.deploy.conftest import DEPLOY, REPO, find, run, tool

DOCKERFILE = REPO / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            keyword, _, rest = line.strip().partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def runtime_stage() -> list[tuple[str, str]]:
    """The instructions of the last stage: what the shipped image is."""
    steps = instructions()
    last = max(i for i, (k, _) in enumerate(steps) if k == "FROM")
    return steps[last:]


def test_hadolint_passes():
    run(tool("hadolint"), "--no-color", str(DOCKERFILE))


def test_every_hadolint_exception_says_why():
    lines = DOCKERFILE.read_text().splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore=" in line:
            reason = lines[i - 1].strip()
            assert reason.startswith("#") and "hadolint ignore" not in reason, (
                f"line {i + 1}: explain the exception in the comment line above it"
            )


def test_the_venv_comes_from_make_install_only():
    runs = [args for k, args in instructions() if k == "RUN"]
    assert any(re.search(r"\bmake\b.*\binstall\b", r) for r in runs)
    # Versions live in requirements.txt; a pip line here would be a second source of truth.
    assert not any(re.search(r"\bpip3? install\b|\buv pip\b", r) for r in runs)


def test_the_image_never_holds_or_fetches_a_model():
    text = DOCKERFILE.read_text().lower()
    for word in ("safetensors", "huggingface", "hf_hub_download", "curl ", "wget "):
        assert word not in text, word
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    assert ignore[next(i for i, x in enumerate(ignore) if not x.startswith("#"))] == "*", (
        ".dockerignore starts by excluding everything, then lists what the build needs"
    )


def test_the_build_context_holds_what_make_install_needs():
    allowed = {
        x.strip()[1:].rstrip("/")
        for x in (REPO / ".dockerignore").read_text().splitlines()
        if x.startswith("!")
    }
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages <= allowed
    assert {"Makefile", "requirements.txt", "pyproject.toml", "deploy/healthcheck.py"} <= allowed


def test_the_runtime_image_matches_the_manifests(rendered):
    stage = runtime_stage()
    (user,) = [args for k, args in stage if k == "USER"]
    uid, _, gid = user.partition(":")
    (entrypoint,) = [args for k, args in stage if k == "ENTRYPOINT"]
    assert entrypoint == '["magi-server"]'
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["magi-server"] == "server.__main__:main"  # what make install puts on PATH
    (healthcheck,) = [args for k, args in stage if k == "HEALTHCHECK"]
    assert '"deploy/healthcheck.py"' in healthcheck and (DEPLOY / "healthcheck.py").is_file()
    exposed = {int(p) for k, args in stage if k == "EXPOSE" for p in args.split()}
    objects = rendered["cpu-demo"]
    flags = find(objects, "ConfigMap")[0]["data"]
    assert exposed == {int(flags["MAGISTREAM_PORT"]), int(flags["MAGISTREAM_METRICS_PORT"])}
    pod = find(objects, "Deployment")[0]["spec"]["template"]["spec"]
    assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]) == (
        int(uid),
        int(gid),
    )
    assert int(uid) != 0


def test_any_debian_base_given_by_a_build_argument():
    """The base is an argument (a registry's debian:12 slim image, or `make image`'s local
    debootstrap one), and Python is Debian's own, installed by apt: no registry-only images."""
    steps = instructions()
    assert steps[0] == ("ARG", "BASE_IMAGE=debian:12.11-slim")
    froms = [args for k, args in steps if k == "FROM"]
    assert froms[0] == "${BASE_IMAGE} AS python"
    assert all(f.split()[0] in ("${BASE_IMAGE}", "python") for f in froms)
    assert "python3.11" in next(args for k, args in steps if k == "RUN")
    build = (REPO / "deploy" / "image" / "build.sh").read_text()
    assert "localhost/magistream-base:bookworm" in build and "--build-arg BASE_IMAGE" in build

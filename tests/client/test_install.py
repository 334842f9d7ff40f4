"""The client installs and runs without torch: imports, `--help` and a usage error in an
interpreter that sees only the standard library, grpcio, protobuf, av and the repo's client/
and proto/ folders."""

from __future__ import annotations

import re
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

from tests.client.conftest import REPO

SITE = Path(sysconfig.get_paths()["purelib"])
# what `pip install magistream[client]` brings: grpcio (+ typing_extensions), protobuf, av
CLIENT_DEPS = ["grpc", "google", "av", "av.libs", "typing_extensions.py"]
PROBE = """
import sys
sys.path[:0] = {paths!r}
import client, client.cli, client.commands, client.writers
heavy = sorted({{m.split(".")[0] for m in sys.modules}} & {{"torch", "numpy", "model",
                                                            "scheduler", "server"}})
assert not heavy, heavy
try:
    import torch
except ImportError:
    pass
else:
    raise AssertionError("torch is importable here; the probe proves nothing")
sys.argv = ["magi-client", "generate", "--prompt", "x", "--chunks", "0", "--out", "o.mp4"]
sys.exit(client.cli.main())
"""


def test_client_imports_and_runs_in_an_environment_without_torch(tmp_path):
    site, repo = tmp_path / "site", tmp_path / "repo"
    site.mkdir()
    repo.mkdir()
    for name in CLIENT_DEPS:
        if (SITE / name).exists():
            (site / name).symlink_to(SITE / name)
    for name in ("client", "proto"):
        (repo / name).symlink_to(REPO / name)
    # -S: no site-packages at all (so no torch), -I: no PYTHONPATH, cwd or user site
    done = subprocess.run(
        [sys.executable, "-S", "-I", "-c", PROBE.format(paths=[str(repo), str(site)])],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr  # the usage error, after every import worked
    assert "--chunks must be >= 1" in done.stderr


def test_client_imports_without_torch_in_the_project_environment():
    code = "import client, client.cli; import sys; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)


def test_client_distribution_depends_only_on_grpcio_protobuf_and_av():
    spec = tomllib.loads((REPO / "client" / "pyproject-client.toml").read_text())["project"]
    names = {re.split(r"[<>=!~ ]", dep)[0] for dep in spec["optional-dependencies"]["client"]}
    assert names == {"grpcio", "protobuf", "av"}
    assert spec["scripts"]["magi-client"] == "client.cli:main"
    # once merged into the repo's pyproject.toml, the two must say the same
    root = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    if "client" in root.get("optional-dependencies", {}):
        assert root["optional-dependencies"]["client"] == spec["optional-dependencies"]["client"]
        assert root["scripts"]["magi-client"] == "client.cli:main"

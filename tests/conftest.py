"""Shared fixtures: paths to the official conformance outputs, tiny model folders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

# One intra-op thread: tests share 2 cores with worker subprocesses, and OpenMP threads that
# spin against each other make a forward 10-100x slower than one thread alone.
torch.set_num_threads(1)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Make `xdist_group` marks work again. pytest-xdist 3.8 tags `--dist loadgroup` tests by
    setting `item._nodeid`, which pytest 9 no longer reads (the node id is built from
    `item._id`): a grouped module's tests spread over both workers, each paying the module's
    fixtures (a server, a browser, a rank group). This tags them the way xdist means to."""
    if not getattr(config.option, "loadgroup", False):
        return
    for item in items:
        names = {
            str(m.args[0] if m.args else m.kwargs.get("name", "default"))
            for m in item.iter_markers("xdist_group")
        }
        suffix = "@" + "_".join(sorted(names))
        if names and not item.nodeid.endswith(suffix):
            item._id = type(item._id).parse(item.nodeid + suffix)


@pytest.fixture(scope="session")
def conformance_dir() -> Path:
    path = SHARED / "conformance"
    if not path.is_dir():
        pytest.fail(
            f"conformance fixtures not found at {path} (the shared/ folder beside the repo)"
        )
    return path


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    """A complete `tiny` model folder written by the project's own writer (seed 0)."""
    from model.folder import write_random

    return write_random("tiny", tmp_path_factory.mktemp("models") / "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_model(tiny_folder):
    from model.folder import load_model

    return load_model(tiny_folder)


@pytest.fixture(scope="session")
def tiny_distill_folder(tmp_path_factory) -> Path:
    from model.folder import write_random

    return write_random("tiny_distill", tmp_path_factory.mktemp("models") / "distill", seed=0)


@pytest.fixture(scope="session")
def tiny_distill_model(tiny_distill_folder):
    from model.folder import load_model

    return load_model(tiny_distill_folder)

"""Engines over the tiny model folders (written once per test session)."""

from __future__ import annotations

import pytest

from model.folder import load_model, write_random


@pytest.fixture(scope="session")
def tiny_model(tiny_folder):
    return load_model(tiny_folder)


@pytest.fixture(scope="session")
def tiny_distill_model(tmp_path_factory):
    folder = write_random("tiny_distill", tmp_path_factory.mktemp("models") / "distill", seed=0)
    return load_model(folder)

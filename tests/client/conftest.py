"""The real server for the client's end-to-end tests: `python -m server --model tiny` on
loopback port 0, with its embedded-model cache in a temp folder. Module-scoped: only
test_e2e.py uses it, so it starts once and is gone before the rest of the suite runs."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.serverproc import REPO, ServerProcess

__all__ = ["REPO", "server_target"]  # REPO: for the tests that import it from here

START_TIMEOUT_S = 180.0  # writing the tiny model and starting the worker, on 2 busy cores


@pytest.fixture(scope="module")
def server_target(tmp_path_factory) -> Iterator[str]:
    """HOST:PORT of a running tiny-model server."""
    tmp = tmp_path_factory.mktemp("magi-server")
    with ServerProcess(tmp, model="tiny", start_timeout_s=START_TIMEOUT_S) as server:
        yield server.address

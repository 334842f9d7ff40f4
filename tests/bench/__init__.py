"""Bench smoke tests. A bench that sets process-wide state (torch threads) runs in its own
process through `run_bench`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parents[2] / "bench"


def run_bench(script: str, *args: str) -> str:
    """Run bench/<script> with args in a fresh interpreter; its stdout (it must exit 0)."""
    run = subprocess.run(
        [sys.executable, str(BENCH_DIR / script), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    return run.stdout

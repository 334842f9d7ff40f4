"""bench/train_step.py runs and prints its figures."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "train_step.py"


def test_quick_run_prints_the_step_time_and_its_baseline() -> None:
    run = subprocess.run(
        [sys.executable, str(BENCH), "--steps", "1", "--batch", "2", "--threads", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    header, figures = run.stdout.strip().splitlines()[-2:]
    assert header.startswith("# train step: toy DiT, batch 2")
    assert figures.startswith("step ") and "ratio" in figures

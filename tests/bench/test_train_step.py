"""bench/train_step.py runs and prints its figures."""

from __future__ import annotations

from tests.bench import run_bench


def test_quick_run_prints_the_step_time_and_its_baseline() -> None:
    out = run_bench("train_step.py", "--steps", "1", "--batch", "2", "--threads", "1")
    header, figures = out.strip().splitlines()[-2:]
    assert header.startswith("# train step: toy DiT, batch 2")
    assert figures.startswith("step ") and "ratio" in figures

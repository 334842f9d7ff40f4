"""bench/ab.py reads every number of a bench's tables; bench/engine_steps.py times a checkout."""

from __future__ import annotations

import sys

from bench import ab, engine_steps


def test_numbers_key_each_table_cell_by_context_row_and_column():
    out = (
        "machine: x\n"
        "32x32, 3 chunks\n"
        "sessions | sequential chunks/s | batched/sequential | split ms\n"
        "1 | 2.50 | 1.20x | 7.6 / 1.1\n"
        "\n"
        "sessions | steps/s\n"
        "8 | 12.3\n"
    )
    assert ab.numbers(out) == {
        "32x32, 3 chunks :: 1 :: sequential chunks/s": 2.5,
        "32x32, 3 chunks :: 1 :: batched/sequential": 1.2,
        "32x32, 3 chunks :: 8 :: steps/s": 12.3,
    }


def test_engine_steps_prints_a_row_per_session_count(monkeypatch, capsys):
    argv = ["engine_steps.py", "--size", "32", "--sessions", "1", "--steps", "2", "--repeats", "1"]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setattr(engine_steps.torch, "set_num_threads", lambda n: None)  # keep the suite's
    assert engine_steps.main() == 0
    rows = ab.numbers(capsys.readouterr().out)
    assert len(rows) == 1 and next(iter(rows.values())) > 0

"""Run one benchmark command on two revisions, interleaved (A B A B ...), and compare the
numbers it prints. A revision is measured from its own checkout (a git worktree) with this
checkout's virtual environment (a bench puts its checkout first on sys.path); each round runs
both sides back to back, so drifts of the machine hit both.

    .venv/bin/python bench/ab.py --base 5659e57 --rounds 3 -- bench/batching.py --quick

Every number in a printed table (cells split by `|`, ratios like "2.69x" included) becomes one
series, keyed by the row's first cell and the column's header. For each series it prints A's
and B's medians and the median of the pairwise B/A quotients over the rounds, with their range
(the spread). The first round of each side is a warm-up and is not counted.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NUMBER = re.compile(r"^(\d+(?:\.\d+)?)x?$")


def numbers(output: str) -> dict[str, float]:
    """`context :: row first cell :: column header` -> the number, for every numeric cell of
    every `|`-separated table (a row whose cells after the first hold no number is a header;
    the last line outside a table is the context)."""
    found: dict[str, float] = {}
    header: list[str] = []
    context = ""
    for line in output.splitlines():
        cells = [c.strip() for c in line.split("|")]
        if len(cells) < 2:
            context = line.strip() or context
            header = []
            continue
        if not any(NUMBER.match(c) for c in cells[1:]):
            header = cells
            continue
        for i, cell in enumerate(cells):
            m = NUMBER.match(cell)
            if m and i > 0:
                column = header[i] if i < len(header) else f"col{i}"
                found[f"{context} :: {cells[0]} :: {column}"] = float(m.group(1))
    return found


def run(checkout: Path, command: list[str]) -> str:
    result = subprocess.run(
        [sys.executable, *command], cwd=checkout, capture_output=True, text=True, timeout=3600
    )
    if result.returncode:
        raise SystemExit(f"{checkout}: {' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return result.stdout


def worktree(rev: str, where: Path) -> Path:
    path = where / f"rev-{rev}"
    subprocess.run(
        ["git", "worktree", "add", "--detach", "-q", str(path), rev], cwd=ROOT, check=True
    )
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", required=True, help="revision A (B is this working tree)")
    parser.add_argument("--rounds", type=int, default=3, help="counted rounds after a warm-up")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- script and its arguments")
    args = parser.parse_args()
    command = [c for c in args.command if c != "--"]
    if not command:
        parser.error("give the bench command after --")
    with tempfile.TemporaryDirectory(dir=ROOT.parent) as tmp:
        base = worktree(args.base, Path(tmp))
        try:
            series: dict[str, tuple[list[float], list[float]]] = {}
            for round_ in range(args.rounds + 1):
                a, b = numbers(run(base, command)), numbers(run(ROOT, command))
                print(f"round {round_}{' (warm-up)' if round_ == 0 else ''}: done", flush=True)
                if round_ == 0:
                    continue
                for key in a.keys() & b.keys():
                    series.setdefault(key, ([], []))
                    series[key][0].append(a[key])
                    series[key][1].append(b[key])
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT)
    print(f"command: {' '.join(command)}; A = {args.base}, B = working tree")
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{time.strftime('%Y-%m-%d')}; {args.rounds} counted rounds, interleaved A B"
    )
    print("series | A median | B median | B/A median (min..max)")
    for key in sorted(series):
        a_vals, b_vals = series[key]
        quotients = [b / a for a, b in zip(a_vals, b_vals, strict=True)]
        print(
            f"{key} | {statistics.median(a_vals):.2f} | {statistics.median(b_vals):.2f} | "
            f"{statistics.median(quotients):.2f} ({min(quotients):.2f}..{max(quotients):.2f})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

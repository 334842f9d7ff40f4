"""bench/gpu_check.py in its CPU smoke mode (--quick --device cpu): every part runs the code the
GPU run will (tiny presets and sizes, a real server and client), and each part's table holds
measured numbers, not errors or skips. A broken check would otherwise only show on a GPU lease."""

from __future__ import annotations

import json
import re

from tests.bench import run_bench

NUMBER = re.compile(r"^-?\d+(\.\d+)?(e[+-]\d+)?( ?%|x.*)?$")
PARTS = ("correctness", "server", "step", "realtime", "batching")


def tables(report: str) -> dict[str, list[list[str]]]:
    """`### title` -> its table's data rows (cells), from the final markdown report."""
    found: dict[str, list[list[str]]] = {}
    title = None
    for line in report.splitlines():
        if line.startswith("### "):
            title = line[4:]
            found[title] = []
        elif title and line.startswith("| ") and not line.startswith("|---"):
            found[title].append([c.strip() for c in line.strip().strip("|").split("|")])
    # the first row under a heading is the header
    return {t: rows[1:] for t, rows in found.items()}


def test_quick_cpu_run_fills_every_part_with_numbers(tmp_path):
    out = run_bench(
        "gpu_check.py", "--quick", "--device", "cpu", "--threads", "1", "--out", str(tmp_path)
    )
    report = out[out.index("## GPU check") :]
    printed = tables(report)
    assert [t.split(":")[0].split(" ")[0] for t in printed] == ["1.", "1.", "2.", "4.", "3."]
    for title, rows in printed.items():
        assert rows, f"{title}: no rows"
        for row in rows:
            text = " ".join(row)
            assert not re.search(r"\b(error|skipped|FAIL)\b", text), f"{title}: {row}"
            assert any(NUMBER.match(cell) for cell in row[1:]), f"{title}: no number in {row}"
    # part 2: each size (one in --quick) of both variants; part 3: each session count
    assert len(printed[next(t for t in printed if t.startswith("2."))]) == 2
    assert [r[0] for r in printed[next(t for t in printed if t.startswith("3."))]] == ["1", "2"]
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert tuple(saved["parts"]) == PARTS
    assert [p["rows"] for p in saved["parts"].values()] == list(printed.values())
    assert (tmp_path / "gpu_check.md").read_text().strip() == report.strip().split("\n\nfull")[0]

"""What a worker pays to start: fresh processes import torch, import the model package and load
a tiny model folder (the DiT, the VAE, the T5 encoder and its tokenizer). Each run is a new
process, as a worker (re)start is; the table gives the medians.

    .venv/bin/python bench/startup.py [--runs 5]
    # two revisions interleaved: the script imports the checkout it runs in (its working
    # directory), so give its absolute path
    .venv/bin/python bench/ab.py --base REV --rounds 5 -- $PWD/bench/startup.py --runs 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHECKOUT = Path.cwd()  # the revision measured (bench/ab.py runs this in each checkout)

_ONE_RUN = """
import json, sys, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
from model.folder import load_model
t2 = time.perf_counter()
load_model(sys.argv[1])
t3 = time.perf_counter()
print(json.dumps({"import torch": t1 - t0, "import model": t2 - t1, "load_model": t3 - t2,
                  "whole process": t3 - t0}))
"""


def one_run(folder: Path) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(CHECKOUT)}
    out = subprocess.run(
        [sys.executable, "-c", _ONE_RUN, str(folder)],
        cwd=CHECKOUT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="fresh processes measured")
    args = parser.parse_args()
    sys.path.insert(0, str(CHECKOUT))
    from model.folder import write_random

    with tempfile.TemporaryDirectory() as tmp:
        folder = write_random("tiny", Path(tmp) / "tiny", seed=0)
        one_run(folder)  # warm the page cache and the interpreter's bytecode
        runs = [one_run(folder) for _ in range(args.runs)]
    print(
        f"startup: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{time.strftime('%Y-%m-%d')}, {args.runs} fresh processes, medians in seconds"
    )
    print("part | seconds")
    for part in runs[0]:
        print(f"{part} | {statistics.median(r[part] for r in runs):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

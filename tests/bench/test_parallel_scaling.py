"""Smoke test of bench/parallel_scaling.py: the quick run prints a row per configuration with the
bytes the sharded and unsharded forwards move.

Both tests read one `--quick` run (`quick_run`): it launches 9 ranks (~2 s of CPU each to start),
and its ws 2 rows are the forwards whose bytes the second test checks."""

from __future__ import annotations

import contextlib
import io

import pytest

from bench import parallel_scaling
from model import parallel
from model.checkpoint import random_dit
from model.kv_cache import KVCache
from model.sharding import sharded_bytes_total

# one pytest-xdist worker runs the module, so the quick run happens once per suite run
pytestmark = pytest.mark.xdist_group("bench_parallel_scaling")


@pytest.fixture(scope="module")
def quick_run() -> tuple[str, list[parallel_scaling.Row]]:
    """`main(["--quick"])`: what it printed, and the rows its `run` returned (recorded on the
    way through, unchanged)."""
    returned = []
    real_run = parallel_scaling.run

    def recording_run(*args, **kwargs):
        returned.append(real_run(*args, **kwargs))
        return returned[-1]

    out = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(out):
        patch.setattr(parallel_scaling, "run", recording_run)
        assert parallel_scaling.main(["--quick"]) == 0
    ((config, window, rows),) = returned
    assert config == parallel_scaling.bench_config(quick=True)
    assert window == parallel_scaling.Window(latent=8, in_flight=2)
    return out.getvalue(), rows


def test_quick_run_prints_the_tables(quick_run):
    out, _ = quick_run
    for name in ("| ws 1 |", "| ws 1, 2 threads |", "| ws 2, cp |", "| ws 2, cp+shard |"):
        assert name in out
    assert "ws 2 / ws 1 =" in out
    assert "| rank 0 alone |" in out and "| split over 2 ranks |" in out


def test_weight_bytes_are_the_sharded_parameters(quick_run):
    """Per step, all ranks together send (N - 1) x the sharded bytes (+ padding) of weights,
    and the same activations with and without sharding (the quick run's ws 2 rows: the tiny
    config, its weights saved in 2 files)."""
    config = parallel_scaling.bench_config(quick=True)
    rows = {r.name: r for r in quick_run[1]}
    cp, shard = rows["ws 2, cp"], rows["ws 2, cp+shard"]
    assert (cp.world, cp.shard, shard.world, shard.shard) == (2, False, 2, True)
    sharded, replicated = sharded_bytes_total(config)
    assert cp.weight_bytes == 0
    assert 0 <= shard.weight_bytes - sharded < 64
    assert shard.activation_bytes == cp.activation_bytes > 0
    assert shard.param_bytes[:2] == (sharded // 2, replicated)
    assert cp.param_bytes == (0, sharded + replicated, 0)


def test_window_runs_on_the_plain_model():
    config = parallel_scaling.bench_config(quick=True)
    window = parallel_scaling.Window(latent=8, in_flight=2)
    model = random_dit(config, seed=0)
    groups = parallel_scaling.window_groups(config, window, KVCache(3))
    out = parallel.ulysses_forward(model, groups)
    assert sum(v.shape[1] * 16 for v in out[0]) == parallel_scaling.tokens(config, window)

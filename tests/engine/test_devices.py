"""Placement: the engine makes every tensor on a stated device. Generations run with `meta` as
the default device, so a tensor created without `device=` lands on meta and the step fails
("Tensor on device meta is not on the expected device cpu"); with the model on the CPU they
must give the recorded chunks. (The worker-group version: tests/engine/test_world_size.py.)"""

from __future__ import annotations

import numpy as np
import torch

from tests.engine.golden import GOLDEN, run_all


def test_the_golden_set_runs_with_meta_as_the_default_device(tiny_model, tiny_distill_model):
    with torch.device("meta"):
        got = run_all({"tiny": tiny_model, "tiny_distill": tiny_distill_model})
    with np.load(GOLDEN) as golden:
        recorded = {k.removesuffix(".shape") for k in golden.files if k.endswith(".shape")}
        assert {k for k in got if k.endswith("/frames")} == recorded
        for key, value in got.items():
            if key.endswith("/frames"):
                assert value.shape == tuple(golden[key + ".shape"]), key
            else:
                # the device context routes every op through a torch-function mode, which can
                # pick other kernels: the same numbers to 1 ulp, not to the bit
                want = golden[key]
                rel = np.linalg.norm(value - want) / np.linalg.norm(want)
                assert rel < 1e-5, f"{key}: {rel:.2e}"

"""Snapshots (issue 19): a session's state at its newest chunk boundary, written to bytes and
resumed in another engine of the same model, continues bit for bit; the format is checked
(version, model) and reads without pickle."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch

from engine.engine import Engine
from engine.snapshot import SnapshotError, decode, encode, header_of
from scheduler.session import SessionParams

RNG = np.random.default_rng(0)
IMAGE = RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)
VIDEO = RNG.integers(0, 256, (40, 64, 64, 3), dtype=np.uint8)


def params(sid: str, chunks: int | None = 6, **kw) -> SessionParams:
    prompts = ((0, "a red ball rolls"), (3, "it turns blue"))
    return SessionParams(sid, prompts, chunks, 64, 64, seed=3, **kw)


def by_chunk(done, sid: str) -> dict:
    return {d.output_index: d for d in done if d.session_id == sid}


def run_to(engine: Engine, sid: str, steps: int) -> list:
    done = []
    for _ in range(steps):
        produced = engine.step()
        for d in produced:
            engine.consumed(d.session_id)
        done += produced
    return done


# (t2v through real servers: tests/server/test_snapshot.py)
@pytest.mark.parametrize("mode", ["i2v", "v2v"])
def test_a_snapshot_resumed_elsewhere_continues_bit_for_bit(tiny_model, mode):
    extra = {"i2v": {"image": IMAGE}, "v2v": {"video": VIDEO}}.get(mode, {})
    want = by_chunk(_alone(tiny_model, mode, extra), "ref")
    a = Engine(tiny_model)
    a.open(params("s", mode=mode, **extra))
    before = by_chunk(run_to(a, "s", 9), "s")
    data = encode(a.snapshot("s"), owner="alice")
    meta = header_of(data)
    assert meta["owner"] == "alice" and meta["version"] == 1
    first = meta["spec"]["output_from"] - meta["spec"]["prefix_chunks"]
    assert first <= len(before)  # nothing is lost: it resumes at or before what was out
    b = Engine(tiny_model)  # another replica of the same model
    resumed = b.open(SessionParams("r", (), None, 64, 64, resume=data))
    assert resumed.spec.seed == 3 and resumed.spec.generated_total == 6
    got = by_chunk(b.run_until_idle(), "r")
    assert sorted(got) == list(range(first, 6))
    for c, d in got.items():
        assert torch.equal(d.latent, want[c].latent) and torch.equal(d.frames, want[c].frames)
        assert d.first_frame == want[c].first_frame and d.prompt == want[c].prompt


def _alone(model, mode, extra):
    engine = Engine(model)
    engine.open(params("ref", mode=mode, **extra))
    return engine.run_until_idle()


def test_a_snapshot_of_another_model_or_a_newer_format_is_refused(tiny_model, tiny_distill_model):
    a = Engine(tiny_model)
    a.open(params("s"))
    run_to(a, "s", 5)
    data = encode(a.snapshot("s"))
    with pytest.raises(SnapshotError, match="made with another model"):
        Engine(tiny_distill_model).open(SessionParams("r", (), None, 64, 64, resume=data))
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    meta = json.loads(header["__metadata__"]["magistream"])
    meta["version"] = 99
    header["__metadata__"]["magistream"] = json.dumps(meta)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    newer = struct.pack("<Q", len(raw)) + raw + data[8 + length :]
    with pytest.raises(SnapshotError, match="format version 99 is newer"):
        header_of(newer)
    with pytest.raises(SnapshotError, match="not a magistream snapshot"):
        decode(b"\x00" * 64, None, torch.device("cpu"))


def test_a_queued_session_has_nothing_to_snapshot(tiny_model):
    engine = Engine(tiny_model)
    engine.open(params("s"))
    with pytest.raises(SnapshotError, match="no chunk boundary to snapshot yet"):
        engine.snapshot("s")

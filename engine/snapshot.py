"""A session as a value: its state at a chunk boundary, written to bytes and read back.

A snapshot is a session's most recent fork point (docs/scheduler.md "Forks"): everything that
decides its chunks from then on. Resuming it anywhere the same model is loaded continues the
session bit for bit (a fork of a fork point that travelled). The format is one safetensors file
(tensors as data, never pickle, so reading a snapshot runs no code) whose header metadata holds
the rest as JSON under `magistream`: the format version, the model's fingerprint, the
session's spec, window, timeline and counters. The server reads that header without torch
(`header_of`) and checks the file's sha256 against the resume token.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import Tensor

from engine.snapshot_format import FORMAT, VERSION, SnapshotError, header_of
from scheduler.session import ForkMark, PromptEntry, Session, SessionSpec
from scheduler.window import WindowSpec

_SAMPLE = 1 << 16  # bytes hashed at each end of every model file


@dataclass(frozen=True)
class SessionSnapshot:
    """A session at the moment chunk `mark.chunk` was about to enter its window."""

    model: str  # fingerprint of the model that made it (model_fingerprint)
    spec: SessionSpec  # output_from: the first chunk a resume streams (none before was out)
    mark: ForkMark
    timeline: tuple[PromptEntry, ...]
    prefix: Tensor | None
    latents: dict[int, Tensor]  # chunk -> fp32 latent in flight (or awaiting re-forward)
    kv: dict[int, list[Tensor]]  # chunk -> per-layer K|V cached then (none with window 4)


def model_fingerprint(folder: str | Path) -> str:
    """Which model a snapshot needs: every file of the model folder by name and size, with
    the first and last 64 KiB of each (random weights of another seed, a retrained checkpoint
    or another config all differ; hashing 9 GB of weights at start would not pay)."""
    root = Path(folder)
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        size = path.stat().st_size
        digest.update(f"{path.relative_to(root)}\0{size}\0".encode())
        with path.open("rb") as f:
            digest.update(f.read(_SAMPLE))
            if size > _SAMPLE:
                f.seek(max(_SAMPLE, size - _SAMPLE))
                digest.update(f.read())
    return digest.hexdigest()


def capture(
    session: Session, mark_tensors, kv: dict[int, list[Tensor]], model: str
) -> SessionSnapshot:
    """The session's newest fork point (`mark_tensors`: the runner's TensorMark of it; `kv`:
    its cached K|V with all heads, ModelRunner.marked_kv)."""
    mark = session.fork_marks[-1]
    in_flight = [c for c, _ in mark.bound_prompts]
    # a resume streams every chunk not yet handed up when the mark was taken
    first = min(in_flight, default=mark.chunk)
    spec = dataclasses.replace(session.spec, output_from=max(first, session.spec.output_from))
    return SessionSnapshot(
        model=model,
        spec=spec,
        mark=mark,
        timeline=tuple(session.timeline.entries),
        prefix=mark_tensors.prefix,
        latents=dict(mark_tensors.latents),
        kv=kv,
    )


def encode(snapshot: SessionSnapshot, owner: str = "") -> bytes:
    """The snapshot as one safetensors file; `owner` (the principal) rides in its header."""
    tensors: dict[str, Tensor] = {}
    if snapshot.prefix is not None:
        tensors["prefix"] = snapshot.prefix
    for c, latent in snapshot.latents.items():
        tensors[f"latent.{c}"] = latent
    for c, layers in snapshot.kv.items():
        for layer, kv in enumerate(layers):
            tensors[f"kv.{c}.{layer}"] = kv
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    mark = snapshot.mark
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "model": snapshot.model,
        "owner": owner,
        "spec": dataclasses.asdict(snapshot.spec),
        "window": dataclasses.asdict(mark.window),
        "chunk": mark.chunk,
        "steps_done": mark.steps_done,
        "frames_out": mark.frames_out,
        "bound_prompts": [[c, *_entry(e)] for c, e in mark.bound_prompts],
        "timeline": [_entry(e) for e in snapshot.timeline],
        "kv_layers": {str(c): len(layers) for c, layers in snapshot.kv.items()},
    }
    return save_tensors(tensors, metadata={"magistream": json.dumps(meta)})


def decode(data: bytes, model: str | None, device: torch.device) -> SessionSnapshot:
    """Read a snapshot for the model `model` (None: checked already, on rank 0); raises
    SnapshotError when it is not one, or another model's."""
    meta = header_of(data)
    if model is not None and meta["model"] != model:
        raise SnapshotError(
            "the snapshot was made with another model (its weights or config differ from the "
            "ones this server loaded); resume it where that model is served"
        )
    tensors = {k: v.to(device) for k, v in load_tensors(data).items()}
    spec = SessionSpec(**{**meta["spec"], **_tuples(meta["spec"])})
    window = WindowSpec(**{**meta["window"], **_tuples(meta["window"])})
    mark = ForkMark(
        chunk=meta["chunk"],
        window=window,
        steps_done=meta["steps_done"],
        bound_prompts=tuple((c, PromptEntry(f, t, v)) for c, f, t, v in meta["bound_prompts"]),
        frames_out=meta["frames_out"],
    )
    kv = {
        int(c): [tensors[f"kv.{c}.{layer}"] for layer in range(n)]
        for c, n in meta["kv_layers"].items()
    }
    latents = {int(k.split(".")[1]): v for k, v in tensors.items() if k.startswith("latent.")}
    return SessionSnapshot(
        model=meta["model"],
        spec=spec,
        mark=mark,
        timeline=tuple(PromptEntry(f, t, v) for f, t, v in meta["timeline"]),
        prefix=tensors.get("prefix"),
        latents=latents,
        kv=kv,
    )


def _entry(e: PromptEntry) -> list:
    return [e.from_chunk, e.text, e.version]


def _tuples(fields: dict) -> dict:
    """JSON lists back to the tuples the frozen specs hold."""
    return {k: tuple(v) for k, v in fields.items() if isinstance(v, list)}

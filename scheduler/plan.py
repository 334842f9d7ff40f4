"""What passes between the scheduler (decides) and the runner (computes) each engine step."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from scheduler.window import ForwardPlan


@dataclass(frozen=True)
class SessionForward:
    """One session's part of an engine step."""

    session_id: str  # whose window this forward advances
    plan: ForwardPlan  # which chunks, at which grid indices, with which kv ranges


@dataclass(frozen=True)
class StepPlan:
    """What the scheduler decided for one engine step: all of it runs in one DiT forward."""

    forwards: tuple[SessionForward, ...]  # one forward per scheduled session, fairness-ordered


@dataclass
class StepOutput:
    """What the runner computed; the scheduler applies it."""

    latents: dict[tuple[str, int], Tensor] = field(default_factory=dict)  # updated chunks
    decoded: dict[tuple[str, int], tuple[Tensor, float]] = field(default_factory=dict)  # frames, s
    dit_s: float = 0.0  # time in the DiT forward
    decode_s: float = 0.0  # time in VAE decode
    assemble_s: float = 0.0  # time building the forward and applying the updates
    chunks_in_forward: int = 0  # chunk slots packed into the forward (CFG branches included)

"""What passes between the scheduler (decides) and the engine (computes) each engine step.

The plan is frozen and self-contained: with it and its own tensors keyed by session id, the
engine can run the step without reading any scheduler state. The output is plain numbers: the
frames themselves stay in the engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from scheduler.session import PromptEntry, SessionSpec
from scheduler.window import ForwardPlan


@dataclass(frozen=True)
class SessionStep:
    """One session's part of an engine step."""

    spec: SessionSpec  # the session's fixed parameters: size, seed (noise key), sampling, prefix
    forward: ForwardPlan  # which chunks, at which grid indices, with which kv ranges; which
    #                       chunk enters at pure noise (drawn from (seed, chunk)) and which finish
    prompts: tuple[tuple[int, PromptEntry], ...]  # (chunk, its bound prompt) of every noisy
    #                                               chunk; none for a prefix extraction
    kv_keep_from: int  # after this step, cached KV of chunks below this is never read again
    # Fork history: mark the session's tensors now, before the step (the chunk that enters in
    # it is the fork point), and keep marks of chunks >= marks_from only. None: no marks.
    marks_from: int | None = None

    @property
    def session_id(self) -> str:
        return self.spec.session_id


@dataclass(frozen=True)
class StepPlan:
    """What the scheduler decided for one engine step: all of it runs in one DiT forward."""

    forwards: tuple[SessionStep, ...]  # one per scheduled session, fairness-ordered
    freed: tuple[str, ...] = ()  # sessions that ended since the last plan: free all they hold
    forgotten: tuple[str, ...] = ()  # ended sessions whose fork history is dropped now


@dataclass(frozen=True)
class FinishedChunk:
    frame_count: int  # video frames decoded from it
    decode_s: float  # its share of the VAE decode time


@dataclass
class StepOutput:
    """What the engine reports back to the scheduler: plain results, no tensors."""

    finished: dict[tuple[str, int], FinishedChunk] = field(default_factory=dict)
    dit_s: float = 0.0  # time in the DiT forward
    decode_s: float = 0.0  # time in VAE decode
    assemble_s: float = 0.0  # time building the forward and applying the updates
    chunks_in_forward: int = 0  # chunk slots packed into the forward (CFG branches included)

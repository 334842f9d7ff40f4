"""The runner computes what the scheduler planned: one packed DiT forward per engine step.

It owns every tensor of every session, keyed by session id, on the engine's device: in-flight
latents, the i2v/v2v prefix latents, the KV cache, the text embeddings (cached by text). A plan
is all it reads besides them. For every session in the step it assembles the official forward
(reference §4.4): the clean re-forward, the in-flight chunks with their kv ranges over the
session's KV cache, the CFG branches (§4.7: text+context, null+context, uncond) or the distilled
path with its nearly-clean copy; all sessions' chunks go into one `VideoDiT.forward`. Then it
mixes the branches, takes the Euler step per chunk and VAE-decodes the chunks that became clean.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from engine.sampling import NEARLY_CLEAN_BLEND, cfg_scales, chunk_noise, mix_cfg, time_grid
from engine.snapshot import SessionSnapshot, decode
from model.dit import ChunkGroup, ChunkInput
from model.folder import MagiModel
from model.kv_cache import KVCache
from model.text import PromptEmbedding, TextConditioning, chunk_caption, null_caption
from model.vae import encode_frames, pipeline_tile_frames, to_uint8_frames
from scheduler.plan import FinishedChunk, SessionStep, StepOutput, StepPlan
from scheduler.session import PromptEntry, SessionParams, SessionSpec
from scheduler.timegrid import nearly_clean, step_intervals, step_size_value
from scheduler.window import ForwardPlan

V2V_PREFIX_FRAMES = 32  # video frames of a v2v prefix (official prefix_frame): 8 latents
LATENT_CHANNELS = 16  # VAE latent channels (the DiT's 24B input path duplicates them itself)


@dataclass
class SessionTensors:
    """Everything of one session that is a tensor, on the engine's device."""

    prefix: Tensor | None  # (16, n, h, w) fp32: the i2v image / v2v prefix latents
    cache: KVCache  # clean chunks' K|V, per layer
    latents: dict[int, Tensor] = field(default_factory=dict)  # chunk -> (16, 6, h, w) fp32

    @property
    def nbytes(self) -> int:
        held = [*self.latents.values(), *([] if self.prefix is None else [self.prefix])]
        return self.cache.nbytes + sum(t.numel() * t.element_size() for t in held)


@dataclass
class TensorMark:
    """A session's tensors at the moment a chunk was about to enter (scheduler.ForkMark holds
    the rest of that moment): the latents in flight and the one awaiting its clean
    re-forward, the prefix, the cached KV. References, not copies: the runner replaces latents
    rather than changing them, and a cached chunk is never rewritten."""

    prefix: Tensor | None
    latents: dict[int, Tensor]
    cache: KVCache
    prefix_chunks: int  # to map a fork's output chunk index to the global one

    @property
    def nbytes(self) -> int:
        held = [*self.latents.values()]
        return self.cache.nbytes + sum(t.numel() * t.element_size() for t in held)


class HostCopy:
    """A CUDA decode batch's frames on their way into pinned host memory: the copy is enqueued
    (`non_blocking`) behind the decode, and `wait` returns once it has landed. Nothing may read
    the host buffer before that."""

    def __init__(self, stream: torch.cuda.Stream, members: int) -> None:
        self.members = members
        self._start = torch.cuda.Event(enable_timing=True)
        self._done = torch.cuda.Event(enable_timing=True)
        self._start.record(stream)

    def landed_on(self, stream: torch.cuda.Stream) -> None:
        """Mark the end of the copy (enqueued on `stream` just before)."""
        self._done.record(stream)

    def wait(self) -> float:
        """Block until the frames are on the host; the batch's device time (decode and copy,
        as the device ran it beside the next step) per member, in seconds."""
        self._done.synchronize()
        return self._start.elapsed_time(self._done) / 1e3 / self.members


@dataclass
class Produced:
    """A chunk that became clean this step: its frames and latent, for the consumer."""

    frames: Tensor  # uint8 (T, H, W, 3), on the host once `ready` has landed
    latent: Tensor  # (16, 6, h, w) fp32: the clean latent the frames were decoded from
    decode_s: float  # its share of the VAE decode time (on CUDA: of enqueueing it)
    ready: HostCopy | None = None  # CUDA: the frames' copy to the host; None: they are there


@dataclass
class _Assembled:
    """A session's groups in the packed forward and how to read its velocities back."""

    step: SessionStep
    inputs: dict[int, Tensor]  # chunk -> latent fed to the forward (prefix pasted)
    first_group: int  # index of its first group in the packed list
    roles: dict[str, list[int]]  # "ctx_text" / "ctx_null" / "uncond" / "copy" -> group offsets


@dataclass
class _Layout:
    """One session forward's key layout: `cache[lo .. slice_point) ++ forward_chunks`, chunk g
    at token (g - lo) * tokens; key ranges and RoPE slots as the official forward has them."""

    plan: ForwardPlan
    noisy: list[int]  # the chunks being denoised, oldest first
    forward_chunks: list[int]  # the clean re-forward chunk (if any), then `noisy`
    inputs: dict[int, Tensor]  # chunk -> latent fed to the forward (prefix pasted)
    t_of: dict[int, float]  # chunk -> flow time of this forward
    kv_first: dict[int, int]  # chunk -> first chunk it attends to
    lo: int  # first chunk of the key sequence
    cached: list[int]  # chunks read from the KV cache, in order
    tokens: int  # tokens per chunk
    width: int  # latent frames per chunk
    step_size: float  # distill step-size conditioning value
    cache: KVCache | None

    def is_clean(self, c: int) -> bool:
        return self.plan.prefix_extraction or c == self.plan.clean_chunk

    def chunk(self, c: int, caption: Tensor, dropped: bool, writes: bool) -> ChunkInput:
        return ChunkInput(
            latent=self.inputs[c],
            t=self.t_of[c],
            caption=caption,
            caption_dropped=dropped,
            rope_frame=self.width * c,
            rope_frames_total=self.width * (self.forward_chunks[-1] + 1),
            k_range=((self.kv_first[c] - self.lo) * self.tokens, (c + 1 - self.lo) * self.tokens),
            step_size=self.step_size,
            cache_index=c if writes else None,
        )

    def alone(self, c: int, caption: Tensor, dropped: bool, slot: int) -> ChunkInput:
        """Chunk c attending only to itself, placed at RoPE time slot `slot` of slot + 1."""
        return ChunkInput(
            latent=self.inputs[c],
            t=self.t_of[c],
            caption=caption,
            caption_dropped=dropped,
            rope_frame=self.width * slot,
            rope_frames_total=self.width * (slot + 1),
            k_range=(0, self.tokens),
            step_size=self.step_size,
        )

    def group(self, chunks: list[ChunkInput]) -> ChunkGroup:
        return ChunkGroup(chunks, self.cache, self.cached)


class DitForward(Protocol):
    """What runs the packed DiT forward in place of `model.dit` (engine.ranks.GroupForward: all
    ranks of a worker group), makes the caches it can use, and decodes latents."""

    def __call__(self, groups: list[ChunkGroup]) -> list[list[Tensor]]: ...

    def new_cache(self) -> KVCache: ...

    def decode(self, z: Tensor, tile_frames: int) -> Tensor | None: ...  # None off rank 0

    # a cache's K|V with all KV heads (every rank calls it), and back to a rank's share
    def gather_kv(self, cache: KVCache) -> dict[int, list[Tensor]]: ...

    def own_kv_heads(self, kv: Tensor) -> Tensor: ...


class Captions(Protocol):
    """Where the runner gets a prompt's T5 output: the model's `TextEncoder` on a single
    process and on rank 0 of a group; on a follower rank, the embeddings rank 0 sent with the
    plans (engine.ranks.ReceivedCaptions), so only rank 0 holds T5."""

    def encode(self, prompt: str) -> PromptEmbedding: ...


class ModelRunner:
    """Owns the model and every session's tensors on this engine."""

    def __init__(
        self,
        model: MagiModel,
        text_conditioning: TextConditioning | None = None,
        dit: DitForward | None = None,
        batch_invariant: bool | None = None,
        overlap_decode: bool | None = None,
        captions: Captions | None = None,  # None: the model's own T5
    ) -> None:
        self.model = model
        self.dit = dit  # None: `model.dit` on this process alone
        self.captions = model.text if captions is None else captions
        if self.captions is None:
            raise ValueError(
                "this model was loaded without T5 (load_model(text=False): a follower rank); "
                "pass the prompt embeddings rank 0 sends as captions="
            )
        self.rc = model.config.runtime_config
        self.ec = model.config.engine_config
        self.text_conditioning = text_conditioning or TextConditioning()
        # Every null-caption slot reads it: null and uncond branches, the clean re-forward and
        # the v2v prefix forward all take the null half y[1] that NEG_PROMPT changes (§4.4, §4.10).
        self._null = null_caption(
            model.dit.y_embedder.null_caption_embedding.detach(),
            model.special_tokens,
            self.text_conditioning,
        )
        self.device = model.dit.y_embedder.null_caption_embedding.device
        # Batch invariance: each session's groups go through their own forward and each
        # finished chunk through its own decode, with exactly the calls and shapes a run alone
        # makes, so a session's frames never depend on what else is in the step. A packed
        # GEMM's rows (and a batched conv's images) do depend on the batch: fp32 GEMMs take
        # another kernel for the tail rows at small M, oneDNN another conv algorithm from batch
        # 2 (docs/scheduler.md "Batch invariance"). None: on for the CPU, off for CUDA (its cost
        # there is unmeasured; bench/gpu_check.py measures it).
        self.batch_invariant = (
            self.device.type == "cpu" if batch_invariant is None else batch_invariant
        )
        # Decode chunk n while the next step runs: on CUDA the decode and the frames' copy to
        # the host go on a side stream, and the worker sends a step's chunks only after it has
        # enqueued the next step (engine.process). None: on for CUDA, off for the CPU, where
        # nothing runs beside the host (a test forces it on to exercise the deferred sends).
        self.overlap_decode = (
            self.device.type == "cuda" if overlap_decode is None else overlap_decode
        )
        self._decode_stream: torch.cuda.Stream | None = None  # made on first use
        self._null_tokens = _visible(self._null).to(self.device)
        self._grids: dict[tuple[int, str], Tensor] = {}
        self.sessions: dict[str, SessionTensors] = {}
        # fork history: session -> chunk (global) -> its tensors just before that chunk entered;
        # kept past the session's end until a plan forgets it
        self.marks: dict[str, dict[int, TensorMark]] = {}

    # ---- sessions -------------------------------------------------------------------------

    def open(self, params: SessionParams) -> int:
        """Encode the session's prefix and make its cache, or take a fork's tensors from its
        fork point; returns the prefix's latent frames."""
        if params.fork is not None:
            return self._open_fork(params)
        if params.resume is not None:  # (rank 0 decoded and checked it already)
            return self.open_snapshot(params.session_id, decode(params.resume, None, self.device))
        prefix = self._encode_prefix(params)
        self.sessions[params.session_id] = SessionTensors(prefix, self._new_cache())
        return 0 if prefix is None else prefix.shape[1]

    def _open_fork(self, params: SessionParams) -> int:
        source = params.fork
        marks = self.marks.get(source.session_id, {})
        mark = next((m for c, m in marks.items() if c - m.prefix_chunks == source.at_chunk), None)
        if mark is None:  # the scheduler checked its marks first: the two disagree
            raise RuntimeError(f"no fork point of {source.session_id} at chunk {source.at_chunk}")
        self.sessions[params.session_id] = SessionTensors(
            mark.prefix, mark.cache.share(), dict(mark.latents)
        )
        return 0 if mark.prefix is None else mark.prefix.shape[1]

    def open_snapshot(self, session_id: str, snapshot: SessionSnapshot) -> int:
        """A resumed session's tensors, as its snapshot holds them (a snapshot holds all KV
        heads; a rank of a group keeps its own)."""
        cache = self._new_cache()
        for c, layers in snapshot.kv.items():
            for layer, kv in enumerate(layers):
                cache.write(layer, c, kv if self.dit is None else self.dit.own_kv_heads(kv))
        prefix = snapshot.prefix
        self.sessions[session_id] = SessionTensors(prefix, cache, dict(snapshot.latents))
        return 0 if prefix is None else prefix.shape[1]

    def _new_cache(self) -> KVCache:
        """A session's KV cache: the group forward's (a rank's own heads) or a plain one."""
        cache = self.dit.new_cache() if self.dit is not None else None
        return cache or KVCache(self.model.config.model_config.num_layers)

    def free(self, session_id: str) -> None:
        """Drop everything the session holds but its fork marks (idempotent)."""
        held = self.sessions.pop(session_id, None)
        if held is not None:
            held.latents.clear()
            held.cache.clear()

    def forget(self, session_id: str) -> None:
        """Drop the session's fork marks (idempotent)."""
        self.marks.pop(session_id, None)

    def marked_kv(self, session_id: str, chunk: int) -> dict[int, list[Tensor]]:
        """The cached K|V (all heads, per chunk, per layer) of the session's fork point at
        global `chunk`; in a group every rank calls it (it gathers the ranks' heads)."""
        cache = self.marks[session_id][chunk].cache
        if self.dit is not None:
            return self.dit.gather_kv(cache)
        return {c: cache.layers_of(c) for c in cache.chunk_indices}

    def marks_bytes(self) -> int:
        """Memory the fork marks hold beyond the live sessions' own tensors (an upper bound:
        tensors shared with a live session count here too)."""
        return sum(m.nbytes for marks in self.marks.values() for m in marks.values())

    def _mark(self, step: SessionStep) -> None:
        """Keep the session's marks of chunks >= marks_from; mark it now if a chunk enters."""
        if step.marks_from is None:
            return
        sid, plan = step.session_id, step.forward
        marks = self.marks.setdefault(sid, {})
        for c in [c for c in marks if c < step.marks_from]:
            del marks[c]
        if plan.entered is not None and not plan.prefix_extraction:
            held = self.sessions[sid]
            marks[plan.entered] = TensorMark(
                held.prefix, dict(held.latents), held.cache.share(), step.spec.prefix_chunks
            )

    def _encode_prefix(self, params: SessionParams) -> Tensor | None:
        """i2v: the image's latent (16, 1, h, w); v2v: the prefix video's latents (16, n, h, w).
        Both x scale factor, fp32 (reference §4.9)."""
        if params.mode == "i2v":
            frames = torch.as_tensor(params.image, device=self.device)[None]
        elif params.mode == "v2v":
            # continue from the END of the given video (the reference script takes its start)
            frames = torch.as_tensor(params.video[-V2V_PREFIX_FRAMES:], device=self.device)
        else:
            return None
        latent = encode_frames(self.model.vae, frames, self.rc.scale_factor, self.rc.fps)
        return latent[0].float()

    def grid(self, num_steps: int, shortcut_mode: str) -> Tensor:
        key = (num_steps, shortcut_mode)
        if key not in self._grids:
            self._grids[key] = time_grid(num_steps, shortcut_mode)
        return self._grids[key]

    # ---- one engine step ------------------------------------------------------------------

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> tuple[StepOutput, dict[tuple[str, int], Produced]]:
        """Run one step: free what the plan frees, draw entering chunks' noise, run the packed
        forward, take the Euler steps, evict unreachable KV, decode the chunks that finished."""
        for session_id in plan.freed:
            self.free(session_id)
        for session_id in plan.forgotten:
            self.forget(session_id)
        out = StepOutput()
        if not plan.forwards:
            return out, {}
        t0 = time.perf_counter()
        for step in plan.forwards:
            self._mark(step)  # before the entering chunk's noise: the fork draws its own
            self._enter(step)
        groups: list[ChunkGroup] = []
        assembled = [self._assemble(step, groups) for step in plan.forwards]
        out.chunks_in_forward = sum(len(g.chunks) for g in groups)
        t1 = time.perf_counter()
        velocities = self._forward(groups, [a.first_group for a in assembled])
        t2 = time.perf_counter()
        finished = []
        for a in assembled:
            forward, held = a.step.forward, self.sessions[a.step.session_id]
            if not forward.prefix_extraction:  # (there only the KV written to the cache counts)
                for c, latent in self._update(a, velocities).items():
                    held.latents[c] = latent
                    if c in forward.finished:
                        finished.append((a.step.spec, c, latent))
            if forward.clean_chunk is not None:  # its KV is cached now; the latent is not needed
                held.latents.pop(forward.clean_chunk, None)
            held.cache.drop_before(a.step.kv_keep_from)
        t3 = time.perf_counter()
        produced = self._decode_all(finished)
        for key, p in produced.items():
            out.finished[key] = FinishedChunk(p.frames.shape[0], p.decode_s)
        out.dit_s, out.decode_s = t2 - t1, time.perf_counter() - t3
        out.assemble_s = (t1 - t0) + (t3 - t2)
        return out, produced

    def _forward(self, groups: list[ChunkGroup], firsts: list[int]) -> list[list[Tensor]]:
        """The DiT forward of every group: one packed call, or one per session (`firsts`: the
        index of each session's first group) when batch invariant."""
        forward = self.model.dit if self.dit is None else self.dit
        if not self.batch_invariant:
            return forward(groups)
        ends = [*firsts[1:], len(groups)]
        return [v for a, b in zip(firsts, ends, strict=True) for v in forward(groups[a:b])]

    def _enter(self, step: SessionStep) -> None:
        """The chunk entering the window starts as pure noise keyed by (seed, chunk)."""
        c, spec = step.forward.entered, step.spec
        if c is not None:
            shape = (LATENT_CHANNELS, self.rc.chunk_width, spec.height // 8, spec.width // 8)
            self.sessions[spec.session_id].latents[c] = chunk_noise(
                spec.seed, c, shape, self.device
            )

    def _assemble(self, step: SessionStep, groups: list[ChunkGroup]) -> _Assembled:
        """Append this session's branches to `groups` (reference §4.4, §4.7)."""
        lay = self._layout(step)
        prompts = dict(step.prompts)
        cfg = self._cfg3 if self.rc.cfg_number == 3 else self._cfg1
        branches = cfg(lay, step, prompts)
        first, roles = len(groups), {}
        for role, group in branches:
            roles.setdefault(role, []).append(len(groups) - first)
            groups.append(group)
        return _Assembled(step, lay.inputs, first, roles)

    def _layout(self, step: SessionStep) -> _Layout:
        plan, spec = step.forward, step.spec
        held = self.sessions[spec.session_id]
        grid = self.grid(spec.num_steps, spec.shortcut_mode)
        noisy = [c.chunk_index for c in plan.chunks]
        clean = [plan.clean_chunk] if plan.clean_chunk is not None else []
        t_of = {c.chunk_index: float(grid[c.grid_index]) for c in plan.chunks}
        kv_first = {c.chunk_index: c.kv_first_chunk for c in plan.chunks}
        if plan.prefix_extraction:
            t_of = dict.fromkeys(noisy, self.rc.clean_t)
        if clean:
            t_of[plan.clean_chunk] = self.rc.clean_t
            kv_first[plan.clean_chunk] = plan.clean_kv_first_chunk
        forward_chunks = clean + noisy
        slice_point = forward_chunks[0]
        lo = min(min(kv_first.values()), slice_point)
        interval = step_intervals(spec.num_steps, spec.shortcut_mode)[plan.sub_step]
        return _Layout(
            plan=plan,
            noisy=noisy,
            forward_chunks=forward_chunks,
            inputs={
                c: self._input_latent(spec, held, c, plan.prefix_extraction) for c in forward_chunks
            },
            t_of=t_of,
            kv_first=kv_first,
            lo=lo,
            cached=list(range(lo, slice_point)),
            tokens=self.rc.chunk_width * (spec.height // 16) * (spec.width // 16),
            width=self.rc.chunk_width,
            step_size=step_size_value(spec.num_steps, interval),
            cache=held.cache,
        )

    def _cfg3(
        self, lay: _Layout, step: SessionStep, prompts: dict[int, PromptEntry]
    ) -> list[tuple[str, ChunkGroup]]:
        """Text+context (row -2, no write), null+context (row -1, writes the clean chunk's
        KV), and each noisy chunk alone without context or text at time positions 0..5."""
        text = [
            lay.chunk(
                c,
                self._null_tokens if lay.is_clean(c) else self._prompt(step.spec, prompts, c),
                False,
                False,
            )
            for c in lay.forward_chunks
        ]
        null = [lay.chunk(c, self._null_tokens, True, lay.is_clean(c)) for c in lay.forward_chunks]
        if lay.plan.prefix_extraction:  # only the cache write matters there
            return [("ctx_null", lay.group(null))]
        uncond = [
            ("uncond", ChunkGroup([lay.alone(c, self._null_tokens, True, slot=0)]))
            for c in lay.noisy
        ]
        return [("ctx_text", lay.group(text)), ("ctx_null", lay.group(null)), *uncond]

    def _cfg1(
        self, lay: _Layout, step: SessionStep, prompts: dict[int, PromptEntry]
    ) -> list[tuple[str, ChunkGroup]]:
        """One branch that writes the cache; while the oldest chunk is nearly clean, a self-only
        copy of it one slot after the newest (blended 0.7 / 0.3 in `_update`)."""
        branch = [
            lay.chunk(
                c,
                self._null_tokens if lay.is_clean(c) else self._prompt(step.spec, prompts, c),
                False,
                lay.is_clean(c),
            )
            for c in lay.forward_chunks
        ]
        out = [("ctx_text", lay.group(branch))]
        oldest = lay.noisy[0]
        threshold = self.ec.distill_nearly_clean_chunk_threshold
        if not lay.plan.prefix_extraction and nearly_clean(lay.t_of[oldest], threshold):
            slot = lay.forward_chunks[0] + len(lay.forward_chunks)
            copy = lay.alone(oldest, self._prompt(step.spec, prompts, oldest), False, slot=slot)
            out.append(("copy", ChunkGroup([copy])))
        return out

    def _update(self, a: _Assembled, velocities: list[list[Tensor]]) -> dict[int, Tensor]:
        """Mix the branches per chunk and take its Euler step: x + v * (t[k+1] - t[k])."""
        plan, spec = a.step.forward, a.step.spec
        grid = self.grid(spec.num_steps, spec.shortcut_mode)
        offset = 1 if plan.clean_chunk is not None else 0  # the clean chunk's output is discarded
        rc = self.rc
        out = {}
        for m, pc in enumerate(plan.chunks):
            c, k = pc.chunk_index, pc.grid_index
            if rc.cfg_number == 3:
                v_ct = velocities[a.first_group + a.roles["ctx_text"][0]][offset + m]
                v_c = velocities[a.first_group + a.roles["ctx_null"][0]][offset + m]
                v_u = velocities[a.first_group + a.roles["uncond"][m]][0]
                s_p, s_t = cfg_scales(
                    float(grid[k]),
                    rc.cfg_t_range,
                    spec.prev_chunk_scales or rc.prev_chunk_scales,
                    spec.text_scales or rc.text_scales,
                )
                v = mix_cfg(v_u, v_c, v_ct, s_p, s_t)
            else:
                v = velocities[a.first_group + a.roles["ctx_text"][0]][offset + m]
                if m == 0 and "copy" in a.roles:
                    v_copy = velocities[a.first_group + a.roles["copy"][0]][0]
                    v = v * NEARLY_CLEAN_BLEND + v_copy * (1 - NEARLY_CLEAN_BLEND)
            out[c] = a.inputs[c] + v * (grid[k + 1] - grid[k])
        return out

    # ---- helpers --------------------------------------------------------------------------

    def _input_latent(
        self, spec: SessionSpec, held: SessionTensors, c: int, prefix_extraction: bool
    ) -> Tensor:
        """The chunk's latent with prefix frames pasted in (every forward, §4.4 step 5)."""
        width = self.rc.chunk_width
        prefix = held.prefix
        if prefix_extraction:
            return prefix[:, width * c : width * (c + 1)]
        x = held.latents[c]
        n = min(spec.prefix_latent_frames - width * c, width)
        if prefix is None or n <= 0:
            return x
        x = x.clone()
        x[:, :n] = prefix[:, width * c : width * c + n]
        return x

    def _prompt(self, spec: SessionSpec, prompts: dict[int, PromptEntry], c: int) -> Tensor:
        caption = chunk_caption(
            self.captions.encode(prompts[c].text),
            self.model.special_tokens,
            self.text_conditioning,
            c - spec.prefix_chunks,
            spec.generated_total,
        )
        return _visible(caption).to(self.device)  # no copy: the text cache keeps it here

    def _decode_all(
        self, finished: list[tuple[SessionSpec, int, Tensor]]
    ) -> dict[tuple[str, int], Produced]:
        """uint8 frames of the chunks that became clean; chunks of one latent shape (most
        sessions' chunks) are decoded as one batch unless batch invariant. Prefix latents are
        not output, except the i2v image frame (§4.6 `real_start`)."""
        width = self.rc.chunk_width
        by_shape: dict[tuple, list[tuple[str, int, Tensor, Tensor]]] = {}
        for spec, c, latent in finished:
            start = width * c
            if spec.mode == "v2v":
                start = max(start, spec.prefix_latent_frames)
            z = latent[:, start - width * c :]
            # batch invariant: every chunk alone, as a session running alone decodes it
            key = (spec.session_id, c) if self.batch_invariant else tuple(z.shape)
            by_shape.setdefault(key, []).append((spec.session_id, c, z, latent))
        decoded = {}
        stream = self._decode_on()
        for members in by_shape.values():
            t0 = time.perf_counter()
            ready = None if stream is None else HostCopy(stream, len(members))
            with torch.cuda.stream(stream) if stream is not None else nullcontext():
                frames = self._decode_batch(members, stream)
                if frames is None:  # a follower rank: its tiles went to rank 0, which keeps frames
                    continue
                if ready is not None:  # one pinned copy per batch, read after it has landed
                    host = torch.empty(
                        frames.shape, dtype=frames.dtype, device="cpu", pin_memory=True
                    )
                    frames = host.copy_(frames, non_blocking=True)
                    ready.landed_on(stream)
            seconds = (time.perf_counter() - t0) / len(members)
            for (sid, c, _, latent), f in zip(members, frames, strict=True):
                decoded[(sid, c)] = Produced(f, latent, seconds, ready)
        return decoded

    def _decode_on(self) -> torch.cuda.Stream | None:
        """The CUDA stream the step's decodes and host copies go on (None on the CPU): the
        side stream when overlapping (a worker group's split decode keeps to the main stream:
        its collectives run in the same order on every rank), after the main stream's work so
        far, which wrote the latents."""
        if self.device.type != "cuda":
            return None
        main = torch.cuda.current_stream(self.device)
        if not self.overlap_decode or self.dit is not None:
            return main
        if self._decode_stream is None:
            self._decode_stream = torch.cuda.Stream(self.device)
        self._decode_stream.wait_stream(main)
        return self._decode_stream

    def _decode_batch(
        self, members: list[tuple[str, int, Tensor, Tensor]], stream: torch.cuda.Stream | None
    ) -> Tensor | None:
        """(N, T, H, W, 3) uint8 frames of one batch, where the latents are; None off rank 0."""
        if stream is not None and stream is self._decode_stream:
            for m in members:  # made on the main stream: not reused there before this reads it
                m[3].record_stream(stream)
        z = torch.stack([m[2] for m in members]).float() / self.rc.scale_factor
        tile_frames = pipeline_tile_frames(self.rc.fps)
        if self.dit is not None:  # a worker group: tiles spread over the ranks
            video = self.dit.decode(z, tile_frames)
        else:
            video = self.model.vae.tiled_decode(z, tile_frames=tile_frames)
        if video is None:
            return None
        return to_uint8_frames(video).unflatten(0, (len(members), -1))


def _visible(caption: PromptEmbedding) -> Tensor:
    """The caption rows the DiT's cross-attention sees (mask = 1), fp32."""
    return caption.embedding[caption.mask.bool()].float()

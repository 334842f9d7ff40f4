"""Every Prometheus metric of the server, declared once on a registry passed in."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

if TYPE_CHECKING:
    from engine.ipc import DeviceMemory

# Chunk latencies span a tiny CPU model (tens of ms) to the 24B model (tens of seconds).
_LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300)
_STEP_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256, 512)


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        r = registry
        self.sessions_active = Gauge(
            "magistream_sessions_active", "Sessions generating now.", registry=r
        )
        self.sessions_queued = Gauge(
            "magistream_sessions_queued", "Sessions accepted and waiting for admission.", registry=r
        )
        self.sessions_detached = Gauge(
            "magistream_sessions_detached",
            "Sessions whose call broke within their detach grace, paused until Attach or the "
            "grace runs out.",
            registry=r,
        )
        self.sessions_finished = Counter(
            "magistream_sessions_finished",
            "Sessions ended, by final state and gRPC status code.",
            ["state", "code"],
            registry=r,
        )
        self.time_to_first_chunk = Histogram(
            "magistream_time_to_first_chunk_seconds",
            "From a request's acceptance to its first chunk event.",
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.inter_chunk_latency = Histogram(
            "magistream_inter_chunk_latency_seconds",
            "Between consecutive chunk events of one session.",
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.chunks_generated = Counter(
            "magistream_chunks_generated", "Chunks the engine decoded.", registry=r
        )
        self.frames_generated = Counter(
            "magistream_frames_generated", "Frames the engine decoded.", registry=r
        )
        self.engine_step = Histogram(
            "magistream_engine_step_seconds",
            "Wall time of one engine step (DiT forward, Euler updates, VAE decodes).",
            buckets=_STEP_BUCKETS_S,
            registry=r,
        )
        self.engine_batch_chunks = Histogram(
            "magistream_engine_batch_chunks",
            "Chunk slots packed into one forward (CFG branches count).",
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.engine_batch_sessions = Histogram(
            "magistream_engine_batch_sessions",
            "Sessions sharing one forward.",
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.chunks_in_flight = Gauge(
            "magistream_chunks_in_flight", "Chunks inside denoising windows.", registry=r
        )
        self.kv_cache = Gauge(
            "magistream_kv_cache_bytes", "KV cache held by running sessions.", registry=r
        )
        self.memory_reserved = Gauge(
            "magistream_memory_reserved_bytes",
            "KV cache and latent memory admission has reserved.",
            registry=r,
        )
        self.fork_history = Gauge(
            "magistream_fork_history_bytes",
            "Memory reserved for fork points: running sessions' and recently ended ones'.",
            registry=r,
        )
        self.fork_history_held = Gauge(
            "magistream_fork_history_held_bytes",
            "Tensors the fork points hold now (shared with live sessions counted too).",
            registry=r,
        )
        # The worker's device (rank 0's in a group), from its heartbeats; absent while it
        # (re)starts, and allocated/reserved absent on CPU, where torch counts nothing.
        self.device_memory_total = Gauge(
            "magistream_device_memory_total_bytes",
            "Memory of the worker's device (on CPU the host's MemTotal).",
            ["device"],
            registry=r,
        )
        self.device_memory_free = Gauge(
            "magistream_device_memory_free_bytes",
            "Free memory of the worker's device, every process counted (on CPU MemAvailable).",
            ["device"],
            registry=r,
        )
        self.device_memory_allocated = Gauge(
            "magistream_device_memory_allocated_bytes",
            "Device memory held by the worker's live tensors (CUDA only).",
            ["device"],
            registry=r,
        )
        self.device_memory_reserved = Gauge(
            "magistream_device_memory_reserved_bytes",
            "Device memory held by torch's caching allocator in the worker (CUDA only).",
            ["device"],
            registry=r,
        )
        self.memory_budget = Gauge(
            "magistream_memory_budget_bytes",
            "Admission's budget for KV cache and latents (on CUDA: free after loading less the "
            "reserve).",
            ["device"],
            registry=r,
        )
        self.worker_resident = Gauge(
            "magistream_worker_resident_bytes",
            "Resident set (VmRSS) of the worker process (rank 0).",
            registry=r,
        )
        self._reported_device: str | None = None  # the device the gauges above are labelled with
        self.prompt_updates = Counter(
            "magistream_prompt_updates",
            "Prompts pushed to running sessions, by result.",
            ["result"],
            registry=r,
        )
        self.encode = Histogram(
            "magistream_encode_seconds",
            "Encoding one chunk for the wire, by output encoding.",
            ["encoding"],
            buckets=_STEP_BUCKETS_S,
            registry=r,
        )
        self.worker_restarts = Counter(
            "magistream_worker_restarts", "Worker processes restarted after dying.", registry=r
        )
        self.worker_up = Gauge(
            "magistream_worker_up", "1 when the worker is loaded and answering.", registry=r
        )
        self.auth_failures = Counter(
            "magistream_auth_failures",
            "Calls and scrapes refused for their credentials, by reason (missing, invalid_token, "
            "not_loopback, no_client_cert, tls_handshake, scrape_only, no_metrics; on the HTTP "
            "port also http_not_loopback, http_host, http_origin).",
            ["reason"],
            registry=r,
        )
        self.grpc_calls = Counter(
            "magistream_grpc_calls",
            "Finished gRPC calls, by method and status code.",
            ["method", "code"],
            registry=r,
        )
        self.realtime_calls = Counter(
            "magistream_realtime_calls",
            "Finished WebSocket realtime sessions (/v1/realtime), by gRPC status code name "
            "(OK: finished or cancelled by the client's cancel; CANCELLED: the connection went).",
            ["code"],
            registry=r,
        )

    def observe_device_memory(self, memory: DeviceMemory | None) -> None:
        """Set the device gauges from the worker's report; None (the worker is gone, or
        restarting) removes them rather than leave a dead worker's figures."""
        device_gauges = (
            self.device_memory_total,
            self.device_memory_free,
            self.device_memory_allocated,
            self.device_memory_reserved,
            self.memory_budget,
        )
        device = None if memory is None else memory.device
        if device != self._reported_device:  # a restarted worker may run on another device
            for gauge in device_gauges:
                gauge.clear()
            self._reported_device = device
        if memory is None:
            self.worker_resident.set(0)
            return
        d = device
        self.device_memory_total.labels(d).set(memory.total_bytes)
        self.device_memory_free.labels(d).set(memory.free_bytes)
        if memory.allocated_bytes is not None:
            self.device_memory_allocated.labels(d).set(memory.allocated_bytes)
        if memory.reserved_bytes is not None:
            self.device_memory_reserved.labels(d).set(memory.reserved_bytes)
        self.memory_budget.labels(d).set(memory.budget_bytes)
        self.worker_resident.set(memory.worker_resident_bytes)

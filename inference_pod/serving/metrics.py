"""Prometheus metrics of one server instance, all prefixed ``lipsync_``.

Each server owns its own CollectorRegistry (tests run several servers in one process). The operator's
autoscaler reads ``lipsync_queue_depth``, ``lipsync_inflight_requests`` and ``lipsync_sessions_utilization``;
the chart's dashboards read the rest by these exact names.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    start_http_server,
)

from inference_pod.errors import Unavailable

log = logging.getLogger(__name__)
disable_created_metrics()  # the *_created series double the exposition and no dashboard reads them

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128)
SPEECH_LATENCY_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0)
LOAD_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.frames_generated = Counter(
            "lipsync_frames_generated", "Frames returned, by model and where they came from (model or cache)",
            ["model", "source"], registry=r)
        self.request_duration = Histogram(
            "lipsync_request_duration_seconds", "Server-side duration of an RPC, by method and status code",
            ["method", "code"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram(
            "lipsync_batch_size", "Items per device batch", ["model"], buckets=BATCH_BUCKETS, registry=r)
        self.inference_duration = Histogram(
            "lipsync_inference_duration_seconds", "Duration of one device batch (engine.predict)", ["model"],
            buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge(
            "lipsync_queue_depth", "Frames waiting for a device batch, by model", ["model"], registry=r)
        self.inflight_requests = Gauge(
            "lipsync_inflight_requests", "RPCs being served right now", registry=r)
        self.cache_requests = Counter(
            "lipsync_cache_requests", "Cache lookups by kind (frame, features) and result (hit, miss, error)",
            ["kind", "result"], registry=r)
        self.cache_bypass = Counter(
            "lipsync_cache_bypass", "Cache operations skipped because the cache backend failed or was down",
            registry=r)
        self.model_loads = Counter(
            "lipsync_model_loads", "Model load attempts by source tier (memory, store, zip, registry) and result",
            ["model", "source", "result"], registry=r)
        self.model_load_duration = Histogram(
            "lipsync_model_load_duration_seconds", "Time to make a model resident (extract, download, build)",
            buckets=LOAD_BUCKETS, registry=r)
        self.models_resident = Gauge(
            "lipsync_models_resident", "Models loaded in memory", registry=r)
        self.device_memory = Gauge(
            "lipsync_device_memory_bytes",
            "Memory by kind: models (estimated, resident models), allocated/reserved/total (CUDA device)",
            ["kind"], registry=r)
        self.full_frame_jpegs = Counter(
            "lipsync_full_frame_jpegs", "Full-frame JPEGs by how they were made: spliced (only the mouth region "
            "encoded, the rest from the template's encoding) or plain (the whole frame encoded)",
            ["model", "path"], registry=r)
        self.benchmark_identity_network = Gauge(
            "lipsync_benchmark_identity_network", "1: a benchmark-only identity network replaces every model's "
            "U-Net (frames are the templates' own regions, not lip-sync)", registry=r)
        # Live sessions (serving.session). Active over max is a pod's session load (autoscaling, placement).
        self.sessions_active = Gauge(
            "lipsync_sessions_active", "Live sessions running now, by model", ["model"], registry=r)
        self.sessions_max = Gauge(
            "lipsync_sessions_max", "Live sessions this pod admits at once (--max-sessions; 0: no limit)",
            registry=r)
        self.sessions_utilization = Gauge(
            "lipsync_sessions_utilization", "Live sessions running over the most admitted (active / --max-sessions; "
            "0 without a limit): the pod's session load, an autoscaling target", registry=r)
        self.sessions_refused = Counter(
            "lipsync_sessions_refused", "Sessions refused because the pod ran --max-sessions already", registry=r)
        self.session_frames = Counter(
            "lipsync_session_frames", "Frames sessions emitted, by kind: speaking, idle_cached (no network call), "
            "idle_computed, repeated (not ready at its tick: the previous image again)", ["model", "kind"],
            registry=r)
        self.session_frames_dropped = Counter(
            "lipsync_session_frames_dropped", "Session frames a slow reader never got (its outbox was full)",
            ["model"], registry=r)
        self.session_speech_latency = Histogram(
            "lipsync_session_speech_latency_seconds", "From audio arriving at an idle session to the tick that "
            "plays it (look-ahead + render-ahead + at most a tick)", ["model"], buckets=SPEECH_LATENCY_BUCKETS,
            registry=r)
        self.session_barge_ins = Counter(
            "lipsync_session_barge_ins", "Clears (barge-ins) sessions received", ["model"], registry=r)
        # Labels are created up front so dashboards see zeros rather than absent series.
        for kind in ("frame", "features"):
            for result in ("hit", "miss", "error"):
                self.cache_requests.labels(kind=kind, result=result)

    def watch_device_memory(self, kind: str, read: Callable[[], float]) -> None:
        """Read ``kind`` at scrape time (device memory changes without any request passing by)."""
        self.device_memory.labels(kind=kind).set_function(read)

    def exposition(self) -> bytes:
        """The text format, for tests and for a gateway that serves /metrics itself."""
        return generate_latest(self.registry)

    def sample(self, name: str, labels: dict[str, str] | None = None) -> float:
        """Current value of one series (0 when absent), e.g. ``sample("lipsync_frames_generated_total", ...)``."""
        value = self.registry.get_sample_value(name, labels or {})
        return 0.0 if value is None else value


class MetricsHttpServer:
    """The /metrics endpoint on its own port (prometheus_client's threaded WSGI server)."""

    def __init__(self, metrics: Metrics, host: str, port: int) -> None:
        try:
            self._server, self._thread = start_http_server(port, addr=host, registry=metrics.registry)
        except OSError as exc:  # e.g. [Errno 98] Address already in use
            raise Unavailable(f"cannot listen on {host}:{port} (metrics port, --metrics-port): {exc}") from None
        self.port = self._server.server_port
        log.info("metrics on http://%s:%d/metrics", host, self.port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

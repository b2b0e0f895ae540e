"""What the front doors show, as plain dataclasses: each door renders them in its own protocol.

Fields are declared in the order of the matching protobuf messages (lipsync.v1), so the HTTP rendering
(``dataclasses.asdict``) and the gRPC one (field by field) list the same names in the same order. Enums are
their short lower-case names ("loaded"), as HTTP has always shown them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

LOADED = "loaded"  # resident: requests go straight to its batcher
AVAILABLE = "available"  # a local package (extracted or zip): loads on first request


@dataclass(frozen=True)
class ModelView:
    name: str
    version: str
    state: str  # LOADED or AVAILABLE
    location: str  # memory, store or zip
    audio_mode: str
    fps: int
    frame_count: int
    default_track_frames: int = 0
    memory_bytes: int = 0
    queue_depth: int = 0
    idle_seconds: float = 0.0
    device_memory_bytes: int = 0
    host_memory_bytes: int = 0
    mapped_memory_bytes: int = 0


@dataclass(frozen=True)
class LoadResult:
    model: ModelView
    source: str  # memory, store, zip or registry
    load_ms: float


@dataclass(frozen=True)
class RegistryPackageView:
    name: str
    version: str
    size: int
    sha256: str
    url: str


@dataclass(frozen=True)
class RegistryListing:
    registry_url: str
    packages: list[RegistryPackageView] = field(default_factory=list)


@dataclass(frozen=True)
class ModelStatsView:
    name: str
    version: str
    queue_depth: int
    frames_generated: int
    frames_from_cache: int
    batches: int
    mean_batch_size: float
    sessions_active: int = 0


@dataclass(frozen=True)
class CacheStatsView:
    backend: str
    hits: int
    misses: int
    errors: int
    bypassed: int


@dataclass(frozen=True)
class StatsView:
    server_version: str
    uptime_seconds: float
    inflight_requests: int
    draining: bool
    device: str
    precision: str
    max_batch: int
    models: list[ModelStatsView]
    cache: CacheStatsView
    models_resident: int
    memory_budget_bytes: int
    models_memory_bytes: int
    sessions_active: int = 0  # live sessions admitted and running (DataPlane.sessions_active)
    max_sessions: int = 0  # --max-sessions; 0: no limit
    sessions_refused: int = 0  # since the pod started


@dataclass(frozen=True)
class Ports:
    grpc: int | None = None
    http: int | None = None
    metrics: int | None = None


@dataclass(frozen=True)
class StatusView:
    """HTTP /status: the pod's state, settings and ports."""

    status: str
    server_version: str
    uptime_seconds: float
    draining: bool
    device: str
    precision: str
    max_batch: int
    inflight_requests: int
    models_resident: list[str]
    models_available: list[str]
    cache_backend: str
    registry_url: str | None
    api_keys_required: bool
    health_requires_key: bool
    websocket_connections: int
    ports: Ports
    sessions_active: int = 0
    max_sessions: int = 0

"""The operator's calls to a pool pod's gRPC API (at its pod IP): what it holds, its demand, load and unload.

Only the generated stubs and grpcio: the operator never imports the inference stack (torch).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc

from lipsync.v1 import lipsync_pb2 as pb
from lipsync.v1 import lipsync_pb2_grpc as pb_grpc


class PodUnreachable(Exception):
    """The pod did not answer (or refused): it is treated as gone for this round."""


@dataclass(frozen=True)
class PodReport:
    memory_budget_bytes: int             # 0: unlimited
    loaded: dict[str, int]               # model -> memory_bytes, for every resident model
    versions: dict[str, str]             # model -> loaded version
    frames: dict[str, int]               # model -> frames generated so far (a counter)
    queue_depth: dict[str, int]          # model -> frames waiting
    draining: bool
    sessions: dict[str, int] = field(default_factory=dict)   # model -> live sessions running now
    fps: dict[str, int] = field(default_factory=dict)        # model -> its frames per second (a session's rate)
    max_sessions: int = 0                # the pod's --max-sessions (0: no limit)


class PodClient:
    def __init__(self, address: str, *, api_key: str | None = None, timeout_s: float = 10.0,
                 load_timeout_s: float = 600.0):
        self.address = address
        self.timeout_s = timeout_s
        self.load_timeout_s = load_timeout_s
        self._metadata = (("x-api-key", api_key),) if api_key else ()
        self._channel = grpc.insecure_channel(address)
        self._stub = pb_grpc.LipSyncStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> PodClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, method, request, timeout: float):
        try:
            return method(request, timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise PodUnreachable(f"{self.address}: {exc.code().name}: {exc.details()}") from None

    def report(self) -> PodReport:
        models = self._call(self._stub.ListModels, pb.ListModelsRequest(), self.timeout_s).models
        stats = self._call(self._stub.GetStats, pb.GetStatsRequest(), self.timeout_s)
        loaded = {m.name: m.memory_bytes for m in models if m.state == pb.MODEL_STATE_LOADED}
        return PodReport(
            memory_budget_bytes=stats.memory_budget_bytes, loaded=loaded,
            versions={m.name: m.version for m in models if m.name in loaded},
            frames={m.name: m.frames_generated for m in stats.models},
            queue_depth={m.name: m.queue_depth for m in stats.models}, draining=stats.draining,
            sessions={m.name: m.sessions_active for m in stats.models if m.sessions_active},
            fps={m.name: m.fps for m in models if m.name in loaded}, max_sessions=stats.max_sessions)

    def load(self, name: str, version: str = "") -> int:
        """Load (from the pod's registry if need be); returns the model's memory_bytes."""
        reply = self._call(self._stub.LoadModel, pb.LoadModelRequest(name=name, version=version),
                           self.load_timeout_s)
        return reply.model.memory_bytes

    def unload(self, name: str) -> bool:
        return self._call(self._stub.UnloadModel, pb.UnloadModelRequest(name=name), self.load_timeout_s).unloaded

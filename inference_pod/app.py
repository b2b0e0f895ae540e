"""The composition root: one pod's data plane, its front doors, its ports and its lifecycle.

``Pod`` builds a ``DataPlane`` (inference_pod.serving) and hands only that to each front door: the gRPC
server (``api.grpc``), the HTTP gateway (``api.http``) and the metrics port. It binds their ports (a port in
use is one clear error, with nothing left running), preloads, turns healthy, and on SIGTERM/SIGINT drains:
health NOT_SERVING, new calls refused, in-flight calls given the grace period, ports released, the data
plane closed. Nothing below this module knows it exists.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable

from inference_pod.api.grpc.server import GrpcServer
from inference_pod.api.http.gateway import HttpGateway
from inference_pod.serving.data_plane import DataPlane, EngineFactory
from inference_pod.serving.metrics import MetricsHttpServer
from inference_pod.serving.settings import Settings
from inference_pod.serving.views import Ports

log = logging.getLogger(__name__)


class Pod:
    """One pod: build with settings, ``await start()``, ``await stop()`` (or ``run()`` for the CLI)."""

    def __init__(self, settings: Settings, *, engine_factory: EngineFactory | None = None):
        self.data_plane = DataPlane(settings, engine_factory=engine_factory)
        self.settings = self.data_plane.settings
        self.grpc: GrpcServer | None = None
        self.gateway: HttpGateway | None = None  # when --http-port is not 0
        self._metrics_http: MetricsHttpServer | None = None
        self._stopped = asyncio.Event()
        self._stopping: asyncio.Task | None = None

    @property
    def port(self) -> int | None:
        """The gRPC port (the one asked for, or the one the system chose for port 0)."""
        return self.grpc.port if self.grpc is not None else None

    async def start(self) -> Pod:
        """Bind every port (a port in use is one clear error, with nothing left running), then preload."""
        s = self.settings
        try:
            self.grpc = GrpcServer(self.data_plane)
            await self.grpc.start()
            if s.metrics_port:
                self._metrics_http = MetricsHttpServer(self.data_plane.metrics, s.host, s.metrics_port)
            if s.http_port:
                self.gateway = await HttpGateway(self.data_plane).start()
        except BaseException:
            await self._release_ports()
            self.data_plane.cpu_pool.shutdown(wait=False)
            raise
        self.data_plane.ports = Ports(grpc=self.port, http=self.gateway.port if self.gateway else None,
                                      metrics=self._metrics_http.port if self._metrics_http else None)
        await self.data_plane.start()
        log.info("serving lipsync.v1 on %s:%d (%s, %s, max batch %d)%s", s.host, self.port, s.device, s.precision,
                 s.max_batch, " with TLS" if s.tls_cert else "")
        return self

    async def stop(self, grace_s: float | None = None) -> None:
        """Drain, give in-flight calls up to ``grace_s`` to finish, then release everything. Idempotent."""
        if self._stopping is None:
            self._stopping = asyncio.get_running_loop().create_task(self._stop(grace_s))
        await asyncio.shield(self._stopping)

    async def _stop(self, grace_s: float | None) -> None:
        await self.data_plane.drain()
        grace = self.settings.shutdown_grace_s if grace_s is None else grace_s
        deadline = time.monotonic() + grace
        # Keep listening while in-flight calls finish, so probes read NOT_SERVING and new calls get a clean
        # UNAVAILABLE from us rather than a refused connection; then stop listening.
        await self.data_plane.wait_idle(deadline)
        await self._release_ports(max(0.0, deadline - time.monotonic()))
        await self.data_plane.close()
        self._stopped.set()
        log.info("stopped")

    async def _release_ports(self, grace_s: float = 0.0) -> None:
        if self.gateway is not None:
            await self.gateway.stop()
        if self.grpc is not None:
            await self.grpc.stop(grace_s)
        if self._metrics_http is not None:
            self._metrics_http.close()
            self._metrics_http = None

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def run(self, on_ready: Callable[[Pod], None] | None = None) -> None:
        """Serve until SIGTERM or SIGINT, then shut down gracefully (the ``lipsync serve`` entry point).
        ``on_ready(pod)`` is called once the ports are bound and the preload list is loaded."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        await self.start()
        if on_ready is not None and self._stopping is None:
            on_ready(self)
        await self.wait_stopped()

    def _on_signal(self, sig: signal.Signals) -> None:
        log.info("received %s", sig.name)
        if self._stopping is None:
            self._stopping = asyncio.get_running_loop().create_task(self._stop(None))

"""Health: state of the data plane that every front door reads and none owns.

The pod is ``starting`` (binding ports, preloading), ``healthy`` (taking requests) or ``draining`` (shutting
down: new calls refused, in-flight ones finishing). Each model named by the pod is serving (resident) or not
(known, not loaded). The gRPC health service, HTTP ``/health`` (pod and ``?service=NAME``) and readiness
all read this one object; a front door that has to push changes somewhere (grpcio's Watch streams) registers
a listener, so nothing here ever calls a door.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable

POD = ""  # the service name of the pod itself, as grpc.health.v1 spells it


class PodState(enum.Enum):
    STARTING = "starting"
    HEALTHY = "healthy"
    DRAINING = "draining"


# (service, serving) for a change of one name's health; service POD is the pod itself.
Listener = Callable[[str, bool], Awaitable[None]]
DrainListener = Callable[[], Awaitable[None]]


class Health:
    def __init__(self) -> None:
        self.state = PodState.STARTING
        self._models: dict[str, bool] = {}
        self._listeners: list[Listener] = []
        self._drain_listeners: list[DrainListener] = []

    def subscribe(self, on_change: Listener, on_drain: DrainListener | None = None) -> None:
        """``on_change`` hears every change from now on (``snapshot`` gives the state so far); ``on_drain``
        hears the pod start draining."""
        self._listeners.append(on_change)
        if on_drain is not None:
            self._drain_listeners.append(on_drain)

    def snapshot(self) -> dict[str, bool]:
        """Every name's serving flag, the pod's (``POD``) included."""
        return {POD: self.serving, **{name: self.model(name) is True for name in self._models}}

    @property
    def serving(self) -> bool:
        return self.state is PodState.HEALTHY

    @property
    def draining(self) -> bool:
        return self.state is PodState.DRAINING

    def model(self, name: str) -> bool | None:
        """A model's serving flag (never while the pod drains), or None for a name this pod does not know."""
        if name == POD:
            return self.serving
        serving = self._models.get(name)
        return None if serving is None else serving and not self.draining

    async def set_model(self, name: str, serving: bool) -> None:
        self._models[name] = serving
        await self._tell(name, serving)

    async def set_healthy(self) -> None:
        if self.state is PodState.STARTING:
            self.state = PodState.HEALTHY
            await self._tell(POD, True)

    async def drain(self) -> bool:
        """Enter draining (once); True when this call did it."""
        if self.state is PodState.DRAINING:
            return False
        self.state = PodState.DRAINING
        await self._tell(POD, False)
        for listener in self._drain_listeners:
            await listener()
        return True

    async def _tell(self, name: str, serving: bool) -> None:
        for listener in self._listeners:
            await listener(name, serving)

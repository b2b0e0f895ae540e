"""How much memory a loaded model holds, and where: the one type the engine reports and the model store's
budget, the metrics and the model views read. Light on purpose (no torch): the serving layer types against it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MemoryUse:
    """Bytes an engine holds, by where. ``device``: what the network's device holds for this model (its
    weights, and its templates when they are device-resident); ``host``: CPU memory (crops or their PNGs,
    the staging buffer, decoded full frames, template JPEGs). On a CPU engine both are RAM, split the same
    way so the modes compare. ``templates``: the template store itself (device regions, host crops or
    PNGs), the part that grows with the template count, wherever it lives. ``mapped``: prepared templates
    mapped from the node's store (crops, border strips, template JPEGs): file-backed pages of the page
    cache, shared by every process on the node that maps the same character and reclaimable by the kernel,
    so not in ``host``. The model store's memory budget counts ``total``, the memory this process holds
    alone; a node holds each character's ``mapped`` bytes once (see docs/ARCHITECTURE.md)."""

    device: int
    host: int
    templates: int
    mapped: int = 0

    @property
    def total(self) -> int:
        return self.device + self.host

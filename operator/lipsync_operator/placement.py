"""Where the copies of pooled models run: a pure function from (pods, models, current placement) to the next.

One call decides, in this order:

1. Copies on pods that are gone or no longer schedulable (draining, terminating) are dropped from the plan,
   and re-placed below: nothing waits on a dead pod.
2. Each model wants ``ceil(demand / demand per copy)`` copies, between its min and max. Scaling down has
   hysteresis: a copy goes only once the others would still run below ``SCALE_DOWN_AT`` of their target,
   so a demand hovering at a boundary does not load and unload a model every round. A model whose demand
   is not measured yet (None, e.g. the first round after an operator restart) keeps its copies.
3. A copy that already runs stays where it is (no moves for a placement that works). Surplus copies leave
   the most loaded pods first.
4. Missing copies are placed busiest model first, each on a pod without a copy of that model, with the memory
   for it and the load headroom for its share of the demand (under LOAD_TARGET of its capacity); among those,
   the pod with the least memory left (best fit: empty pods stay empty, so the pool can shrink). Copies
   without demand leave 1 - PACKING of each pod's memory free, for the extra copies of hot models.
5. A pod that carries more demand than it can serve moves copies it does not need to pods with headroom.
6. Copies that fit nowhere are reported, with the numbers (``Placement.full``); more pods resolve it.

Deterministic: the same input gives the same plan (ties broken by name). Footprints and budgets are bytes,
demand and capacity frames per second. The operator and ``lipsync bench pool`` both run this code.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from operator import attrgetter

SCALE_DOWN_AT = 0.75   # remove a copy once the rest would carry at most this share of their target demand
LOAD_TARGET = 0.85     # a new copy goes where the pod's load stays under this share of its capacity
PACKING = 0.9          # copies without demand fill a pod's memory only to this share: the rest is for the
                       # extra copies of hot models, which then find room on every pod
MIB = 1 << 20


@dataclass(frozen=True)
class Pod:
    name: str
    memory_bytes: int          # the pod's model memory budget
    capacity_fps: float        # frames per second it can generate, all its models together
    schedulable: bool = True   # False: draining or terminating; its copies move elsewhere


@dataclass(frozen=True)
class Model:
    name: str
    footprint_bytes: int       # memory one copy takes on a pod
    demand_fps: float | None = 0.0   # measured, all copies together; None: not measured yet (copies stay)
    demand_per_copy: float = 25.0   # what one copy should carry
    min_copies: int = 1
    max_copies: int = 1

    def __post_init__(self):
        if self.min_copies < 0 or self.max_copies < self.min_copies:
            raise ValueError(f"{self.name}: need 0 <= min copies <= max copies, got "
                             f"{self.min_copies}..{self.max_copies}")
        if self.demand_per_copy <= 0:
            raise ValueError(f"{self.name}: demand per copy must be positive, got {self.demand_per_copy}")


@dataclass(frozen=True)
class PoolFull:
    """Copies that fit nowhere, and the numbers that say why."""

    missing_copies: int
    models: tuple[str, ...]
    memory_needed_bytes: int     # of the missing copies
    memory_free_bytes: int       # on schedulable pods, all together
    largest_free_bytes: int      # on any one schedulable pod
    demand_unplaced_fps: float   # the missing copies' share of their models' demand
    pods: int                    # schedulable pods
    pod_memory_bytes: int        # the largest pod budget

    @property
    def pods_to_add(self) -> int:
        """A lower bound on the pods that would make room (by memory; load may need more)."""
        return max(1, math.ceil(self.memory_needed_bytes / max(1, self.pod_memory_bytes)))

    def message(self) -> str:
        names = ", ".join(self.models[:5]) + (f" and {len(self.models) - 5} more" if len(self.models) > 5 else "")
        return (f"{self.missing_copies} copies of {len(self.models)} models ({names}) fit on none of {self.pods} "
                f"pods: they need {self.memory_needed_bytes / MIB:,.0f} MiB and {self.demand_unplaced_fps:,.1f} "
                f"frames/s; {self.memory_free_bytes / MIB:,.0f} MiB free in all, at most "
                f"{self.largest_free_bytes / MIB:,.0f} MiB on one pod; add pods (about {self.pods_to_add} more)")


@dataclass
class PodUse:
    memory_bytes: int = 0
    load_fps: float = 0.0


@dataclass
class Placement:
    copies: dict[str, tuple[str, ...]]           # model -> pods holding a copy, sorted
    wanted: dict[str, int]                        # model -> copies it should have
    load: list[tuple[str, str]]                   # (model, pod): copies to add
    unload: list[tuple[str, str]]                 # (model, pod): copies to remove (from live pods)
    use: dict[str, PodUse]                        # pod -> memory and load after the plan
    missing: dict[str, int] = field(default_factory=dict)   # model -> copies that fit nowhere
    full: PoolFull | None = None

    @property
    def moves(self) -> int:
        return len(self.load) + len(self.unload)


def wanted_copies(model: Model, current: int) -> int:
    if model.demand_fps is None:     # no measure yet (e.g. just after an operator restart): keep what runs
        return max(model.min_copies, min(model.max_copies, current))
    up = math.ceil(model.demand_fps / model.demand_per_copy - 1e-9) if model.demand_fps > 0 else 0
    if current <= up:
        n = up
    else:   # shrink only to what keeps each copy under SCALE_DOWN_AT of its target
        n = min(current, math.ceil(model.demand_fps / (model.demand_per_copy * SCALE_DOWN_AT) - 1e-9))
    return max(model.min_copies, min(model.max_copies, n))


def place(pods: Iterable[Pod], models: Iterable[Model], current: Mapping[str, Collection[str]]) -> Placement:
    """The next placement. ``current``: model -> pods that hold (or are loading) a copy; models not in
    ``models`` (deleted) lose all their copies; pods not in ``pods`` are gone."""
    pod_by_name = {p.name: p for p in pods}
    live = {name for name, p in pod_by_name.items() if p.schedulable}
    use = {name: PodUse() for name in pod_by_name}
    ordered = sorted(models, key=attrgetter("name"))
    by_name = {m.name: m for m in ordered}
    unload: list[tuple[str, str]] = []

    # Copies of deleted models come off every live pod.
    for name in sorted(set(current) - set(by_name)):
        unload.extend((name, pod) for pod in sorted(set(current[name])) if pod in pod_by_name)

    # 1-3: keep what runs on schedulable pods, within memory; drop the rest.
    kept: dict[str, list[str]] = {}
    wanted: dict[str, int] = {}
    shares: dict[str, float] = {}     # each copy's part of its model's demand
    surplus, short = [], []
    budget = {name: p.memory_bytes for name, p in pod_by_name.items()}
    for m in ordered:   # the hot loop at 10,000 models: plain and local
        name, footprint = m.name, m.footprint_bytes
        held = current.get(name, ())
        if len(held) > 1:
            held = sorted(set(held))
        if m.demand_fps == 0:
            want, share = m.min_copies, 0.0      # what wanted_copies says for no demand
        else:
            want = wanted_copies(m, sum(1 for p in held if p in live))
            share = (m.demand_fps or 0.0) / want if want else 0.0
        keep = []
        for pod in held:
            if pod in live:
                u = use[pod]
                if u.memory_bytes + footprint <= budget[pod]:
                    keep.append(pod)
                    u.memory_bytes += footprint
                    u.load_fps += share
                    continue
            if pod in pod_by_name:                # draining, or over the budget (a footprint grew)
                unload.append((name, pod))        # (a pod that is gone has nothing to unload)
        kept[name], wanted[name], shares[name] = keep, want, share
        if len(keep) > want:
            surplus.append(m)
        elif len(keep) < want:
            short.append(m)

    for m in surplus:
        extra = len(kept[m.name]) - wanted[m.name]
        # The remaining copies each carry the model's share; the surplus ones carried it too until now.
        for pod in sorted(kept[m.name], key=lambda p: (-_busy(use[p], pod_by_name[p]), p))[:extra]:
            kept[m.name].remove(pod)
            use[pod].memory_bytes -= m.footprint_bytes
            use[pod].load_fps -= shares[m.name]
            unload.append((m.name, pod))

    # 4: place what is missing, busiest model first (first fit decreasing by share, then by size).
    load: list[tuple[str, str]] = []
    missing: dict[str, int] = {}
    last_idle: str | None = None   # where the last copy without demand went: see _still_best
    for m in sorted(short, key=lambda m: (-shares[m.name], -m.footprint_bytes, m.name)):
        share = shares[m.name]
        for _ in range(wanted[m.name] - len(kept[m.name])):
            dest: str | None
            if share <= 0 and last_idle is not None and _still_best(m, last_idle, kept[m.name], pod_by_name,
                                                                    use):
                dest = last_idle
            else:
                # Below min copies a busy pod, or the reserve, is still better than no copy at all.
                dest = _choose(m, share, kept[m.name], pod_by_name, live, use,
                               overload_ok=len(kept[m.name]) < max(1, m.min_copies))
            last_idle = dest if share <= 0 else None
            if dest is None:
                missing[m.name] = missing.get(m.name, 0) + 1
                continue
            kept[m.name].append(dest)
            use[dest].memory_bytes += m.footprint_bytes
            use[dest].load_fps += share
            load.append((m.name, dest))

    # 5: an overloaded pod hands copies to pods with headroom (a move: load there first, then unload here).
    overloaded = sorted((p for p in live if use[p].load_fps > pod_by_name[p].capacity_fps + 1e-9),
                        key=lambda p: (-_busy(use[p], pod_by_name[p]), p))
    holders: dict[str, list[str]] = {p: [] for p in overloaded}
    if overloaded:
        for name, held in kept.items():
            for pod in held:
                if pod in holders and shares[name] > 0:
                    holders[pod].append(name)
    for pod in overloaded:
        for name in sorted(holders[pod], key=lambda n: (-shares[n], n)):
            if use[pod].load_fps <= pod_by_name[pod].capacity_fps + 1e-9:
                break
            m = by_name[name]
            share = shares[name]
            target = _choose(m, share, kept[name], pod_by_name, live, use, overload_ok=False)
            if target is None:
                continue
            kept[name].remove(pod)
            kept[name].append(target)
            for p, sign in ((pod, -1), (target, 1)):
                use[p].memory_bytes += sign * m.footprint_bytes
                use[p].load_fps += sign * share
            if (name, pod) in load:       # placed this round: just place it elsewhere
                load.remove((name, pod))
            else:
                unload.append((name, pod))
            load.append((name, target))

    full = None
    if missing:
        free = [pod_by_name[p].memory_bytes - use[p].memory_bytes for p in live]
        full = PoolFull(
            missing_copies=sum(missing.values()), models=tuple(sorted(missing)),
            memory_needed_bytes=sum(by_name[n].footprint_bytes * k for n, k in missing.items()),
            memory_free_bytes=max(0, sum(free)), largest_free_bytes=max([0, *free]),
            demand_unplaced_fps=sum(shares[n] * k for n, k in missing.items()),
            pods=len(live), pod_memory_bytes=max([0, *(pod_by_name[p].memory_bytes for p in live)]))
    return Placement(copies={n: tuple(sorted(p)) if len(p) > 1 else tuple(p) for n, p in kept.items()},
                     wanted=wanted,
                     load=sorted(load), unload=sorted(unload), use=use, missing=missing, full=full)


def _busy(u: PodUse, pod: Pod) -> float:
    return u.load_fps / pod.capacity_fps if pod.capacity_fps > 0 else math.inf


def _choose(m: Model, share: float, held: list[str], pods: dict[str, Pod], live: set[str],
            use: dict[str, PodUse], *, overload_ok: bool) -> str | None:
    """The pod for one more copy of ``m``, or None. Runs for every pod per copy placed: kept lean."""
    best_key, best = None, None
    footprint, idle = m.footprint_bytes, share <= 0
    for name in live:
        if name in held:
            continue
        pod, u = pods[name], use[name]
        free = pod.memory_bytes - u.memory_bytes - footprint
        if free < 0:
            continue
        in_reserve = idle and free < pod.memory_bytes * (1 - PACKING)
        fits_load = u.load_fps + share <= pod.capacity_fps * LOAD_TARGET + 1e-9
        if (in_reserve or not fits_load) and not overload_ok:
            continue
        # Outside the reserve and with load headroom first; then best fit by memory; then the less busy pod.
        key = (in_reserve, not fits_load, free,
               u.load_fps / pod.capacity_fps if pod.capacity_fps > 0 else math.inf, name)
        if best_key is None or key < best_key:
            best_key, best = key, name
    return best


def _still_best(m: Model, name: str, held: list[str], pods: dict[str, Pod], use: dict[str, PodUse]) -> bool:
    """Whether the pod the previous copy without demand went to is still _choose's answer for ``m`` (also
    without demand), without scanning every pod. Copies without demand come last and change only the pod they
    go to, whose free memory only shrinks: while it still has room outside the reserve and load headroom, it
    stays the best fit. This turns placing thousands of idle models from pods x models into about models."""
    pod, u = pods[name], use[name]
    free = pod.memory_bytes - u.memory_bytes - m.footprint_bytes
    return (name not in held and free >= pod.memory_bytes * (1 - PACKING) and free >= 0
            and u.load_fps <= pod.capacity_fps * LOAD_TARGET + 1e-9)


def pods_needed(models: Iterable[Model], current_copies: Mapping[str, int], pod_memory_bytes: int,
                pod_capacity_fps: float, target_load: float) -> int:
    """Pods a pool needs: for the memory of the copies its models want (``current_copies``: how many each has
    now, for the hysteresis; idle copies fill PACKING of a pod), for their demand at ``target_load`` of each
    pod's capacity, and one pod per copy of the model with the most copies."""
    memory = demand = 0.0
    widest = 0
    for m in models:
        want = m.min_copies if m.demand_fps == 0 else wanted_copies(m, current_copies.get(m.name, 0))
        memory += want * m.footprint_bytes
        demand += m.demand_fps or 0.0
        if want > widest:
            widest = want
    by_memory = math.ceil(memory / (pod_memory_bytes * PACKING)) if pod_memory_bytes > 0 else 0
    by_load = math.ceil(demand / (pod_capacity_fps * target_load)) if pod_capacity_fps > 0 else 0
    return max(by_memory, by_load, widest)

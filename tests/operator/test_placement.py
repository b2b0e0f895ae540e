"""The placement core: budgets, distinct pods, few moves, copies following demand, dead pods, a full pool."""

from __future__ import annotations

import random

import pytest

from lipsync_operator.placement import MIB, Model, Pod, place, pods_needed, wanted_copies

GIB = 1024 * MIB


def pods(n: int, memory: int = 4 * GIB, fps: float = 100.0, **kw) -> list[Pod]:
    return [Pod(f"pod-{i}", memory, fps, **kw) for i in range(n)]


def models(n: int, footprint: int = GIB, **kw) -> list[Model]:
    return [Model(f"m{i:03d}", footprint, **kw) for i in range(n)]


def check_invariants(plan, pod_list, model_list) -> None:
    budget = {p.name: p.memory_bytes for p in pod_list}
    size = {m.name: m.footprint_bytes for m in model_list}
    used: dict[str, int] = {}
    for name, held in plan.copies.items():
        assert len(held) == len(set(held)), f"{name}: two copies on one pod"
        for pod in held:
            used[pod] = used.get(pod, 0) + size[name]
    for pod, b in used.items():
        assert b <= budget[pod], f"{pod} over its budget"
        assert plan.use[pod].memory_bytes == b


def apply(current: dict, plan) -> dict:
    """What the operator's actions leave behind: loads added, unloads removed."""
    out = {k: set(v) for k, v in current.items()}
    for model, pod in plan.load:
        out.setdefault(model, set()).add(pod)
    for model, pod in plan.unload:
        out.get(model, set()).discard(pod)
    return {k: tuple(sorted(v)) for k, v in out.items() if v}


@pytest.mark.parametrize("demand, current, expected", [
    (0.0, 0, 1),      # min copies
    (25.0, 1, 1),
    (26.0, 1, 2),     # up as soon as one copy would carry more than its target
    (90.0, 1, 4),     # max copies caps it
    (40.0, 2, 2),
    (30.0, 3, 2),     # two copies would carry 15 each, under 0.75 x 25: one goes
    (40.0, 3, 3),     # two would carry 20 each, over 0.75 x 25: all three stay
])
def test_wanted_copies_follow_demand_with_hysteresis(demand, current, expected):
    m = Model("m", GIB, demand_fps=demand, demand_per_copy=25.0, min_copies=1, max_copies=4)
    assert wanted_copies(m, current) == expected


def test_scaling_down_waits_for_headroom():
    m = dict(demand_per_copy=25.0, min_copies=0, max_copies=10)
    # 3 copies, demand 55: two copies would carry 27.5 each, over target -> keep 3.
    assert wanted_copies(Model("m", 1, demand_fps=55.0, **m), 3) == 3
    # demand 37: two copies carry 18.5 each, under 0.75 x 25 -> 2.
    assert wanted_copies(Model("m", 1, demand_fps=37.0, **m), 3) == 2
    # demand 0 with min 0: no copy.
    assert wanted_copies(Model("m", 1, demand_fps=0.0, **m), 3) == 0


def test_models_are_packed_within_each_pods_budget():
    pod_list, model_list = pods(3, memory=4 * GIB), models(11, footprint=GIB)
    plan = place(pod_list, model_list, {})
    check_invariants(plan, pod_list, model_list)
    assert sum(len(v) for v in plan.copies.values()) == 11
    assert plan.full is None
    # Best fit: idle models fill one pod before the next (so an emptied pool can shrink).
    per_pod = sorted(u.memory_bytes // GIB for u in plan.use.values())
    assert per_pod == [3, 4, 4]


def test_copies_of_one_model_go_to_distinct_pods():
    pod_list = pods(3, fps=100.0)
    hot = Model("hot", GIB, demand_fps=250.0, demand_per_copy=100.0, max_copies=5)
    plan = place(pod_list, [hot], {})
    assert plan.wanted["hot"] == 3
    assert plan.copies["hot"] == ("pod-0", "pod-1", "pod-2")
    # A fourth copy would need a fourth pod: the pool is full, with numbers.
    hotter = Model("hot", GIB, demand_fps=380.0, demand_per_copy=100.0, max_copies=5)
    plan = place(pod_list, [hotter], plan.copies)
    assert plan.missing == {"hot": 1}
    assert plan.full.missing_copies == 1 and plan.full.memory_needed_bytes == GIB
    assert plan.full.demand_unplaced_fps == pytest.approx(95.0)
    assert "1 copies of 1 models (hot)" in plan.full.message()


def test_a_working_placement_is_kept_and_a_new_model_moves_nothing():
    pod_list, model_list = pods(4), models(10)
    first = place(pod_list, model_list, {})
    again = place(pod_list, model_list, first.copies)
    assert again.load == [] and again.unload == [] and again.copies == first.copies
    # The same placement written in another order, with the inputs shuffled: the same answer.
    shuffled = list(model_list)
    random.Random(1).shuffle(shuffled)
    assert place(list(reversed(pod_list)), shuffled, dict(reversed(list(first.copies.items())))).copies == \
        first.copies
    more = place(pod_list, [*model_list, Model("new", GIB)], first.copies)
    assert more.unload == [] and [m for m, _ in more.load] == ["new"]


def test_a_dead_pod_is_replaced_and_a_draining_pod_is_emptied():
    pod_list, model_list = pods(3), models(6)
    plan = place(pod_list, model_list, {})
    victim = plan.copies["m000"][0]
    lost = sorted(m for m, held in plan.copies.items() if victim in held)
    survivors = [p for p in pod_list if p.name != victim]
    after = place(survivors, model_list, plan.copies)
    check_invariants(after, survivors, model_list)
    assert sorted(m for m, _ in after.load) == lost
    assert after.unload == []                      # nothing to unload from a pod that is gone
    assert all(victim not in held for held in after.copies.values())

    draining = [p if p.name != victim else Pod(p.name, p.memory_bytes, p.capacity_fps, schedulable=False)
                for p in pod_list]
    after = place(draining, model_list, plan.copies)
    assert sorted(m for m, _ in after.unload) == lost and all(p == victim for _, p in after.unload)
    assert sorted(m for m, _ in after.load) == lost and all(p != victim for _, p in after.load)


def test_copies_follow_demand_up_and_down():
    pod_list = pods(4, memory=8 * GIB, fps=100.0)
    cold = models(4, demand_per_copy=50.0, max_copies=4)
    plan = place(pod_list, cold, {})
    assert all(len(v) == 1 for v in plan.copies.values())
    current = apply({}, plan)
    spike = [Model(m.name, m.footprint_bytes, demand_fps=180.0 if m.name == "m002" else 0.0,
                   demand_per_copy=50.0, max_copies=4) for m in cold]
    up = place(pod_list, spike, current)
    assert up.wanted["m002"] == 4 and len(up.copies["m002"]) == 4
    assert [m for m, _ in up.load] == ["m002"] * 3 and up.unload == []
    current = apply(current, up)
    calm = place(pod_list, cold, current)
    assert len(calm.copies["m002"]) == 1 and [m for m, _ in calm.unload] == ["m002"] * 3
    assert calm.load == []


def test_an_overloaded_pod_hands_a_copy_to_a_pod_with_headroom():
    pod_list = pods(2, fps=100.0)
    # Both hot models sit on pod-0 (e.g. after pod-1 came back): together they need 160 of its 100 fps.
    a = Model("a", GIB, demand_fps=80.0, demand_per_copy=100.0)
    b = Model("b", GIB, demand_fps=80.0, demand_per_copy=100.0)
    plan = place(pod_list, [a, b], {"a": ["pod-0"], "b": ["pod-0"]})
    assert plan.copies == {"a": ("pod-0",), "b": ("pod-1",)} or plan.copies == {"a": ("pod-1",), "b": ("pod-0",)}
    assert len(plan.load) == 1 and len(plan.unload) == 1 and plan.load[0][0] == plan.unload[0][0]
    assert all(u.load_fps <= 100.0 for u in plan.use.values())


def test_a_full_pool_is_reported_and_resolved_by_more_pods():
    pod_list, model_list = pods(2, memory=3 * GIB), models(8)
    plan = place(pod_list, model_list, {})
    assert plan.full is not None and plan.full.missing_copies == 2
    assert plan.full.memory_needed_bytes == 2 * GIB and plan.full.memory_free_bytes == 0
    assert plan.full.pods_to_add == 1
    more = place(pods(3, memory=3 * GIB), model_list, plan.copies)
    assert more.full is None and len(more.load) == 2 and more.unload == []


def test_deleted_models_come_off_and_a_grown_footprint_moves():
    pod_list = pods(2, memory=2 * GIB)
    plan = place(pod_list, [Model("a", GIB), Model("b", GIB)], {"a": ["pod-0"], "b": ["pod-0"], "gone": ["pod-1"]})
    assert ("gone", "pod-1") in plan.unload and "gone" not in plan.copies
    grown = place(pod_list, [Model("a", GIB), Model("b", GIB + 1)], {"a": ["pod-0"], "b": ["pod-0"]})
    assert grown.copies == {"a": ("pod-0",), "b": ("pod-1",)}
    assert grown.unload == [("b", "pod-0")] and grown.load == [("b", "pod-1")]


def test_min_copies_are_placed_even_on_a_busy_pod_but_extra_copies_are_not():
    pod_list = pods(1, fps=10.0)
    plan = place(pod_list, [Model("busy", GIB, demand_fps=60.0, demand_per_copy=25.0, max_copies=3)], {})
    assert plan.copies["busy"] == ("pod-0",)
    assert plan.missing == {"busy": 2}          # distinct pods: only one exists


def test_invalid_copies_are_refused():
    with pytest.raises(ValueError, match="min copies"):
        Model("x", 1, min_copies=3, max_copies=2)
    with pytest.raises(ValueError, match="demand per copy"):
        Model("x", 1, demand_per_copy=0)


def test_unmeasured_demand_keeps_the_copies_that_run():
    pod_list = pods(3)
    current = {"m": ("pod-0", "pod-2")}
    unknown = Model("m", GIB, demand_fps=None, max_copies=3)
    plan = place(pod_list, [unknown], current)
    assert plan.copies == {"m": ("pod-0", "pod-2")} and plan.moves == 0
    idle = Model("m", GIB, demand_fps=0.0, max_copies=3)   # measured and idle: back to min copies
    assert len(place(pod_list, [idle], current).copies["m"]) == 1


def test_pods_needed_counts_memory_load_and_the_widest_model():
    ms = models(10, footprint=GIB)                       # 10 GiB of idle copies
    assert pods_needed(ms, {}, 4 * GIB, 100.0, 0.7) == 3            # 10 / (4 x 0.9) -> 3 by memory
    hot = [*ms, Model("hot", GIB, demand_fps=700.0, demand_per_copy=50.0, max_copies=5)]
    assert pods_needed(hot, {}, 64 * GIB, 100.0, 0.7) == 10         # 700 / (100 x 0.7) by load
    wide = [Model("w", GIB, demand_fps=500.0, demand_per_copy=50.0, max_copies=6)]
    assert pods_needed(wide, {}, 64 * GIB, 10_000.0, 0.7) == 6      # six copies need six pods

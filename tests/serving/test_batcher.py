"""Dynamic batching over a real engine: concurrent requests become device batches, with bounded queues."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
from conditions import wait_until_async

from inference_pod.core.engine import Engine
from inference_pod.errors import InvalidInput, Overloaded
from inference_pod.serving.batcher import Batcher, BatcherClosed
from inference_pod.serving.metrics import Metrics

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def engine(demo_character_package) -> Engine:
    return Engine.from_package(demo_character_package, max_batch=8)


def items(engine: Engine, n: int) -> list[tuple[int, np.ndarray]]:
    windows = engine.windows(engine.default_features, list(range(n)))
    return [(engine.template_index(i), windows[i]) for i in range(n)]


async def test_concurrent_requests_are_merged_into_batches(engine):
    metrics = Metrics()
    batcher = Batcher("demo", engine, metrics, max_batch=4, max_delay_s=0.05, max_queue=64)
    work = items(engine, 6)
    results = await asyncio.gather(*(batcher.submit(t, w) for t, w in work))
    await batcher.close()
    # All six were queued before the batcher ran: one full batch of 4, then the other 2.
    assert [r.batch_size for r in results] == [4, 4, 4, 4, 2, 2]
    assert batcher.batches == 2
    assert metrics.sample("lipsync_batch_size_count", {"model": "demo"}) == 2
    assert metrics.sample("lipsync_batch_size_sum", {"model": "demo"}) == 6
    assert metrics.sample("lipsync_inference_duration_seconds_count", {"model": "demo"}) == 2
    # Each item gets its own prediction: the same as predicting it alone (up to float rounding in uint8).
    for (template_id, window), result in zip(work, results, strict=True):
        alone = engine.predict([template_id], window[None])[0]
        assert np.abs(alone.astype(int) - result.prediction).max() <= 1


async def test_a_lone_request_waits_at_most_the_delay_then_runs(engine):
    batcher = Batcher("demo", engine, Metrics(), max_batch=8, max_delay_s=0.0)
    (template_id, window), = items(engine, 1)
    result = await batcher.submit(template_id, window)
    assert result.batch_size == 1 and result.prediction.shape == (320, 320, 3)
    await batcher.close()


async def test_a_lone_sequential_client_does_not_wait_for_a_batch_to_fill(engine):
    # An hour's fill wait would hold a lone request an hour; with no sign of other traffic it runs at once (the
    # 60 s limit only separates "at once" from "an hour", however busy the machine).
    batcher = Batcher("demo", engine, Metrics(), max_batch=2, max_delay_s=3600.0)
    (template_id, window), = items(engine, 1)
    for _ in range(3):
        result = await asyncio.wait_for(batcher.submit(template_id, window), timeout=60.0)
        assert result.batch_size == 1 and result.queue_s < 60.0
    # Concurrent traffic is still merged: two at once form one (full) batch.
    pair = await asyncio.gather(*(batcher.submit(t, w) for t, w in items(engine, 2)))
    assert [r.batch_size for r in pair] == [2, 2]
    await batcher.close()


async def test_full_queue_is_overloaded_and_the_rest_still_succeed(engine):
    metrics = Metrics()
    batcher = Batcher("demo", engine, metrics, max_batch=2, max_delay_s=0.01, max_queue=2)
    work = items(engine, 3)
    outcomes = await asyncio.gather(*(batcher.submit(t, w) for t, w in work), return_exceptions=True)
    assert isinstance(outcomes[2], Overloaded)
    assert all(o.prediction.shape == (320, 320, 3) for o in outcomes[:2])
    assert metrics.sample("lipsync_queue_depth", {"model": "demo"}) == 0
    await batcher.close()


class _HeldDevice:
    """The real engine behind a gate: batches reach the device and wait there until the test opens it."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.num_templates, self.audio_shape = engine.num_templates, engine.audio_shape
        self.gate = threading.Event()

    def predict(self, template_ids, windows):
        self.gate.wait(30)
        return self.engine.predict(template_ids, windows)


async def test_a_stream_waits_for_room_in_a_full_queue_and_can_leave(engine):
    """wait_for_space: a full queue holds the caller instead of refusing it; one that leaves gives its turn
    away, and the queue never grows past its limit."""
    device = _HeldDevice(engine)
    batcher = Batcher("demo", device, Metrics(), max_batch=2, max_delay_s=0.01, max_queue=2)
    work = items(engine, 8)
    # Two batches of two go to the (held) device, the most in flight; the next two fill the queue.
    ahead = []
    for k in range(3):
        ahead += [asyncio.ensure_future(batcher.submit(t, w)) for t, w in work[2 * k : 2 * k + 2]]
        await asyncio.sleep(0)  # they are queued
        await wait_until_async(lambda k=k: batcher.queue_depth == (2 if k == 2 else 0), poll=0.001,
                               what=f"batch {k} to be {'queued' if k == 2 else 'on the device'}")
    with pytest.raises(Overloaded):  # a lone request is refused at once
        await batcher.submit(*work[6])
    waiting = [asyncio.ensure_future(batcher.submit(t, w, wait_for_space=True)) for t, w in work[6:]]
    await asyncio.sleep(0)  # one turn of the loop: each submit runs up to its wait for room (no thread involved)
    assert not any(t.done() for t in waiting) and batcher.queue_depth == 2
    waiting[0].cancel()  # a client that went away while waiting
    device.gate.set()
    depths = []

    def all_answered() -> bool:
        depths.append(batcher.queue_depth)
        return all(t.done() for t in ahead + waiting)

    await wait_until_async(all_answered, what="every submit to be answered", poll=0.001)
    assert max(depths) <= 2
    assert waiting[0].cancelled()
    assert all(t.result().prediction.shape == (320, 320, 3) for t in ahead + waiting[1:])
    await batcher.close()


async def test_streams_waiting_for_room_are_released_when_the_batcher_closes(engine):
    device = _HeldDevice(engine)
    batcher = Batcher("demo", device, Metrics(), max_batch=1, max_delay_s=10.0, max_queue=1)
    work = items(engine, 4)
    ahead = []
    for k in range(3):  # two on the device, one queued
        ahead.append(asyncio.ensure_future(batcher.submit(*work[k])))
        await asyncio.sleep(0)  # it is queued
        await wait_until_async(lambda k=k: batcher.queue_depth == (1 if k == 2 else 0), poll=0.001,
                               what=f"item {k} to be {'queued' if k == 2 else 'on the device'}")
    waiting = asyncio.ensure_future(batcher.submit(*work[3], wait_for_space=True))
    await asyncio.sleep(0)  # one turn of the loop: the submit runs up to its wait for room (no thread involved)
    assert not waiting.done()
    closing = asyncio.ensure_future(batcher.close())
    device.gate.set()
    await closing
    assert all(t.result().batch_size == 1 for t in ahead)
    # close() finishes what was queued, not what waited for room: the queued item leaving lets the waiter go,
    # but the batcher closes in that same step, before the waiter runs, so it is told the model is gone
    # (never left hanging, never served by a closed batcher).
    with pytest.raises(BatcherClosed, match="'demo' was unloaded"):
        await waiting


async def test_queue_depth_gauge_follows_the_queue(engine):
    metrics = Metrics()
    batcher = Batcher("demo", engine, metrics, max_batch=8, max_delay_s=10.0)  # waits for a full batch
    tasks = [asyncio.ensure_future(batcher.submit(t, w)) for t, w in items(engine, 3)]
    await wait_until_async(lambda: batcher.queue_depth == 3, what="three items queued")
    assert metrics.sample("lipsync_queue_depth", {"model": "demo"}) == 3
    assert batcher.batches == 0 and not any(t.done() for t in tasks)  # waiting for a full batch
    await batcher.close()  # closing dispatches what is queued without waiting for the delay
    assert all(t.result().batch_size == 3 for t in tasks)
    assert metrics.sample("lipsync_queue_depth", {"model": "demo"}) == 0


async def test_bad_items_fail_alone(engine):
    batcher = Batcher("demo", engine, Metrics(), max_batch=4, max_delay_s=0.02)
    (template_id, window), = items(engine, 1)
    good = asyncio.ensure_future(batcher.submit(template_id, window))
    with pytest.raises(InvalidInput, match="template"):
        await batcher.submit(engine.num_templates, window)
    with pytest.raises(InvalidInput, match="audio window"):
        await batcher.submit(0, window[:1])
    with pytest.raises(InvalidInput, match="audio window"):
        await batcher.submit(0, window.astype(np.float64))
    assert (await good).batch_size == 1
    await batcher.close()


async def test_a_caller_that_goes_away_does_not_break_the_batch(engine):
    batcher = Batcher("demo", engine, Metrics(), max_batch=4, max_delay_s=0.05)
    work = items(engine, 3)
    tasks = [asyncio.ensure_future(batcher.submit(t, w)) for t, w in work]
    await asyncio.sleep(0)
    tasks[1].cancel()
    done = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(done[1], asyncio.CancelledError)
    assert done[0].batch_size == done[2].batch_size == 2  # the cancelled one was left out
    await batcher.close()


async def test_close_finishes_queued_work_then_refuses(engine):
    batcher = Batcher("demo", engine, Metrics(), max_batch=2, max_delay_s=0.01)
    work = items(engine, 3)
    tasks = [asyncio.ensure_future(batcher.submit(t, w)) for t, w in work]
    await asyncio.sleep(0)
    await batcher.close()
    assert all(t.done() and t.exception() is None for t in tasks)
    with pytest.raises(BatcherClosed):
        await batcher.submit(*work[0])


async def test_engine_failures_reach_every_caller_of_that_batch(engine):
    class Broken:  # an engine whose device fails: the callers get the error, the batcher keeps working
        num_templates = engine.num_templates
        audio_shape = engine.audio_shape
        calls = 0

        def predict(self, template_ids, windows):
            Broken.calls += 1
            if Broken.calls == 1:
                raise RuntimeError("device fell over")
            return engine.predict(template_ids, windows)

    batcher = Batcher("broken", Broken(), Metrics(), max_batch=4, max_delay_s=0.01)
    work = items(engine, 2)
    first = await asyncio.gather(*(batcher.submit(t, w) for t, w in work), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in first)
    second = await batcher.submit(*work[0])
    assert second.batch_size == 1
    await batcher.close()


def test_invalid_configuration(engine):
    with pytest.raises(InvalidInput):
        asyncio.run(_make(engine, max_batch=0))


async def _make(engine, **kwargs):
    return Batcher("demo", engine, Metrics(), **kwargs)


async def test_finish_work_runs_on_the_cpu_pool_in_one_chunk_per_thread(engine):
    """Each item's finish gets its own prediction and comes back in BatchResult.output; a device batch is
    split into one chunk per CPU thread, and an item whose finish fails fails alone."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    threads: dict[int, set[str]] = {}

    def finish(index: int, prediction: np.ndarray):
        threads.setdefault(index, set()).add(threading.current_thread().name)
        if index == 2:
            raise ValueError("this frame cannot be encoded")
        return index, int(prediction.sum())

    with ThreadPoolExecutor(2, thread_name_prefix="cpu") as pool:
        batcher = Batcher("demo", engine, Metrics(), max_batch=4, max_delay_s=0.05, finisher=pool, finish_workers=2)
        work = items(engine, 4)
        results = await asyncio.gather(*(batcher.submit(t, w, lambda p, i=i: finish(i, p))
                                         for i, (t, w) in enumerate(work)), return_exceptions=True)
        await batcher.close()
    assert isinstance(results[2], ValueError)
    for i in (0, 1, 3):
        assert results[i].output == (i, int(results[i].prediction.sum())) and results[i].batch_size == 4
        assert results[i].finish_s > 0
    assert all(name.startswith("cpu") for names in threads.values() for name in names)
    # contiguous halves of the batch: items 0 and 1 on one thread, 2 and 3 on the other
    assert threads[0] == threads[1] and threads[2] == threads[3]


async def test_finish_work_fails_cleanly_once_the_cpu_pool_is_shut_down(engine):
    from concurrent.futures import ThreadPoolExecutor

    from inference_pod.errors import Unavailable

    pool = ThreadPoolExecutor(1)
    pool.shutdown()
    batcher = Batcher("demo", engine, Metrics(), max_batch=2, max_delay_s=0.0, finisher=pool, finish_workers=1)
    (template_id, window), = items(engine, 1)
    with pytest.raises(Unavailable, match="shutting down"):
        await batcher.submit(template_id, window, lambda p: p.sum())
    await batcher.close()

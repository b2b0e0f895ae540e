"""Dynamic batching: concurrent frame requests for one model become device batches.

One ``Batcher`` per resident model. Requests wait in a bounded queue; a batch goes to the device when it is
full, or when the device is idle and the oldest request has waited ``max_delay_s``. That wait only pays
when other requests are coming: a lone sequential client (the last batch held one item and one item is
queued) is dispatched at once instead. While one batch runs,
the next one is gathered, and a full next batch is queued right behind it, so the device is never left
waiting on the event loop. ``engine.predict`` runs in the model's own single worker thread. What each
item needs done with its prediction (compositing, encoding: its ``finish``) runs on the shared CPU pool,
overlapping with the next batch: a device batch is split into one chunk per CPU thread, and each chunk's
results reach the event loop in one wake-up, not one per frame.

A full queue refuses a request (``Overloaded``: the client may retry, or another pod may take it), unless
the caller asks to wait for space: streams do, first come first served, so a stream that has started slows
down under load instead of being cut off by other clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from inference_pod.errors import InvalidInput, Overloaded, Unavailable
from inference_pod.serving.metrics import Metrics

log = logging.getLogger(__name__)

MAX_BATCHES_IN_FLIGHT = 2  # one on the device, one ready behind it


class BatcherClosed(Unavailable):
    """The model was unloaded after this request found it; asking the model store again will reload it."""


Finish = Callable[[np.ndarray], Any]  # an item's work on its prediction, on the CPU pool


@dataclass
class BatchResult:
    prediction: np.ndarray  # (320, 320, 3) uint8 BGR
    queue_s: float
    inference_s: float
    batch_size: int
    output: Any = None  # what the item's finish returned
    finish_s: float = 0.0


@dataclass
class _Item:
    template_id: int
    window: np.ndarray
    future: asyncio.Future
    finish: Finish | None = None
    enqueued: float = field(default_factory=time.perf_counter)


class Predictor(Protocol):
    """What a batcher needs of its engine: the item checks and the batched device call
    (``protocols.InferenceEngine`` is one)."""

    @property
    def num_templates(self) -> int: ...
    @property
    def audio_shape(self) -> tuple[int, ...]: ...
    def predict(self, template_ids: Sequence[int], audio_windows: np.ndarray) -> np.ndarray: ...


class Batcher:
    """``finisher`` runs the items' finish work (``finish_workers`` threads of it are used at once); without
    one it runs in the model's worker thread, after the batch's prediction."""

    def __init__(self, model: str, engine: Predictor, metrics: Metrics, *, max_batch: int = 32, max_delay_s: float = 0.005,
                 max_queue: int = 256, finisher: Executor | None = None, finish_workers: int = 1):
        if max_batch < 1 or max_queue < 1 or max_delay_s < 0:
            raise InvalidInput("max_batch and max_queue must be >= 1 and max_delay_s >= 0")
        self.model = model
        self.engine = engine
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        self.max_queue = max_queue
        self._metrics = metrics
        self._queue_gauge = metrics.queue_depth.labels(model=model)
        self._batch_hist = metrics.batch_size.labels(model=model)
        self._inference_hist = metrics.inference_duration.labels(model=model)
        self._pending: deque[_Item] = deque()
        self._space_waiters: deque[asyncio.Future] = deque()  # submits waiting for queue space, in order
        self._wakeup = asyncio.Event()
        self._in_flight: set[asyncio.Future] = set()
        self._worker = ThreadPoolExecutor(1, thread_name_prefix=f"predict-{model}")
        self._finisher = finisher or self._worker
        self._finish_workers = max(1, finish_workers) if finisher is not None else 1
        self._closing = False
        self._closed = False
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"batcher-{model}")
        self.batches = 0
        self.items = 0
        self._last_batch_size = 0

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    async def submit(self, template_id: int, window: np.ndarray, finish: Finish | None = None, *,
                     wait_for_space: bool = False) -> BatchResult:
        """Queue one (template, audio window) item and wait for its prediction, and for ``finish(prediction)``
        (in ``BatchResult.output``) when given. A full queue raises Overloaded, or with ``wait_for_space``
        holds the caller until an item leaves the queue."""
        if self._closed:
            raise BatcherClosed(f"model {self.model!r} was unloaded")
        # Checked here, per item, so one bad item can never fail the batch it would have joined.
        if not 0 <= template_id < self.engine.num_templates:
            raise InvalidInput(f"template {template_id} is out of range 0..{self.engine.num_templates - 1}")
        if window.shape != tuple(self.engine.audio_shape) or window.dtype != np.float32:
            raise InvalidInput(f"audio window must be float32 {tuple(self.engine.audio_shape)}, "
                               f"got {window.dtype} {window.shape}")
        while len(self._pending) >= self.max_queue:
            if not wait_for_space:
                raise Overloaded(f"model {self.model!r} has {len(self._pending)} frames queued (limit "
                                 f"{self.max_queue}); retry later")
            await self._wait_for_space()
            if self._closed:
                raise BatcherClosed(f"model {self.model!r} was unloaded")
        item = _Item(template_id, window, asyncio.get_running_loop().create_future(), finish)
        self._pending.append(item)
        self._queue_gauge.set(len(self._pending))
        self._wakeup.set()
        return await item.future

    async def _wait_for_space(self) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._space_waiters.append(waiter)
        try:
            await waiter
        finally:
            if not waiter.done():  # cancelled: the caller went away
                waiter.cancel()
            with contextlib.suppress(ValueError):
                self._space_waiters.remove(waiter)

    def _make_space(self) -> None:
        """Items left the queue (or the batcher stopped): let waiting submits in, oldest first."""
        room = self.max_queue - len(self._pending) if not self._closed else len(self._space_waiters)
        for waiter in self._space_waiters:
            if room <= 0:
                break
            if not waiter.done():
                waiter.set_result(None)
                room -= 1

    # -------------------------------------------------------------------------------------- the loop

    async def _run(self) -> None:
        try:
            while True:
                if not self._pending:
                    if self._closing:
                        self._closed = True  # in the same step as the check: no submit can slip in between
                        self._make_space()  # waiters, if any, now find it closed
                        return
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                await self._gather_and_dispatch()
        except Exception:  # a bug here must not strand callers: fail what is queued, loudly
            self._closed = True
            self._make_space()
            log.exception("batcher for %s crashed", self.model)
            self._fail_pending(Unavailable(f"model {self.model!r} batcher failed; retry"))
            raise

    async def _gather_and_dispatch(self) -> None:
        concurrent = self._last_batch_size > 1 or len(self._pending) > 1 or self._in_flight
        deadline = self._pending[0].enqueued + (self.max_delay_s if concurrent else 0.0)
        while self._pending:
            busy = len(self._in_flight)
            now = time.perf_counter()
            full = len(self._pending) >= self.max_batch
            if full and busy < MAX_BATCHES_IN_FLIGHT:
                break
            if busy == 0 and (now >= deadline or self._closing):
                break
            # Wait for a new item, a batch finishing, or the deadline (only while the device is idle).
            self._wakeup.clear()
            timeout = max(0.0, deadline - now) if busy == 0 else None
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout)
            except asyncio.TimeoutError:
                pass
        self._dispatch()

    def _dispatch(self) -> None:
        batch: list[_Item] = []
        while self._pending and len(batch) < self.max_batch:
            item = self._pending.popleft()
            if not item.future.done():  # skip callers that went away
                batch.append(item)
        self._queue_gauge.set(len(self._pending))
        self._make_space()
        if not batch:
            return
        started = time.perf_counter()
        future = asyncio.get_running_loop().run_in_executor(self._worker, self._predict, batch)
        self._in_flight.add(future)
        future.add_done_callback(lambda f: self._finish(f, batch, started))

    def _predict(self, batch: list[_Item]) -> tuple[np.ndarray, float]:
        """Worker thread: one device batch."""
        started = time.perf_counter()
        windows = np.stack([item.window for item in batch])
        predictions = self.engine.predict([item.template_id for item in batch], windows)
        return predictions, time.perf_counter() - started

    def _finish(self, future: asyncio.Future, batch: list[_Item], dispatched: float) -> None:
        self._in_flight.discard(future)
        self._wakeup.set()
        error = Unavailable("inference was cancelled") if future.cancelled() else future.exception()
        if error is not None:
            log.error("batch of %d for %s failed: %s", len(batch), self.model, error)
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(error)
            return
        predictions, inference_s = future.result()
        self.batches += 1
        self.items += len(batch)
        self._last_batch_size = len(batch)
        self._batch_hist.observe(len(batch))
        self._inference_hist.observe(inference_s)
        finishing: list[tuple[_Item, BatchResult]] = []
        for item, prediction in zip(batch, predictions, strict=True):
            if item.future.done():
                continue
            result = BatchResult(prediction, dispatched - item.enqueued, inference_s, len(batch))
            if item.finish is None:
                item.future.set_result(result)
            else:
                finishing.append((item, result))
        if finishing:
            self._start_finishing(finishing)

    def _start_finishing(self, pairs: list[tuple[_Item, BatchResult]]) -> None:
        """One job per CPU thread, each a contiguous share of the batch (ordered items finish in order)."""
        loop = asyncio.get_running_loop()
        chunks = min(len(pairs), self._finish_workers)
        for k in range(chunks):
            chunk = pairs[k * len(pairs) // chunks : (k + 1) * len(pairs) // chunks]
            try:
                self._finisher.submit(self._finish_chunk, loop, chunk)
            except RuntimeError:  # the pool is shut down: the pod is stopping
                self._deliver([(item, None, Unavailable("the server is shutting down")) for item, _ in chunk])

    def _finish_chunk(self, loop: asyncio.AbstractEventLoop, chunk: Sequence[tuple[_Item, BatchResult]]) -> None:
        """CPU pool thread: each item's finish, then one hand-over of the whole chunk to the event loop."""
        done: list[tuple[_Item, BatchResult | None, BaseException | None]] = []
        for item, result in chunk:
            started = time.perf_counter()
            try:
                assert item.finish is not None
                result.output = item.finish(result.prediction)
                result.finish_s = time.perf_counter() - started
                done.append((item, result, None))
            except Exception as exc:  # this item's alone: its chunk-mates are delivered
                done.append((item, None, exc))
        try:
            loop.call_soon_threadsafe(self._deliver, done)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    @staticmethod
    def _deliver(done: Sequence[tuple[_Item, BatchResult | None, BaseException | None]]) -> None:
        for item, result, error in done:
            if item.future.done():  # the caller went away
                continue
            if error is not None:
                item.future.set_exception(error)
            else:
                item.future.set_result(result)

    def _fail_pending(self, error: Exception) -> None:
        while self._pending:
            item = self._pending.popleft()
            if not item.future.done():
                item.future.set_exception(error)
        self._queue_gauge.set(0)

    # -------------------------------------------------------------------------------------- shutdown

    async def close(self) -> None:
        """Finish everything queued and running, then stop. Later submits raise BatcherClosed."""
        if self._closed:
            return
        self._closing = True
        self._wakeup.set()
        try:
            await self._task
        except Exception:
            pass  # already logged, and the pending callers failed
        if self._in_flight:
            await asyncio.gather(*self._in_flight, return_exceptions=True)
        self._worker.shutdown(wait=False)
        # Zero rather than remove the series: a reload of this model reuses it.
        self._queue_gauge.set(0)

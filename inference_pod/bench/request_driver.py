"""Closed-loop load over gRPC: client threads work through planned request lists and tally what came back.

A scenario plans its requests up front (``Job``: one frame, or a batch of frames, each a model and a frame
id of that model's default track), hands one list per client to ``drive``, and gets a ``Tally``: latency per
request, frames that came back right, cache hits and error codes. Every loop is bounded twice: by the planned
list and by a deadline; what the deadline cut off is reported as planned but not sent.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import grpc
from tqdm import tqdm

from inference_pod.bench.report import latency_summary
from inference_pod.client import LipSyncClient, frame_request

CONNECT_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Job:
    """One request: ``GenerateFrame`` for a single item unless ``batch``, else one ``GenerateBatch``."""

    items: tuple[tuple[str, int], ...]  # (model, frame id)
    batch: bool = False
    region: str = "full"  # output region: "full" (the default a client gets) or "prediction"


def single(model: str, frame_id: int, region: str = "full") -> Job:
    return Job(((model, frame_id),), region=region)


def batch(items: Sequence[tuple[str, int]], region: str = "full") -> Job:
    return Job(tuple(items), batch=True, region=region)


class FrameIds:
    """Frame ids of each model's default track that no earlier request of this run asked for.

    Frames of a default track are cached by the server, so a scenario that measures generation must not
    ask for a frame twice. Ids are handed out in order; a track too short for the run wraps around (and the
    scenario's cache-hit count shows it), which only happens against a server with short tracks.
    """

    def __init__(self, track_frames: dict[str, int]):
        self.track_frames = dict(track_frames)
        self._next = dict.fromkeys(track_frames, 0)
        self.wrapped: set[str] = set()

    def take(self, model: str, n: int) -> list[int]:
        size = self.track_frames[model]
        start = self._next[model]
        self._next[model] = start + n
        if start + n > size:
            self.wrapped.add(model)
        return [(start + k) % size for k in range(n)]

    def used(self, model: str) -> int:
        return self._next[model]


@dataclass
class Tally:
    """What one scenario's requests did. ``record`` is called from the client threads."""

    planned_frames: int = 0
    sent_frames: int = 0
    ok_frames: int = 0
    requests: int = 0
    cache_hits: int = 0
    errors: Counter = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    started: float | None = None
    finished: float | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def start(self) -> float:
        self.started = time.perf_counter()
        return self.started

    def record(self, frames: int, ok: int, cached: int, errors: Sequence[str], latency_s: float) -> None:
        with self._lock:
            self.requests += 1
            self.sent_frames += frames
            self.ok_frames += ok
            self.cache_hits += cached
            self.errors.update(errors)
            self.latencies.append(latency_s)
            self.finished = time.perf_counter()

    @property
    def wall_s(self) -> float:
        if self.started is None or self.finished is None:
            return 0.0
        return self.finished - self.started

    def row(self, scenario: str, label: str, **extra) -> dict:
        wall = self.wall_s
        return {
            "scenario": scenario,
            "label": label,
            "requests": self.requests,
            "planned_frames": self.planned_frames,
            "sent_frames": self.sent_frames,
            "ok_frames": self.ok_frames,
            "fps": self.ok_frames / wall if wall > 0 else None,
            "wall_s": round(wall, 3),
            **latency_summary(self.latencies),
            "success_rate": self.ok_frames / self.sent_frames if self.sent_frames else None,
            "cache_hits": self.cache_hits,
            "errors": dict(self.errors),
            "cut_by_deadline": self.sent_frames < self.planned_frames,
            **extra,
        }


def execute(client: LipSyncClient, job: Job) -> tuple[int, int, list[str]]:
    """Send one job; (frames right, of them cached, error codes). A frame counts as right when it is the
    model and frame id that was asked for and carries an image."""
    try:
        if job.batch:
            results = client.generate_batch([frame_request(m, f, region=job.region) for m, f in job.items])
            frames = [(r.frame if r.HasField("frame") else None, r.error.code) for r in results]
            if len(frames) != len(job.items):
                return 0, 0, ["WRONG_RESULT_COUNT"] * len(job.items)
        else:
            model, frame_id = job.items[0]
            frames = [(client.generate_frame(model, frame_id, region=job.region), "")]
    except grpc.RpcError as exc:
        return 0, 0, [exc.code().name] * len(job.items)
    ok = cached = 0
    errors = []
    for (model, frame_id), (frame, code) in zip(job.items, frames, strict=True):
        if frame is None:
            errors.append(code or "UNKNOWN")
        elif frame.model != model or frame.frame_id != frame_id or not frame.image:
            errors.append("WRONG_FRAME")
        else:
            ok += 1
            cached += int(frame.cached)
    return ok, cached, errors


def connect(target: str, api_key: str | None, timeout_s: float) -> LipSyncClient:
    client = LipSyncClient(target, api_key=api_key, timeout=timeout_s)
    try:
        grpc.channel_ready_future(client.channel).result(timeout=CONNECT_TIMEOUT_S)
    except grpc.FutureTimeoutError:
        client.close()
        raise ConnectionError(f"no gRPC server answers at {target}") from None
    return client


def drive(target: str, queues: Sequence[Sequence[Job]], *, max_seconds: float, timeout_s: float = 60.0,
          api_key: str | None = None, progress: bool = True, desc: str = "",
          run: Callable[[LipSyncClient, Job], tuple[int, int, list[str]]] = execute) -> Tally:
    """One client (own channel, own thread) per queue; all start together once every client is connected."""
    queues = [list(q) for q in queues if q]
    tally = Tally(planned_frames=sum(len(job.items) for q in queues for job in q))
    if not queues:
        return tally
    deadline: list[float] = []

    def begin() -> None:  # runs once, when the last client has connected
        deadline.append(tally.start() + max_seconds)

    barrier = threading.Barrier(len(queues), action=begin)
    failures: list[BaseException] = []
    bar = tqdm(total=tally.planned_frames, desc=desc, unit="frame", disable=not progress, leave=False)

    def worker(jobs: list[Job]) -> None:
        try:
            with connect(target, api_key, timeout_s) as client:
                barrier.wait()
                for job in jobs:
                    if time.perf_counter() >= deadline[0]:
                        break
                    started = time.perf_counter()
                    ok, cached, errors = run(client, job)
                    tally.record(len(job.items), ok, cached, errors, time.perf_counter() - started)
                    bar.update(len(job.items))
        except BaseException as exc:  # a connection failure or a bug: reported after the others stop
            failures.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(q,), daemon=True, name=f"bench-client-{i}")
               for i, q in enumerate(queues)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    bar.close()
    real = [f for f in failures if not isinstance(f, threading.BrokenBarrierError)]
    if real:
        raise real[0]
    return tally


def split_round_robin(jobs: Sequence[Job], clients: int) -> list[list[Job]]:
    return [list(jobs[i::clients]) for i in range(max(1, clients))]

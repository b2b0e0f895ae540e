"""The session's shared parts on their own: admission past --max-sessions, and the idle-frame cache's budget
and its one render per template however many ticks ask at once."""

from __future__ import annotations

import asyncio

import pytest

from inference_pod.core.encoding import OutputSpec
from inference_pod.errors import AudioError, Overloaded
from inference_pod.serving.metrics import Metrics
from inference_pod.serving.pipeline import FrameResult
from inference_pod.serving.session import Admission, IdleFrames, SessionConfig

JPEG = OutputSpec()


def frame(template: int, size: int) -> FrameResult:
    return FrameResult("demo", "1", template, template, bytes(size), JPEG, 8, 8, (0, 0, 8, 8, 8), False)


def test_admission_refuses_the_session_past_the_limit_at_once_and_counts_it():
    metrics = Metrics()
    admission = Admission(2, metrics)
    assert metrics.sample("lipsync_sessions_max") == 2
    with admission.slot(), admission.slot():
        with pytest.raises(Overloaded, match=r"maximum of 2 live sessions \(--max-sessions\); try another pod"):
            with admission.slot():
                pass
        assert admission.active == 2
    assert admission.active == 0 and metrics.sample("lipsync_sessions_refused_total") == 1
    with admission.slot():  # a slot is free again once a session has ended
        assert admission.active == 1
    unlimited = Admission(0, Metrics())
    with unlimited.slot(), unlimited.slot(), unlimited.slot():
        assert unlimited.active == 3


def test_idle_frames_stay_within_their_budget_least_recently_used_first():
    cache = IdleFrames(budget_bytes=250)
    for template in range(3):
        cache.put(("demo", "1", template, JPEG.key), frame(template, 100))
    assert len(cache) == 2 and cache.get(("demo", "1", 0, JPEG.key)) is None
    assert cache.get(("demo", "1", 1, JPEG.key)) is not None  # used: 2 goes next
    cache.put(("demo", "1", 3, JPEG.key), frame(3, 100))
    assert cache.get(("demo", "1", 2, JPEG.key)) is None and cache.get(("demo", "1", 1, JPEG.key)) is not None
    cache.put(("demo", "1", 9, JPEG.key), frame(9, 1000))  # larger than the whole budget: not kept
    assert cache.get(("demo", "1", 9, JPEG.key)) is None
    cache.forget("demo")
    assert len(cache) == 0


async def test_an_idle_frame_is_rendered_once_however_many_ticks_ask_and_even_when_they_stop_waiting():
    cache = IdleFrames()
    renders = []
    release = asyncio.Event()

    async def render():
        renders.append(1)
        await release.wait()
        return frame(4, 10)

    key = ("demo", "1", 4, JPEG.key)
    first = asyncio.ensure_future(cache.render(key, render()))
    second = asyncio.ensure_future(cache.render(key, render()))
    await asyncio.sleep(0)
    first.cancel()  # the tick that started it was too late: the render goes on and fills the cache
    release.set()
    result, rendered_here = await second
    assert (result.template_id, rendered_here, len(renders)) == (4, False, 1)
    await asyncio.sleep(0)
    assert cache.get(key) is not None


def test_a_session_takes_16_khz_mono_only():
    with pytest.raises(AudioError, match="16 kHz mono PCM16"):
        SessionConfig("demo", JPEG, sample_rate=48000)
    with pytest.raises(AudioError, match="16 kHz mono PCM16"):
        SessionConfig("demo", JPEG, channels=2)

"""Waiting on a condition with a deadline: how tests synchronise with threads, servers, processes and the
operator. A bare sleep guesses how long the other side takes, which a busy machine gets wrong; these poll the
condition itself and, past the deadline, fail naming what was awaited and what was seen last."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")

DEFAULT_TIMEOUT_S = 30.0  # generous: the deadline only matters when something is broken
POLL_S = 0.01


class ConditionTimeout(AssertionError):
    """The awaited condition did not hold before the deadline."""


def _failure(what: str, timeout: float, last: Any) -> ConditionTimeout:
    seen = "" if last is None or isinstance(last, bool) else f" (last seen: {last!r})"
    return ConditionTimeout(f"timed out after {timeout:g} s waiting for {what}{seen}")


def wait_until(predicate: Callable[[], T], *, what: str, timeout: float = DEFAULT_TIMEOUT_S,
               poll: float = POLL_S) -> T:
    """Poll ``predicate()`` until it returns something truthy, and return that; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        last = predicate()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise _failure(what, timeout, last)
        time.sleep(poll)


async def wait_until_async(predicate: Callable[[], T | Awaitable[T]], *, what: str,
                           timeout: float = DEFAULT_TIMEOUT_S, poll: float = POLL_S) -> T:
    """``wait_until`` on the event loop: ``predicate`` may be a plain function or a coroutine function, and
    the loop keeps running other tasks between polls."""
    deadline = time.monotonic() + timeout
    while True:
        last = predicate()
        if inspect.isawaitable(last):
            last = await last
        if last:
            return last
        if time.monotonic() >= deadline:
            raise _failure(what, timeout, last)
        await asyncio.sleep(poll)

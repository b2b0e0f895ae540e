"""ICE consent freshness (RFC 7675) that a busy but living peer passes.

aioice checks consent every ~5 s with one STUN request that gets 0.5 s and no retransmission, and closes the
connection after six misses in a row. On the project's 2-core machine under load, an aiortc peer whose event
loop was starved answered those checks 0.7-2.3 s late (its STUN requests queue behind the RTP packets in its
socket), so every check "failed" and the pod closed connections whose peer was alive and answering, about 30 s
in. RFC 7675 asks only that consent expire when no response has arrived for 30 s; so here a check goes out
every few seconds, retransmitted as STUN does (0.5 + 1 + 2 + 4 s), any answer to any of them renews consent,
and the connection closes once none has come for ``expiry_s``.

This replaces aioice's own checks per connection (``Connection.query_consent``, the coroutine aioice starts
once ICE completes); it reads aioice's nominated pairs, so an aioice without them keeps its own checks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from typing import Any

from aioice import stun
from aiortc import RTCPeerConnection

log = logging.getLogger(__name__)

CONSENT_EXPIRY_S = 30.0  # RFC 7675 section 5.1
CHECK_INTERVAL_S = 5.0  # RFC 7675: randomised around 5 s
CHECK_RETRANSMISSIONS = 3  # after 0.5, 1, 2 and 4 s: an answer up to 7.5 s late still counts


def keep_consent(pc: RTCPeerConnection, expiry_s: float = CONSENT_EXPIRY_S) -> None:
    """Give every ICE connection of ``pc`` the patient consent checks. Call it once the transports exist (after
    setRemoteDescription on the answering side, setLocalDescription on the offering side) and before ICE
    completes, i.e. before returning to the event loop."""
    for connection in _ice_connections(pc):
        if not all(hasattr(connection, name) for name in ("query_consent", "_nominated", "build_request")):
            log.warning("aioice has changed: its own consent checks stay (a late answer may close the connection)")
            return
        connection.query_consent = lambda c=connection: _query_consent(c, expiry_s)


def _ice_connections(pc: RTCPeerConnection) -> list[Any]:
    transports = [t.receiver.transport for t in pc.getTransceivers() if t.receiver.transport is not None]
    if pc.sctp is not None:
        transports.append(pc.sctp.transport)
    connections = {id(t.transport._connection): t.transport._connection for t in transports}  # BUNDLE: one
    return list(connections.values())


async def _query_consent(connection: Any, expiry_s: float) -> None:
    """Checks until no answer has come for ``expiry_s``; then the connection closes (its state goes to closed,
    as with aioice's own expiry)."""
    loop = asyncio.get_running_loop()
    answered = loop.time()
    interval = min(CHECK_INTERVAL_S, expiry_s / 4)
    checks: set[asyncio.Task] = set()

    async def check(pair: Any) -> None:
        nonlocal answered
        request = connection.build_request(pair, nominate=False)
        with contextlib.suppress(stun.TransactionError):
            await pair.protocol.request(request, pair.remote_addr, retransmissions=CHECK_RETRANSMISSIONS,
                                        integrity_key=connection.remote_password.encode("utf8"))
            answered = loop.time()

    try:
        while loop.time() - answered < expiry_s:
            for pair in connection._nominated.values():
                task = loop.create_task(check(pair))
                checks.add(task)
                task.add_done_callback(checks.discard)
            await asyncio.sleep(interval * (0.8 + 0.4 * random.random()))
    finally:
        for task in list(checks):
            task.cancel()
    log.info("ICE consent expired: no answer to any check for %.0f s", expiry_s)
    connection._query_consent_task = None  # close() would otherwise wait for this very task
    await connection.close()

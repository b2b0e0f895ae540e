"""The project's error types. Each carries its gRPC status and its HTTP status, so every front door maps an
error the same way (``reply_for``), and the CLI prints it as one line.

Every layer raises these (never bare ValueError for user input), so the gRPC server, the gateway and the
CLI report a bad request the same way: a clear message, the right code, and no traceback. Anything else is
a bug: the caller gets a generic INTERNAL reply and the traceback goes to the log, never to the client.
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)

ECHO_CHARS = 64  # the most of a client's value an error message repeats back
MESSAGE_CHARS = 1024  # the longest message a reply carries (gRPC sends it as metadata, which is bounded)
INTERNAL_MESSAGE = "internal error: the server failed on this request (details are in the server's log)"


class LipSyncError(Exception):
    grpc_status = "INTERNAL"  # name of a grpc.StatusCode member
    http_status = 500


class InvalidInput(LipSyncError):
    """Bad sizes, formats, ids or values in a request or a file."""

    grpc_status = "INVALID_ARGUMENT"
    http_status = 400


class AudioError(InvalidInput):
    """Audio that cannot be used: undecodable, empty, too short, wrong shape."""


class PackageError(InvalidInput):
    """A character package that is not valid: bad zip, missing member, checksum, unsafe path, bad tensors."""


class CheckpointError(PackageError):
    """Weights that do not fit the network they are loaded into."""


class ModelNotFound(LipSyncError):
    grpc_status = "NOT_FOUND"
    http_status = 404


class FailedPrecondition(LipSyncError):
    """The server is not set up for this request (e.g. no model registry is configured): asking again will
    not help; configuring the server will."""

    grpc_status = "FAILED_PRECONDITION"
    http_status = 409


class Overloaded(LipSyncError):
    """Queues are full; the client should back off and retry."""

    grpc_status = "RESOURCE_EXHAUSTED"
    http_status = 429


class TooLarge(LipSyncError):
    """A body or message over --max-message-mb: what gRPC answers RESOURCE_EXHAUSTED, as HTTP 413."""

    grpc_status = "RESOURCE_EXHAUSTED"
    http_status = 413


class StorageFull(LipSyncError):
    """The disk a package is being downloaded or extracted to is full (or over quota). gRPC names this case
    RESOURCE_EXHAUSTED ("the entire file system is out of space"); HTTP has 507 Insufficient Storage. Retrying
    does not help until someone frees space or points the pod at a larger disk."""

    grpc_status = "RESOURCE_EXHAUSTED"
    http_status = 507


def is_disk_full(exc: BaseException) -> bool:
    """An OSError that says the disk is full or the user's quota is spent: not transient, not a bug."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


class PermissionDenied(LipSyncError):
    """A caller the pod knows and refuses: a web page from an origin it does not allow."""

    grpc_status = "PERMISSION_DENIED"
    http_status = 403


class Unavailable(LipSyncError):
    """The server is draining, or a dependency (registry) cannot be reached, or a port cannot be bound."""

    grpc_status = "UNAVAILABLE"
    http_status = 503


class Unauthenticated(LipSyncError):
    grpc_status = "UNAUTHENTICATED"
    http_status = 401


def clip(text: str) -> str:
    """``text`` cut to ECHO_CHARS: error messages name what the client sent without repeating 100,000
    characters of it back (which would also overflow gRPC's metadata limit)."""
    return text if len(text) <= ECHO_CHARS else text[:ECHO_CHARS] + "…"


def echo(value: object) -> str:
    """``repr(value)``, clipped: how an error message quotes a client's value."""
    return clip(repr(value))


@dataclass(frozen=True)
class ErrorReply:
    """What a front door sends for a failed request: the gRPC status name, the HTTP status and the text."""

    code: str
    http_status: int
    message: str


def reply_for(exc: BaseException, what: str) -> ErrorReply:
    """The one mapping from an exception to a reply. Project errors keep their message (bounded); anything
    else is a bug, logged here with its traceback under ``what`` and answered with generic text."""
    if isinstance(exc, LipSyncError):
        message = str(exc)
        if len(message) > MESSAGE_CHARS:
            message = message[:MESSAGE_CHARS] + "…"
        return ErrorReply(exc.grpc_status, exc.http_status, message)
    log.error("%s failed", what, exc_info=exc)
    return ErrorReply("INTERNAL", 500, INTERNAL_MESSAGE)

"""The project's error types. Each carries the gRPC status it maps to; the HTTP gateway maps those on.

Every layer raises these (never bare ValueError for user input), so the gRPC server, the gateway and the
CLI report a bad request the same way: a clear message, the right code, and no traceback.
"""

from __future__ import annotations


class LipSyncError(Exception):
    grpc_status = "INTERNAL"  # name of a grpc.StatusCode member


class InvalidInput(LipSyncError):
    """Bad sizes, formats, ids or values in a request or a file."""

    grpc_status = "INVALID_ARGUMENT"


class AudioError(InvalidInput):
    """Audio that cannot be used: undecodable, empty, too short, wrong shape."""


class PackageError(InvalidInput):
    """A character package that is not valid: bad zip, missing member, checksum, unsafe path, bad tensors."""


class CheckpointError(PackageError):
    """Weights that do not fit the network they are loaded into."""


class ModelNotFound(LipSyncError):
    grpc_status = "NOT_FOUND"


class Overloaded(LipSyncError):
    """Queues are full; the client should back off and retry."""

    grpc_status = "RESOURCE_EXHAUSTED"


class Unavailable(LipSyncError):
    """The server is draining, or a dependency (registry) cannot be reached."""

    grpc_status = "UNAVAILABLE"


class Unauthenticated(LipSyncError):
    grpc_status = "UNAUTHENTICATED"


HTTP_STATUS = {
    "INVALID_ARGUMENT": 400,
    "UNAUTHENTICATED": 401,
    "NOT_FOUND": 404,
    "RESOURCE_EXHAUSTED": 429,
    "INTERNAL": 500,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}

"""errors: every error carries a gRPC and an HTTP status, replies quote little of the client's input, and a
bug's reply says nothing of the bug."""

from __future__ import annotations

import grpc
import pytest

from inference_pod import errors
from inference_pod.errors import INTERNAL_MESSAGE, LipSyncError, echo, reply_for

CLASSES = [cls for cls in vars(errors).values() if isinstance(cls, type) and issubclass(cls, LipSyncError)]


@pytest.mark.parametrize("cls", CLASSES, ids=lambda cls: cls.__name__)
def test_every_error_names_a_grpc_code_and_an_http_status(cls):
    assert cls.grpc_status in grpc.StatusCode.__members__
    assert 400 <= cls.http_status <= 599
    reply = reply_for(cls("what happened"), "test")
    assert (reply.code, reply.http_status, reply.message) == (cls.grpc_status, cls.http_status, "what happened")


def test_echo_and_reply_bound_what_they_repeat():
    assert echo("demo") == "'demo'"
    assert echo("x" * 100_000) == "'" + "x" * 63 + "…"
    reply = reply_for(errors.InvalidInput("y" * 100_000), "test")
    assert len(reply.message) <= errors.MESSAGE_CHARS + 1 and reply.message.endswith("…")


def test_a_bug_is_logged_and_answered_with_generic_text(caplog):
    with caplog.at_level("ERROR"):
        reply = reply_for(KeyError("secret"), "GenerateFrame")
    assert (reply.code, reply.http_status, reply.message) == ("INTERNAL", 500, INTERNAL_MESSAGE)
    assert "secret" not in reply.message
    assert caplog.records[0].exc_info and "GenerateFrame failed" in caplog.records[0].getMessage()

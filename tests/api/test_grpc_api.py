"""Property-based tests of the gRPC front door (hypothesis): any request message, or any bytes at all, through
the real pipeline of a running pod gets OK or a client-error status, never INTERNAL or UNKNOWN, and the pod
stays SERVING. The method-by-method behaviour is in test_grpc_service.py."""

from __future__ import annotations

import math

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serving_support import LOOPBACK, ServerThread, models_dir_with, speech_pcm16, wav_bytes

from inference_pod.serving.settings import Settings
from lipsync.v1 import lipsync_pb2 as pb
from lipsync.v1 import lipsync_pb2_grpc as pb_grpc

pytestmark = pytest.mark.usefixtures("one_torch_thread")
# What a client may be told about its own request; RESOURCE_EXHAUSTED: a full queue, back off.
CLIENT_ERRORS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED,
                 grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.OUT_OF_RANGE}
EXAMPLES = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
TIMEOUT_S = 30

WAV = wav_bytes(speech_pcm16(0.5))
names = st.one_of(st.sampled_from(["demo", "nobody", "", "Demo", "../demo", "demo\n", "x" * 10_000]),
                  st.text(max_size=80))
frame_ids = st.one_of(st.integers(-3, 30), st.integers(-(2**63), 2**63 - 1))
int32s = st.one_of(st.integers(-5, 200_000), st.integers(-(2**31), 2**31 - 1))
outputs = st.builds(pb.OutputOptions, format=st.integers(0, 5), region=st.integers(0, 4),
                    jpeg_quality=st.one_of(st.integers(-2, 102), int32s))
audio = st.one_of(
    st.none(),
    st.builds(lambda data: pb.Audio(file=data), st.one_of(st.binary(max_size=256), st.just(WAV),
                                                         st.builds(lambda n: WAV[:n], st.integers(0, len(WAV))))),
    st.builds(lambda data, rate, channels: pb.Audio(pcm16=pb.Pcm16Audio(data=data, sample_rate=rate,
                                                                       channels=channels)),
              st.one_of(st.binary(max_size=64), st.just(speech_pcm16(0.3))), int32s, st.integers(-2, 12)),
    st.just(pb.Audio()))


def _frame_request(model, frame_id, audio_message, output):
    request = pb.GenerateFrameRequest(model=model, frame_id=frame_id, output=output)
    if audio_message is not None:
        request.audio.CopyFrom(audio_message)
    return request


frame_requests = st.builds(_frame_request, names, frame_ids, audio, outputs)


def _stream_request(model, first, last, audio_message, output, realtime, fps):
    request = pb.StreamFramesRequest(model=model, first_frame=first, output=output, realtime=realtime, fps=fps)
    if last is not None:
        request.last_frame = last
    if audio_message is not None:
        request.audio.CopyFrom(audio_message)
    return request


# Pacing is the client's choice (a realtime stream at 0.01 fps is slow by request), so realtime streams are
# drawn with fps the pod must refuse or that keeps them short.
stream_requests = st.one_of(
    st.builds(_stream_request, names, frame_ids, st.one_of(st.none(), frame_ids), audio, outputs, st.just(False),
              st.floats(allow_nan=True, allow_infinity=True)),
    st.builds(_stream_request, st.just("demo"), st.integers(0, 3), st.integers(0, 4), st.none(), outputs,
              st.just(True), st.one_of(st.sampled_from([math.nan, math.inf, -1.0, 1e9]), st.floats(200, 1000))))


@pytest.fixture(scope="module")
def pod(tmp_path_factory):
    models = models_dir_with(tmp_path_factory.mktemp("grpc-properties") / "models", "demo-1")
    pod = ServerThread(Settings(host=LOOPBACK, port=0, metrics_port=0, http_port=0, models_dir=models, max_batch=8,
                                max_batch_delay_ms=5, encode_threads=2, max_message_mb=1, preload=["demo"]))
    channel = grpc.insecure_channel(pod.target)
    yield pb_grpc.LipSyncStub(channel), channel
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S)
    channel.close()
    pod.close()
    assert health.status == health_pb2.HealthCheckResponse.SERVING


def outcome(call) -> tuple[grpc.StatusCode, object]:
    """The call's status and, when OK, its response (a stream's messages as a list)."""
    try:
        result = call()
        if hasattr(result, "__iter__") and not hasattr(result, "ListFields"):
            result = list(result)
    except grpc.RpcError as exc:
        assert exc.code() in CLIENT_ERRORS, (exc.code(), exc.details())
        assert len(exc.details()) < 1200  # bounded, whatever the request held
        return exc.code(), None
    return grpc.StatusCode.OK, result


@pytest.mark.parametrize("method, requests", [("GenerateFrame", frame_requests), ("StreamFrames", stream_requests)])
@EXAMPLES
@given(data=st.data())
def test_any_request(pod, method, requests, data):
    stub, _ = pod
    request = data.draw(requests)
    outcome(lambda: getattr(stub, method)(request, timeout=TIMEOUT_S))


@EXAMPLES
@given(items=st.lists(frame_requests, max_size=6))
def test_any_generate_batch_request(pod, items):
    stub, _ = pod
    code, response = outcome(lambda: stub.GenerateBatch(pb.GenerateBatchRequest(items=items), timeout=TIMEOUT_S))
    if code == grpc.StatusCode.OK:  # then each item failed alone, with a client error
        assert len(response.results) == len(items)
        assert {r.error.code for r in response.results if r.HasField("error")} <= {c.name for c in CLIENT_ERRORS}


@EXAMPLES
@given(data=st.binary(max_size=200), method=st.sampled_from(["GenerateFrame", "GenerateBatch", "LoadModel",
                                                              "UnloadModel", "ListModels"]))
def test_any_bytes(pod, data, method):
    _, channel = pod
    call = channel.unary_unary(f"/lipsync.v1.LipSync/{method}", request_serializer=None, response_deserializer=None)
    outcome(lambda: call(data, timeout=TIMEOUT_S))

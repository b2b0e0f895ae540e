"""Hostile audio against a running pod (``lipsync serve`` as a process): refused with INVALID_ARGUMENT / 400,
and the pod's own peak RSS (its VmHWM) stays within a few tens of MB of what a normal request costs.

Before the decoder checked lengths and rates first, one 78 KiB WAV declaring 1 Hz grew the pod by 2.5 GB.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
import soundfile
from serving_support import (
    LOOPBACK,
    claimed_wav,
    free_port,
    models_dir_with,
    silent_flac,
    speech_pcm16,
    wait_serving,
    wav_bytes,
)

from inference_pod.client import LipSyncClient


def _peak_mib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) // 1024
    raise AssertionError("no VmHWM")


@pytest.fixture
def pod(tmp_path):
    port, http_port = free_port(), free_port()
    models = models_dir_with(tmp_path / "models", "demo-1")
    env = dict(os.environ, LIPSYNC_HOST=LOOPBACK, LIPSYNC_PORT=str(port), LIPSYNC_HTTP_PORT=str(http_port),
               LIPSYNC_METRICS_PORT="0", LIPSYNC_MODELS_DIR=str(models), LIPSYNC_PRELOAD="demo",
               LIPSYNC_MAX_BATCH="4", LIPSYNC_MAX_MESSAGE_MB="4", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "inference_pod.cli", "serve"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with LipSyncClient(f"{LOOPBACK}:{port}", timeout=60) as client:
            wait_serving(client, proc)
            yield proc, client, f"http://{LOOPBACK}:{http_port}"
    finally:
        proc.kill()
        proc.wait()


def _http_frame(base: str, audio: bytes) -> tuple[int, dict]:
    body = json.dumps({"model_name": "demo", "frame_id": 0, "audio_override": base64.b64encode(audio).decode()})
    request = urllib.request.Request(f"{base}/generate/frame", data=body.encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_hostile_audio_is_refused_without_growing_the_pod(pod, tmp_path):
    proc, client, http = pod
    # Warm up with real audio at another rate: decoding, resampling and features are all paid for once.
    speech = wav_bytes(speech_pcm16(2.0), rate=16000)
    other_rate = tmp_path / "speech-44k.flac"
    soundfile.write(other_rate, np.zeros(44100, np.float32), 44100)
    assert client.generate_frame("demo", 3, audio=speech).frame_id == 3
    assert client.generate_frame("demo", 3, audio=other_rate.read_bytes()).frame_id == 3
    assert _http_frame(http, speech)[0] == 200
    baseline = _peak_mib(proc.pid)

    hour = silent_flac(tmp_path / "hour.flac", 3600)
    cases = [(claimed_wav(rate=1, samples=40_000), "sample rate of 1 Hz"), (hour, "audio is 3600.0 s long; the limit is 600 s")]
    for data, message in cases:
        for _ in range(2):  # and again: nothing is kept from a refusal
            with pytest.raises(grpc.RpcError) as refused:
                client.generate_frame("demo", 0, audio=data)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert message in refused.value.details()
            status, answer = _http_frame(http, data)
            assert status == 400 and message in json.dumps(answer)
    grown = _peak_mib(proc.pid) - baseline
    assert grown < 40, f"the pod's peak RSS grew by {grown} MiB while refusing hostile audio"
    assert client.health() == "SERVING"
    assert client.generate_frame("demo", 5, audio=speech).frame_id == 5  # and it still serves

"""The Python clients and the ``lipsync client`` commands against a real pod on loopback."""

from __future__ import annotations

import json
import shutil

import grpc
import numpy as np
import pytest
from serving_support import (
    ServerThread,
    StaticRegistry,
    models_dir_with,
    package,
    speech_pcm16,
    wav_bytes,
)

from inference_pod.cli import main
from inference_pod.client import AsyncLipSyncClient, LipSyncClient, Pcm16, decode_frame, frame_request
from inference_pod.serving.registry import publish
from inference_pod.serving.settings import Settings


@pytest.fixture(scope="module")
def pod(tmp_path_factory, one_torch_thread):
    root = tmp_path_factory.mktemp("client-pod")
    registry_dir = root / "registry"
    publish(package("other-1"), registry_dir)
    registry = StaticRegistry(registry_dir)
    keys = root / "keys"
    keys.write_text("client-key\n")
    settings = Settings(host="127.0.0.1", port=0, metrics_port=0, http_port=0, models_dir=models_dir_with(
        root / "models", "demo-1"), registry_url=registry.url, api_keys_file=keys, max_batch=8,
        max_batch_delay_ms=10, encode_threads=2)
    pod = ServerThread(settings)
    yield pod
    pod.close()
    registry.close()




@pytest.fixture
def client(pod):
    with LipSyncClient(pod.target, api_key="client-key", timeout=30) as c:
        yield c


def test_every_method_through_the_blocking_client(client, tmp_path):
    frame = client.generate_frame("demo", 2)
    assert decode_frame(frame).shape == (48, 48, 3)
    raw = client.generate_frame("demo", 2, format="raw", region="prediction")
    assert decode_frame(raw).shape == (320, 320, 3)
    pcm = speech_pcm16(0.6, seed=8)
    (tmp_path / "speech.wav").write_bytes(wav_bytes(pcm))
    by_path = client.generate_frame("demo", 3, tmp_path / "speech.wav", format="png")
    by_pcm = client.generate_frame("demo", 3, Pcm16(pcm, 16000), format="png")
    assert np.abs(decode_frame(by_path).astype(int) - decode_frame(by_pcm)).max() <= 2

    results = client.generate_batch([frame_request("demo", i) for i in range(3)] + [frame_request("nope", 0)])
    assert [r.WhichOneof("result") for r in results] == ["frame", "frame", "frame", "error"]
    assert [f.frame_id for f in client.stream_frames("demo", 1, 4)] == [1, 2, 3, 4]
    chunks = [pcm[i : i + 640] for i in range(0, len(pcm), 640)]
    live = list(client.stream_audio("demo", chunks, 16000))
    assert [f.frame_id for f in live] == list(range(len(live))) and len(live) > 10

    assert {m.name for m in client.list_models()} == {"demo"}
    loaded = client.load_model("other")
    assert loaded.source == "registry" and loaded.model.name == "other"
    assert client.unload_model("other") is True
    assert [p.name for p in client.list_registry().packages] == ["other"]
    assert client.get_stats().models_resident >= 1
    assert client.health() == "SERVING" and client.health("demo") == "SERVING"


def test_errors_are_rpc_errors_with_the_status(pod):
    with LipSyncClient(pod.target, timeout=30) as anonymous:
        with pytest.raises(grpc.RpcError) as info:
            anonymous.list_models()
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert anonymous.health() == "SERVING"  # probes need no key
    with LipSyncClient(pod.target, api_key="client-key") as c:
        with pytest.raises(grpc.RpcError) as info:
            c.generate_frame("demo", -4)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(ValueError, match="format"):
        frame_request("demo", 0, format="gif")


async def test_async_client(pod):
    async with AsyncLipSyncClient(pod.target, api_key="client-key", timeout=30) as c:
        frame = await c.generate_frame("demo", 1, format="png")
        assert decode_frame(frame).shape == (48, 48, 3)
        assert [f.frame_id async for f in c.stream_frames("demo", 0, 2)] == [0, 1, 2]
        pcm = speech_pcm16(0.5, seed=1)

        async def chunks():
            for i in range(0, len(pcm), 3200):
                yield pcm[i : i + 3200]

        assert len([f async for f in c.stream_audio("demo", chunks())]) > 5
        results = await c.generate_batch([frame_request("demo", 0)])
        assert results[0].frame.frame_id == 0
        assert await c.health("demo") == "SERVING"
        assert (await c.get_stats()).server_version
        assert [m.name for m in await c.list_models()][0] == "demo"


def cli(pod, capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["client", "--target", pod.target, "--api-key", "client-key", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_commands(pod, capsys, tmp_path):
    out_file = tmp_path / "one.png"
    code, out, _ = cli(pod, capsys, "frame", "demo", "4", "--format", "png", "-o", str(out_file))
    assert code == 0 and json.loads(out)["frame_id"] == 4 and out_file.read_bytes()[:4] == b"\x89PNG"

    code, out, _ = cli(pod, capsys, "batch", "demo:0-2", "nope:1", "-o", str(tmp_path / "batch"))
    assert code == 1 and "nope:1 failed: NOT_FOUND" in out
    assert sorted(p.name for p in (tmp_path / "batch").iterdir()) == [f"demo_{i:06d}.jpg" for i in range(3)]

    code, out, _ = cli(pod, capsys, "stream", "demo", "--first", "2", "--last", "5", "-o", str(tmp_path / "s"))
    assert code == 0 and json.loads(out)["frames"] == 4

    wav = tmp_path / "speech.wav"
    wav.write_bytes(wav_bytes(speech_pcm16(0.6, seed=3)))
    code, out, _ = cli(pod, capsys, "stream-audio", "demo", str(wav), "-o", str(tmp_path / "live"))
    live = json.loads(out)
    assert code == 0 and live["frames"] == len(list((tmp_path / "live").iterdir())) > 10

    code, out, _ = cli(pod, capsys, "frame", "demo", "1", "--audio", str(wav), "-o", str(tmp_path / "a.jpg"))
    assert code == 0 and (tmp_path / "a.jpg").stat().st_size > 0

    code, out, _ = cli(pod, capsys, "models")
    assert code == 0 and "demo" in {m["name"] for m in json.loads(out)}
    code, out, _ = cli(pod, capsys, "load", "demo")
    assert code == 0 and json.loads(out)["model"]["name"] == "demo"
    code, out, _ = cli(pod, capsys, "unload", "demo")
    assert code == 0 and json.loads(out) == {"name": "demo", "unloaded": True}
    code, out, _ = cli(pod, capsys, "registry")
    assert code == 0 and json.loads(out)["packages"][0]["name"] == "other"
    code, out, _ = cli(pod, capsys, "stats")
    assert code == 0 and json.loads(out)["device"] == "cpu"
    code, out, _ = cli(pod, capsys, "health", "--service", "demo")  # unloaded above
    assert (code, json.loads(out)["status"]) == (1, "NOT_SERVING")
    code, out, _ = cli(pod, capsys, "health")
    assert (code, json.loads(out)["status"]) == (0, "SERVING")


def test_cli_reports_errors_with_the_status_code(pod, capsys):
    code, _, err = cli(pod, capsys, "frame", "nobody", "0", "-o", "/dev/null")
    assert code == 1 and "NOT_FOUND" in err and "nobody" in err
    capsys.readouterr()
    code = main(["client", "--target", pod.target, "models"])  # no key
    assert code == 1 and "UNAUTHENTICATED" in capsys.readouterr().err


def _digit_strings(value, where="") -> list[str]:
    if isinstance(value, dict):
        # versions are strings by design ("1", "2"); every other digit string is an integer printed as text
        return [w for k, v in value.items() if k != "version" for w in _digit_strings(v, f"{where}.{k}")]
    if isinstance(value, list):
        return [w for i, v in enumerate(value) for w in _digit_strings(v, f"{where}[{i}]")]
    return [where] if isinstance(value, str) and value.lstrip("-").isdigit() else []


def test_cli_prints_integers_as_numbers(pod, capsys, tmp_path):
    cli(pod, capsys, "frame", "demo", "3", "-o", str(tmp_path / "f.jpg"))  # so the counters are not all zero
    for action in ("stats", "models"):
        code, out, _ = cli(pod, capsys, action)
        data = json.loads(out)
        assert code == 0 and _digit_strings(data) == [], action
    code, out, _ = cli(pod, capsys, "stats")
    demo = next(m for m in json.loads(out)["models"] if m["name"] == "demo")
    # frame 3 may come from the cache when an earlier test asked for it: one of the two counters saw it
    assert isinstance(demo["frames_generated"], int) and isinstance(demo["frames_from_cache"], int)
    assert demo["frames_generated"] + demo["frames_from_cache"] >= 1  # zero values are printed, not left out
    code, out, _ = cli(pod, capsys, "frame", "demo", "7", "-o", str(tmp_path / "g.jpg"))
    assert json.loads(out)["frame_id"] == 7


def test_cli_health_of_an_unknown_model_says_so(pod, capsys):
    code, out, err = cli(pod, capsys, "health", "--service", "nosuch")
    assert code == 1 and out == ""
    line = err.strip()
    assert "\n" not in line and line.startswith("lipsync: error: NOT_FOUND: ") and "'nosuch'" in line
    assert line != "lipsync: error: NOT_FOUND:"


def test_cli_rejects_malformed_batch_items(pod, capsys):
    for item, words in {"demo": "is not MODEL:FRAME", "demo:x": "bad frame id", "demo:5-2": "empty range"}.items():
        code, out, err = cli(pod, capsys, "batch", item)
        assert code == 2 and out == "" and err.startswith(f"lipsync: error: batch item {item!r}") and words in err, err
    assert shutil.which("lipsync") is not None  # the console script is installed

"""The README's Quick start as a newcomer runs it: ``make demo`` (a live session through a real pod, recorded to
an mp4) and ``make serve`` (a pod with the demo character until Ctrl-C), each run as the Makefile runs it."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from conditions import wait_until
from serving_support import LOOPBACK, RedisServer, free_port, models_dir_with, speech_pcm16, wav_bytes

from inference_pod import cli
from inference_pod.client import LipSyncClient

ROOT = Path(__file__).resolve().parents[2]
NEEDS = [tool for tool in ("make", "ffmpeg", "ffprobe", "espeak-ng") if shutil.which(tool) is None]
pytestmark = pytest.mark.skipif(bool(NEEDS), reason=f"needs {', '.join(NEEDS)} (make setup installs them)")
ENV = dict(os.environ, OMP_NUM_THREADS="1")  # a pod beside the test on a small CPU: see conftest.one_torch_thread


def make_recipe(target: str, **variables: str) -> list[str]:
    """The command ``make TARGET`` runs for the target itself (its setup prerequisite left out), as make expands
    it with these variables, e.g. ``PYTHON`` (this interpreter) and ``SERVE_FLAGS``."""
    assigned = [f"{name}={value}" for name, value in {"PYTHON": sys.executable, **variables}.items()]
    done = subprocess.run(["make", "-s", "-n", "-o", "setup", "-C", str(ROOT), target, *assigned],
                          capture_output=True, text=True, timeout=60, check=True)
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, f"make {target} should run one command: {lines}"
    return shlex.split(lines[0])


def bindable(port: int) -> bool:
    """Nothing listens on the loopback port. SO_REUSEADDR, as servers bind: connections the server closed linger
    in TIME_WAIT, which would refuse a plain bind, but a listening socket still refuses this one."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def streams(video: Path) -> list[str]:
    done = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "stream=codec_type", "-of", "json", str(video)],
                          capture_output=True, text=True, timeout=60, check=True)
    return sorted(s["codec_type"] for s in json.loads(done.stdout)["streams"])


def test_the_readme_says_what_the_make_targets_run():
    """The Quick start's prose names each target's command: it must be what the Makefile runs."""
    readme = (ROOT / "README.md").read_text()
    quick_start = readme[readme.index("## Quick start") : readme.index("## Contents")]
    for target in ("demo", "serve", "test"):
        assert re.search(rf"^make {target} +# ", quick_start, re.M), f"the Quick start block lacks make {target}"
    for target in ("demo", "serve"):
        named = re.search(rf"`make {target}` \(`lipsync ([^`]+)`\)", quick_start)
        assert named, f"the Quick start does not say what make {target} runs"
        assert make_recipe(target)[3:] == shlex.split(named.group(1)), (target, named.group(1))


# ------------------------------------------------------------------------------------------------ make demo


@pytest.mark.timeout(600)  # builds the demo and loads it in this process: minutes on a busy machine
@pytest.mark.usefixtures("one_torch_thread")
def test_make_demo_plays_a_live_session_through_a_pod_and_leaves_none(tmp_path, capsys, monkeypatch):
    """What ``make demo`` runs, in this process (so a pod left running would still hold its port here), with a
    short line of the user's own (``make demo WAV=...``) and a short idle; on this CPU machine it runs unpaced by
    default, and says so."""
    wav = tmp_path / "line.wav"
    wav.write_bytes(wav_bytes(speech_pcm16(0.6, seed=4)))
    argv = make_recipe("demo", WAV=str(wav))
    assert argv[:3] == [sys.executable, "-m", "inference_pod.cli"], argv
    assert argv[argv.index("--audio") + 1] == str(wav)
    monkeypatch.chdir(tmp_path)  # the recipe's demo-output/ lands here
    assert cli.main([*argv[3:], "--frames", "4", "--idle", "0.4"]) == 0
    out = capsys.readouterr().out

    port = int(re.search(rf"pod: serving demo over gRPC at {LOOPBACK}:(\d+)", out).group(1))
    assert bindable(port), "the demo's pod still listens"
    assert not [t.name for t in threading.enumerate() if t.name == "lipsync-demo-pod"], "the pod's thread lives on"
    assert re.search(r"^first frame: [\d.]+ s after the session opened, [\d.]+ s after the demo started$", out, re.M), out
    kinds = re.search(r"^frames: (\d+) — speaking (\d+), idle (\d+), repeated (\d+)", out, re.M)
    assert kinds, out
    total, speaking, idle, repeated = map(int, kinds.groups())
    assert total == speaking + idle + repeated and total >= 25 * (0.4 + 0.6 + 0.4) - 1, out
    assert "on the CPU the session runs unpaced" in out and repeated == 0, out
    # In sync, or not measurable when the line is too short to tell: either way, said.
    assert re.search(r"^A/V offset: ([+-]\d+ ms, measured|not measurable) on demo-output/demo\.mp4: ", out, re.M), out

    output = tmp_path / "demo-output"
    assert streams(output / "demo.mp4") == ["audio", "video"]
    frames = sorted((output / "frames").glob("frame_*.png"))
    assert len(frames) == total and f"wrote {total} PNG frames to demo-output/frames" in out


@pytest.mark.timeout(600)  # builds the demo and loads it in this process: minutes on a busy machine
@pytest.mark.usefixtures("one_torch_thread")
def test_the_demos_recording_is_in_sync_as_measured_on_its_mp4(tmp_path, capsys):
    """Unpaced (no clock to miss on a busy machine: every frame rendered, none repeated), the trained demo's
    mouth follows the voice it was sent, and the mp4 that was written shows it at offset 0."""
    from inference_pod.tools.demo_character import speech_track
    from inference_pod.tools.lipsync_quality import HELD_OUT_SPEECH, MIN_CORRELATION
    from inference_pod.tools.synctalk_dataset import encode_wav_pcm16

    wav = tmp_path / "held-out.wav"
    wav.write_bytes(encode_wav_pcm16(speech_track(HELD_OUT_SPEECH[:1])))
    assert cli.main(["demo", "--out", str(tmp_path / "out"), "--audio", str(wav), "--unpaced", "--idle", "0.4"]) == 0
    out = capsys.readouterr().out
    kinds = re.search(r"^frames: \d+ — speaking (\d+), idle \d+, repeated (\d+)", out, re.M)
    assert kinds and int(kinds.group(1)) > 25 and kinds.group(2) == "0", out
    offset = re.search(r"^A/V offset: ([+-]\d+) ms, measured .* best at ([+-]\d+) frames \(r = ([-\d.]+);", out, re.M)
    assert offset, out
    assert offset.group(1) in ("+0", "-0") and offset.group(2) == "+0" and float(offset.group(3)) >= MIN_CORRELATION, out


@pytest.mark.timeout(600)  # builds the demo and loads it in this process: minutes on a busy machine
def test_a_demo_whose_pod_cannot_serve_is_one_line_and_leaves_no_pod(tmp_path, capsys):
    """A failure after the pod started (here: its device is missing, so the preload fails) ends the demo with
    one line and a non-zero exit, and the pod is stopped all the same."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the failure below needs a machine without it")
    code = cli.main(["demo", "--out", str(tmp_path / "out"), "--frames", "4", "--device", "cuda", "--no-video"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("lipsync: error:")]
    assert code == cli.USER_ERROR and len(errors) == 1 and "Traceback" not in err, err
    failed = re.search(rf"the demo's pod at {LOOPBACK}:(\d+) cannot serve demo \(NOT_SERVING\)", errors[0])
    assert failed, errors
    assert bindable(int(failed.group(1))), "the failed demo's pod still listens"
    assert not [t.name for t in threading.enumerate() if t.name == "lipsync-demo-pod"]


# ------------------------------------------------------------------------------------------------ make serve


@dataclass(frozen=True)
class Served:
    """A running ``make serve`` pod, as its ready lines give it."""

    proc: subprocess.Popen
    target: str  # gRPC host:port
    page: str  # the live page's URL
    output: list[str]  # stdout so far
    page_dir: Path  # a folder of the test's for files the page is given


def page_answers(served: Served) -> None:
    with urllib.request.urlopen(served.page, timeout=30) as response:
        assert response.status == 200 and response.headers["Content-Type"].startswith("text/html")
        assert response.read().lstrip().lower().startswith(b"<!doctype html")


def grpc_answers(served: Served) -> None:
    with LipSyncClient(served.target, timeout=60) as client:
        assert client.health() == "SERVING" and client.health("demo") == "SERVING"
        assert [m.name for m in client.list_models()] == ["demo"]
        frame = client.generate_frame("demo", 3)
        assert (frame.width, frame.height) == (256, 256) and frame.image


def the_page_plays_a_file_and_the_mouth_moves(served: Served) -> None:
    """The live page in headless Chromium, as a newcomer opens it: its session idles, a file played into it
    comes back as voice and the avatar's mouth opens (its transport is tests/api/test_live_page.py's subject:
    the WebSocket here, which needs no ICE), then Stop returns it to idle."""
    from live_page_support import browser_missing, canvas, chromium, mouth_darkness, until

    from inference_pod.tools.lipsync_quality import held_out_speech
    from inference_pod.tools.synctalk_dataset import encode_wav_pcm16

    if (missing := browser_missing()) is not None:
        pytest.skip(missing)
    voice = Path(served.page_dir) / "voice.wav"
    voice.write_bytes(encode_wav_pcm16(held_out_speech()))
    driver = chromium()
    try:
        driver.get(served.page + "?transport=ws")
        until(driver, lambda p: p["idle"] >= 25 and p["state"] == "idle", "a second of idle frames")
        closed = max(mouth_darkness(canvas(driver)) for _ in range(5))
        driver.find_element("id", "file").send_keys(str(voice))
        until(driver, lambda p: p["state"] == "speaking" and p["voice_s"] > 0, "the state speaking")
        # The mouth opens on some frame while the file plays (a real-time session on this CPU shows fewer
        # distinct frames, yet speaking ones among them): sampled until the file has played, never paced.
        widest = closed
        deadline = time.monotonic() + 90
        while widest <= closed + 0.02:
            assert time.monotonic() < deadline, f"the mouth never opened while the file played ({widest:.3f})"
            widest = max(widest, mouth_darkness(canvas(driver)))
        driver.find_element("id", "stop").click()
        until(driver, lambda p: p["status"].startswith("stopped") and p["state"] == "idle", "idle after Stop")
    finally:
        driver.quit()


# What is checked while the pod serves, in order, each given the pod.
WHILE_SERVING: list[Callable[[Served], None]] = [page_answers, grpc_answers, the_page_plays_a_file_and_the_mouth_moves]


def start_make_serve(workdir: Path, *flags: str) -> tuple[subprocess.Popen, list[str]]:
    """What ``make serve SERVE_FLAGS=...`` runs, started in ``workdir``; its stdout lines collect in the list as
    they come, its stderr (the pod's log) goes to ``workdir/serve.log``."""
    argv = make_recipe("serve", SERVE_FLAGS=" ".join(flags))
    assert argv[3:5] == ["serve", "--demo"] and "--host" in argv, argv
    with open(workdir / "serve.log", "w") as log:
        proc = subprocess.Popen(argv, cwd=workdir, env=ENV, stdout=subprocess.PIPE, stderr=log, text=True)
    lines: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)

    threading.Thread(target=read, daemon=True).start()
    return proc, lines


@pytest.mark.timeout(600)  # a new process imports torch, builds the demo and loads it: minutes on a busy machine
def test_make_serve_answers_until_ctrl_c_then_drains_and_exits_0(tmp_path):
    port, http_port = free_port(), free_port()
    # A second of frames rendered ahead (the live page test's slack): a CPU beside the test suite shows some of
    # the file's speaking frames on time.
    proc, lines = start_make_serve(tmp_path, "--port", str(port), "--http-port", str(http_port),
                                   "--session-render-ahead-ms", "1000")
    log = tmp_path / "serve.log"
    try:
        def ready() -> bool:
            assert proc.poll() is None, f"make serve's pod exited {proc.returncode}: {log.read_text()[-3000:]}"
            return any(line.startswith("  models ") for line in lines)

        wait_until(ready, what="make serve's ready lines", timeout=420, poll=0.2)
        text = "".join(lines)
        assert f"  gRPC       localhost:{port} " in text and f"  live page  http://localhost:{http_port}/ " in text, text
        assert "no Redis needed" in text and "demo (serving)" in text, text
        served = Served(proc, f"localhost:{port}", f"http://localhost:{http_port}/", lines, tmp_path)
        for check in WHILE_SERVING:
            check(served)
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
        proc.wait(timeout=120)
        err = log.read_text()
        assert proc.returncode == 0, err[-3000:]
        assert "Traceback" not in err and "received SIGINT" in err
        wait_until(lambda: "lipsync serve: stopped\n" in lines, what="the last line read")
        assert bindable(port) and bindable(http_port)
        assert (tmp_path / "demo-output" / "demo.zip").is_file()  # where make demo puts it: one copy for both
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.timeout(600)
@pytest.mark.parametrize("flag", ["--port", "--http-port"])
def test_make_serve_on_a_busy_port_is_one_line_naming_the_flag(tmp_path, flag):
    others = {"--port": str(free_port()), "--http-port": str(free_port())}
    with socket.socket() as taken:
        taken.bind((LOOPBACK, 0))
        taken.listen()
        others[flag] = str(taken.getsockname()[1])
        proc, lines = start_make_serve(tmp_path, *(item for pair in others.items() for item in pair))
        proc.wait(timeout=420)
    err = (tmp_path / "serve.log").read_text()
    errors = [line for line in err.splitlines() if line.startswith("lipsync: error:")]
    assert proc.returncode == cli.USER_ERROR and "Traceback" not in err, err
    assert len(errors) == 1 and f"{LOOPBACK}:{others[flag]}" in errors[0] and f"{flag})" in errors[0], err
    assert "in use" in errors[0], errors
    assert not any(line.startswith("lipsync serve: ready") for line in lines)


def test_serve_says_when_it_uses_redis_and_does(tmp_path):
    """The ready lines name the Redis given (and no password); frames are cached there."""
    import asyncio

    from inference_pod.app import Pod
    from inference_pod.commands.serve import ready_lines
    from inference_pod.serving.settings import Settings

    redis = RedisServer(tmp_path).start()
    try:
        url = redis.url.replace("redis://", "redis://:secret@")
        settings = Settings(host=LOOPBACK, port=0, http_port=0, metrics_port=0, redis_url=url,
                            models_dir=models_dir_with(tmp_path / "models", "demo-1"), preload=["demo"])

        async def serve() -> list[str]:
            pod = await Pod(settings).start()
            try:
                lines = ready_lines(pod)
                async with _client(pod.port) as client:
                    await client.generate_frame("demo", 1)
                return lines
            finally:
                await pod.stop(grace_s=1)

        lines = asyncio.run(serve())
        cache = next(line for line in lines if line.strip().startswith("cache"))
        assert f"Redis at redis://{LOOPBACK}:{redis.port}/0" in cache and "secret" not in "\n".join(lines), lines
        assert _redis_keys(redis.port) > 0
    finally:
        redis.stop()


def _client(port: int):
    from inference_pod.client import AsyncLipSyncClient

    return AsyncLipSyncClient(f"{LOOPBACK}:{port}", timeout=60)


def _redis_keys(port: int) -> int:
    with socket.create_connection((LOOPBACK, port), timeout=5) as s:
        s.sendall(b"DBSIZE\r\n")
        reply = s.recv(64)
    with contextlib.suppress(ValueError):
        return int(reply.strip().lstrip(b":"))
    raise AssertionError(f"DBSIZE answered {reply!r}")

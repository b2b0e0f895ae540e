"""Real infrastructure for the serving-layer tests: a redis-server, a static HTTP registry, demo packages,
and a pod running in its own thread (for the blocking client). Everything binds to 127.0.0.1 only."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import http.server
import io
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import wave
from functools import partial
from pathlib import Path

import grpc
import numpy as np
import pytest
import soundfile
from conditions import wait_until

from inference_pod.tools.demo_character import TRAINED, build_demo_package, default_speech, speech_like_audio

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def build_package(out_dir: Path, name: str, version: str = "1", seed: int = 0, frames: int = 6) -> Path:
    """A tiny demo package (width 4, 48x48 frames, 1 s default track) at out_dir/{name}-{version}.zip."""
    out = Path(out_dir) / f"{name}-{version}.zip"
    build_demo_package(name, out, width=4, frames=frames, seed=seed, size=(48, 48), audio_seconds=1.0,
                       version=version)
    return out


# The packages the serving tests use, built once per test process (building one takes about a second).
# The demo's AVE encoder is seeded by the seed: twin shares demo's encoder (and so its audio features),
# other does not.
PACKAGE_SPECS = {"demo-1": ("demo", "1", 0), "demo-2": ("demo", "2", 4), "other-1": ("other", "1", 3),
                 "twin-1": ("twin", "1", 0)}
_built: dict[str, Path] = {}
_build_lock = threading.Lock()


def package(key: str) -> Path:
    """Path of a shared, read-only package zip (copy it to modify it)."""
    with _build_lock:
        if key not in _built:
            if not _built:
                root = Path(tempfile.mkdtemp(prefix="lipsync-serving-packages-"))
                atexit.register(shutil.rmtree, root, True)
                _built["__root__"] = root
            name, version, seed = PACKAGE_SPECS[key]
            _built[key] = build_package(_built["__root__"], name, version, seed)
        return _built[key]


def trained_demo_models(folder: Path) -> Path:
    """``folder`` holding the trained demo ("demo", its committed width-4 weights and own voice): the character
    whose mouth follows speech, for the tests that measure lips from pixels."""
    build_demo_package("demo", folder / "demo.zip", width=TRAINED.width, speech=default_speech(), trained=True)
    return folder


def models_dir_with(root: Path, *keys: str) -> Path:
    """A models directory holding copies of the given packages."""
    root.mkdir(parents=True, exist_ok=True)
    for key in keys:
        shutil.copy(package(key), root / f"{key}.zip")
    return root


needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed (make setup)")


@contextlib.asynccontextmanager
async def started_pod(settings):
    """A real pod (``inference_pod.app.Pod``) started with ``settings`` in this event loop, stopped after."""
    from inference_pod.app import Pod

    server = await Pod(settings).start()
    try:
        yield server
    finally:
        await server.stop(grace_s=2)


def pcm16(wav: np.ndarray) -> bytes:
    """Float audio in [-1, 1] as little-endian 16-bit PCM (clipped)."""
    return (np.clip(wav, -1, 1) * 32767).astype("<i2").tobytes()


def speech_pcm16(seconds: float, seed: int = 7) -> bytes:
    return pcm16(speech_like_audio(seconds, seed))


def wav_bytes(pcm: bytes, rate: int = 16000) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------ hostile audio


def claimed_wav(rate: int, samples: int) -> bytes:
    """A PCM16 mono WAV written byte by byte, so its header can claim any rate (1 Hz: the resampler's worst
    case) for silent samples that are really there."""
    data = bytes(2 * samples)
    fmt = struct.pack("<HHIIHH", 1, 1, rate, 2 * rate, 2, 16)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


def silent_flac(path: Path, seconds: int, rate: int = 8000) -> bytes:
    """Long silence that compresses to almost nothing: a small file that decodes to a lot of audio."""
    with soundfile.SoundFile(path, "w", rate, 1, format="FLAC", subtype="PCM_16") as out:
        block = np.zeros(rate * 60, np.int16)
        for _ in range(seconds // 60):
            out.write(block)
    return path.read_bytes()


# A new pod process imports torch and loads its preload list first: seconds on a quiet machine, minutes on a
# busy one. The deadline only matters when the pod is broken.
POD_START_TIMEOUT_S = 180.0


def wait_serving(client, proc: subprocess.Popen, timeout_s: float = POD_START_TIMEOUT_S) -> None:
    """Until the pod started as ``proc`` reports SERVING (after its preload list); fails if it exits."""

    def serving() -> bool:
        assert proc.poll() is None, f"the pod exited with status {proc.returncode}"
        try:
            return client.health() == "SERVING"
        except grpc.RpcError:
            return False

    wait_until(serving, what="the pod to report SERVING", timeout=timeout_s, poll=0.2)


class RedisServer:
    """redis-server on a free loopback port, no persistence; stop() and start() again on the same port."""

    def __init__(self, workdir: Path):
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is not installed (make system-deps)")
        self.port = free_port()
        self.workdir = Path(workdir)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    def start(self) -> RedisServer:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", LOOPBACK, "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(self.answers, what=f"redis-server to answer PING on port {self.port}", timeout=60)
        return self

    def answers(self) -> bool:
        try:
            with socket.create_connection((LOOPBACK, self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None


class _RegistryHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # quiet
        pass

    def do_GET(self):
        self.server.requests.append(self.path)
        if self.server.token and self.headers.get("Authorization") != f"Bearer {self.server.token}":
            self.send_error(401, "token required")
            return
        if self.server.fail_next > 0:
            self.server.fail_next -= 1
            self.send_error(503, "registry warming up")
            return
        super().do_GET()


@contextlib.contextmanager
def small_filesystem(mount_point: Path, size: str = "2m"):
    """A real filesystem of ``size`` (tmpfs) at ``mount_point``: a disk that fills up, for the full-disk tests.
    Skips the test where mounting is refused (not root, or a container without CAP_SYS_ADMIN)."""
    import pytest

    mount_point.mkdir(parents=True, exist_ok=True)
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)],
                                 capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"cannot mount a small tmpfs for the full-disk test: {exc}")
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs for the full-disk test: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True, timeout=30)


def grow_filesystem(mount_point: Path, size: str) -> None:
    """Give a ``small_filesystem`` more room, as an operator freeing space would."""
    subprocess.run(["mount", "-o", f"remount,size={size}", str(mount_point)], check=True, capture_output=True,
                   timeout=30)


class StaticRegistry:
    """A static web server over a registry directory, as any web server or bucket would host it."""

    def __init__(self, directory: Path, token: str | None = None):
        self.directory = Path(directory)
        self.httpd = http.server.ThreadingHTTPServer((LOOPBACK, 0), partial(_RegistryHandler,
                                                                             directory=str(directory)))
        self.httpd.requests = []
        self.httpd.fail_next = 0
        self.httpd.token = token  # when set, every request needs "Authorization: Bearer <token>"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.httpd.server_address[1]}/"

    @property
    def requests(self) -> list[str]:
        return self.httpd.requests

    def fail_next(self, n: int) -> None:
        self.httpd.fail_next = n

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


class ServerThread:
    """A Pod on its own event loop in a thread, so blocking clients can call it from the test."""

    def __init__(self, settings):
        from inference_pod.app import Pod

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = self.call(self._start(Pod, settings))

    @staticmethod
    async def _start(cls, settings):
        return await cls(settings).start()

    def call(self, coro, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def target(self) -> str:
        return f"{LOOPBACK}:{self.server.port}"

    def close(self) -> None:
        self.call(self.server.stop(grace_s=5))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()

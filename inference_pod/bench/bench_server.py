"""The server ``lipsync bench service`` starts when it is given no ``--target``: demo packages in a scratch
models directory and a real ``lipsync serve`` in its own process, listening on 127.0.0.1 only.

Its own process, so the server's event loop and the benchmark's client threads do not share one GIL, as
they would not in production. Settings are the pod's defaults (frame cache on, batching 32 / 5 ms) except
where the benchmark must pin them: loopback, a free port, no metrics port and no HTTP gateway (the
benchmark speaks gRPC; fixed ports could clash with other pods on the machine), all models preloaded.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
from tqdm import tqdm

from inference_pod.client import LipSyncClient
from inference_pod.tools.demo_character import build_demo_package

LOOPBACK = "127.0.0.1"
START_TIMEOUT_S = 300.0
STOP_GRACE_S = 10.0
DEMO_TEMPLATES = 50


def demo_model_names(count: int) -> list[str]:
    return [f"bench{k}" for k in range(count)]


def build_demo_models(models_dir: Path, count: int, *, width: int, frame_size: tuple[int, int],
                      audio_seconds: list[float], seed: int = 0, templates: int = DEMO_TEMPLATES,
                      progress: bool = True) -> list[Path]:
    """``count`` demo packages, each its own seed (own look, weights and audio encoder, so models share
    nothing), each with a default track of ``audio_seconds[k]`` so every request of the run can ask for a
    frame not asked for before."""
    models_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    names = demo_model_names(count)
    for k in tqdm(range(count), desc="demo packages", unit="model", disable=not progress, leave=False):
        path = models_dir / f"{names[k]}-1.zip"
        build_demo_package(names[k], path, width=width, frames=templates, seed=seed + k, size=frame_size,
                           audio_seconds=audio_seconds[k])
        paths.append(path)
    return paths


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


class BenchServer:
    """``lipsync serve`` in a subprocess; use as a context manager. Its log goes to ``log_path``."""

    def __init__(self, models_dir: Path, preload: list[str], *, log_path: Path, device: str = "cpu",
                 precision: str = "fp32", torch_threads: int = 0, http_port: int = 0,
                 extra_args: tuple[str, ...] = ()):
        self.models_dir = models_dir
        self.preload = preload
        self.log_path = log_path
        self.device = device
        self.precision = precision
        self.torch_threads = torch_threads
        self.http_port = http_port  # 0: no HTTP gateway (gRPC is enough, and no fixed port can clash)
        self.extra_args = extra_args
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def target(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def command(self) -> list[str]:
        # Extra arguments first: the pinned ones after them win (argparse keeps the last), so the server
        # stays on loopback and on the port this object knows.
        return [sys.executable, "-m", "inference_pod.cli", "serve", *self.extra_args, "--host", LOOPBACK,
                "--port", str(self.port),
                "--metrics-port", "0", "--http-port", str(self.http_port), "--models-dir", str(self.models_dir), "--device", self.device,
                "--precision", self.precision, "--shutdown-grace-s", str(STOP_GRACE_S / 2),
                "--preload", *self.preload]

    def start(self) -> BenchServer:
        env = dict(os.environ)
        if self.torch_threads:
            env["OMP_NUM_THREADS"] = str(self.torch_threads)  # torch's intra-op threads, read at import
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self.proc = proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            self._wait_serving(proc)
        except BaseException:  # interrupted or failed: leave no server behind
            self.stop()
            raise
        return self

    def _wait_serving(self, proc: subprocess.Popen) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        with LipSyncClient(self.target, timeout=2.0) as client:
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    raise RuntimeError(f"the benchmark's server exited with {proc.returncode}:\n{self.log_tail()}")
                try:
                    if client.health() == "SERVING":  # after the preload list is loaded
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.2)
        raise RuntimeError(f"the benchmark's server was not SERVING after {START_TIMEOUT_S:.0f} s:\n{self.log_tail()}")

    def cpu_seconds(self) -> float | None:
        """CPU seconds the server process has used (user + system, all threads); None off Linux."""
        if self.proc is None:  # not started
            return None
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM (the pod's graceful shutdown), then SIGKILL if it does not exit in time."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=STOP_GRACE_S)

    def __enter__(self) -> BenchServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

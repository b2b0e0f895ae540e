"""``lipsync demo``'s live run: the demo character served by a real pod, heard and seen through a live session.

A ``Pod`` (the one ``lipsync serve`` runs) starts in this process, on its own event loop in a thread, on free
loopback ports, with the character preloaded. The speech is played into a ``Session`` over gRPC in real time,
between idle stretches, exactly as ``lipsync client session`` plays a file (``session_recording``); the frames
and audio that come back become PNG frames and an mp4, and the A/V offset is measured on what was written,
from the pixels and the sound alone (``lipsync_quality.recording_sync``). The pod is stopped before this
returns, whatever happened: nothing is left listening.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from inference_pod.app import Pod
from inference_pod.client import LipSyncClient
from inference_pod.core import audio
from inference_pod.core.engine import CropBox, pingpong_index
from inference_pod.errors import LipSyncError
from inference_pod.package import CharacterPackage
from inference_pod.serving.settings import Settings
from inference_pod.tools.lipsync_quality import SyncReport, recording_sync
from inference_pod.tools.session_recording import mux, play_session, require_ffmpeg

LOOPBACK = "127.0.0.1"
POD_STOP_GRACE_S = 5.0


class PodInThread:
    """A ``Pod`` on its own event loop in a background thread, so a blocking client can call it from this one.
    ``close()`` drains it and returns once its ports are released; a pod that failed to start is stopped too."""

    def __init__(self, settings: Settings, start_timeout_s: float = 600.0):
        self.pod: Pod | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="lipsync-demo-pod", daemon=True)
        self._thread.start()
        try:
            self._call(self._start(settings), start_timeout_s)
        except BaseException:
            self.close()
            raise

    async def _start(self, settings: Settings) -> None:
        self.pod = Pod(settings)  # built on the pod's own loop, as `lipsync serve` builds it
        await self.pod.start()

    def _call(self, coro, timeout_s: float):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)

    @property
    def target(self) -> str:
        assert self.pod is not None and self.pod.port is not None, "started"
        return f"{self.pod.settings.host}:{self.pod.port}"

    def close(self) -> None:
        try:
            if self.pod is not None:
                self._call(self.pod.stop(POD_STOP_GRACE_S), POD_STOP_GRACE_S + 60)
            self._call(self._cancel_the_rest(), 60)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)
            self._loop.close()

    @staticmethod
    async def _cancel_the_rest() -> None:
        """What ``asyncio.run`` does at the end of ``lipsync serve``: tasks still pending (an idle frame being
        rendered for the cache when the session ended) are cancelled and awaited, not destroyed mid-flight."""
        tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.get_running_loop().shutdown_asyncgens()

    def __enter__(self) -> PodInThread:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def demo_pod_settings(models_dir: Path, name: str, device: str = "cpu", paste: str = "exact") -> Settings:
    """A pod for the demo alone: loopback only, ports the system picks, no metrics port, the character preloaded."""
    return Settings(host=LOOPBACK, port=0, http_port=0, metrics_port=0, models_dir=models_dir, preload=[name],
                    device=device, paste=paste, shutdown_grace_s=POD_STOP_GRACE_S).validate()


@dataclass(frozen=True)
class AvOffset:
    frames: int  # the recording's mouth lags its voice by this many frames at the correlation peak (+: late)
    fps: int
    report: SyncReport
    video_start_s: float  # stream start times in the mp4 (0 and 0 when measured on PNG frames)
    audio_start_s: float

    @property
    def ms(self) -> float:
        return 1000.0 * self.frames / self.fps


@dataclass(frozen=True)
class LiveDemoResult:
    target: str  # the pod's gRPC address
    session: dict  # play_session's figures
    first_frame_since_start_s: float  # from `lipsync demo` starting to the session's first frame
    frames_dir: Path
    video: Path | None
    offset: AvOffset


def run_live_demo(character: CharacterPackage, name: str, models_dir: Path, pcm: bytes, out: Path, *,
                  video: Path | None, started: float, idle_s: float = 1.0, unpaced: bool = False,
                  device: str = "cpu", paste: str = "exact", on_pod_ready=None) -> LiveDemoResult:
    """Serve ``character`` from ``models_dir``, play ``pcm`` (16 kHz mono PCM16) between ``idle_s`` of idle
    before and after, write ``out/frames`` (PNG) and ``video`` (mp4, None: none), measure the A/V offset.
    ``started`` is the ``time.perf_counter()`` the whole demo began at; ``on_pod_ready(target)`` is told the
    pod's address as soon as it serves."""
    if video is not None:
        require_ffmpeg()
    frames_dir = out / "frames"
    frames_dir.mkdir(parents=True, exist_ok=True)
    for stale in frames_dir.glob("frame_*.png"):  # a longer earlier run's frames would trail this one's
        stale.unlink()
    with tempfile.TemporaryDirectory(prefix="lipsync-demo-") as tmp:
        sound = Path(tmp) / "audio.pcm"
        with PodInThread(demo_pod_settings(models_dir, name, device, paste)) as pod:
            target = pod.target
            with LipSyncClient(target, timeout=30) as client:
                try:
                    if (health := client.health(name)) != "SERVING":
                        raise LipSyncError(f"the demo's pod at {target} cannot serve {name} ({health}) — the pod's "
                                           "log above says why")
                    if on_pod_ready is not None:
                        on_pod_ready(target)
                    opened = time.perf_counter()
                    session = play_session(client, name, pcm, frames_dir, sound, idle_before=idle_s,
                                           idle_after=idle_s, unpaced=unpaced, image_format="png")
                except grpc.RpcError as exc:
                    raise LipSyncError(f"the demo's session with its pod at {target} failed: "
                                       f"{exc.code().name}: {exc.details()} — the pod's log above says why") from None
        if session["first_frame_s"] is None or "ticks" not in session:
            raise LipSyncError(f"the demo's session with its pod at {target} ended without "
                               f"{'a frame' if session['first_frame_s'] is None else 'its summary'} — the pod's log "
                               "above says why")
        first_frame = opened - started + session["first_frame_s"]
        if video is not None:
            mux(frames_dir, sound, session["fps"], video, image_format="png")
            offset = mp4_av_offset(video, character)
        else:
            recorded = np.frombuffer(sound.read_bytes(), dtype="<i2").astype(np.float32) / 32768.0
            offset = frames_av_offset(sorted(frames_dir.glob("frame_*.png")), recorded, character, session["fps"])
    return LiveDemoResult(target, session, first_frame, frames_dir, video, offset)


def _boxes(character: CharacterPackage, n_frames: int) -> list[CropBox]:
    """The crop box of the template tick i shows (the session's template order is the tick's ping-pong index)."""
    boxes = np.asarray(character.crop_boxes(), dtype=np.int64)
    out = []
    for i in range(n_frames):
        x1, y1, x2, y2 = (int(v) for v in boxes[pingpong_index(i, len(boxes))])
        out.append(CropBox(x1, y1, x2, y2, x2 - x1))
    return out


def frames_av_offset(frame_files: list[Path], wav16k: np.ndarray, character: CharacterPackage, fps: int) -> AvOffset:
    import cv2

    def frames() -> Iterator[np.ndarray]:
        for path in frame_files:
            frame = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if frame is None:
                raise LipSyncError(f"cannot read {path}")
            yield frame

    report = recording_sync(frames(), _boxes(character, len(frame_files)), wav16k)
    return AvOffset(report.peak_offset, fps, report, 0.0, 0.0)


def mp4_av_offset(video: Path, character: CharacterPackage) -> AvOffset:
    """Decode ``video`` as a player would (ffmpeg, edit lists applied), place its sound at its stream's start
    time against the picture's, and measure how far the mouth lags the voice."""
    streams = _probe(video)
    picture, sound = streams.get("video"), streams.get("audio")
    if picture is None or sound is None:
        raise LipSyncError(f"{video} lacks a {'video' if picture is None else 'audio'} stream")
    width, height = int(picture["width"]), int(picture["height"])
    fps = round(_rate(picture["avg_frame_rate"]))
    video_start, audio_start = float(picture.get("start_time", 0)), float(sound.get("start_time", 0))
    wav = _decode_audio(video)
    lead = round((audio_start - video_start) * audio.SAMPLE_RATE)  # sound starting late: silence before it
    wav = np.concatenate([np.zeros(lead, np.float32), wav]) if lead > 0 else wav[-lead:]
    n_frames = int(picture.get("nb_frames") or 0)
    if n_frames < 1:
        raise LipSyncError(f"{video} has no video frames")
    report = recording_sync(_decode_frames(video, width, height), _boxes(character, n_frames), wav)
    return AvOffset(report.peak_offset, fps, report, video_start, audio_start)


def _probe(video: Path) -> dict[str, dict]:
    done = subprocess.run(["ffprobe", "-v", "error", "-show_entries",
                           "stream=codec_type,start_time,width,height,avg_frame_rate,nb_frames", "-of", "json",
                           str(video)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise LipSyncError(f"ffprobe cannot read {video}: {done.stderr.strip()}")
    streams: dict[str, dict] = {}
    for stream in json.loads(done.stdout).get("streams", []):
        streams.setdefault(stream.get("codec_type", ""), stream)
    return streams


def _rate(text: str) -> float:
    num, _, den = text.partition("/")
    return float(num) / float(den or 1) if float(den or 1) else 0.0


def _decode_audio(video: Path) -> np.ndarray:
    done = subprocess.run(["ffmpeg", "-v", "error", "-i", str(video), "-map", "0:a:0", "-f", "s16le", "-ac", "1",
                           "-ar", str(audio.SAMPLE_RATE), "-"], capture_output=True, check=False)
    if done.returncode != 0:
        raise LipSyncError(f"ffmpeg cannot decode the sound of {video}: {done.stderr.decode(errors='replace')}")
    return np.frombuffer(done.stdout, dtype="<i2").astype(np.float32) / 32768.0


def _decode_frames(video: Path, width: int, height: int) -> Iterator[np.ndarray]:
    size = width * height * 3
    proc = subprocess.Popen(["ffmpeg", "-v", "error", "-i", str(video), "-map", "0:v:0", "-f", "rawvideo",
                             "-pix_fmt", "bgr24", "-"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None  # PIPE
    try:
        while len(data := proc.stdout.read(size)) == size:
            yield np.frombuffer(data, dtype=np.uint8).reshape(height, width, 3)
    finally:
        proc.stdout.close()
        proc.kill()
        proc.wait()

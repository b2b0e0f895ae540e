"""Playing an audio file into a live session over gRPC, and recording what comes back: every frame as an image
file and the audio the frames carried, then both muxed into an mp4.

Shared by ``lipsync client session`` (any running pod) and ``lipsync demo`` (a pod it starts itself). Needs no
torch: the client side only decodes the file, paces it and writes what arrives.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import numpy as np

from inference_pod.client import EXTENSIONS, LipSyncClient
from inference_pod.core import audio
from inference_pod.errors import InvalidInput

TICK_BYTES = 2 * 640  # one 25 fps tick of 16 kHz PCM16


def pcm16_from_file(path: Path) -> bytes:
    """The file's speech as 16 kHz mono PCM16, what a session takes. Read here, so a missing file is the CLI's
    one line naming the path."""
    wav = audio.decode_audio(Path(path).read_bytes(), source=str(path))
    return (np.clip(wav, -1.0, 1.0) * 32767).astype("<i2").tobytes()


def frame_path(frames_dir: Path, index: int, image_format: str = "jpeg") -> Path:
    return frames_dir / f"frame_{index:06d}.{EXTENSIONS[image_format]}"


def require_ffmpeg() -> None:
    if shutil.which("ffmpeg") is None:
        raise InvalidInput("ffmpeg is needed to write the mp4: apt-get install ffmpeg")


def play_session(client: LipSyncClient, model: str, pcm: bytes, frames_dir: Path, audio_out: Path, *,
                 idle_before: float = 1.0, idle_after: float = 1.0, unpaced: bool = False, jpeg_quality: int = 0,
                 image_format: str = "jpeg") -> dict:
    """Drive a session by its own ticks: ``idle_before`` seconds of idle, then ``pcm`` in 40 ms chunks as the
    ticks pass (real time unless ``unpaced``), then a flush; the session ends ``idle_after`` seconds after
    playback finished. Frame i is written to ``frame_path(frames_dir, i)`` and the audio every frame carried
    to ``audio_out`` (raw 16 kHz mono PCM16), as they come. Returns the session's figures."""
    from lipsync.v1 import lipsync_pb2 as pb

    frames_dir.mkdir(parents=True, exist_ok=True)
    sent_at: dict[int, float] = {}  # chunk offset -> wall time sent
    kinds = {"idle": 0, "speaking": 0, "repeated": 0}
    summary: dict = {"fps": 25}
    first_voiced = next((i for i in range(0, len(pcm), 2) if pcm[i : i + 2] != b"\0\0"), None)
    start_tick = finished_tick = None
    heard_at = first_frame_at = None
    offset = 0
    ticks = 0
    image_index = 0
    opened = time.perf_counter()
    with client.session(model, unpaced=unpaced, jpeg_quality=jpeg_quality, format=image_format) as session, \
            open(audio_out, "wb") as audio_file:
        for response in session:
            kind = response.WhichOneof("message")
            if kind == "started":
                summary.update(fps=response.started.fps, session_id=response.started.session_id,
                               lookahead_s=round(response.started.lookahead_s, 3))
                start_tick = round(idle_before * response.started.fps)
            elif kind == "frame":
                frame = response.frame
                if first_frame_at is None:
                    first_frame_at = time.perf_counter() - opened
                kinds[pb.FrameKind.Name(frame.kind).removeprefix("FRAME_KIND_").lower()] += 1
                while image_index <= frame.tick:  # a tick a slow reader lost: the previous image again
                    frame_path(frames_dir, image_index, image_format).write_bytes(frame.frame.image)
                    image_index += 1
                audio_file.write(frame.audio)
                ticks += 1
                if heard_at is None and first_voiced is not None and frame.audio.strip(b"\0"):
                    heard_at = time.perf_counter() - sent_at[first_voiced - first_voiced % TICK_BYTES]
                if start_tick is not None and frame.tick >= start_tick:
                    # Paced: 40 ms a tick, as a voice. Unpaced there is no real time to keep: all at once.
                    due = len(pcm) if unpaced else (frame.tick - start_tick + 1) * TICK_BYTES
                    if offset < min(due, len(pcm)):
                        for piece in range(offset, min(due, len(pcm)), TICK_BYTES):
                            sent_at[piece] = time.perf_counter()
                        session.send_audio(pcm[offset:due])
                        offset = min(due, len(pcm))
                    if offset >= len(pcm) and start_tick >= 0:
                        session.flush()
                        start_tick = -1  # everything sent
                if finished_tick is not None and frame.tick >= finished_tick + idle_after * summary["fps"]:
                    session.end()
            elif kind == "playback_finished":
                finished_tick = response.playback_finished.tick
            elif kind == "ended":
                ended = response.ended
                summary.update(ticks=ended.ticks, frames={"speaking": ended.speaking_frames,
                                                          "idle_cached": ended.idle_cached_frames,
                                                          "idle_computed": ended.idle_computed_frames,
                                                          "repeated": ended.repeated_frames},
                               repeated=ended.repeated_frames, dropped=ended.dropped_frames,
                               ended=ended.reason)
    summary["frames_received"] = ticks
    summary["frames_written"] = image_index
    summary["first_frame_s"] = None if first_frame_at is None else round(first_frame_at, 3)
    summary["speech_latency_s"] = None if heard_at is None else round(heard_at, 3)
    return summary


def mux(frames_dir: Path, audio_pcm: Path, fps: int, out: Path, image_format: str = "jpeg") -> None:
    """The frames and the audio they carried, into one mp4 (H.264 + AAC)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    pattern = frames_dir / f"frame_%06d.{EXTENSIONS[image_format]}"
    cmd = ["ffmpeg", "-y", "-loglevel", "error", "-framerate", str(fps), "-i", str(pattern),
           "-f", "s16le", "-ar", "16000", "-ac", "1", "-i", str(audio_pcm),
           "-c:v", "libx264", "-pix_fmt", "yuv420p", "-vf", "pad=ceil(iw/2)*2:ceil(ih/2)*2",
           "-c:a", "aac", "-shortest", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise InvalidInput(f"ffmpeg could not write {out}: {done.stderr.strip()[-500:]}")

"""``lipsync bench sessions``: M concurrent real-time live sessions on one pod, M stepped upward.

Each session is one character of several (as a pool pod carries them) and plays a conversation's pattern
(``session_driver``): idle gaps, replies streamed at real time, some of them interrupted by a barge-in. Per
M: the share of repeated frames (a frame not ready at its tick), speech and barge-in latency, the A/V
offset of the output, and the network calls the idle cache saved (``session_figures``); overall the largest
M whose sessions repeat at most 1 % of their frames. Against ``--target`` (a running pod) or a
``lipsync serve`` it starts itself with demo characters (the first of them the trained demo, whose mouth is
measured from its pixels). The sessions go through a transport (``session_transport``): gRPC, or WebRTC
(``--transport webrtc``: aiortc peers in this process receive and decode H.264 or VP8 and Opus, as viewers
would). Per level it also reads the CPU the pod used (its process's, from /proc, when it started the pod)
and the CPU this process used (the receivers': decoding, and the driver), each per session.
Writes sessions.json, sessions.md and sessions.png.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from inference_pod.bench.bench_server import LOOPBACK, BenchServer, free_port
from inference_pod.bench.report import machine_info, markdown_table, write_json
from inference_pod.bench.session_driver import Pattern, SessionRecord, play_session
from inference_pod.bench.session_figures import level_row
from inference_pod.bench.session_transport import TRANSPORTS, SessionTransport, transport
from inference_pod.tools.demo_character import (
    DEFAULT_SPEECH,
    TRAINED,
    build_demo_package,
    default_speech,
    espeak,
    speech_like_audio,
)
from inference_pod.tools.lipsync_quality import HELD_OUT_SPEECH

WEBRTC_CODECS = ("h264", "vp8")
STOP_REPEATED_SHARE = 0.5  # a level repeating more than this ends the escalation: larger M only repeat more
START_SPREAD_S = 1.0  # sessions of a level open at random moments within this, as independent callers would
SYNTHETIC_CLIPS = 4
PHASE_STEP = 0.618  # session k's barge-ins at phase 0.5 + k x this (mod 1): spread over a level's sessions


@dataclass
class SessionsBenchConfig:
    target: str | None = None  # None: start a pod with demo characters
    api_key: str | None = None
    models: tuple[str, ...] = ()  # with target: the characters (sessions take them in turn)
    sync_model: str | None = None  # with target: the trained demo among them, its mouth measured from pixels
    transport: str = "grpc"
    codec: str | None = None  # webrtc: h264 or vp8 (None: the pod's choice from the offer)
    video_size: tuple[int, int] | None = None  # webrtc: the video's WxH (None: the character's frame size)
    bitrate_kbps: int | None = None  # webrtc (None: the pod's default)
    characters: int = 3  # demo characters of the pod it starts
    width: int = 4  # their U-Net base width (the trained demo's is 4)
    frame_size: tuple[int, int] = (256, 256)
    templates: int = 50
    device: str = "cpu"
    precision: str = "fp32"
    torch_threads: int = 1  # of the pod it starts (0: torch's default)
    server_args: tuple[str, ...] = ()
    sessions: tuple[int, ...] = (1, 2, 4, 8)  # the levels: sessions at once
    duration_s: float = 20.0  # per level: each session starts replies for this long
    warm_up_s: float = 4.0  # one session per character first (idle cache, the model's first passes)
    gap_s: tuple[float, float] = (0.6, 2.0)
    barge_in_share: float = 0.3
    chunk_ms: float = 40.0
    max_repeated_share: float = 0.01
    stop_repeated_share: float = STOP_REPEATED_SHARE  # a level past this ends the escalation
    seed: int = 0
    out_dir: Path = Path("bench-results/sessions")
    progress: bool = True
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.transport not in TRANSPORTS:
            raise ValueError(f"unknown transport {self.transport!r}; choose from {', '.join(TRANSPORTS)}")
        if self.transport != "webrtc" and (self.codec or self.video_size or self.bitrate_kbps):
            raise ValueError("--codec, --video-size and --bitrate-kbps are WebRTC's: add --transport webrtc")
        if self.codec is not None and self.codec not in WEBRTC_CODECS:
            raise ValueError(f"--codec must be one of {', '.join(WEBRTC_CODECS)}, got {self.codec!r}")
        if self.target is not None and not self.models:
            raise ValueError("with --target, name the characters to run sessions of: --models NAME[,NAME...]")
        if self.target is None and (self.models or self.sync_model):
            raise ValueError("--models and --sync-model name a --target's characters; without --target the "
                             "benchmark builds its own (--characters)")
        if self.sync_model is not None and self.sync_model not in self.models:
            raise ValueError(f"--sync-model {self.sync_model!r} is not one of --models")
        if not self.sessions or min(self.sessions) < 1 or self.characters < 1 or self.templates < 1:
            raise ValueError("--sessions, --characters and --templates must be positive")
        if not 0 <= self.barge_in_share <= 1 or not 0 <= self.max_repeated_share <= 1:
            raise ValueError("--barge-in-share and --max-repeated-share are shares: 0 to 1")
        if self.duration_s <= 0 or self.chunk_ms <= 0 or self.warm_up_s < 0:
            raise ValueError("--duration-s and --chunk-ms must be positive, --warm-up-s at least 0")

    @property
    def trained_demo(self) -> bool:
        """The pod it starts carries the trained demo as its first character (the weights exist for one look)."""
        return self.target is None and self.width == TRAINED.width and tuple(self.frame_size) == TRAINED.size

    @property
    def pattern(self) -> Pattern:
        return Pattern(self.duration_s, self.gap_s, self.barge_in_share, chunk_ms=self.chunk_ms)

    @property
    def transport_options(self) -> dict:
        """What the transport passes on with each session (WebRTC's video options)."""
        if self.transport != "webrtc":
            return {}
        width, height = self.video_size or (None, None)
        return {"codec": self.codec, "width": width, "height": height, "bitrate_kbps": self.bitrate_kbps}


def character_names(count: int) -> list[str]:
    return [f"char{k}" for k in range(count)]


def build_characters(cfg: SessionsBenchConfig, models_dir: Path, log) -> list[dict]:
    """Demo packages, as ``lipsync package demo`` builds them: the first the trained demo when the size and
    width allow, the others seeded random weights (each its own look)."""
    models_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for k, name in enumerate(tqdm(character_names(cfg.characters), desc="characters", unit="package",
                                  disable=not cfg.progress, leave=False)):
        trained = k == 0 and cfg.trained_demo
        seed = TRAINED.seed if trained else cfg.seed + 1 + k
        build_demo_package(name, models_dir / f"{name}-1.zip", width=cfg.width, frames=cfg.templates, seed=seed,
                           size=cfg.frame_size, speech=default_speech(2.0, seed), trained=trained)
        out.append({"name": name, "weights": "trained demo" if trained else "random", "seed": seed,
                    "width": cfg.width, "frame_size": list(cfg.frame_size), "templates": cfg.templates})
    log(f"built {len(out)} characters ({cfg.frame_size[0]}x{cfg.frame_size[1]}, width {cfg.width}"
        + (", the first the trained demo" if cfg.trained_demo else ", random weights") + ")")
    return out


def speech_clips(seed: int) -> tuple[list[np.ndarray], str]:
    """The replies' audio as PCM16: espeak-ng sentences the demo never learnt from, or synthetic syllables."""
    if shutil.which("espeak-ng") is not None:
        clips = [espeak(u) for u in (*HELD_OUT_SPEECH, *DEFAULT_SPEECH)]
        source = "espeak-ng sentences (the quality gate's held-out ones and the demo's)"
    else:
        rng = np.random.default_rng(seed)
        clips = [speech_like_audio(float(rng.uniform(2.0, 4.0)), seed + k) for k in range(SYNTHETIC_CLIPS)]
        source = "synthetic syllables (espeak-ng is not installed)"
    return [(np.clip(c, -1.0, 1.0) * 32767).astype("<i2") for c in clips], source


def levels_of(cfg: SessionsBenchConfig) -> list[int]:
    return sorted(set(cfg.sessions))


def largest_within(rows: list[dict], max_share: float) -> int:
    """The largest M up to which every level ran all its sessions and repeated at most ``max_share``."""
    largest = 0
    for row in rows:
        ok = (row["sessions_ran"] == row["sessions"] and not row["errors"]
              and row["repeated_share"] is not None and row["repeated_share"] <= max_share)
        if not ok:
            break
        largest = row["sessions"]
    return largest


# ------------------------------------------------------------------------------------------ running


async def _warm_up(link: SessionTransport, models: list[str], clips: list[np.ndarray], cfg: SessionsBenchConfig) -> None:
    """One session per character at once: the idle cache's first pass and the model's first speech."""
    if cfg.warm_up_s <= 0:
        return
    pattern = Pattern(cfg.warm_up_s, gap_s=(0.5 * cfg.warm_up_s, 0.5 * cfg.warm_up_s), barge_in_share=0.0,
                      chunk_ms=cfg.chunk_ms)
    records = await asyncio.gather(*(
        play_session(link.open(m), SessionRecord(m), pattern, clips, np.random.default_rng([cfg.seed, 0, k]))
        for k, m in enumerate(models)))
    failed = [f"{r.model}: {'refused' if r.refused else r.error}" for r in records if r.refused or r.error]
    if failed:
        raise RuntimeError(f"warm-up sessions failed: {'; '.join(failed)}")


async def _level(link: SessionTransport, m: int, models: list[str], sync_models: set[str], clips: list[np.ndarray],
                 cfg: SessionsBenchConfig, pod_cpu) -> dict:
    records = [SessionRecord(models[k % len(models)], keep_images=models[k % len(models)] in sync_models)
               for k in range(m)]
    start_rng = np.random.default_rng([cfg.seed, m, 1 << 20])

    async def one(k: int) -> SessionRecord:
        await asyncio.sleep(float(start_rng.uniform(0, START_SPREAD_S)) if m > 1 else 0.0)
        rng = np.random.default_rng([cfg.seed, m, k])
        return await play_session(link.open(records[k].model, keep_images=records[k].keep_images), records[k],
                                  cfg.pattern, clips, rng, phase=(0.5 + k * PHASE_STEP) % 1.0)

    cpu_before, own_before = pod_cpu(), time.process_time()
    began = time.perf_counter()
    await asyncio.gather(*(one(k) for k in range(m)))
    wall = time.perf_counter() - began
    cpu_after, own_cpu_s = pod_cpu(), time.process_time() - own_before  # every thread of this process
    pod_cpu_s = cpu_after - cpu_before if cpu_before is not None and cpu_after is not None else None
    # Decoding the measured sessions' images happens here, after the level: nothing measured waits for it.
    return level_row(m, records, wall, pod_cpu_s, own_cpu_s)


async def _levels(cfg: SessionsBenchConfig, target: str, models: list[str], sync_models: set[str],
                  clips: list[np.ndarray], pod_cpu, log) -> list[dict]:
    rows: list[dict] = []
    async with transport(cfg.transport, target, cfg.api_key, **cfg.transport_options) as link:
        log(f"warming up: one session per character for {cfg.warm_up_s:g} s ...")
        await _warm_up(link, models, clips, cfg)
        for m in levels_of(cfg):
            log(f"{m} session{'s' if m > 1 else ''} at once for {cfg.duration_s:g} s ...")
            row = await _level(link, m, models, sync_models, clips, cfg, pod_cpu)
            rows.append(row)
            log("  " + _row_line(row))
            if row["sessions_ran"] == 0 or (row["repeated_share"] or 0) > cfg.stop_repeated_share:
                break
    return rows


def run(cfg: SessionsBenchConfig, log=print) -> dict:
    load_before = _load_average()
    with tempfile.TemporaryDirectory(prefix="lipsync-bench-sessions-") as tmp, contextlib.ExitStack() as stack:
        workdir = Path(tmp)
        clips, speech = speech_clips(cfg.seed)
        pod_cpu: Callable[[], float | None] = lambda: None  # noqa: E731 - a running pod's CPU is not ours to read
        if cfg.target is None:
            characters = build_characters(cfg, workdir / "models", log)
            models = [c["name"] for c in characters]
            sync_models = {models[0]} if cfg.trained_demo else set()
            log("starting lipsync serve on 127.0.0.1 ...")
            http_port = free_port() if cfg.transport == "webrtc" else 0  # WebRTC offers go to the HTTP gateway
            server = stack.enter_context(BenchServer(
                workdir / "models", models, log_path=workdir / "server.log", device=cfg.device,
                precision=cfg.precision, torch_threads=cfg.torch_threads, http_port=http_port,
                extra_args=("--max-sessions", "0", *cfg.server_args)))
            target, pod_cpu = server.target, server.cpu_seconds
            if http_port:
                target = f"http://{LOOPBACK}:{http_port}"
        else:
            characters = [{"name": m, "weights": "trained demo" if m == cfg.sync_model else "unknown"}
                          for m in cfg.models]
            models, sync_models, target = list(cfg.models), {cfg.sync_model} - {None}, cfg.target
        started = time.perf_counter()
        rows = asyncio.run(_levels(cfg, target, models, sync_models, clips, pod_cpu, log))
    machine = machine_info(cfg.device)
    result: dict[str, Any] = {
        "benchmark": "sessions",
        "label": _label(cfg, machine),
        "machine": machine | {"load_average_before": load_before, "load_average_after": _load_average()},
        "transport": cfg.transport,
        "target": cfg.target or "started by the benchmark on 127.0.0.1",
        "characters": characters,
        "speech": speech,
        "config": _config_dict(cfg),
        "levels": rows,
        "largest_sessions_within": largest_within(rows, cfg.max_repeated_share),
        "stopped_early": len(rows) < len(levels_of(cfg)),
        "max_repeated_share": cfg.max_repeated_share,
        "duration_s": round(time.perf_counter() - started, 1),
    }
    result["markdown"] = render_markdown(result)
    out = cfg.out_dir
    out.mkdir(parents=True, exist_ok=True)
    from inference_pod.bench.chart import write_sessions_chart  # matplotlib: only when a chart is written

    result["files"] = {"json": str(out / "sessions.json"), "markdown": str(out / "sessions.md"),
                       "chart": str(write_sessions_chart(result, out / "sessions.png"))}
    (out / "sessions.md").write_text(result["markdown"] + "\n")
    write_json(out / "sessions.json", {k: v for k, v in result.items() if k != "markdown"})
    return result


# ------------------------------------------------------------------------------------------ report


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _label(cfg: SessionsBenchConfig, machine: dict) -> str:
    device = machine.get("gpu") or f"{machine['cpu']} ({machine['cpu_count']} CPUs)"
    own = (f", {cfg.characters} characters {cfg.frame_size[0]}x{cfg.frame_size[1]} width {cfg.width}"
           if cfg.target is None else f", target {cfg.target}")
    video = ""
    if cfg.transport == "webrtc":
        size = f"{cfg.video_size[0]}x{cfg.video_size[1]}" if cfg.video_size else "the characters' size"
        video = f" ({cfg.codec or 'codec from the offer'} {size}" + (
            f" {cfg.bitrate_kbps} kbit/s)" if cfg.bitrate_kbps else ")")
    return f"{device}, {cfg.device} {cfg.precision}, torch {machine['torch']}, {cfg.transport}{video}{own}"


def _config_dict(cfg: SessionsBenchConfig) -> dict:
    d = asdict(replace(cfg, api_key="***" if cfg.api_key else None))
    extra = d.pop("extra")
    return {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
            for k, v in d.items()} | extra


def _pct(value) -> str | None:
    return None if value is None else f"{100 * value:.1f} %"


def _pair(summary: dict) -> str | None:
    if summary.get("p50_ms") is None:
        return None
    return f"{summary['p50_ms']:,.0f} / {summary['p99_ms']:,.0f}"


def _sync(row: dict) -> str | None:
    sync = row.get("av_pixel_sync")
    if not sync:
        return None
    return f"{sync['peak_offset_frames']:+d} ({sync['peak_offset_ms']:+.0f} ms), r={sync['r_at_0']:.2f}"


def _cores(value) -> str | None:
    return None if value is None else f"{100 * value:.0f} %"


def _row_line(row: dict) -> str:
    return (f"repeated {_pct(row['repeated_share'])}, speech p50/p99 {_pair(row['speech_latency'])} ms, barge-in "
            f"p50/p99 {_pair(row['barge_in_latency'])} ms, idle cache saved {row['network_calls_saved']} calls, "
            f"{row['refused']} refused, errors {row['errors'] or 'none'}; CPU per session: pod "
            f"{_cores(row['pod_cpu_per_session'])}, client {_cores(row['client_cpu_per_session'])} of a core")


COLUMNS = [
    ("sessions", "sessions"), ("ticks", "frames"), ("repeated_pct", "repeated"), ("speaking_pct", "speaking"),
    ("saved", "idle from cache (calls saved)"), ("idle_computed", "idle computed"),
    ("speech", "speech latency p50 / p99 ms"), ("barge", "barge-in latency p50 / p99 ms"),
    ("sync", "A/V offset, pixels: frames, r"), ("av_timestamp_offset_ms", "A/V offset, timestamps ms"),
    ("dropped", "dropped"), ("failed", "refused / failed"),
    ("pod_cpu", "pod CPU / session (of a core)"), ("client_cpu", "client CPU / session (of a core)"),
]


def render_markdown(result: dict) -> str:
    rows = [{**r, "repeated_pct": _pct(r["repeated_share"]), "speaking_pct": _pct(r["speaking_share"]),
             "saved": f"{r['network_calls_saved']} ({_pct(r['saved_share'])})",
             "speech": _pair(r["speech_latency"]), "barge": _pair(r["barge_in_latency"]), "sync": _sync(r),
             "failed": f"{r['refused']} / {sum(r['errors'].values())}",
             "pod_cpu": _cores(r.get("pod_cpu_per_session")), "client_cpu": _cores(r.get("client_cpu_per_session"))}
            for r in result["levels"]]
    cfg = result["config"]
    load = result["machine"].get("load_average_before")
    lines = [
        f"**lipsync bench sessions**: {result['label']}"
        + (f"; load average {load[0]:.1f} at the start" if load else ""),
        "",
        f"Each session {cfg['duration_s']:g} s of replies: idle gaps of {cfg['gap_s'][0]:g}-{cfg['gap_s'][1]:g} s, "
        f"replies of {result['speech']} streamed in {cfg['chunk_ms']:g} ms chunks at real time, "
        f"{100 * cfg['barge_in_share']:.0f} % of them cut by a barge-in; characters "
        f"{', '.join(c['name'] + ' (' + c['weights'] + ')' for c in result['characters'])}, taken in turn. "
        f"**Largest M with at most {100 * result['max_repeated_share']:g} % repeated frames: "
        f"{result['largest_sessions_within']}**",
        "",
        markdown_table(rows, COLUMNS),
    ]
    return "\n".join(lines)


__all__ = ["SessionsBenchConfig", "largest_within", "render_markdown", "run"]

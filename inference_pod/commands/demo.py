"""``lipsync demo``: the demo character, served by a real pod and played through a live session (CPU).

Needs no GPU, no Redis and no cluster (espeak-ng gives the voice, ffmpeg the mp4): the character is
generated (drawn frames, the committed trained weights, an espeak-ng voice) and packaged with the real
converter; a pod (the one ``lipsync serve`` runs) starts in this process on free loopback ports, and the
demo's line, or any audio file passed with --audio, is played into a live session over gRPC (in real time
on a GPU, unpaced on the CPU) between a second of idle before and after. What comes back is written as PNG frames and an mp4, with the
figures a newcomer asks about: the pod's address, time to the first frame, frames by kind and the A/V offset
measured on the output. ``--offline`` renders straight from the engine instead, with no pod (``lipsync
render``'s path).
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from inference_pod.commands import nonnegative_float
from inference_pod.core.templates import PASTE_MODES


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="a demo character served by a pod and played through a live session (CPU)",
                       description="Build (or reuse) the demo character, start a pod with it on free loopback ports, "
                                   "play its line (or --audio) into a live session (real time on a GPU, unpaced on the CPU) between idle "
                                   "stretches, and write what came back as PNG frames and an mp4; prints the pod's "
                                   "address, time to the first frame, frames by kind and the A/V offset measured "
                                   "on the output, then stops the pod. --offline renders from the engine instead, "
                                   "with no pod.")
    p.add_argument("--out", type=Path, default=Path("demo-output"), help="output directory (default demo-output)")
    p.add_argument("--name", default="demo", help="character name")
    p.add_argument("--audio", type=Path, metavar="FILE", help="speech to play (wav, mp3, ...; default: the demo's own line)")
    p.add_argument("--random-weights", action="store_true", help="untrained, seeded random weights (the mouth will not move)")
    p.add_argument("--width", type=int, help="U-Net base width with --random-weights (default 8)")
    p.add_argument("--frames", type=int, default=50, help="template frames to draw")
    p.add_argument("--device", default="cpu", help="cpu or cuda (--offline: also cuda:N)")
    p.add_argument("--idle", type=nonnegative_float, default=1.0,
                   help="seconds of idle before and after the speech in the live session (default 1)")
    pace = p.add_mutually_exclusive_group()
    pace.add_argument("--unpaced", action="store_true",
                      help="the session ticks as fast as the pod renders instead of in real time: the same frames, "
                           "none repeated (the default on --device cpu, which cannot render 25 frames/s)")
    pace.add_argument("--real-time", action="store_true",
                      help="the session ticks in real time, 25 frames/s, frames not ready at their tick repeated "
                           "(the default on --device cuda)")
    p.add_argument("--paste", choices=PASTE_MODES, default="feather",
                   help="how each prediction goes back into its frame (lipsync serve --paste): feather by default "
                        "here, since the width-4 demo network's border does not match its template and exact, "
                        "SyncTalk_2D's paste and the pod's default, shows the crop box as a line")
    p.add_argument("--no-video", action="store_true", help="PNG frames only")
    p.add_argument("--offline", action="store_true",
                   help="render straight from the engine, frame by frame as fast as it goes, with no pod and no "
                        "session (what lipsync render does)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from inference_pod.errors import InvalidInput
    from inference_pod.tools.demo_character import TRAINED

    started = time.perf_counter()
    if args.audio is not None and not args.audio.is_file():
        raise InvalidInput(f"--audio {args.audio}: no such file")
    if args.width is not None and not args.random_weights:
        raise InvalidInput(f"--width applies to --random-weights only: the trained demo is width {TRAINED.width}")
    if not args.offline and args.device not in ("cpu", "cuda"):
        raise InvalidInput(f"--device {args.device}: the live demo's pod runs on cpu or cuda (the pod's first GPU); "
                           "--offline takes cuda:N")
    package = build(args.out, args.name, args.frames, args.random_weights, args.width)
    return (run_offline if args.offline else run_live)(args, package, started)


def run_offline(args: argparse.Namespace, package, started: float) -> int:
    from inference_pod.core.engine import Engine
    from inference_pod.tools.render import render, track_for

    engine = Engine.from_package(package, device=args.device, paste=args.paste)
    video = None if args.no_video or shutil.which("ffmpeg") is None else args.out / f"{args.name}.mp4"
    audio_path = args.audio or package.default_audio_path()
    result = render(engine, args.out / "frames", track_for(engine, args.audio, None), video=video, audio_path=audio_path)
    print(f"rendered {result.frames} frames to {result.out_dir}" + (f", video {result.video}" if result.video else ""))
    return 0


def run_live(args: argparse.Namespace, package, started: float) -> int:
    from inference_pod.core import audio
    from inference_pod.tools.live_demo import run_live_demo
    from inference_pod.tools.session_recording import pcm16_from_file

    speech = args.audio or package.default_audio_path()
    pcm = pcm16_from_file(speech)
    video = None if args.no_video else args.out / f"{args.name}.mp4"
    if video is not None and shutil.which("ffmpeg") is None:
        print("ffmpeg is not installed: PNG frames only (apt-get install ffmpeg for the mp4)")
        video = None

    what = args.audio or "the demo's line"
    # A CPU renders the U-Net at a few frames a second: in real time nearly every frame would be a repeat.
    unpaced = args.unpaced or (args.device == "cpu" and not args.real_time)
    if unpaced and not args.unpaced:
        print("on the CPU the session runs unpaced (its clock follows the renders: the same frames and timestamps, "
              "none repeated); --real-time plays it at 25 frames/s, as a GPU does")

    def announce(target: str) -> None:
        print(f"pod: serving {args.name} over gRPC at {target} (started by this demo, stopped when it ends)")
        print(f"playing {args.idle:g} s idle, {len(pcm) / 2 / audio.SAMPLE_RATE:.1f} s of speech "
              f"({what}), {args.idle:g} s idle "
              f"into a live session, {'unpaced' if unpaced else 'in real time'}", flush=True)

    result = run_live_demo(package, args.name, args.out, pcm, args.out, video=video, started=started, idle_s=args.idle,
                           unpaced=unpaced, device=args.device, paste=args.paste,
                           on_pod_ready=announce)
    session = result.session
    counts = session["frames"]
    idle = counts["idle_cached"] + counts["idle_computed"]
    print(f"first frame: {session['first_frame_s']:.2f} s after the session opened, "
          f"{result.first_frame_since_start_s:.1f} s after the demo started")
    print(f"frames: {session['ticks']} — speaking {counts['speaking']}, idle {idle}, "
          f"repeated {counts['repeated']} (a frame not ready at its tick)"
          + (f", {session['dropped']} dropped" if session.get("dropped") else ""))
    if session.get("speech_latency_s") is not None:
        print(f"speech latency: {session['speech_latency_s']:.2f} s from a chunk sent to its sound coming back")
    if counts["repeated"] * 4 > session["ticks"]:  # only --real-time on a slow machine
        print(f"  {counts['repeated']} frames were repeated: this machine did not render 25 frames/s in time "
              "(busy, or slow); without --real-time it renders every frame")
    print(av_offset_line(result.offset, result.video or f"{result.frames_dir} and the session's audio"))
    print(f"wrote {session['frames_written']} PNG frames to {result.frames_dir}"
          + (f" and {result.video}" if result.video is not None else ""))
    print(f"pod at {result.target} stopped")
    return 0


def av_offset_line(offset, where) -> str:
    """The A/V offset where the mouth follows the voice at all; otherwise that it cannot be measured, and why."""
    from inference_pod.tools.lipsync_quality import MIN_CORRELATION

    report = offset.report
    best = report.correlations[offset.frames]
    streams = f"streams start at {offset.video_start_s:.3f} s (video) and {offset.audio_start_s:.3f} s (audio)"
    if best < MIN_CORRELATION:
        return (f"A/V offset: not measurable on {where}: the mouth follows the voice at no offset (best r = "
                f"{best:.2f} at {offset.frames:+d} frames, below {MIN_CORRELATION}); {streams}")
    return (f"A/V offset: {offset.ms:+.0f} ms, measured on {where}: the mouth follows the voice best at "
            f"{offset.frames:+d} frames (r = {best:.2f}; r = {report.correlation:.2f} at 0); {streams}")


def build(out: Path, name: str = "demo", frames: int = 50, random_weights: bool = False, width: int | None = None):
    """The demo's package, ``OUT/NAME.zip``, extracted where ``lipsync serve --models-dir OUT`` keeps its
    copies (``OUT/.store``), so that serving the demo's output reuses this copy instead of making a second."""
    from inference_pod.package import extract_package
    from inference_pod.serving.model_store import store_copy
    from inference_pod.serving.settings import Settings
    from inference_pod.tools.demo_character import TRAINED, build_demo_package, default_speech

    out.mkdir(parents=True, exist_ok=True)
    package_path = out / f"{name}.zip"
    manifest = build_demo_package(name, package_path, width=(width or 8) if random_weights else TRAINED.width,
                                  frames=frames, speech=default_speech(), trained=not random_weights)
    print(f"demo character package: {package_path}")
    return extract_package(package_path, store_copy(Settings(models_dir=out).extract_dir, manifest))

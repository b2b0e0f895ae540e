"""``lipsync client ...``: call every method of a running pod from the command line.

Images are written to files; everything else is printed as JSON. The target and API key also come from
``LIPSYNC_TARGET`` and ``LIPSYNC_API_KEY``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import grpc

from inference_pod.commands import nonnegative_float, positive_float

ACTIONS = ("frame", "batch", "stream", "stream-audio", "session", "models", "load", "unload", "registry", "stats", "health")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("client", help="call a running inference pod (every gRPC method)",
                       description="Call every method of a running pod. Images are written to files; everything "
                                   "else is printed as JSON. The target and API key also come from "
                                   "LIPSYNC_TARGET and LIPSYNC_API_KEY.")
    p.add_argument("--target", default=os.environ.get("LIPSYNC_TARGET", "localhost:50051"),
                   help="host:port of the pod (env LIPSYNC_TARGET, default localhost:50051)")
    p.add_argument("--api-key", default=os.environ.get("LIPSYNC_API_KEY"), help="API key (env LIPSYNC_API_KEY)")
    p.add_argument("--tls", action="store_true", help="connect with TLS (system roots unless --ca-cert)")
    p.add_argument("--ca-cert", type=Path, help="PEM file of the CA that signed the server's certificate")
    p.add_argument("--timeout", type=positive_float, default=60.0, help="seconds per unary call (default 60)")
    ps = p.add_subparsers(dest="client_command", required=True, metavar="ACTION")

    def output_flags(q: argparse.ArgumentParser) -> None:
        q.add_argument("--format", choices=("jpeg", "png", "raw"), default="jpeg",
                       help="image format (raw: BGR bytes, height x width x 3)")
        q.add_argument("--region", choices=("full", "prediction"), default="full",
                       help="the whole composited frame, or the model's 320x320 mouth region only")
        q.add_argument("--quality", type=int, default=0, help="JPEG quality 1..100 (default: the server's)")

    def audio_flags(q: argparse.ArgumentParser) -> None:
        q.add_argument("--audio", type=Path, help="audio file (WAV, FLAC, OGG, MP3, ...); default: the model's track")
        q.add_argument("--pcm-rate", type=int, help="treat --audio as raw PCM16 at this sample rate")
        q.add_argument("--channels", type=int, default=1, help="channels of raw PCM16 audio (default 1)")

    q = ps.add_parser("frame", help="GenerateFrame: one frame to a file")
    q.add_argument("model", help="model (character) name")
    q.add_argument("frame_id", type=int, help="frame number in the audio track, from 0")
    audio_flags(q)
    output_flags(q)
    q.add_argument("-o", "--out", type=Path, help="image file (default frame_<id>.<ext>)")
    q.set_defaults(func=run_frame)

    q = ps.add_parser("batch", help="GenerateBatch: items MODEL:FRAME or MODEL:FIRST-LAST")
    q.add_argument("items", nargs="+", help="e.g. demo:0-9 other:3")
    audio_flags(q)
    output_flags(q)
    q.add_argument("-o", "--out-dir", type=Path, default=Path("frames"), help="directory for the images")
    q.set_defaults(func=run_batch)

    q = ps.add_parser("stream", help="StreamFrames: a range of frames to a directory")
    q.add_argument("model", help="model (character) name")
    q.add_argument("--first", type=int, default=0, help="first frame")
    q.add_argument("--last", type=int, help="inclusive (default: the end of the track)")
    q.add_argument("--realtime", action="store_true", help="paced at the model's fps (or --fps)")
    q.add_argument("--fps", type=float, default=0.0, help="pace of --realtime (0: the model's fps)")
    audio_flags(q)
    output_flags(q)
    q.add_argument("-o", "--out-dir", type=Path, default=Path("frames"), help="directory for the images")
    q.set_defaults(func=run_stream)

    q = ps.add_parser("stream-audio", help="StreamAudio: send an audio file as live PCM chunks, save frames")
    q.add_argument("model", help="model (character) name")
    q.add_argument("audio", type=Path, help="audio file, decoded here and streamed as 16 kHz PCM16")
    q.add_argument("--chunk-ms", type=positive_float, default=40.0, help="chunk length (default 40 ms)")
    q.add_argument("--realtime", action="store_true", help="send chunks at the pace of the audio, like a microphone")
    output_flags(q)
    q.add_argument("-o", "--out-dir", type=Path, default=Path("frames"), help="directory for the images")
    q.set_defaults(func=run_stream_audio)

    q = ps.add_parser("session", help="Session: play an audio file into a live session in real time, record an mp4",
                      description="Open a live session, let the avatar idle, play AUDIO into it as a voice would "
                                  "(in real time, 40 ms chunks), let it idle again, and write what came back - "
                                  "every frame with the audio it returned - to an mp4 (ffmpeg). Prints frames by "
                                  "kind, repeated frames and the speech latency.")
    q.add_argument("model", help="model (character) name")
    q.add_argument("audio", type=Path, help="speech (WAV, FLAC, OGG, MP3, ...), decoded here to 16 kHz mono")
    q.add_argument("--out", type=Path, default=Path("session.mp4"), help="the mp4 to write (default session.mp4)")
    q.add_argument("--idle-before", type=nonnegative_float, default=1.0, help="seconds of idle before (default 1)")
    q.add_argument("--idle-after", type=nonnegative_float, default=1.0, help="seconds of idle after (default 1)")
    q.add_argument("--unpaced", action="store_true",
                   help="ticks as fast as the pod renders them instead of in real time (same result, offline)")
    q.add_argument("--quality", type=int, default=0, help="JPEG quality 1..100 (default: the server's)")
    q.set_defaults(func=run_session)

    ps.add_parser("models", help="ListModels").set_defaults(func=run_models)
    q = ps.add_parser("load", help="LoadModel")
    q.add_argument("name", help="model (character) name")
    q.add_argument("--version", help="package version (default: the local one, else the registry's latest)")
    q.set_defaults(func=run_load)
    q = ps.add_parser("unload", help="UnloadModel")
    q.add_argument("name", help="model (character) name")
    q.set_defaults(func=run_unload)
    ps.add_parser("registry", help="ListRegistry").set_defaults(func=run_registry)
    ps.add_parser("stats", help="GetStats").set_defaults(func=run_stats)
    q = ps.add_parser("health", help="grpc.health.v1 Check: the server, or one model with --service NAME")
    q.add_argument("--service", default="", help="a model name (default: the whole server)")
    q.set_defaults(func=run_health)


# ------------------------------------------------------------------------------------------ helpers


def _client(args):
    from inference_pod.client import LipSyncClient

    roots = args.ca_cert.read_bytes() if args.ca_cert else None
    return LipSyncClient(args.target, api_key=args.api_key, tls=args.tls, root_certificates=roots,
                         timeout=args.timeout)


def _calling(run):
    """Report RPC errors as one line with the status code, exit status 1."""

    def wrapper(args: argparse.Namespace) -> int:
        try:
            with _client(args) as client:
                return run(client, args) or 0
        except grpc.RpcError as exc:
            print(f"lipsync: error: {exc.code().name}: {exc.details()}{_hint(exc.code(), args)}", file=sys.stderr)
            return 1

    return wrapper


def _hint(code: grpc.StatusCode, args: argparse.Namespace) -> str:
    """What a command-line user does about a failed call; the server's message stays protocol-neutral."""
    if code == grpc.StatusCode.UNAVAILABLE:
        return f" — is a pod running at {args.target}? (--target or LIPSYNC_TARGET)"
    if code == grpc.StatusCode.UNAUTHENTICATED:
        given = "the key given was refused; " if args.api_key else ""
        return (f" — {given}pass a valid key with --api-key KEY before the action "
                f"(lipsync client --api-key KEY {args.client_command} ...) or in LIPSYNC_API_KEY")
    return ""


def _print(message_or_obj) -> None:
    from inference_pod.client import message_to_dict

    obj = message_or_obj if isinstance(message_or_obj, (dict, list)) else message_to_dict(message_or_obj)
    print(json.dumps(obj, indent=2))


def _audio(args):
    from inference_pod.client import Pcm16

    if args.audio is None:
        return None
    data = args.audio.read_bytes()
    return Pcm16(data, args.pcm_rate, args.channels) if args.pcm_rate else data


def _output(args) -> dict:
    return {"format": args.format, "region": args.region, "jpeg_quality": args.quality}


def _summary(frame) -> dict:
    from inference_pod.client import message_to_dict

    d = message_to_dict(frame)
    d["image"] = f"{len(frame.image)} bytes"
    return d


def _save(frame, out_dir: Path, fmt: str) -> Path:
    from inference_pod.client import EXTENSIONS

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{frame.model}_{frame.frame_id:06d}.{EXTENSIONS[fmt]}"
    path.write_bytes(frame.image)
    return path


def _parse_items(specs: list[str]) -> list[tuple[str, int]]:
    from inference_pod.errors import InvalidInput

    items = []
    for spec in specs:
        model, sep, frames = spec.rpartition(":")
        if not sep or not model:
            raise InvalidInput(f"batch item {spec!r} is not MODEL:FRAME or MODEL:FIRST-LAST — e.g. demo:0-24")
        first, _, last = frames.partition("-")
        try:
            first_id, last_id = int(first), int(last or first)
        except ValueError:
            raise InvalidInput(f"batch item {spec!r} has a bad frame id — frame ids are whole numbers from 0, "
                               "e.g. demo:0-24") from None
        if last_id < first_id:  # an empty range would send an empty batch and print nothing
            raise InvalidInput(f"batch item {spec!r} is an empty range: {last_id} is before {first_id} — "
                               f"write FIRST-LAST with FIRST <= LAST, e.g. {model}:{last_id}-{first_id}")
        items += [(model, i) for i in range(first_id, last_id + 1)]
    return items


# ------------------------------------------------------------------------------------------ actions


@_calling
def run_frame(client, args) -> int:
    from inference_pod.client import EXTENSIONS

    frame = client.generate_frame(args.model, args.frame_id, _audio(args), **_output(args))
    out = args.out or Path(f"frame_{args.frame_id}.{EXTENSIONS[args.format]}")
    out.write_bytes(frame.image)
    _print({**_summary(frame), "written": str(out)})
    return 0


@_calling
def run_batch(client, args) -> int:
    from inference_pod.client import frame_request

    audio = _audio(args)
    requests = [frame_request(model, i, audio, **_output(args)) for model, i in _parse_items(args.items)]
    results = client.generate_batch(requests)
    failed = 0
    for request, result in zip(requests, results, strict=True):
        if result.HasField("frame"):
            print(f"{request.model}:{request.frame_id} -> {_save(result.frame, args.out_dir, args.format)}")
        else:
            failed += 1
            print(f"{request.model}:{request.frame_id} failed: {result.error.code}: {result.error.message}")
    return 1 if failed else 0


def _consume(frames, out_dir: Path, fmt: str) -> dict:
    started = time.perf_counter()
    first_at = None
    count = 0
    for frame in frames:
        first_at = first_at or time.perf_counter() - started
        _save(frame, out_dir, fmt)
        count += 1
    elapsed = time.perf_counter() - started
    return {"frames": count, "seconds": round(elapsed, 3), "fps": round(count / elapsed, 2) if elapsed else 0.0,
            "first_frame_seconds": round(first_at or 0.0, 3), "out_dir": str(out_dir)}


@_calling
def run_stream(client, args) -> int:
    frames = client.stream_frames(args.model, args.first, args.last, _audio(args), realtime=args.realtime,
                                  fps=args.fps, **_output(args))
    _print(_consume(frames, args.out_dir, args.format))
    return 0


@_calling
def run_stream_audio(client, args) -> int:
    import numpy as np

    from inference_pod.core import audio

    # read here, like every client command's audio, so a missing file is the CLI's one line naming AUDIO
    wav = audio.decode_audio(args.audio.read_bytes(), source=str(args.audio))
    pcm = (np.clip(wav, -1.0, 1.0) * 32767).astype("<i2").tobytes()
    step = max(2, int(audio.SAMPLE_RATE * args.chunk_ms / 1000) * 2)

    def chunks():
        started = time.perf_counter()
        for offset in range(0, len(pcm), step):
            if args.realtime:  # like a microphone: a chunk is sent when its audio has been "spoken"
                delay = started + (offset + step) / 2 / audio.SAMPLE_RATE - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
            yield pcm[offset : offset + step]

    frames = client.stream_audio(args.model, chunks(), audio.SAMPLE_RATE, 1, **_output(args))
    _print(_consume(frames, args.out_dir, args.format))
    return 0


@_calling
def run_session(client, args) -> int:
    import tempfile

    from inference_pod.tools.session_recording import mux, pcm16_from_file, play_session, require_ffmpeg

    require_ffmpeg()
    pcm = pcm16_from_file(args.audio)
    with tempfile.TemporaryDirectory(prefix="lipsync-session-") as tmp:
        frames, sound = Path(tmp), Path(tmp) / "audio.pcm"
        summary = play_session(client, args.model, pcm, frames, sound, idle_before=args.idle_before,
                               idle_after=args.idle_after, unpaced=args.unpaced, jpeg_quality=args.quality)
        mux(frames, sound, summary["fps"], args.out)
    _print({**summary, "out": str(args.out)})
    ticks, repeated = summary.get("ticks", 0), summary.get("repeated", 0)
    if not args.unpaced and repeated * 4 > ticks:  # a still face in the mp4: say why, and what to do
        print(f"lipsync: {repeated} of {ticks} frames were repeated: the pod did not render {summary['fps']} "
              "frames/s in time (a CPU pod cannot; a busy one may not) — --unpaced renders every frame",
              file=sys.stderr)
    return 0


@_calling
def run_models(client, args) -> int:
    from inference_pod.client import message_to_dict

    _print([message_to_dict(m) for m in client.list_models()])
    return 0


@_calling
def run_load(client, args) -> int:
    _print(client.load_model(args.name, args.version))
    return 0


@_calling
def run_unload(client, args) -> int:
    _print({"name": args.name, "unloaded": client.unload_model(args.name)})
    return 0


@_calling
def run_registry(client, args) -> int:
    _print(client.list_registry())
    return 0


@_calling
def run_stats(client, args) -> int:
    _print(client.get_stats())
    return 0


@_calling
def run_health(client, args) -> int:
    try:
        status = client.health(args.service)
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.NOT_FOUND or exc.details():
            raise
        # grpc.health.v1 answers an unknown service with NOT_FOUND and no message at all
        print(f"lipsync: error: NOT_FOUND: no model named {args.service!r} is loaded or known to the pod at "
              f"{args.target} — 'lipsync client models' lists them", file=sys.stderr)
        return 1
    _print({"service": args.service, "status": status})
    return 0 if status == "SERVING" else 1



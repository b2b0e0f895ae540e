"""``lipsync package``: build, demo, inspect, verify, publish and fetch character packages."""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path

from inference_pod.errors import InvalidInput


def register(subparsers) -> None:
    p = subparsers.add_parser("package", help="build, inspect, verify and distribute character packages")
    sub = p.add_subparsers(dest="package_command", required=True, metavar="ACTION")

    b = sub.add_parser("build", help="package a SyncTalk_2D character directory and its checkpoints")
    b.add_argument("--synctalk-dataset", type=Path, required=True, metavar="DIR",
                   help="SyncTalk_2D character directory (full_body_img/, landmarks/, aud.wav, aud_ave.npy)")
    b.add_argument("--checkpoint", type=Path, required=True, metavar="UNET.pth", help="trained U-Net checkpoint")
    b.add_argument("--audio-encoder", type=Path, metavar="AVE.pth",
                   help="SyncTalk_2D's audio_visual_encoder.pth (required in ave mode)")
    b.add_argument("--name", required=True, help="character name (a-z, 0-9, '.', '_', '-')")
    b.add_argument("--version", default="1", help="package version (default 1)")
    b.add_argument("--mode", choices=["ave", "hubert", "wenet"],
                   help="audio mode; default: wenet if the checkpoint is one, else ave (hubert must be named)")
    b.add_argument("--out", type=Path, required=True, metavar="FILE.zip", help="package to write")
    b.set_defaults(func=_build)

    d = sub.add_parser("demo", help="build the demo character (drawn face, trained weights, espeak-ng voice)")
    d.add_argument("--name", default="demo", help="character name (default demo)")
    d.add_argument("--version", default="1", help="package version (default 1)")
    d.add_argument("--out", type=Path, required=True, metavar="FILE.zip", help="package to write")
    d.add_argument("--random-weights", action="store_true",
                   help="seeded random U-Net weights instead of the trained ones (any width, seed and size)")
    d.add_argument("--training-set", action="store_true",
                   help="one frame per frame of the training speech, random weights: what lipsync train learns from")
    d.add_argument("--width", type=int, help="U-Net base width (default: the trained 4; 8 with --random-weights)")
    d.add_argument("--frames", type=int, default=50, help="template frames (default 50)")
    d.add_argument("--size", type=_size, default=(256, 256), metavar="WxH", help="frame size (default 256x256)")
    d.add_argument("--audio-seconds", type=float,
                   help="default track of this many seconds of synthetic syllables (default: espeak-ng speech)")
    d.add_argument("--seed", type=int, default=0, help="seed for drawing, audio and weights (default 0)")
    d.set_defaults(func=_demo)

    i = sub.add_parser("inspect", help="print a package's manifest")
    i.add_argument("package", type=Path, metavar="FILE", help="package zip or extracted directory")
    i.add_argument("--json", action="store_true", help="print the manifest as JSON")
    i.set_defaults(func=_inspect)

    v = sub.add_parser("verify", help="fully check a package: checksums, frames, crop boxes, tensor shapes")
    v.add_argument("package", type=Path, metavar="FILE", help="package zip or extracted directory")
    v.set_defaults(func=_verify)

    pub = sub.add_parser("publish", help="add a package to a file-system registry")
    pub.add_argument("package", type=Path, metavar="FILE", help="package zip")
    pub.add_argument("--registry", type=Path, required=True, metavar="DIR", help="registry directory")
    pub.add_argument("--base-url", help="URL the registry directory is served at (for the index)")
    pub.set_defaults(func=_publish)

    f = sub.add_parser("fetch", help="download a package from a registry and verify it")
    f.add_argument("name", help="character name")
    f.add_argument("--registry", required=True, metavar="URL", help="registry URL: http://, https:// or file://")
    f.add_argument("--version", help="package version (default: the latest)")
    f.add_argument("--sha256", metavar="HEX", help="expected SHA-256 of the package zip")
    f.add_argument("--out", type=Path, required=True, metavar="DIR", help="directory to store the package in")
    f.add_argument("--token", default=os.environ.get("LIPSYNC_REGISTRY_TOKEN") or None,
                   help="bearer token for a private registry (default: $LIPSYNC_REGISTRY_TOKEN)")
    f.add_argument("--prepare", action="store_true",
                   help="also extract it into the store and prepare its templates, so that a pod's first load "
                        "maps them instead of decoding every frame (the pod's init container does)")
    f.add_argument("--store-dir", type=Path, metavar="DIR",
                   help="the store to extract into with --prepare (default OUT/.store, as lipsync serve "
                        "--models-dir OUT)")
    f.set_defaults(func=_fetch)


def _size(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)x(\d+)", text)
    if not match:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, e.g. 256x256, got {text!r}")
    return int(match[1]), int(match[2])


def _build(args) -> int:
    from inference_pod.package import package_summary
    from inference_pod.tools.synctalk_dataset import build_package

    manifest = build_package(
        args.synctalk_dataset, args.checkpoint, args.audio_encoder, args.name, args.out, version=args.version, mode=args.mode
    )
    print(f"wrote {args.out}\n{package_summary(manifest)}")
    return 0


def _demo(args) -> int:
    from inference_pod.package import package_summary
    from inference_pod.tools.demo_character import (
        TRAINED,
        TRAINING_SPEECH,
        build_demo_package,
        default_speech,
        speech_track,
    )

    trained = not (args.random_weights or args.training_set)
    width = args.width if args.width is not None else (TRAINED.width if trained or args.training_set else 8)
    if width < 2 or width % 2:
        raise InvalidInput(f"--width must be an even number >= 2, got {width}")
    if args.training_set:
        speech, frames = speech_track(TRAINING_SPEECH), None
    else:
        speech, frames = default_speech(args.audio_seconds, args.seed), args.frames
    manifest = build_demo_package(
        args.name, args.out, width=width, frames=frames, seed=args.seed, size=args.size, version=args.version,
        speech=speech, trained=trained,
    )  # fmt: skip
    print(f"wrote {args.out}\n{package_summary(manifest)}")
    return 0


def _inspect(args) -> int:
    from inference_pod.package import package_summary, read_manifest

    manifest = read_manifest(args.package)
    print(json.dumps(manifest.to_dict(), indent=2) if args.json else package_summary(manifest))
    return 0


def _verify(args) -> int:
    from inference_pod.package import verify_package

    manifest = verify_package(args.package)
    print(f"OK {manifest.name} {manifest.version}: {manifest.frame_count} frames, {len(manifest.members) + 1} members checked")
    return 0


def _publish(args) -> int:
    from inference_pod.serving.registry import publish

    entry = publish(args.package, args.registry, base_url=args.base_url)
    print(f"published {entry.name} {entry.version} to {args.registry}: {entry.url} (sha256 {entry.sha256})")
    return 0


def _fetch(args) -> int:
    from inference_pod.serving.registry import fetch

    path = fetch(args.registry, args.name, args.version, args.out, expected_sha256=args.sha256, token=args.token)
    print(path)
    if args.prepare:
        _prepare(path, args.store_dir or args.out / ".store")
    elif args.store_dir is not None:
        raise InvalidInput("--store-dir needs --prepare")
    return 0


def _prepare(zip_path: Path, store_dir: Path) -> None:
    """Extract into the store where ``lipsync serve`` looks, and prepare the templates beside it."""
    import time

    from inference_pod.core.prepared_templates import prepare_package
    from inference_pod.package import extract_package, read_manifest
    from inference_pod.serving.model_store import store_copy
    from inference_pod.serving.node_store import CopyLease

    started = time.perf_counter()
    manifest = read_manifest(zip_path)
    copy = store_copy(store_dir, manifest)
    lease = CopyLease.take(copy)  # a node store's collection leaves a copy alone while it is being made
    try:
        package = extract_package(zip_path, copy)
        prepared = prepare_package(package)
    finally:
        lease.release()
    print(f"prepared {manifest.frame_count} templates in {prepared} ({time.perf_counter() - started:.1f} s)")

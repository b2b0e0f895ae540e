"""``lipsync serve``: run an inference pod (gRPC API, health, reflection, Prometheus metrics, HTTP gateway).

Once its ports are bound and its preload list is loaded it prints where it answers (``ready_lines``), so a
person knows when to open the live page. ``--demo`` serves the demo character (``make serve``): built into
the models directory as ``lipsync demo`` builds it, and preloaded.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
from pathlib import Path

from inference_pod.serving.settings import Settings, env_name

DEMO_MODELS_DIR = Path("demo-output")  # where `lipsync demo` puts the demo character, so both share one copy
DEMO_NAME = "demo"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the inference pod's gRPC server and HTTP gateway",
                       description="Run an inference pod: the gRPC API with health and reflection, Prometheus "
                                   "metrics and the HTTP gateway (REST and WebSocket). Every flag also reads "
                                   "LIPSYNC_<FLAG> (e.g. LIPSYNC_REDIS_URL); flags win over the environment.")
    Settings.add_arguments(p)
    p.add_argument("--demo", action="store_true",
                   help=f"serve the demo character: build it into the models directory (default {DEMO_MODELS_DIR} "
                        "with --demo, the folder lipsync demo writes) and preload it; what make serve runs")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    settings = Settings.from_args(args)
    if args.demo:
        settings = with_the_demo(settings, models_dir_given=hasattr(args, "setting_models_dir")
                                 or bool(os.environ.get(env_name("models_dir"), "").strip()))
    settings.check_paths()
    logging.getLogger().setLevel(settings.log_level)
    from inference_pod.app import Pod

    asyncio.run(Pod(settings).run(on_ready=announce_ready))
    print("lipsync serve: stopped", flush=True)
    return 0


def with_the_demo(settings: Settings, models_dir_given: bool) -> Settings:
    """``settings`` serving the demo character too: built (or its extracted copy reused) in the models
    directory, ``demo-output`` unless one was given, and added to the preload list."""
    from inference_pod.commands.demo import build

    models_dir = settings.models_dir if models_dir_given else DEMO_MODELS_DIR
    build(models_dir, DEMO_NAME)
    preload = settings.preload if DEMO_NAME in settings.preload else [*settings.preload, DEMO_NAME]
    return dataclasses.replace(settings, models_dir=models_dir, preload=preload).validate()


def announce_ready(pod) -> None:
    print("\n".join(ready_lines(pod)), flush=True)


def ready_lines(pod) -> list[str]:
    """Where the pod answers, what it serves and how it caches, for the person who started it."""
    s = pod.settings
    host = "localhost" if s.host in ("0.0.0.0", "::", "127.0.0.1", "::1", "localhost") else s.host
    http = "https" if s.tls_cert else "http"
    lines = [f"lipsync serve: ready (Ctrl-C drains and stops it; in-flight calls get {s.shutdown_grace_s:g} s)",
             f"  gRPC       {host}:{pod.port}   e.g. lipsync client --target {host}:{pod.port} models"]
    if pod.gateway is not None:
        lines.append(f"  live page  {http}://{host}:{pod.gateway.port}/   (REST and WebSocket on the same port)")
    else:
        lines.append("  live page  off (--http-port 0)")
    metrics = pod.data_plane.ports.metrics
    lines.append(f"  metrics    http://{host}:{metrics}/metrics" if metrics else "  metrics    off (--metrics-port 0)")
    redis = pod.data_plane.cache.redis_display_url
    lines.append(f"  cache      Redis at {redis}" if redis else
                 "  cache      in this process: no Redis needed (--redis-url redis://HOST:6379 shares one between pods)")
    health = pod.data_plane.health.snapshot()
    models = [name for name in health if name]
    if models:
        lines.append("  models     " + ", ".join(f"{name} ({'serving' if health[name] else 'loads on first use'})"
                                              for name in sorted(models)))
    return lines

"""``lipsync serve``: run an inference pod (gRPC API, health, reflection, Prometheus metrics, HTTP gateway)."""

from __future__ import annotations

import argparse
import asyncio
import logging

from inference_pod.serving.settings import Settings


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the inference pod's gRPC server and HTTP gateway",
                       description="Run an inference pod: the gRPC API with health and reflection, Prometheus "
                                   "metrics and the HTTP gateway (REST and WebSocket). Every flag also reads "
                                   "LIPSYNC_<FLAG> (e.g. LIPSYNC_REDIS_URL); flags win over the environment.")
    Settings.add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    settings = Settings.from_args(args).check_paths()
    logging.getLogger().setLevel(settings.log_level)
    from inference_pod.app import Pod

    asyncio.run(Pod(settings).run())
    return 0

"""``lipsync bench engine``, ``lipsync bench service``, ``lipsync bench pool``, ``lipsync bench sessions``
and ``lipsync bench load``."""

from __future__ import annotations

import argparse
import os
import shlex
from pathlib import Path

from inference_pod.bench import SERVICE_SCENARIOS, SESSION_TRANSPORTS
from inference_pod.commands import positive_float, positive_int
from inference_pod.core.precision import PRECISION_NAMES as PRECISIONS
from inference_pod.core.templates import TEMPLATE_STORAGES


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _float_list(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return values


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WxH, e.g. 256x256, got {text!r}") from None
    return w, h


def _names(text: str) -> tuple[str, ...]:
    names = tuple(v.strip() for v in text.split(",") if v.strip())
    unknown = [n for n in names if n not in SERVICE_SCENARIOS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"unknown scenarios {unknown}; choose from {', '.join(SERVICE_SCENARIOS)}")
    return names


def _storages(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(v.strip() for v in text.split(",") if v.strip()))
    unknown = [n for n in names if n not in TEMPLATE_STORAGES]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"unknown template storages {unknown}; choose from {', '.join(TEMPLATE_STORAGES)}")
    return names


def register(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True, metavar="BENCH")
    p = bench.add_parser("engine", help="batched engine vs SyncTalk_2D's per-frame loop, in one run")
    p.add_argument("--package", type=Path, help="character package; default: a generated demo of --width")
    p.add_argument("--width", type=int, default=32, help="U-Net base width of the generated demo (32 = SyncTalk_2D)")
    p.add_argument("--frame-size", type=_size, default=(256, 256), help="frame size WxH of the generated demo "
                                                                        "(default 256x256; e.g. 1280x720, 1920x1080)")
    p.add_argument("--identity-network", action="store_true",
                   help="BENCHMARKS ONLY: an identity instead of the U-Net (returns each template's region), to "
                        "measure the CPU side alone; named in the results")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--precision", choices=sorted(PRECISIONS), default="fp32",
                   help="fp16 and bf16 are for CUDA")
    p.add_argument("--batch-sizes", type=_int_list, default="1,2,4,8,16,32,64", help="comma-separated batch sizes")
    p.add_argument("--frames", type=int, default=64, help="frames per batch-size run")
    p.add_argument("--naive-frames", type=int, default=16, help="frames through the naive loop (0: skip it)")
    p.add_argument("--output-batch", type=positive_int, default=16, help="batch of the region-vs-full-frame rows")
    p.add_argument("--template-storage", type=_storages, default=",".join(TEMPLATE_STORAGES),
                   help="comma-separated template storages to compare at the largest batch size: resident bytes, "
                        "gather cost, frames/s (default: all of device,host,compressed; the first runs the "
                        "other rows)")
    p.add_argument("--out", type=Path, default=Path("bench-results/engine.json"), help="JSON results file")
    p.set_defaults(func=run_engine)

    s = bench.add_parser(
        "service", help="the replaced service's scenarios over gRPC, against a running pod or one it starts",
        description="Measure a pod over gRPC: sequential frames, 5- and 50-frame batches, concurrent clients, "
                    "several models, stress runs, live audio streams against deadlines, cache hits, and the "
                    "in-process engine on the same frames. Writes service.json, service.md and service.png. "
                    "Unset options take the full run's defaults, or --quick's.")
    s.add_argument("--target", help="HOST:PORT of a running pod; default: start one on 127.0.0.1 with demo models")
    s.add_argument("--api-key", default=os.environ.get("LIPSYNC_API_KEY"), help="for --target (env LIPSYNC_API_KEY)")
    s.add_argument("--package", type=Path, help="with --target: the package of its first model, for the "
                                                "in-process engine comparison")
    s.add_argument("--models", type=positive_int, help="models at once (default 6)")
    s.add_argument("--width", type=positive_int, help="U-Net base width of the demo models (default 4 on CPU, 32 = "
                                                   "SyncTalk_2D's on CUDA)")
    s.add_argument("--frame-size", type=_size, help="demo frame size WxH (default 256x256)")
    s.add_argument("--device", help="device of the server it starts: cpu, cuda (default cpu)")
    s.add_argument("--precision", choices=sorted(PRECISIONS), help="default fp32")
    s.add_argument("--frames", type=positive_int, help="frames per scenario (default 100)")
    s.add_argument("--clients", type=positive_int, help="concurrent clients (default 4)")
    s.add_argument("--streams", type=int, help="most concurrent live audio streams tried (default 4, 48 on CUDA; 0: skip)")
    s.add_argument("--stream-seconds", type=float, help="audio per live stream (default 4)")
    s.add_argument("--chunk-ms", type=float, help="live audio chunk, sent at real time (default 40)")
    s.add_argument("--budget-ms", type=float, help="live frame deadline after its audio window (default 200)")
    s.add_argument("--stress-sizes", type=_int_list, help="frames of each stress run (default 100,1000)")
    s.add_argument("--cache-pairs", type=positive_int, help="frames asked for twice in the cache scenario (default 20)")
    s.add_argument("--scenarios", type=_names, help=f"comma-separated subset of: {','.join(SERVICE_SCENARIOS)}")
    s.add_argument("--torch-threads", type=int, help="torch threads per process (default 1 on CPU: the client "
                                                     "and the server share the cores; 0: torch's default)")
    s.add_argument("--identity-network", action="store_true", default=None,
                   help="BENCHMARKS ONLY: the server it starts runs an identity instead of the U-Net (each "
                        "template's own region), to measure the serving layer alone; named in the results")
    s.add_argument("--server-args", type=shlex.split, help="more lipsync serve flags for the server it starts, "
                                                           "e.g. '--max-batch 4' (it always binds 127.0.0.1)")
    s.add_argument("--max-scenario-s", type=float, help="a scenario stops sending after this long (default 300)")
    s.add_argument("--seed", type=int, help="seed for audio and frame choices (default: a fixed one)")
    s.add_argument("--quick", action="store_true", help="every scenario, a few frames each (a smoke run)")
    s.add_argument("--no-progress", action="store_true", help="no progress bars")
    s.add_argument("--out-dir", type=Path, default=Path("bench-results/service"),
                   help="directory for service.json, service.md and service.png")
    s.set_defaults(func=run_service)

    p = bench.add_parser(
        "pool", help="dedicated pods vs a LipSyncPool: the operator's placement code on a simulated day",
        description="Simulate a day of Zipf-distributed live-stream demand with a daily cycle and spikes of cold "
                    "characters; place copies with the operator's own placement code; report GPUs for one "
                    "Deployment per character vs the pool, demand served, copies moved, cold loads, memory use. "
                    "Writes pool.json, pool.md and pool.png.")
    p.add_argument("--characters", type=_int_list, default="1000,10000", help="comma-separated (default 1000,10000)")
    p.add_argument("--zipf", type=_float_list, default="1.0,1.2", help="Zipf exponents (default 1.0,1.2)")
    p.add_argument("--hours", type=positive_float, default=24.0, help="simulated hours")
    p.add_argument("--step-s", type=positive_float, default=60.0, help="simulated seconds per step (default 60)")
    p.add_argument("--peak-streams-per-character", type=positive_float, default=0.25,
                   help="concurrent live streams at the daily peak, per character (default 0.25)")
    p.add_argument("--spikes", type=int, default=8, help="spikes of a cold character in the run (default 8)")
    p.add_argument("--spike-streams", type=positive_int, default=40, help="streams a spike reaches (default 40)")
    p.add_argument("--pod-fps", type=positive_float, help="frames/s one pod serves (default: --engine-json, else 400)")
    p.add_argument("--engine-json", type=Path, help="a lipsync bench engine JSON: pod capacity = its best "
                                                    "end-to-end FPS")
    p.add_argument("--package", type=Path, help="a character package: the footprint from its manifest")
    p.add_argument("--footprint-mb", type=positive_float, help="memory one character takes (overrides --package)")
    p.add_argument("--pod-memory-gib", type=positive_float, default=64.0, help="model memory per pod (default 64)")
    p.add_argument("--demand-per-copy", type=positive_float, default=100.0,
                   help="frames/s one copy should carry (default 100: 4 live streams)")
    p.add_argument("--max-copies", type=positive_int, default=100, help="most copies of one character (default 100)")
    p.add_argument("--seed", type=int, default=0, help="seed of the simulated demand")
    p.add_argument("--load-s", type=float, help="seconds from placing a copy to its first frame (default: "
                                                "--load-json, else a copy serves from the next step)")
    p.add_argument("--load-json", type=Path, help="a lipsync bench load JSON: its slowest prepared-store load")
    p.add_argument("--out-dir", type=Path, default=Path("bench-results/pool"),
                   help="directory for pool.json, pool.md and pool.png")
    p.set_defaults(func=run_pool)
    _register_sessions(bench)

    # lipsync bench load (issue 18): cold start of characters, prepared templates against derived ones.
    p = bench.add_parser(
        "load", help="cold start: zip -> first frame, prepared store -> first frame, memory shared by processes",
        description="Synthetic characters of each size and template count: a load from the zip (extract and "
                    "prepare), a load from the prepared store while another process holds the character "
                    "(private and shared memory from /proc), each template storage, and the bare decode of "
                    "the template JPEGs. Writes JSON and prints a table; removes what it made.")
    p.add_argument("--sizes", type=lambda t: tuple(_size(v) for v in t.split(",")),
                   default="256x256,1280x720,1920x1080", help="comma-separated WxH (default 256x256,1280x720,1920x1080)")
    p.add_argument("--templates", type=_int_list, default="1500,7500", help="template counts (default 1500,7500)")
    p.add_argument("--template-storage", type=_storages, default="host",
                   help="comma-separated storages; the first times every step, the others add a store load each "
                        "(default host)")
    p.add_argument("--derived", action="store_true",
                   help="also load with preparation off (every template decoded and derived in the load, as before)")
    p.add_argument("--distinct", type=positive_int, default=25, help="distinct drawn frames the templates cycle")
    p.add_argument("--width", type=positive_int, default=4, help="U-Net base width of the synthetic characters "
                                                                  "(default 4: the first frame's network call is "
                                                                  "not what this measures)")
    p.add_argument("--work-dir", type=Path, help="where the synthetic characters are made (default: the temp dir)")
    p.add_argument("--out", type=Path, default=Path("bench-results/load.json"), help="JSON results")
    p.set_defaults(func=run_load)


def run_engine(args: argparse.Namespace) -> int:
    from inference_pod.bench.engine_bench import EngineBenchConfig, run

    cfg = EngineBenchConfig(package=args.package, width=args.width, frame_size=args.frame_size,
                            identity_network=args.identity_network, device=args.device, precision=args.precision,
                            batch_sizes=args.batch_sizes, frames=args.frames, naive_frames=args.naive_frames,
                            output_batch=args.output_batch, template_storages=args.template_storage, out=args.out)
    result = run(cfg)
    print(result["markdown"])
    print(f"\nJSON: {args.out}")
    return 0


def run_service(args: argparse.Namespace) -> int:
    from inference_pod.bench.service_bench import ServiceBenchConfig, run

    cfg = ServiceBenchConfig.preset(
        args.quick, target=args.target, api_key=args.api_key, package=args.package, models=args.models,
        width=args.width, frame_size=args.frame_size, device=args.device, precision=args.precision,
        frames=args.frames, clients=args.clients, streams=args.streams, stream_seconds=args.stream_seconds,
        chunk_ms=args.chunk_ms, budget_ms=args.budget_ms, stress_sizes=args.stress_sizes,
        cache_pairs=args.cache_pairs, scenarios=args.scenarios, torch_threads=args.torch_threads,
        server_args=args.server_args, identity_network=args.identity_network,
        max_scenario_s=args.max_scenario_s, seed=args.seed, out_dir=args.out_dir, progress=not args.no_progress)
    _report(run(cfg))
    return 0


def run_pool(args: argparse.Namespace) -> int:
    from inference_pod.bench.pool_bench import PoolBenchConfig, resolve_inputs, run
    from inference_pod.errors import InvalidInput

    if args.spikes < 0:
        raise InvalidInput("--spikes must be 0 or more")
    cfg = PoolBenchConfig(
        characters=args.characters, zipf=args.zipf, hours=args.hours, step_s=args.step_s,
        peak_streams_per_character=args.peak_streams_per_character, spikes_per_day=args.spikes,
        spike_streams=args.spike_streams, pod_fps=args.pod_fps, engine_json=args.engine_json, package=args.package,
        footprint_mb=args.footprint_mb, pod_memory_gib=args.pod_memory_gib, demand_per_copy=args.demand_per_copy,
        max_copies=args.max_copies, seed=args.seed, load_s=args.load_s, load_json=args.load_json,
        out_dir=args.out_dir)
    if args.load_s is not None and args.load_s < 0:
        raise InvalidInput("--load-s must be 0 or more")
    try:
        resolve_inputs(cfg)   # a missing or wrong --engine-json: one line, before any work
    except (OSError, ValueError, KeyError) as exc:
        raise InvalidInput(f"bench pool: {exc}") from None
    _report(run(cfg))
    return 0


# ------------------------------------------------------------------------------------------ bench sessions

def _share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {text}")
    return value


def _range(text: str) -> tuple[float, float]:
    values = _float_list(text)
    if len(values) != 2 or values[0] > values[1]:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH seconds, e.g. 0.6,2, got {text!r}")
    return values[0], values[1]


def _register_sessions(bench: argparse._SubParsersAction) -> None:
    s = bench.add_parser(
        "sessions", help="M concurrent real-time live sessions on one pod: repeated frames, latency, A/V offset",
        description="Run M live sessions at once (M stepped upward), each a conversation's pattern of idle gaps, "
                    "replies streamed at real time and barge-ins, over several characters; report per M the "
                    "repeated frames, speech and barge-in latency, the A/V offset of the output and the network "
                    "calls the idle cache saved, and the largest M with at most 1 % repeated frames. Writes "
                    "sessions.json, sessions.md and sessions.png.")
    s.add_argument("--target", help="HOST:PORT of a running pod; default: start one on 127.0.0.1 with demo characters")
    s.add_argument("--api-key", default=os.environ.get("LIPSYNC_API_KEY"), help="for --target (env LIPSYNC_API_KEY)")
    s.add_argument("--models", type=lambda t: tuple(v.strip() for v in t.split(",") if v.strip()),
                   help="with --target: comma-separated characters, taken in turn by the sessions")
    s.add_argument("--sync-model", help="with --target: the trained demo among --models (its mouth is measured "
                                        "from the pixels for the A/V offset)")
    s.add_argument("--transport", choices=SESSION_TRANSPORTS, default="grpc", help="how sessions reach the pod "
                                                                                   "(default grpc)")
    s.add_argument("--codec", choices=("h264", "vp8"), help="with --transport webrtc: the video codec (default: the "
                                                           "pod's pick from the offer, H.264)")
    s.add_argument("--video-size", type=_size, help="with --transport webrtc: the video's WxH, e.g. 1280x720 "
                                                    "(default: the characters' frame size)")
    s.add_argument("--bitrate-kbps", type=positive_int, help="with --transport webrtc: the video bitrate (default: "
                                                             "the pod's)")
    s.add_argument("--sessions", type=_int_list, default="1,2,4,8", help="sessions at once, one level each "
                                                                         "(default 1,2,4,8)")
    s.add_argument("--duration-s", type=positive_float, default=20.0, help="seconds of replies per level (default 20)")
    s.add_argument("--characters", type=positive_int, default=3, help="demo characters of the pod it starts "
                                                                      "(default 3; the first the trained demo)")
    s.add_argument("--width", type=positive_int, default=4, help="their U-Net base width (default 4, the trained "
                                                                 "demo's; 32 = SyncTalk_2D's: random weights)")
    s.add_argument("--frame-size", type=_size, default=(256, 256), help="their frame size WxH (default 256x256, the "
                                                                        "trained demo's; others: random weights)")
    s.add_argument("--templates", type=positive_int, default=50, help="template frames per character (default 50)")
    s.add_argument("--device", default="cpu", help="device of the pod it starts: cpu, cuda (default cpu)")
    s.add_argument("--precision", choices=sorted(PRECISIONS), default="fp32", help="default fp32")
    s.add_argument("--torch-threads", type=int, help="torch threads of the pod it starts (default 1 on CPU: the "
                                                     "benchmark shares the cores; torch's default on CUDA)")
    s.add_argument("--server-args", type=shlex.split, default=(), help="more lipsync serve flags for the pod it "
                                                                       "starts, e.g. '--max-batch 16'")
    s.add_argument("--warm-up-s", type=float, default=4.0, help="one session per character first, this long "
                                                                "(default 4; 0: none)")
    s.add_argument("--gap-s", type=_range, default=(0.6, 2.0), help="idle between replies, LOW,HIGH s (default 0.6,2)")
    s.add_argument("--barge-in-share", type=_share, default=0.3, help="replies cut by a clear (default 0.3)")
    s.add_argument("--chunk-ms", type=positive_float, default=40.0, help="reply audio chunk, sent at real time "
                                                                         "(default 40)")
    s.add_argument("--max-repeated-share", type=_share, default=0.01, help="the bar for the largest M (default "
                                                                           "0.01)")
    s.add_argument("--stop-repeated-share", type=_share, default=0.5, help="a level repeating more than this ends "
                                                                           "the run (default 0.5; 1: every level)")
    s.add_argument("--seed", type=int, default=0, help="seed of the patterns and characters")
    s.add_argument("--no-progress", action="store_true", help="no progress bars")
    s.add_argument("--out-dir", type=Path, default=Path("bench-results/sessions"),
                   help="directory for sessions.json, sessions.md and sessions.png")
    s.set_defaults(func=run_sessions)


def run_sessions(args: argparse.Namespace) -> int:
    from inference_pod.bench.sessions import SessionsBenchConfig, run
    from inference_pod.errors import InvalidInput

    threads = args.torch_threads if args.torch_threads is not None else (0 if args.device.startswith("cuda") else 1)
    try:
        cfg = SessionsBenchConfig(
            target=args.target, api_key=args.api_key, models=args.models or (), sync_model=args.sync_model,
            transport=args.transport, codec=args.codec, video_size=args.video_size, bitrate_kbps=args.bitrate_kbps,
            characters=args.characters, width=args.width, frame_size=args.frame_size,
            templates=args.templates, device=args.device, precision=args.precision, torch_threads=threads,
            server_args=tuple(args.server_args), sessions=args.sessions, duration_s=args.duration_s,
            warm_up_s=args.warm_up_s, gap_s=args.gap_s, barge_in_share=args.barge_in_share, chunk_ms=args.chunk_ms,
            max_repeated_share=args.max_repeated_share, stop_repeated_share=args.stop_repeated_share, seed=args.seed,
            out_dir=args.out_dir,
            progress=not args.no_progress)
    except ValueError as exc:
        raise InvalidInput(f"bench sessions: {exc}") from None
    _report(run(cfg))
    return 0


def run_load(args: argparse.Namespace) -> int:
    from inference_pod.bench.load_bench import LoadBenchConfig, run

    cfg = LoadBenchConfig(sizes=args.sizes, templates=args.templates, storages=args.template_storage,
                          derived=args.derived, distinct=args.distinct, width=args.width, work_dir=args.work_dir, out=args.out)
    print(run(cfg)["markdown"])
    print(f"\nJSON: {args.out}")
    return 0


def _report(result: dict) -> None:
    """The Markdown tables, then where the JSON, Markdown and chart files went."""
    print()
    print(result["markdown"])
    files = result["files"]
    print(f"\nJSON: {files['json']}\nMarkdown: {files['markdown']}\nChart: {files['chart']}")

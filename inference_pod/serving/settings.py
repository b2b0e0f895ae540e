"""The pod's settings: one dataclass, filled from ``lipsync serve`` flags, else ``LIPSYNC_<FLAG>`` env vars.

The gRPC server and the HTTP gateway share this object, so a setting means the same thing on both paths.
Precedence: command-line flag > environment variable > default.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from inference_pod.core.precision import PRECISION_NAMES
from inference_pod.core.templates import PASTE_MODES, TEMPLATE_STORAGES
from inference_pod.errors import InvalidInput

ENV_PREFIX = "LIPSYNC_"
DEVICES = ("cpu", "cuda")
PRECISIONS = PRECISION_NAMES
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
# Where a model's template crops live (see inference_pod.core.engine): on the device, in host memory with a copy
# per batch, or PNG-compressed in host memory with a decode per batch.
_DEST_PREFIX = "setting_"
LIST_FIELDS = frozenset({"preload", "allowed_origins", "ice_server"})  # repeated, space- or comma-separated; env: commas


def origin_problem(origin: str) -> str | None:
    """What is wrong with an --allowed-origins entry, or None: ``*``, or scheme://host[:port] as browsers send
    it in the Origin header (no path, no trailing slash)."""
    if origin == "*":
        return None
    try:
        parts = urllib.parse.urlsplit(origin)
        parts.port  # noqa: B018 (raises ValueError on a port that is not a number)
    except ValueError as exc:
        return f"not an origin ({exc})"
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path or parts.query or parts.fragment:
        return "an origin is http(s)://host[:port], as a browser's Origin header names a page, e.g. " \
               "https://app.example.com (or * for any page)"
    return None


def split_ice_server(url: str) -> tuple[str, str | None, str | None]:
    """``turn:USER:PASSWORD@HOST:PORT`` as (``turn:HOST:PORT``, USER, PASSWORD); STUN URLs have no credentials.
    The password may hold colons (it is everything between the first colon of the credentials and the last @)."""
    scheme, _, rest = url.partition(":")
    credentials, at, address = rest.rpartition("@")
    if not at:
        return url, None, None
    username, _, password = credentials.partition(":")
    return f"{scheme}:{address}", username, password


def ice_server_problem(url: str) -> str | None:
    """What is wrong with an --ice-server entry, or None."""
    scheme = url.partition(":")[0]
    if scheme not in ("stun", "stuns", "turn", "turns"):
        return "an ICE server is stun:HOST[:PORT] or turn:USER:PASSWORD@HOST[:PORT] (or stuns:/turns:)"
    address, username, password = split_ice_server(url)
    if not address.partition(":")[2].partition("?")[0].split(":")[0]:
        return "no host after the scheme"
    if scheme.startswith("turn") and not (username and password):
        return "a TURN server needs credentials: turn:USER:PASSWORD@HOST[:PORT]"
    return None


def _path_or_none(value: str) -> Path | None:
    return Path(value) if value else None


def _names(value: str | list[str]) -> list[str]:
    """A preload list from env (comma-separated) or flags (repeated / space-separated / comma-separated)."""
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    return [name.strip() for item in items for name in str(item).split(",") if name.strip()]


@dataclass
class Settings:
    """Everything ``lipsync serve`` can be told. Field names are the flags' names in snake case."""

    port: int = field(default=50051, metadata={"help": "gRPC port"})
    metrics_port: int = field(default=9090, metadata={"help": "Prometheus metrics port (0 disables)"})
    http_port: int = field(default=8080, metadata={"help": "HTTP gateway port: REST and WebSocket (0 disables)"})
    host: str = field(default="0.0.0.0", metadata={"help": "address the gRPC, metrics and HTTP ports bind to"})
    models_dir: Path = field(default=Path("models"), metadata={
        "help": "directory of character packages (zips or extracted); registry downloads land here too"})
    store_dir: Path | None = field(default=None, metadata={
        "help": "where packages are extracted (default MODELS_DIR/.store)", "type": _path_or_none})
    device: str = field(default="cpu", metadata={"help": "inference device", "choices": DEVICES})
    precision: str = field(default="fp32", metadata={"help": "inference precision", "choices": PRECISIONS})
    max_batch: int = field(default=32, metadata={"help": "largest device batch"})
    template_storage: str = field(default="device", metadata={
        "help": "where each model's template crops live: device (resident, fastest; device memory grows with "
                "the template count), host (host memory, copied to the device per batch) or compressed "
                "(PNG in host memory, decoded per batch; smallest)", "choices": TEMPLATE_STORAGES})
    paste: str = field(default="exact", metadata={
        "help": "how each prediction goes back into its frame: exact (SyncTalk_2D's paste, the default) or feather "
                "(faded in from the mouth mask's edge, for networks whose edge does not match the template and "
                "shows the crop box as a line; frames then differ from SyncTalk_2D's)", "choices": PASTE_MODES})
    max_batch_delay_ms: float = field(default=5.0, metadata={
        "help": "longest wait for a batch to fill once its first request arrived"})
    max_queue: int = field(default=256, metadata={
        "help": "queued frames per model before requests get RESOURCE_EXHAUSTED (frames of streams wait)"})
    memory_budget_mb: int = field(default=0, metadata={
        "help": "resident models' memory budget; least recently used models are unloaded (0: no limit)"})
    registry_url: str = field(default="", metadata={"help": "model registry (http://, https:// or file://)"})
    registry_token: str = field(default="", repr=False, metadata={"help": "bearer token for a private registry"})
    redis_url: str = field(default="", metadata={
        "help": "Redis for the frame and feature caches (default: an in-process LRU)"})
    frame_cache_ttl: float = field(default=3600.0, metadata={"help": "seconds a cached frame lives (0: off)"})
    feature_cache_ttl: float = field(default=86400.0, metadata={
        "help": "seconds cached audio features live (0: off)"})
    memory_cache_mb: int = field(default=256, metadata={"help": "size of the in-process cache without Redis"})
    preload: list[str] = field(default_factory=list, metadata={
        "help": "models to load at start (repeat, or comma-separate)", "nargs": "*", "type": str,
        "metavar": "NAME"})
    api_keys_file: Path | None = field(default=None, metadata={
        "help": "file of accepted API keys, one per line; unset: no authentication", "type": _path_or_none})
    health_requires_key: bool = field(default=False, metadata={
        "help": "with API keys, a model's gRPC health (Health.Check service=NAME) needs a key too; the pod's own "
                "health (service \"\") stays open for probes"})
    allowed_origins: list[str] = field(default_factory=list, metadata={
        "help": "web pages allowed to call this pod from a browser (CORS and /ws), as origins "
                "(https://app.example.com; repeat, or comma-separate), or * for any page; by default only "
                "pages this pod serves itself (the live page). Clients that are not browsers are not affected",
        "nargs": "*", "type": str, "metavar": "ORIGIN"})
    tls_cert: Path | None = field(default=None, metadata={"help": "TLS certificate (PEM), for gRPC and HTTP", "type": _path_or_none})
    tls_key: Path | None = field(default=None, metadata={"help": "TLS private key (PEM)", "type": _path_or_none})
    max_message_mb: int = field(default=64, metadata={
        "help": "largest gRPC message, HTTP body or WebSocket message (audio uploads)"})
    max_sessions: int = field(default=4, metadata={
        "help": "live sessions (Session RPC, WebSocket session_start) run at once; the next is refused with "
                "RESOURCE_EXHAUSTED / 429 so it can try another pod (0: no limit). Size it as the frames/s the "
                "pod sustains divided by fps x the share of time sessions speak (idle frames are cached): see "
                "docs/API.md"})
    session_render_ahead_ms: float = field(default=120.0, metadata={
        "help": "how far ahead of its tick a session frame is rendered: a frame not ready at its tick is repeated, "
                "and speech plays this much later (on top of the 0.45 s audio look-ahead); raise it when "
                "lipsync_session_frames_total{kind=\"repeated\"} grows"})
    max_audio_seconds: float = field(default=600.0, metadata={"help": "longest audio accepted in one request"})
    encode_threads: int = field(default=0, metadata={
        "help": "threads for decoding, compositing and image encoding (0: number of CPUs)"})
    # WebRTC (POST /webrtc/offer, api/http/webrtc.py)
    ice_server: list[str] = field(default_factory=list, metadata={
        "help": "STUN or TURN server for WebRTC sessions, as stun:HOST[:PORT] or turn:USER:PASSWORD@HOST[:PORT] "
                "(turns: for TLS; ?transport=tcp allowed); repeat, or comma-separate. Without one, only host "
                "candidates: browsers on the same network. A cluster needs a TURN relay: docs/KUBERNETES.md",
        "nargs": "*", "type": str, "metavar": "URL"})
    webrtc_encode_threads: int = field(default=0, metadata={
        "help": "threads that encode WebRTC video (H.264/VP8), shared by every WebRTC session; a session whose "
                "frames wait for them drops frames, others keep their pace (0: number of CPUs)"})
    webrtc_consent_expiry_s: float = field(default=30.0, metadata={
        "help": "a WebRTC peer that answers none of the pod's ICE consent checks for this long is gone: its "
                "session ends and its slot is freed (RFC 7675's 30 s; late answers still count)"})
    shutdown_grace_s: float = field(default=30.0, metadata={
        "help": "on SIGTERM, how long in-flight calls get to finish"})
    log_level: str = field(default="INFO", metadata={"help": "log level", "choices": LOG_LEVELS})
    benchmark_identity_network: bool = field(default=False, metadata={
        "help": "BENCHMARKS ONLY: replace every model's U-Net by an identity that returns the template's own "
                "mouth region, to measure what the serving layer carries without the network"})

    def __post_init__(self) -> None:
        # Accept plain strings from Python callers too, the same way flags and env vars are read.
        self.models_dir = Path(self.models_dir)
        for name in ("store_dir", "api_keys_file", "tls_cert", "tls_key"):
            value = getattr(self, name)
            setattr(self, name, Path(value) if value else None)
        self.preload = _names(self.preload)
        self.allowed_origins = _names(self.allowed_origins)
        self.ice_server = _names(self.ice_server)
        self.log_level = self.log_level.upper()

    # ---------------------------------------------------------------------------------------- derived

    @property
    def extract_dir(self) -> Path:
        return self.store_dir or self.models_dir / ".store"

    @property
    def memory_budget_bytes(self) -> int:
        return max(0, self.memory_budget_mb) * 1024 * 1024

    def validate(self) -> Settings:
        """Reject settings that cannot work, with the flag's name in the message."""
        problems = []
        for name in ("port", "metrics_port", "http_port"):
            if not 0 <= getattr(self, name) <= 65535:
                problems.append(f"--{_flag(name)} must be 0..65535")
        for name in ("max_batch", "max_queue", "max_message_mb"):
            if getattr(self, name) < 1:
                problems.append(f"--{_flag(name)} must be >= 1")
        for name in ("max_sessions", "session_render_ahead_ms", "max_batch_delay_ms", "frame_cache_ttl", "feature_cache_ttl", "memory_budget_mb",
                     "memory_cache_mb", "encode_threads", "webrtc_encode_threads", "webrtc_consent_expiry_s",
                     "shutdown_grace_s",
                     "max_audio_seconds"):
            if getattr(self, name) < 0:
                problems.append(f"--{_flag(name)} must be >= 0")
        if self.device not in DEVICES:
            problems.append(f"--device must be one of {', '.join(DEVICES)}")
        if self.precision not in PRECISIONS:
            problems.append(f"--precision must be one of {', '.join(PRECISIONS)}")
        if self.template_storage not in TEMPLATE_STORAGES:
            problems.append(f"--template-storage must be one of {', '.join(TEMPLATE_STORAGES)}")
        if self.paste not in PASTE_MODES:
            problems.append(f"--paste must be one of {', '.join(PASTE_MODES)}")
        if self.log_level.upper() not in LOG_LEVELS:
            problems.append(f"--log-level must be one of {', '.join(LOG_LEVELS)}")
        problems += [f"--allowed-origins {origin!r}: {problem}" for origin in self.allowed_origins
                     if (problem := origin_problem(origin))]
        problems += [f"--ice-server {url!r}: {problem}" for url in self.ice_server
                     if (problem := ice_server_problem(url))]
        if (self.tls_cert is None) != (self.tls_key is None):
            problems.append("--tls-cert and --tls-key go together")
        if problems:
            raise InvalidInput("invalid settings: " + "; ".join(problems))
        return self

    def check_paths(self) -> Settings:
        """Refuse, at start, paths that do not exist: a pod pointed at a missing models directory would
        otherwise start, serve nothing and say nothing. Without a registry the directory must exist; with
        one, downloads create it."""
        if not self.models_dir.is_dir() and not self.registry_url:
            what = "is not a directory" if self.models_dir.exists() else "does not exist"
            raise InvalidInput(f"--models-dir {self.models_dir} {what} — point it at your character packages "
                               f"(or create it, or set --registry-url to download them there)")
        for name in ("api_keys_file", "tls_cert", "tls_key"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise InvalidInput(f"--{_flag(name)} {path}: no such file — check the path")
        return self

    # ---------------------------------------------------------------------------------------- sources

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """One flag per field. Defaults are left unset so ``from_args`` can tell a flag from its absence;
        dests are prefixed so they cannot collide with the top-level parser's options (``--log-level``)."""
        for f in dataclasses.fields(cls):
            meta = dict(f.metadata)
            kwargs = {"dest": _DEST_PREFIX + f.name, "default": argparse.SUPPRESS,
                      "help": f"{meta.pop('help')} ({_default_text(f)}env {env_name(f.name)})",
                      "metavar": meta.pop("metavar", f.name.upper())}
            if "choices" in meta:
                kwargs["choices"] = meta.pop("choices")
                kwargs["type"] = str.upper if f.name == "log_level" else str
                del kwargs["metavar"]  # argparse shows the choices instead
            if "nargs" in meta:
                kwargs.update(nargs=meta.pop("nargs"), action="extend")
            elif isinstance(f.default, bool):  # a switch: --flag alone is true; --flag false also works
                kwargs.update(nargs="?", const="true", metavar="BOOL")
            kwargs.setdefault("type", meta.pop("type", None) or _converter(f))
            parser.add_argument(f"--{_flag(f.name)}", **kwargs)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        env = os.environ if env is None else env
        values = {}
        for f in dataclasses.fields(cls):
            raw = env.get(env_name(f.name))
            if raw is None or not raw.strip():
                continue
            values[f.name] = _convert(f, raw)
        values.update(overrides)
        return cls(**values).validate()

    @classmethod
    def from_args(cls, args: argparse.Namespace, env: Mapping[str, str] | None = None) -> Settings:
        flags = {f.name: getattr(args, _DEST_PREFIX + f.name) for f in dataclasses.fields(cls)
                 if hasattr(args, _DEST_PREFIX + f.name)}
        for name in LIST_FIELDS & flags.keys():
            flags[name] = _names(flags[name])
        return cls.from_env(env, **flags)


def _default_text(f: dataclasses.Field) -> str:
    """"default: X; " for the help line; flags' own defaults are SUPPRESS, so argparse cannot show them."""
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    if default is None or default == "" or default == []:
        return ""
    return f"default: {default}; "


def _flag(name: str) -> str:
    return name.replace("_", "-")


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def _converter(f: dataclasses.Field) -> Callable[[str], Any]:
    default = f.default
    if isinstance(default, bool):
        return lambda s: s.strip().lower() in ("1", "true", "yes", "on")
    if isinstance(default, int):
        return int
    if isinstance(default, float):
        return float
    if isinstance(default, Path):
        return Path
    return str


def _convert(f: dataclasses.Field, raw: str) -> Any:
    if f.name in LIST_FIELDS:
        return _names(raw)
    convert = f.metadata.get("type") or _converter(f)
    try:
        value = convert(raw)
    except ValueError as exc:
        raise InvalidInput(f"environment variable {env_name(f.name)}={raw!r}: {exc}") from None
    return value.upper() if f.name == "log_level" else value

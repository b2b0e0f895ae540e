"""Settings: one dataclass, every field a ``lipsync serve`` flag and a LIPSYNC_* variable; flag > env > default."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest

from inference_pod.cli import build_parser
from inference_pod.errors import InvalidInput
from inference_pod.serving.settings import Settings, env_name, split_ice_server

# A valid, non-default value for every field, as it would be written in the environment.
ENV_VALUES = {
    "port": ("5001", 5001), "metrics_port": ("9191", 9191), "http_port": ("8181", 8181),
    "host": ("127.0.0.1", "127.0.0.1"), "models_dir": ("/m", Path("/m")), "store_dir": ("/s", Path("/s")),
    "device": ("cuda", "cuda"), "precision": ("fp16", "fp16"), "max_batch": ("8", 8),
    "template_storage": ("compressed", "compressed"), "paste": ("feather", "feather"),
    "max_batch_delay_ms": ("2.5", 2.5), "max_queue": ("9", 9), "memory_budget_mb": ("512", 512),
    "registry_url": ("http://registry.local/", "http://registry.local/"),
    "registry_token": ("s3cret", "s3cret"),
    "redis_url": ("redis://127.0.0.1:1/0", "redis://127.0.0.1:1/0"), "frame_cache_ttl": ("60", 60.0),
    "feature_cache_ttl": ("120", 120.0), "memory_cache_mb": ("16", 16), "preload": ("a, b,c", ["a", "b", "c"]),
    "api_keys_file": ("/keys", Path("/keys")), "health_requires_key": ("true", True), "tls_cert": ("/c.pem", Path("/c.pem")),
    "tls_key": ("/k.pem", Path("/k.pem")), "max_message_mb": ("8", 8), "max_audio_seconds": ("30", 30.0),
    "max_sessions": ("7", 7), "session_render_ahead_ms": ("200", 200.0),
    "encode_threads": ("3", 3), "shutdown_grace_s": ("4", 4.0), "log_level": ("debug", "DEBUG"),
    "benchmark_identity_network": ("true", True),
    "allowed_origins": ("https://app.example.com,http://localhost:3000",
                        ["https://app.example.com", "http://localhost:3000"]),
    "ice_server": ("stun:stun.example.com:3478,turn:user:pa:ss@turn.example.com:3478?transport=tcp",
                   ["stun:stun.example.com:3478", "turn:user:pa:ss@turn.example.com:3478?transport=tcp"]),
    "webrtc_encode_threads": ("2", 2),
    "webrtc_consent_expiry_s": ("12.5", 12.5),
}


def parse(argv: list[str], env: dict[str, str]) -> Settings:
    parser = argparse.ArgumentParser()
    Settings.add_arguments(parser)
    return Settings.from_args(parser.parse_args(argv), env=env)


def test_every_field_reads_its_environment_variable():
    assert set(ENV_VALUES) == {f.name for f in dataclasses.fields(Settings)}, "table out of date"
    env = {env_name(name): raw for name, (raw, _) in ENV_VALUES.items()}
    settings = Settings.from_env(env)
    for name, (_, expected) in ENV_VALUES.items():
        assert getattr(settings, name) == expected, name
    assert env_name("redis_url") == "LIPSYNC_REDIS_URL"


def test_every_field_has_a_flag_and_flags_beat_the_environment():
    argv = []
    for name, (raw, expected) in ENV_VALUES.items():
        flag = f"--{name.replace('_', '-')}"
        argv += [flag] if expected is True else [flag, raw.replace(" ", "")]  # a switch takes no value
    env = {env_name("port"): "1234", env_name("redis_url"): "redis://elsewhere:1/0"}
    settings = parse(argv, env)
    for name, (_, expected) in ENV_VALUES.items():
        assert getattr(settings, name) == expected, name


def test_defaults_then_environment_then_flag():
    assert parse([], {}).port == 50051
    assert parse([], {"LIPSYNC_PORT": "6000"}).port == 6000
    assert parse(["--port", "7000"], {"LIPSYNC_PORT": "6000"}).port == 7000
    defaults = parse([], {})
    assert (defaults.metrics_port, defaults.http_port, defaults.max_batch, defaults.max_batch_delay_ms) == (
        9090, 8080, 32, 5.0)
    assert defaults.extract_dir == Path("models/.store")
    assert defaults.benchmark_identity_network is False  # benchmarks only: never on unless asked


def test_preload_accepts_repeats_lists_and_commas():
    assert parse(["--preload", "a", "b,c", "--preload", "d"], {}).preload == ["a", "b", "c", "d"]
    assert parse([], {"LIPSYNC_PRELOAD": "x,y"}).preload == ["x", "y"]
    assert Settings(preload="p, q").preload == ["p", "q"]


@pytest.mark.parametrize("kwargs, message", [
    ({"port": 70000}, "--port"),
    ({"max_batch": 0}, "--max-batch"),
    ({"max_batch_delay_ms": -1}, "--max-batch-delay-ms"),
    ({"device": "tpu"}, "--device"),
    ({"template_storage": "disk"}, "--template-storage must be one of device, host, compressed"),
    ({"tls_cert": "/c.pem"}, "--tls-key"),
    ({"paste": "soft"}, "--paste must be one of exact, feather"),
])
def test_invalid_settings_name_the_flag(kwargs, message):
    with pytest.raises(InvalidInput, match=message):
        Settings(**kwargs).validate()


def test_bad_environment_value_is_a_clear_error():
    with pytest.raises(InvalidInput, match="LIPSYNC_MAX_BATCH"):
        Settings.from_env({"LIPSYNC_MAX_BATCH": "lots"})


def test_serve_command_exposes_every_flag_and_keeps_the_global_log_level():
    parser = build_parser()
    args = parser.parse_args(["serve", "--models-dir", "/x", "--log-level", "warning"])
    settings = Settings.from_args(args, env={})
    assert settings.models_dir == Path("/x") and settings.log_level == "WARNING"
    assert parser.parse_args(["--log-level", "DEBUG", "serve"]).log_level == "DEBUG"
    help_text = parser._subparsers._group_actions[0].choices["serve"].format_help()
    for f in dataclasses.fields(Settings):
        assert f"--{f.name.replace('_', '-')}" in help_text
        assert env_name(f.name) in help_text


def test_a_boolean_setting_is_a_switch():
    assert parse([], {}).health_requires_key is False
    assert parse(["--health-requires-key"], {}).health_requires_key is True
    assert parse(["--health-requires-key", "false"], {"LIPSYNC_HEALTH_REQUIRES_KEY": "1"}).health_requires_key is False
    assert parse([], {"LIPSYNC_HEALTH_REQUIRES_KEY": "true"}).health_requires_key is True


def test_allowed_origins_are_origins_or_a_star():
    assert Settings().allowed_origins == []  # the pod's own pages only
    assert parse(["--allowed-origins", "*"], {}).allowed_origins == ["*"]
    assert parse(["--allowed-origins", "https://a.example", "https://b.example:8443"], {}).allowed_origins == \
        ["https://a.example", "https://b.example:8443"]
    for bad in ("app.example.com", "https://app.example.com/", "https://app.example.com/page", "ftp://x",
                "https://x:port"):
        with pytest.raises(InvalidInput, match="--allowed-origins") as info:
            Settings(allowed_origins=[bad]).validate()
        assert bad in str(info.value)


def test_ice_servers_are_stun_or_turn_urls_and_turn_carries_its_credentials():
    assert Settings().ice_server == []  # host candidates only
    settings = parse(["--ice-server", "stun:stun.example.com", "turn:bot:s3:cret@turn.example.com:3478"], {})
    assert settings.validate().ice_server == ["stun:stun.example.com", "turn:bot:s3:cret@turn.example.com:3478"]
    assert split_ice_server("turn:bot:s3:cret@turn.example.com:3478") == ("turn:turn.example.com:3478", "bot", "s3:cret")
    assert split_ice_server("stun:stun.example.com") == ("stun:stun.example.com", None, None)
    for bad, words in [("turn.example.com:3478", "stun:HOST"), ("turn:turn.example.com", "needs credentials"),
                       ("stun:", "no host"), ("http://turn.example.com", "stun:HOST")]:
        with pytest.raises(InvalidInput, match="--ice-server") as info:
            Settings(ice_server=[bad]).validate()
        assert bad in str(info.value) and words in str(info.value)

"""The ``lipsync`` command line as a user meets it: help texts, and one clear line for each mistake."""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys

import pytest
from serving_support import LOOPBACK, free_port, speech_pcm16, wait_serving, wav_bytes

from inference_pod import cli
from inference_pod.client import LipSyncClient


def _options(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
            continue
        yield action


def test_every_option_of_every_command_has_help_without_backticks():
    missing, backticks = [], []
    for prog, parser in cli.walk_parsers(cli.build_parser()):
        if "`" in (parser.description or ""):
            backticks.append(f"{prog} (description)")
        for action in _options(parser):
            name = f"{prog} {'/'.join(action.option_strings) or action.dest}"
            if not action.help:
                missing.append(name)
            elif "`" in action.help:
                backticks.append(name)
        if "`" in parser.format_help():
            backticks.append(f"{prog} --help")
    assert not missing, f"options without help: {missing}"
    assert not backticks, f"help with reStructuredText backticks: {backticks}"


def test_help_shows_defaults_and_metavars():
    parsers = dict(cli.walk_parsers(cli.build_parser()))
    serve = " ".join(parsers["lipsync serve"].format_help().split())
    assert "SETTING_PRELOAD" not in serve and "--preload [NAME ...]" in serve
    assert "default: 50051" in serve and "default: 32" in serve and "env LIPSYNC_MAX_BATCH" in serve
    render = " ".join(parsers["lipsync render"].format_help().split())
    assert "(default: 16)" in render and "(default: fp32)" in render
    # every option with a default says it, once
    for prog, parser in parsers.items():
        text = " ".join(parser.format_help().split())
        for action in _options(parser):
            if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
                assert "default" in action.help or f"(default: {action.default})" in text, (prog, action.dest)


# ------------------------------------------------------------------------------------ mistakes, one line


def run_cli(capsys, *argv) -> tuple[int, str]:
    capsys.readouterr()
    code = cli.main(list(argv))
    return code, capsys.readouterr().err


def assert_one_line(err: str, *words: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lipsync: error: ") and " — " in lines[0], err
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0], (word, lines[0])


@pytest.mark.parametrize("argv, flag", [
    (["render", "{package}", "--audio", "{missing}", "--out", "{tmp}/frames"], "--audio"),
    (["render", "{package}", "--features", "{missing}", "--out", "{tmp}/frames"], "--features"),
    (["render", "{missing}", "--out", "{tmp}/frames"], "PACKAGE"),
    (["verify", "{package}", "--audio", "{missing}", "--out", "{tmp}/grid.png"], "--audio"),
    (["client", "--target", "127.0.0.1:1", "frame", "demo", "0", "--audio", "{missing}"], "--audio"),
    (["client", "--target", "127.0.0.1:1", "batch", "demo:0", "--audio", "{missing}"], "--audio"),
    (["client", "--target", "127.0.0.1:1", "stream", "demo", "--audio", "{missing}"], "--audio"),
    (["client", "--target", "127.0.0.1:1", "stream-audio", "demo", "{missing}"], "AUDIO"),
], ids=lambda v: " ".join(v[:2]) if isinstance(v, list) else v)
def test_a_missing_input_file_is_one_line_naming_it(argv, flag, demo_package, tmp_path, capsys):
    missing = tmp_path / "no-such-speech.wav"
    argv = [a.format(package=demo_package, missing=missing, tmp=tmp_path) for a in argv]
    code, err = run_cli(capsys, *argv)
    assert code == cli.USER_ERROR
    assert_one_line(err, flag, str(missing), "no such file")
    assert not (tmp_path / "frames").exists()  # refused before any work


def test_an_unwritable_output_is_one_line(demo_package, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    code, err = run_cli(capsys, "render", str(demo_package), "--out", str(blocker / "frames"), "--no-progress",
                        "--cache-dir", str(tmp_path / "cache"))
    assert code == cli.USER_ERROR
    assert_one_line(err, "--out", str(blocker / "frames"))


def test_an_os_error_elsewhere_is_a_bug_and_keeps_its_traceback(tmp_path):
    parser = cli.build_parser()
    args = parser.parse_args(["render", str(tmp_path / "p.zip"), "--audio", str(tmp_path / "a.wav"),
                              "--out", str(tmp_path / "out")])
    given = FileNotFoundError(2, "No such file or directory", str(tmp_path / "a.wav"))
    inside = PermissionError(13, "Permission denied", str(tmp_path / "out" / "frame_000000.png"))
    elsewhere = FileNotFoundError(2, "No such file or directory", "/usr/lib/some-library.so")
    assert cli._path_error(parser, args, given).startswith(f"--audio {tmp_path / 'a.wav'}: no such file")
    assert "--out" in cli._path_error(parser, args, inside) and "permission denied" in cli._path_error(
        parser, args, inside)
    assert cli._path_error(parser, args, elsewhere) is None
    assert cli._path_error(parser, args, OSError("no filename")) is None


def test_serve_refuses_a_models_dir_that_does_not_exist(tmp_path):
    # a process with a timeout: a pod that accepts the directory would serve (nothing) until stopped
    proc = subprocess.run([sys.executable, "-m", "inference_pod.cli", "serve", "--models-dir", str(tmp_path / "modles"),
                           "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", "--http-port", "0"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == cli.USER_ERROR
    assert_one_line(proc.stderr, "--models-dir", str(tmp_path / "modles"), "does not exist")


def test_the_console_script_prints_one_line_and_exits_non_zero(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "inference_pod.cli", "client", "--target", "127.0.0.1:1",
                           "frame", "demo", "0", "--audio", str(tmp_path / "speech.wav")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == cli.USER_ERROR and proc.stdout == ""
    assert_one_line(proc.stderr, "--audio", "speech.wav")


def test_a_project_error_over_several_lines_is_printed_as_one(capsys):
    from inference_pod.errors import AudioError

    assert cli.fail(str(AudioError("cannot decode audio: pipe:0: Invalid data\nOutput file is empty"))) == 2
    assert capsys.readouterr().err == "lipsync: error: cannot decode audio: pipe:0: Invalid data; Output file is empty\n"


def test_no_pod_at_the_target_is_one_line_with_the_fix(capsys):
    code, err = run_cli(capsys, "client", "--target", "127.0.0.1:1", "--timeout", "10", "models")
    assert code == 1
    assert_one_line(err, "UNAVAILABLE", "is a pod running at 127.0.0.1:1")


@pytest.mark.parametrize("argv", [("client", "stream-audio", "demo", "x.wav", "--chunk-ms", "0"),
                                  ("client", "--timeout", "-5", "models"),
                                  ("bench", "service", "--frames", "0"),
                                  ("bench", "pool", "--hours", "nan")])
def test_a_number_out_of_range_is_a_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(list(argv))
    assert exit_.value.code == 2 and "expected a positive" in capsys.readouterr().err


# ----------------------------------------------------- silent non-errors and rough edges, as a user meets them


def lipsync(*argv, timeout=120, **kwargs) -> subprocess.CompletedProcess:
    """The real ``lipsync`` command in a subprocess (the console script runs the same ``main``)."""
    return subprocess.run([sys.executable, "-m", "inference_pod.cli", *map(str, argv)], capture_output=True,
                          text=True, timeout=timeout, **kwargs)


def test_a_batch_range_that_runs_backwards_is_one_line_not_silence():
    proc = lipsync("client", "--target", "127.0.0.1:1", "batch", "demo:5-2")
    assert proc.returncode == cli.USER_ERROR and proc.stdout == ""
    assert_one_line(proc.stderr, "'demo:5-2'", "empty range", "demo:2-5")


def test_output_cut_short_by_its_reader_ends_quietly(demo_package):
    # `lipsync package inspect --json | head -1`, with the reader gone before the first write: deterministic
    proc = subprocess.Popen([sys.executable, "-m", "inference_pod.cli", "package", "inspect", "--json", str(demo_package)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == cli.BROKEN_PIPE
    assert err == "", err


@pytest.mark.parametrize("argv, usage, hint", [
    (["client", "frame", "demo", "1", "--target", "127.0.0.1:1"], "usage: lipsync client frame",
     "--target belongs to 'lipsync client': put it before 'frame'"),
    (["client", "models", "--api-key", "k"], "usage: lipsync client models",
     "--api-key belongs to 'lipsync client': put it before 'models'"),
    (["client", "frame", "demo", "1", "--bogus"], "usage: lipsync client frame",
     "options of 'lipsync client', such as --target, --api-key"),
    (["package", "inspect", "x.zip", "--log-level", "DEBUG"], "usage: lipsync package inspect",
     "--log-level belongs to 'lipsync': put it before 'package'"),
    (["render", "x.zip", "--out", "o", "--bogus"], "usage: lipsync render", "unrecognized arguments: --bogus"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_an_unknown_flag_gets_the_subcommands_usage_and_where_global_options_go(argv, usage, hint):
    proc = lipsync(*argv)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith(usage), proc.stderr
    assert hint in proc.stderr.splitlines()[-1], proc.stderr


def test_render_names_the_batch_size_flag(demo_package, tmp_path):
    proc = lipsync("render", demo_package, "--out", tmp_path / "frames", "--batch-size", "0")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--batch-size" in proc.stderr.splitlines()[-1] and "max batch" not in proc.stderr, proc.stderr
    assert not (tmp_path / "frames").exists()


def test_the_render_progress_bar_has_no_empty_field(demo_package, tmp_path):
    proc = lipsync("render", demo_package, "--out", tmp_path / "frames", "--cache-dir", tmp_path / "cache",
                   env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr
    states = [s.strip() for s in proc.stderr.replace("\r", "\n").splitlines() if "frame" in s or "warming" in s]
    assert any(re.search(r"\[\d\d:\d\d, warming up\]$", s) for s in states), states
    assert not [s for s in states if ", ," in s or "[, " in s or ", ]" in s], states


def test_a_busy_grpc_port_is_one_line_without_grpcs_own_log_line(tmp_path):
    with socket.socket() as taken:
        taken.bind((LOOPBACK, 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = lipsync("serve", "--host", LOOPBACK, "--port", port, "--http-port", "0", "--metrics-port", "0",
                       "--models-dir", tmp_path)
    assert proc.returncode == cli.USER_ERROR, proc.stderr
    assert "add_port" not in proc.stderr and not re.search(r"^[EWI]\d{4} ", proc.stderr, re.M), proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("lipsync: error:")]
    assert len(errors) == 1 and f"{LOOPBACK}:{port} (gRPC port, --port)" in errors[0], proc.stderr
    assert "in use" in errors[0], errors


@pytest.fixture(scope="module")
def demo_pod(tmp_path_factory):
    """``lipsync demo --out DEMO`` (a short render), then ``lipsync serve --models-dir DEMO`` with an API key."""
    root = tmp_path_factory.mktemp("demo-pod")
    wav = root / "short.wav"
    wav.write_bytes(wav_bytes(speech_pcm16(0.4, seed=3)))
    demo = lipsync("demo", "--out", root / "demo-output", "--frames", "4", "--no-video", "--audio", wav, timeout=600,
                   env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert demo.returncode == 0, demo.stderr
    (root / "keys.txt").write_text("the-key\n")
    port = free_port()
    log = open(root / "pod.log", "w")  # noqa: SIM115 - the pod's log for its lifetime
    pod = subprocess.Popen([sys.executable, "-m", "inference_pod.cli", "serve", "--host", LOOPBACK, "--port", str(port),
                            "--http-port", "0", "--metrics-port", "0", "--models-dir", str(root / "demo-output"),
                            "--api-keys-file", str(root / "keys.txt")],
                           stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        with LipSyncClient(f"{LOOPBACK}:{port}", timeout=5) as client:
            wait_serving(client, pod, 120)
        yield root / "demo-output", f"{LOOPBACK}:{port}"
    finally:
        pod.terminate()
        pod.wait(timeout=60)
        log.close()


def test_serving_the_demos_output_reuses_the_demos_extracted_copy(demo_pod):
    out, target = demo_pod
    proc = lipsync("client", "--target", target, "--api-key", "the-key", "load", "demo")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["source"] == "store"  # not "zip": nothing was extracted again
    copies = [p.name for p in (out / ".store").iterdir() if not p.name.startswith(".")]
    assert copies == ["demo-1"], copies
    assert sorted(p.name for p in out.iterdir()) == [".store", "demo.zip", "frames"]


def test_unauthenticated_tells_a_cli_user_about_api_key(demo_pod):
    _, target = demo_pod
    proc = lipsync("client", "--target", target, "models", env={k: v for k, v in os.environ.items()
                                                               if k != "LIPSYNC_API_KEY"})
    assert proc.returncode == 1 and proc.stdout == ""
    assert_one_line(proc.stderr, "UNAUTHENTICATED", "--api-key KEY", "lipsync client --api-key KEY models")
    wrong = lipsync("client", "--target", target, "--api-key", "not-it", "models")
    assert wrong.returncode == 1
    assert_one_line(wrong.stderr, "UNAUTHENTICATED", "the key given was refused", "--api-key")

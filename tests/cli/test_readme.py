"""The README's code blocks, run against what ``make demo`` builds, so the examples cannot drift.

Every fenced block runs, in document order, in one scratch directory, unless the line right above it says
otherwise:

- ``<!-- readme-test: skip (WHY) -->``: not run here (make targets, Docker, a cluster);
- ``<!-- readme-test: needs TOOL -->``: run when TOOL is on PATH, else skipped with that reason.

How each language runs:

- ``bash``: line by line (``\\`` continues a line; ``[...]`` groups in a ``lipsync`` command are optional
  flags and are dropped). ``lipsync ...`` runs through the CLI's ``main()`` in this process, the code the
  console script runs, and must exit 0; ``lipsync serve`` is the pod every other block talks to (started
  once, as a process); any other line (curl, grpcurl) runs in bash with ``pipefail``.
- ``python``: ``exec`` in the scratch directory.
- ``js``: node, with a stand-in ``document``; node has ``fetch`` but (before version 22) no WebSocket, so
  the messages a block sends on a WebSocket are captured by a stand-in and sent to the pod's ``/ws`` from
  here, and every reply must be a frame or the stream's end, never an error.

An unmarked block in another language, or one of these that fails, fails the test. Every image a block
writes must decode.

The scratch directory holds what the README's commands expect: ``models/demo.zip`` built as ``make demo``
builds it (``lipsync demo``'s defaults: 50 template frames, a 3 s track, so frames 0..73; only the U-Net's
width is 4 instead of 8, for speed), a SyncTalk_2D character directory and checkpoints under
``SyncTalk_2D/`` (tiny ones), and ``speech.wav`` (2 s). The
README's addresses are substituted with this test's: ``localhost:50051``/``localhost:8080`` and the serve
ports with free loopback ports (and ``--host 127.0.0.1``; ``LIPSYNC_TARGET`` for ``lipsync client``),
``/srv/registry``,
``https://models.example/registry`` and ``/models`` with folders of the scratch directory. The package
cache goes there too (``LIPSYNC_CACHE_DIR``).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import cv2
import numpy as np
import pytest
from serving_support import LOOPBACK, free_port, speech_pcm16, wait_serving, wav_bytes

from inference_pod.cli import main
from inference_pod.client import LipSyncClient
from inference_pod.commands import demo as demo_command
from inference_pod.tools.demo_character import build_demo_package, write_checkpoints, write_synctalk_dataset

README = Path(__file__).resolve().parents[2] / "README.md"
MARKER = re.compile(r"<!--\s*readme-test:\s*(skip|needs)\s*(.*?)\s*-->")
FENCE = re.compile(r"^```(\w*)\s*$")
RUNNABLE = ("bash", "python", "js")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@dataclass
class Block:
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    marker: tuple[str, str] | None  # ("skip", why) or ("needs", tool)

    @property
    def name(self) -> str:
        return f"README.md:{self.line} ({self.lang or 'no language'})"


def readme_blocks(text: str) -> list[Block]:
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        previous = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        marker = MARKER.search(previous)
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        blocks.append(Block(i + 1, opening.group(1), "\n".join(lines[i + 1 : end]) + "\n",
                            (marker.group(1), marker.group(2).strip("() ")) if marker else None))
        i = end + 1
    return blocks


def shell_commands(code: str) -> list[str]:
    """The block's commands: continuations joined, comment-only and blank lines dropped."""
    commands, current = [], ""
    for line in code.splitlines():
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        current += line
        if current.strip() and not current.lstrip().startswith("#"):
            commands.append(current.strip())
        current = ""
    return commands


def lipsync_argv(command: str, tokens: dict[str, str]) -> list[str]:
    """``lipsync ...`` as argv: optional ``[...]`` groups dropped, the README's paths substituted."""
    argv, optional = [], False
    for token in shlex.split(command, comments=True)[1:]:
        if token.startswith("["):
            optional = True
        if not optional:
            argv.append(tokens.get(token, token))
        if token.endswith("]"):
            optional = False
    return argv


class Readme:
    """The scratch directory, its substitutions, and the pod started from the README's serve line."""

    def __init__(self, root: Path, blocks: list[Block]):
        self.root = root
        self.blocks = blocks
        self.grpc_port, self.http_port, self.metrics_port = free_port(), free_port(), free_port()
        self.text = {"localhost:50051": f"{LOOPBACK}:{self.grpc_port}",
                     "localhost:8080": f"{LOOPBACK}:{self.http_port}",
                     "--port 50051": f"--port {self.grpc_port}",
                     "--http-port 8080": f"--http-port {self.http_port}",
                     "--metrics-port 9090": f"--metrics-port {self.metrics_port}"}
        self.tokens = {"/srv/registry": str(root / "registry"),
                       "https://models.example/registry": (root / "registry").as_uri(),
                       "/models": str(root / "fetched")}
        self.pod: subprocess.Popen | None = None
        self._pod_log = None

    def substitute(self, code: str) -> str:
        for readme, here in self.text.items():
            code = code.replace(readme, here)
        return code

    def start_pod(self) -> None:
        """Start the README's ``lipsync serve`` line once, and wait until the pod answers health checks."""
        if self.pod is not None:
            return
        serve = next(c for b in self.blocks for c in shell_commands(b.code) if c.startswith("lipsync serve"))
        argv = lipsync_argv(self.substitute(serve), self.tokens) + ["--host", LOOPBACK]
        self._pod_log = open(self.root / "pod.log", "w")  # noqa: SIM115 - open for the pod's lifetime
        self.pod = subprocess.Popen([sys.executable, "-m", "inference_pod.cli", *argv], cwd=self.root,
                                    stdout=self._pod_log, stderr=subprocess.STDOUT,
                                    env=dict(os.environ, OMP_NUM_THREADS="1"))
        with LipSyncClient(f"{LOOPBACK}:{self.grpc_port}", timeout=5) as client:
            try:
                wait_serving(client, self.pod)
            except AssertionError:
                raise AssertionError(f"the README's serve line did not start a pod: {serve}\n"
                                     f"{(self.root / 'pod.log').read_text()}") from None

    def stop_pod(self) -> None:
        if self.pod is not None:
            self.pod.terminate()
            try:
                self.pod.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.pod.kill()
                self.pod.wait()
            self._pod_log.close()


@pytest.fixture(scope="module")
def readme(tmp_path_factory):
    root = tmp_path_factory.mktemp("readme")
    # what `make demo` builds: `lipsync demo`'s own defaults
    parser = _demo_defaults()
    (root / "models").mkdir()
    # width 4, not 8: a quarter of the arithmetic, and the width changes no answer a block gets
    build_demo_package(parser.name, root / "models" / f"{parser.name}.zip", width=4, frames=parser.frames)
    dataset = write_synctalk_dataset(root / "SyncTalk_2D" / "dataset" / "may", frames=12, size=(64, 64), seed=0,
                                     audio_seconds=1.0)
    unet, encoder = write_checkpoints(root / "ckpt", "ave", 4, 0)
    (root / "SyncTalk_2D" / "checkpoint" / "may").mkdir(parents=True)
    shutil.copy(unet, root / "SyncTalk_2D" / "checkpoint" / "may" / "200.pth")
    (root / "SyncTalk_2D" / "model" / "checkpoints").mkdir(parents=True)
    shutil.copy(encoder, root / "SyncTalk_2D" / "model" / "checkpoints" / "audio_visual_encoder.pth")
    assert dataset.is_dir()
    (root / "speech.wav").write_bytes(wav_bytes(speech_pcm16(2.0, seed=5)))  # frames 0..49
    env = Readme(root, readme_blocks(README.read_text()))
    yield env
    env.stop_pod()


def _demo_defaults():
    """``lipsync demo``'s flag defaults, read from its parser, so the fixture builds what ``make demo`` does."""
    import argparse

    sub = argparse.ArgumentParser().add_subparsers()
    demo_command.register(sub)
    return sub.choices["demo"].parse_args([])


def test_every_block_is_runnable_or_marked():
    blocks = readme_blocks(README.read_text())
    assert len(blocks) >= 8
    unknown = [b.name for b in blocks if b.marker is None and b.lang not in RUNNABLE]
    assert not unknown, f"blocks this test cannot run: mark them <!-- readme-test: skip (why) -->: {unknown}"
    bad = [b.name for b in blocks if b.marker and b.marker[0] == "skip" and not b.marker[1]]
    assert not bad, f"a skip marker says why: {bad}"


def test_readme_blocks_run_against_the_demo(readme, monkeypatch, capsys):
    monkeypatch.chdir(readme.root)
    monkeypatch.setenv("LIPSYNC_CACHE_DIR", str(readme.root / "cache"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(readme.root / "xdg-cache"))  # never the user's own cache
    monkeypatch.setenv("LIPSYNC_TARGET", f"{LOOPBACK}:{readme.grpc_port}")  # lipsync client's default target
    ran, skipped = [], []
    for block in readme.blocks:
        if block.marker and block.marker[0] == "skip":
            skipped.append(f"{block.name}: {block.marker[1]}")
            continue
        if block.marker and block.marker[0] == "needs" and shutil.which(block.marker[1]) is None:
            skipped.append(f"{block.name}: needs {block.marker[1]}")
            continue
        before, started = _images(readme.root), time.monotonic()
        {"bash": _run_bash, "python": _run_python, "js": _run_js}[block.lang](readme, block, capsys)
        for image, _ in _images(readme.root) - before:
            assert cv2.imread(str(image), cv2.IMREAD_UNCHANGED) is not None, f"{block.name} wrote a bad {image}"
        ran.append(f"{block.name} in {time.monotonic() - started:.1f} s")
    print("ran:", *ran, "skipped:", *skipped, sep="\n  ")
    assert not (readme.root / "xdg-cache").exists()
    assert {"bash", "python", "js"} <= {b.lang for b in readme.blocks if any(r.startswith(b.name) for r in ran)}


def _images(root: Path) -> set[tuple[Path, int]]:
    return {(p, p.stat().st_mtime_ns) for ext in ("jpg", "png") for p in root.rglob(f"*.{ext}")
            if "SyncTalk_2D" not in p.parts and "cache" not in p.parts}


def _run_bash(readme: Readme, block: Block, capsys) -> None:
    for command in shell_commands(block.code):
        command = readme.substitute(command)
        if command.startswith("lipsync serve"):
            readme.start_pod()
            continue
        if command.startswith("lipsync "):
            if command.startswith("lipsync client"):
                readme.start_pod()
            capsys.readouterr()
            code = main(lipsync_argv(command, readme.tokens))
            out, err = capsys.readouterr()
            assert code == 0, f"{block.name}: `{command}` exited {code}\n{out}{err}"
            continue
        if re.search(r"\b(localhost|127\.0\.0\.1):\d+", command):
            readme.start_pod()
        proc = subprocess.run(["bash", "-o", "pipefail", "-c", command], cwd=readme.root, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, f"{block.name}: `{command}` exited {proc.returncode}\n{proc.stderr}"


def _run_python(readme: Readme, block: Block, capsys) -> None:
    code = readme.substitute(block.code)
    if code != block.code:
        readme.start_pod()
    exec(compile(code, block.name, "exec"), {"__name__": "readme"})  # noqa: S102 - the README's own code


NODE_STANDINS = """
const __sent = [];
const __shown = {};
globalThis.document = { querySelector: () => __shown };
globalThis.img = __shown;
globalThis.WebSocket = class {
  constructor(url) { this.url = url; __sent.push({ url, messages: [] });
                     setTimeout(() => this.onopen && this.onopen(), 0); }
  send(message) { __sent.find((s) => s.url === this.url).messages.push(message); }
};
"""
NODE_REPORT = "\nsetTimeout(() => console.log(JSON.stringify({ sockets: __sent, src: __shown.src ?? null })), 100);\n"


def _run_js(readme: Readme, block: Block, capsys) -> None:
    if shutil.which("node") is None:
        pytest.fail(f"{block.name} is JavaScript and node is not installed: install it or mark the block")
    readme.start_pod()
    script = readme.root / "readme-block.mjs"
    script.write_text(NODE_STANDINS + readme.substitute(block.code) + NODE_REPORT)
    proc = subprocess.run(["node", str(script)], cwd=readme.root, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"{block.name} failed under node:\n{proc.stderr}"
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    if report["src"] is not None:  # an image the block put on the page
        assert report["src"].startswith("data:image/jpeg;base64,"), report["src"][:60]
        _assert_image(report["src"].split(",", 1)[1], block)
    for socket in report["sockets"]:
        asyncio.run(_replay(socket["url"], socket["messages"], block))


def _assert_image(b64: str, block: Block) -> None:
    import base64

    data = np.frombuffer(base64.b64decode(b64), np.uint8)
    assert cv2.imdecode(data, cv2.IMREAD_COLOR) is not None, f"{block.name}: not an image"


async def _replay(url: str, messages: list[str], block: Block) -> None:
    """Send what the block sent on its WebSocket; each request must end in frames and an end, no error."""
    async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
        for message in messages:
            await ws.send_str(message)
            frames = 0
            while True:
                reply = json.loads((await ws.receive(timeout=60)).data)
                assert reply["type"] != "error", f"{block.name}: {message} -> {reply}"
                if reply["type"] == "frame":
                    frames += 1
                    _assert_image(reply["frame"], block)
                    if json.loads(message)["type"] == "frame":
                        break
                if reply["type"] == "end":
                    assert reply["frames"] == frames > 0, f"{block.name}: {message} -> {reply}"
                    break

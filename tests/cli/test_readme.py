"""The code blocks of README.md and every docs/*.md, run against what ``make demo`` builds, so the examples
cannot drift from what the project does.

Every fenced block is run or checked, in document order, in one scratch directory per document, unless the
line right above it says otherwise:

- ``<!-- doc-test: skip (WHY) -->``: not run here, and WHY says why (make targets that install system
  packages, Docker, a Kubernetes cluster, minutes of benchmarking or training, a microphone, a diagram);
- ``<!-- doc-test: needs TOOL -->``: run when TOOL is on PATH, else skipped with that reason (grpcurl,
  which Debian 12 does not package: every grpcurl block has a grpcurl-free twin that always runs).

A block without a marker must be one of these languages, else the test fails:

- ``bash``: the whole block is one script, run by ``bash -eo pipefail`` (so a failing command or a failing
  stage of a pipe fails the block) with ``lipsync`` on PATH (the project's CLI, run by this interpreter).
  ``[...]`` groups in a ``lipsync`` command are optional flags and are dropped. A document's first
  ``lipsync serve`` line is the pod its other blocks talk to (started once, as a process, on free loopback
  ports); a later one is checked as far as a pod's start checks its settings (``Settings.check_paths``).
- ``python``: ``exec`` in the scratch directory.
- ``js``: node, with a stand-in ``document`` (and nothing else: a browser example that uses a name it never
  defines fails). ``fetch`` is Node's. A WebSocket is real where node has one (Node 22's global, or
  ``--experimental-websocket`` from Node 20.10): the block runs as written and every socket must end with
  the stream's ``end`` message, never an error. Debian 12's Node 18 (what ``make test`` installs there) has
  none: the messages the block sends are captured and replayed to the pod's ``/ws`` from here, with the
  same checks on the replies.
- ``json`` and ``yaml``: parsed (request, response and manifest shapes; a Kubernetes probe).

Every image a block writes must decode.

The scratch directory holds what the documents' commands expect: ``demo-output/``, as ``make demo``
builds it (``lipsync demo``'s own ``build``, with its defaults: the trained width-4 demo, 50 template frames,
its espeak-ng line as the default track, extracted into ``demo-output/.store``; the rendered PNGs and mp4
are left out, no block reads them), a SyncTalk_2D character directory and checkpoints under
``SyncTalk_2D/`` (tiny ones), and ``speech.wav`` (4 s, 128 kB: more than a command line can carry, so the
recipes that send a WAV must work at any size). The documents' addresses are substituted with this test's:
``localhost:50051``/``localhost:8080`` with the pod's loopback ports (``LIPSYNC_TARGET`` for
``lipsync client``), ``/srv/registry``, ``https://models.example/registry``, ``/models`` and
``/var/cache/lipsync`` with folders of the scratch directory. The package cache goes there too
(``LIPSYNC_CACHE_DIR``).
"""

from __future__ import annotations

import asyncio
import base64
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
import yaml
from serving_support import LOOPBACK, free_port, speech_pcm16, wait_serving, wav_bytes

from inference_pod import cli
from inference_pod.client import LipSyncClient
from inference_pod.commands import demo as demo_command
from inference_pod.serving.settings import Settings
from inference_pod.tools.demo_character import write_checkpoints, write_synctalk_dataset

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARKER = re.compile(r"<!--\s*doc-test:\s*(skip|needs)\s*(.*?)\s*-->")
FENCE = re.compile(r"^```(\w*)\s*$")
RUNNABLE = ("bash", "python", "js", "json", "yaml")
OPTIONAL_FLAGS = re.compile(r"\s\[[^\[\]]*\]")  # `[--device cpu|cuda]` in a lipsync command

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@dataclass
class Block:
    document: str  # e.g. "docs/API.md"
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    marker: tuple[str, str] | None  # ("skip", why) or ("needs", tool)

    @property
    def name(self) -> str:
        return f"{self.document}:{self.line} ({self.lang or 'no language'})"


def document_blocks(path: Path) -> list[Block]:
    document = str(path.relative_to(ROOT))
    blocks, lines, i = [], path.read_text().splitlines(), 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        previous = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        marker = MARKER.search(previous)
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        blocks.append(Block(document, i + 1, opening.group(1), "\n".join(lines[i + 1 : end]) + "\n",
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


class Scratch:
    """One document's scratch directory, its substitutions, and the pod started from its serve line."""

    def __init__(self, root: Path, blocks: list[Block]):
        self.root = root
        self.blocks = blocks
        self.grpc_port, self.http_port, self.metrics_port = free_port(), free_port(), free_port()
        self.text = {"localhost:50051": f"{LOOPBACK}:{self.grpc_port}",
                     "localhost:8080": f"{LOOPBACK}:{self.http_port}",
                     "localhost:9090": f"{LOOPBACK}:{self.metrics_port}",
                     "/srv/registry": str(root / "registry"),
                     "https://models.example/registry": (root / "registry").as_uri(),
                     "--out /models": f"--out {root / 'fetched'}",
                     "/var/cache/lipsync": str(root / "var-cache")}
        self.bin = root / ".bin"
        self.bin.mkdir()
        (self.bin / "lipsync").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m inference_pod.cli "$@"\n')
        (self.bin / "lipsync").chmod(0o755)
        self.env = dict(os.environ, PATH=f"{self.bin}{os.pathsep}{os.environ['PATH']}", OMP_NUM_THREADS="1",
                        LIPSYNC_CACHE_DIR=str(root / "cache"), XDG_CACHE_HOME=str(root / "xdg-cache"),
                        LIPSYNC_TARGET=f"{LOOPBACK}:{self.grpc_port}")
        self.env.pop("LIPSYNC_API_KEY", None)
        self.serve: str | None = None  # the serve line the pod was started from
        self.pod: subprocess.Popen | None = None
        self._pod_log = None

    def substitute(self, code: str) -> str:
        for document, here in self.text.items():
            code = code.replace(document, here)
        return code

    def start_pod(self, serve: str | None = None) -> None:
        """Start the document's first ``lipsync serve`` line once, and wait until the pod answers health checks."""
        if self.pod is not None:
            return
        serve = serve or next((c for b in self.blocks if b.lang == "bash" and not b.marker
                               for c in shell_commands(b.code) if c.startswith("lipsync serve")), None)
        assert serve is not None, f"{self.blocks[0].document} talks to a pod but has no runnable `lipsync serve` line"
        self.serve = serve
        argv = self._serve_argv(serve) + ["--host", LOOPBACK, "--port", str(self.grpc_port), "--http-port",
                                          str(self.http_port), "--metrics-port", str(self.metrics_port)]
        self._pod_log = open(self.root / "pod.log", "w")  # noqa: SIM115 - open for the pod's lifetime
        self.pod = subprocess.Popen([sys.executable, "-m", "inference_pod.cli", *argv], cwd=self.root,
                                    stdout=self._pod_log, stderr=subprocess.STDOUT, env=self.env)
        with LipSyncClient(f"{LOOPBACK}:{self.grpc_port}", timeout=5) as client:
            try:
                wait_serving(client, self.pod)
            except AssertionError:
                raise AssertionError(f"the serve line did not start a pod: {serve}\n"
                                     f"{(self.root / 'pod.log').read_text()}") from None

    def check_serve_line(self, serve: str, block: Block) -> None:
        """A second serve line: parsed and its paths checked as a pod's start checks them."""
        args = cli.build_parser().parse_args(self._serve_argv(serve))
        try:
            Settings.from_args(args).check_paths()  # relative paths: the test runs in the scratch directory
        except Exception as exc:
            raise AssertionError(f"{block.name}: `{serve}` would not start: {exc}") from None

    def _serve_argv(self, serve: str) -> list[str]:
        return shlex.split(OPTIONAL_FLAGS.sub("", self.substitute(serve)), comments=True)[1:]

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
def scratch_master(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("docs-master")
    defaults = _demo_defaults()  # what `make demo` builds: `lipsync demo`'s own defaults
    demo_command.build(root / defaults.out, defaults.name, defaults.frames)
    dataset = write_synctalk_dataset(root / "SyncTalk_2D" / "dataset" / "may", frames=12, size=(64, 64), seed=0,
                                     audio_seconds=1.0)
    unet, encoder = write_checkpoints(root / "ckpt", "ave", 4, 0)
    (root / "SyncTalk_2D" / "checkpoint" / "may").mkdir(parents=True)
    shutil.copy(unet, root / "SyncTalk_2D" / "checkpoint" / "may" / "200.pth")
    (root / "SyncTalk_2D" / "model" / "checkpoints").mkdir(parents=True)
    shutil.copy(encoder, root / "SyncTalk_2D" / "model" / "checkpoints" / "audio_visual_encoder.pth")
    shutil.rmtree(root / "ckpt")
    assert dataset.is_dir()
    (root / "speech.wav").write_bytes(wav_bytes(speech_pcm16(4.0, seed=5)))  # frames 0..99, 128 kB
    return root


def _demo_defaults():
    """``lipsync demo``'s flag defaults, read from its parser, so the fixture builds what ``make demo`` does."""
    import argparse

    sub = argparse.ArgumentParser().add_subparsers()
    demo_command.register(sub)
    return sub.choices["demo"].parse_args([])


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_block_is_runnable_or_marked(path):
    blocks = document_blocks(path)
    unknown = [b.name for b in blocks if b.marker is None and b.lang not in RUNNABLE]
    assert not unknown, f"blocks this test cannot run: mark them <!-- doc-test: skip (why) -->: {unknown}"
    bad = [b.name for b in blocks if b.marker and b.marker[0] == "skip"
           and (not b.marker[1] or b.marker[1].count("(") != b.marker[1].count(")"))]
    assert not bad, f"a skip marker says why, in one pair of parentheses: {bad}"
    needs = [b.name for b in blocks if b.marker and b.marker[0] == "needs" and not re.fullmatch(r"[\w.-]+", b.marker[1])]
    assert not needs, f"a needs marker names one tool: {needs}"


def test_the_readme_runs_every_language():
    runs = {b.lang for b in document_blocks(ROOT / "README.md") if b.marker is None}
    assert {"bash", "python", "js"} <= runs, runs


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_document_blocks_run_against_the_demo(path, scratch_master, tmp_path, monkeypatch):
    root = Path(shutil.copytree(scratch_master, tmp_path / "scratch"))
    scratch = Scratch(root, document_blocks(path))
    monkeypatch.chdir(root)
    for key in ("LIPSYNC_CACHE_DIR", "XDG_CACHE_HOME", "LIPSYNC_TARGET"):
        monkeypatch.setenv(key, scratch.env[key])  # for python blocks, run in this process
    ran, skipped = [], []
    try:
        for block in scratch.blocks:
            if block.marker and block.marker[0] == "skip":
                skipped.append(f"{block.name}: {block.marker[1]}")
                continue
            if block.marker and block.marker[0] == "needs" and shutil.which(block.marker[1]) is None:
                skipped.append(f"{block.name}: needs {block.marker[1]}")
                continue
            before, started = _images(root), time.monotonic()
            {"bash": _run_bash, "python": _run_python, "js": _run_js, "json": _check_json,
             "yaml": _check_yaml}[block.lang](scratch, block)
            for image, _ in _images(root) - before:
                assert cv2.imread(str(image), cv2.IMREAD_UNCHANGED) is not None, f"{block.name} wrote a bad {image}"
            ran.append(f"{block.name} in {time.monotonic() - started:.1f} s")
    finally:
        scratch.stop_pod()
    print("ran:", *ran, "skipped:", *skipped, sep="\n  ")
    assert not (root / "xdg-cache").exists()
    assert not (root / "demo-output" / "store").exists()  # the demo's one store is demo-output/.store


def _images(root: Path) -> set[tuple[Path, int]]:
    return {(p, p.stat().st_mtime_ns) for ext in ("jpg", "png") for p in root.rglob(f"*.{ext}")
            if "SyncTalk_2D" not in p.parts and "cache" not in p.parts and ".store" not in p.parts}


def _run_bash(scratch: Scratch, block: Block) -> None:
    script = []
    for command in shell_commands(block.code):
        command = scratch.substitute(command)
        if command.startswith("lipsync serve"):
            if scratch.pod is None:
                scratch.start_pod(command)
            elif command != scratch.serve:
                scratch.check_serve_line(command, block)
            continue
        if command.startswith("lipsync "):
            command = OPTIONAL_FLAGS.sub("", command)
        script.append(command)
    text = "\n".join(script)
    if re.search(rf"{LOOPBACK}:({scratch.grpc_port}|{scratch.http_port}|{scratch.metrics_port})|lipsync client", text):
        scratch.start_pod()
    proc = subprocess.run(["bash", "-eo", "pipefail", "-c", text], cwd=scratch.root, env=scratch.env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{block.name} exited {proc.returncode}:\n{text}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"


def _run_python(scratch: Scratch, block: Block) -> None:
    code = scratch.substitute(block.code)
    if re.search(rf"{LOOPBACK}:({scratch.grpc_port}|{scratch.http_port})", code):
        scratch.start_pod()
    exec(compile(code, block.name, "exec"), {"__name__": "doc"})  # noqa: S102 - the document's own code


def _check_json(scratch: Scratch, block: Block) -> None:
    try:
        json.loads(block.code)
    except ValueError as exc:
        raise AssertionError(f"{block.name} is not JSON: {exc}") from None


def _check_yaml(scratch: Scratch, block: Block) -> None:
    try:
        list(yaml.safe_load_all(block.code))  # a manifest may hold several documents
    except yaml.YAMLError as exc:
        raise AssertionError(f"{block.name} is not YAML: {exc}") from None


# The page a browser example writes to; anything else it uses must be the platform's (or node's).
NODE_DOCUMENT = """
const __shown = {};
globalThis.document = { querySelector: () => __shown };
"""
# A node with a WebSocket: the block's own sockets, observed, each closed by us once its stream has ended.
NODE_REAL_SOCKETS = """
const __sockets = [];
globalThis.WebSocket = class extends globalThis.WebSocket {
  constructor(...args) {
    super(...args);
    const seen = { url: args[0], types: [], errors: [] };
    __sockets.push(seen);
    this.addEventListener("message", (event) => {
      const message = JSON.parse(event.data);
      seen.types.push(message.type);
      if (message.type === "error") seen.errors.push(message);
      if (message.type === "end" || message.type === "error") this.close();
    });
  }
};
"""
NODE_REAL_REPORT = """
const __deadline = Date.now() + 60000;
const __wait = () => (__sockets.every((s) => s.types.includes("end") || s.errors.length) || Date.now() > __deadline)
  ? console.log("doc-test report " + JSON.stringify({ sockets: __sockets, src: __shown.src ?? null }))
  : setTimeout(__wait, 50);
__wait();
"""
# A node without one (Debian 12's 18): the messages a block sends are captured, and replayed from Python.
NODE_CAPTURED_SOCKETS = """
const __sockets = [];
globalThis.WebSocket = class {
  constructor(url) { this.url = url; __sockets.push({ url, messages: [] });
                     setTimeout(() => this.onopen && this.onopen(), 0); }
  send(message) { __sockets.find((s) => s.url === this.url).messages.push(message); }
};
"""
NODE_CAPTURED_REPORT = ("\nsetTimeout(() => console.log(\"doc-test report \" + JSON.stringify({ sockets: __sockets, "
                        "src: __shown.src ?? null })), 100);\n")


def _node_websocket() -> list[str] | None:
    """The node flags that give a real global WebSocket, or None when this node has none."""
    for flags in ([], ["--experimental-websocket"]):
        probe = subprocess.run(["node", *flags, "-e", "process.exit(typeof WebSocket === 'function' ? 0 : 1)"],
                               capture_output=True, timeout=30)
        if probe.returncode == 0:
            return flags
    return None


def _run_js(scratch: Scratch, block: Block) -> None:
    if shutil.which("node") is None:
        pytest.fail(f"{block.name} is JavaScript and node is not installed: install it or mark the block")
    scratch.start_pod()
    flags = _node_websocket()
    code = scratch.substitute(block.code)
    real = flags is not None
    script = scratch.root / "doc-block.mjs"
    script.write_text(NODE_DOCUMENT + (NODE_REAL_SOCKETS if real else NODE_CAPTURED_SOCKETS) + code
                      + (NODE_REAL_REPORT if real else NODE_CAPTURED_REPORT))
    proc = subprocess.run(["node", *(flags or []), str(script)], cwd=scratch.root, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, f"{block.name} failed under node:\n{proc.stderr}"
    reports = [line for line in proc.stdout.splitlines() if line.startswith("doc-test report ")]
    assert len(reports) == 1, f"{block.name}: no report from node:\n{proc.stdout[-2000:]}"
    report = json.loads(reports[0].removeprefix("doc-test report "))
    if report["src"] is not None:  # an image the block put on the page
        assert report["src"].startswith("data:image/jpeg;base64,"), report["src"][:60]
        _assert_image(report["src"].split(",", 1)[1], block)
    for socket in report["sockets"]:
        if real:
            assert not socket["errors"], f"{block.name}: {socket['errors']}"
            assert socket["types"].count("frame") > 0 and socket["types"][-1] == "end", f"{block.name}: {socket}"
        else:
            asyncio.run(_replay(socket["url"], socket["messages"], block))


def _assert_image(b64: str, block: Block) -> None:
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


def test_the_documents_track_figures_are_the_demos(scratch_master):
    """The frame counts the documents quote are what a pod reports for the demo ``make demo`` builds."""
    from inference_pod.core.engine import Engine
    from inference_pod.package import open_package

    engine = Engine.from_package(open_package(scratch_master / "demo-output" / ".store" / "demo-1"))
    n = len(engine.default_features)  # the pod's default_track_frames (pod.loaded_info)
    readme, api, http = (ROOT / "README.md").read_text(), (ROOT / "docs/API.md").read_text(), (
        ROOT / "docs/HTTP_API.md").read_text()
    assert f"`default_track_frames: {n}`" in readme and f"frames are 0..{n - 1}" in readme
    assert f"a {n}-frame\ntrack (`default_track_frames: {n}`: frame ids 0..{n - 1})" in api
    for name, text in {"README.md": readme, "docs/API.md": api, "docs/HTTP_API.md": http}.items():
        lasts = {int(k) for k in re.findall(r'(?:last: |--last |"demo", 0, )(\d+)', text)}
        assert lasts and max(lasts) == n - 1, (name, lasts)  # the whole track is streamed, and no further


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
@pytest.mark.parametrize("target", ["system-deps", "browser-deps", "python-deps"])
def test_each_install_step_says_what_it_installs_before_it_starts(target):
    # --always-make --dry-run prints the recipe without running it: apt-get and pip must be announced first
    recipe = subprocess.run(["make", "--always-make", "--dry-run", target, "PYTHON=python3"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60, check=True).stdout
    installs = list(re.finditer(r"apt-get install -y|-m pip install", recipe))
    assert installs, recipe
    previous = 0
    for install in installs:
        between = recipe[previous : install.start()]
        # announced since the previous install, unless this is that install's retry with sudo
        assert 'echo "make: installing' in between or "(sudo" in between, f"{target}:\n{recipe}"
        previous = install.end()

"""Shared fixtures: a tiny demo character, as a package zip, as an extracted package, and as a SyncTalk_2D dataset.

Everything here is built once per test session with the real code paths (demo_character ->
synctalk_dataset.build_package -> package.write_package), small enough to keep the suite fast:
U-Net base width 4, 12 frames of 64x64, one second of audio.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from inference_pod.package import CharacterPackage, extract_package
from inference_pod.tools.demo_character import build_demo_package, write_checkpoints, write_synctalk_dataset

DEMO_NAME = "demo"
DEMO_VERSION = "1"
DEMO_WIDTH = 4
DEMO_FRAMES = 12
DEMO_SIZE = (64, 64)
DEMO_AUDIO_SECONDS = 1.0
DEMO_SEED = 0


@pytest.fixture(scope="session")
def demo_package(tmp_path_factory) -> Path:
    """Path to a demo package zip (name "demo", version "1", ave mode, width 4, 12 frames of 64x64, with a
    default track of 1 s: features and wav). Built once per session; treat it as read-only (copy it to
    modify it)."""
    out = tmp_path_factory.mktemp("demo-package") / "demo-1.zip"
    build_demo_package(
        DEMO_NAME, out, width=DEMO_WIDTH, frames=DEMO_FRAMES, seed=DEMO_SEED, size=DEMO_SIZE,
        audio_seconds=DEMO_AUDIO_SECONDS, version=DEMO_VERSION,
    )  # fmt: skip
    return out


@pytest.fixture(scope="session")
def demo_character_package(demo_package, tmp_path_factory) -> CharacterPackage:
    """``demo_package`` extracted and checked (a ``CharacterPackage``), once per session; read-only."""
    return extract_package(demo_package, tmp_path_factory.mktemp("demo-extracted") / "demo-1")


@pytest.fixture(scope="session")
def demo_checkpoints(tmp_path_factory) -> tuple[Path, Path]:
    """(unet.pth, audio_visual_encoder.pth): the demo's seeded ave U-Net (width 4) and AVE encoder, saved as
    SyncTalk_2D saves them (plain state_dicts, no prefix). They match ``synctalk_dataset_dir``'s
    aud_ave.npy. Read-only."""
    return write_checkpoints(tmp_path_factory.mktemp("demo-checkpoints"), "ave", DEMO_WIDTH, DEMO_SEED)


@pytest.fixture(scope="session")
def _synctalk_dataset_master(tmp_path_factory) -> Path:
    return write_synctalk_dataset(
        tmp_path_factory.mktemp("synctalk-master") / "demo",
        frames=DEMO_FRAMES, size=DEMO_SIZE, seed=DEMO_SEED, audio_seconds=DEMO_AUDIO_SECONDS,
    )  # fmt: skip


@pytest.fixture
def synctalk_dataset_dir(_synctalk_dataset_master, tmp_path) -> Path:
    """A fresh copy of the demo character in SyncTalk_2D's layout (full_body_img/N.jpg, landmarks/N.lms,
    aud.wav, aud_ave.npy), 12 frames of 64x64, 1 s of audio; its features come from ``demo_checkpoints``'
    encoder. Each test gets its own copy and may modify it."""
    return Path(shutil.copytree(_synctalk_dataset_master, tmp_path / "synctalk-dataset"))


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread while a module runs (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``):
    serving tests run server, client and batcher threads on the same small CPU, where torch's own thread
    pool spins against them and slows tiny models 10-30x; those tests measure behaviour, not speed."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)

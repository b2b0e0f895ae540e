"""Training a character's U-Net on its own template frames and default track: SyncTalk_2D's reconstruction objective.

Each sample is one template frame i and its audio window (the features the engine feeds frame i). The
network gets what the engine gives it at inference, ``[reference, masked]`` / 255 with the mouth mask
blanking all but a thin border, except that the reference is another, random frame (as in SyncTalk_2D's
training), so the only way to the right mouth is through the audio. The loss is L1 between the output
and frame i's 320x320 region. SyncTalk_2D's perceptual (VGG) and sync (SyncNet) losses are left out:
their pretrained networks are not available here.

Crops, mask and audio windows come from the ``Engine`` itself, so training sees exactly the arithmetic
serving runs. On CPU a run is deterministic: each step's samples are drawn from ``(seed, step)``,
``torch.use_deterministic_algorithms`` is on and the thread count fixed, so the same command gives the
same weights bit for bit (same torch version and CPU kind) and a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import logging
import math
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from inference_pod.core.engine import Engine, mouth_mask
from inference_pod.core.model import LipSyncUNet, load_strict
from inference_pod.errors import InvalidInput, PackageError
from inference_pod.package import DEFAULT_AUDIO, open_package, write_package

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "lipsync-train-checkpoint-1"


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 400
    batch_size: int = 4
    learning_rate: float = 2e-3
    seed: int = 0
    threads: int = 1  # fixed, because the reduction order (and so the last bits) depends on it
    checkpoint_every: int = 50

    def check(self) -> None:
        for name in ("steps", "batch_size", "threads", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise InvalidInput(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise InvalidInput(f"--learning-rate must be a positive number, got {self.learning_rate}")


@dataclass
class TrainResult:
    steps: int
    first_loss: float | None
    last_loss: float | None  # mean of the last (up to) 20 steps
    package: Path


class TrainingSet:
    """A package's template frames (320x320 regions, uint8, CHW BGR) paired with their audio windows."""

    def __init__(self, package):
        engine = Engine.from_package(package, fold_bn=False, max_batch=1)
        try:
            if engine.default_features is None:
                raise PackageError(
                    f"{package.manifest.name} {package.manifest.version} has no default track: training pairs each "
                    "template frame with the default track's audio at the same frame"
                )
            self.count = min(engine.num_templates, len(engine.default_features))
            self.crops = torch.from_numpy(
                np.stack([engine.template_crop(i).transpose(2, 0, 1) for i in range(self.count)])
            )
            self.audio = torch.from_numpy(engine.windows(engine.default_features, range(self.count)))
        finally:
            engine.close()
        if self.count < 2:
            raise PackageError("training needs at least two template frames with audio (one target, one reference)")
        self.mask = torch.from_numpy(mouth_mask())[None, None]

    def batch(self, seed: int, step: int, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(image (B, 6, 320, 320), audio (B, *shape), target (B, 3, 320, 320)) for one step, a function of (seed, step)."""
        rng = np.random.default_rng([seed, step])
        targets = torch.from_numpy(rng.integers(self.count, size=size))
        # A reference other than the target: otherwise the mouth could be copied from it.
        references = torch.from_numpy((targets.numpy() + rng.integers(1, self.count, size=size)) % self.count)
        target = self.crops.index_select(0, targets).float() / 255.0
        reference = self.crops.index_select(0, references).float() / 255.0
        image = torch.cat([reference, target * self.mask], dim=1)
        return image, self.audio.index_select(0, targets), target


@contextlib.contextmanager
def _deterministic(threads: int, device: torch.device):
    """Deterministic kernels and a fixed thread count for the run; the process's settings restored after."""
    before = (torch.are_deterministic_algorithms_enabled(), torch.get_num_threads())
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(device.type == "cpu")  # CUDA: fast, not bit-reproducible
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.set_num_threads(before[1])


def next_version(version: str) -> str:
    """The trained package's version: 3 -> 4, anything else -> '<version>-trained'."""
    return str(int(version) + 1) if version.isdigit() else f"{version}-trained"


def train(
    package_path,
    out,
    config: TrainConfig = TrainConfig(),
    *,
    device: str = "cpu",
    checkpoint_dir=None,
    resume=None,
    version: str | None = None,
    export_unet=None,
    progress: bool = True,
) -> TrainResult:
    """Fine-tune ``package_path``'s U-Net for ``config.steps`` steps (from ``resume``'s step when given) and
    write a new package version to ``out`` with everything else unchanged."""
    config.check()
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidInput("--device cuda requested but CUDA is not available")
    out = Path(out)
    with tempfile.TemporaryDirectory(prefix="lipsync-train-") as scratch:  # the extracted input, removed after
        package = open_package(package_path, cache_dir=scratch)
        return _train(package, out, config, dev, checkpoint_dir, resume, version, export_unet, progress)


def _train(package, out: Path, config: TrainConfig, dev: torch.device, checkpoint_dir, resume, version,
           export_unet, progress: bool) -> TrainResult:
    manifest = package.manifest
    version = version or next_version(manifest.version)
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else out.parent / f"{out.stem}.checkpoints"

    data = TrainingSet(package)
    net = LipSyncUNet(manifest.audio_mode, manifest.model_width)
    load_strict(net, package.unet_state(), "U-Net")
    net.to(dev).train()
    optimizer = torch.optim.Adam(net.parameters(), lr=config.learning_rate)
    start = 0
    if resume is not None:
        start = _load_checkpoint(Path(resume), net, optimizer, config, dev)
        log.info("resuming from %s at step %d", resume, start)

    losses: list[float] = []
    first_loss = None
    with _deterministic(config.threads, dev), tqdm(total=config.steps, initial=start, unit="step",
                                                   disable=not progress, desc="train") as bar:
        for step in range(start, config.steps):
            image, audio_windows, target = (t.to(dev) for t in data.batch(config.seed, step, config.batch_size))
            loss = (net(image, audio_windows) - target).abs().mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            value = float(loss.detach())
            if not math.isfinite(value):
                raise InvalidInput(f"training diverged at step {step} (loss {value}): lower --learning-rate")
            first_loss = value if first_loss is None else first_loss
            losses.append(value)
            bar.set_postfix(l1=f"{value:.4f}")
            bar.update(1)
            if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps:
                _save_checkpoint(checkpoint_dir, step + 1, net, optimizer, config)

    state = {k: v.detach().cpu() for k, v in net.eval().state_dict().items()}
    if export_unet is not None:
        Path(export_unet).parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, export_unet)
    default_audio = package.member_path(DEFAULT_AUDIO).read_bytes() if package.default_audio_path() else None
    write_package(
        out,
        name=manifest.name,
        version=version,
        audio_mode=manifest.audio_mode,
        model_width=manifest.model_width,
        fps=manifest.fps,
        frames=[package.frame_bytes(i) for i in range(manifest.frame_count)],
        frame_ext=manifest.frame_ext,
        crop_boxes=package.crop_boxes(),
        unet_state=state,
        audio_encoder_state=package.audio_encoder_state(),
        default_features=package.default_features(),
        default_audio=default_audio,
    )
    last = float(np.mean(losses[-20:])) if losses else None
    return TrainResult(steps=config.steps, first_loss=first_loss, last_loss=last, package=out)


def _save_checkpoint(directory: Path, step: int, net, optimizer, config: TrainConfig) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    state = {"format": CHECKPOINT_FORMAT, "step": step, "config": asdict(config),
             "unet": net.state_dict(), "optimizer": optimizer.state_dict()}
    path = directory / f"step-{step:06d}.pt"
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # a crash mid-write never leaves a truncated checkpoint behind
    return path


def _load_checkpoint(path: Path, net, optimizer, config: TrainConfig, device: torch.device) -> int:
    if not path.is_file():
        raise InvalidInput(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # unpickling, zip and storage errors all mean "not a usable checkpoint"
        raise InvalidInput(f"checkpoint {path} cannot be loaded: {exc}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise InvalidInput(f"{path} is not a `lipsync train` checkpoint")
    saved = state["config"]
    for key in ("batch_size", "learning_rate", "seed"):
        if saved.get(key) != getattr(config, key):
            raise InvalidInput(
                f"{path} was trained with --{key.replace('_', '-')} {saved.get(key)}, not {getattr(config, key)}: "
                "resume with the same settings"
            )
    if not 0 < state["step"] <= config.steps:
        raise InvalidInput(f"{path} is at step {state['step']}; --steps must be at least that (got {config.steps})")
    load_strict(net, state["unet"], "checkpoint U-Net")
    optimizer.load_state_dict(state["optimizer"])
    return int(state["step"])

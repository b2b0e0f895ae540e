"""The demo character's networks: seeded random weights, or the committed trained U-Net (``TRAINED``), written
as SyncTalk_2D's checkpoints."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from inference_pod.core.model import AveAudioEncoder, LipSyncUNet, random_weights
from inference_pod.errors import InvalidInput
from inference_pod.tools.synctalk_dataset import (
    load_checkpoint,
)

UNET_FILE = "unet.pth"
AUDIO_ENCODER_FILE = "audio_visual_encoder.pth"



def demo_unet(mode: str = "ave", width: int = 8, seed: int = 0) -> LipSyncUNet:
    return random_weights(LipSyncUNet(mode, width), seed)


def demo_audio_encoder(seed: int = 0) -> AveAudioEncoder:
    return random_weights(AveAudioEncoder(), seed + 1)


@dataclass(frozen=True)
class TrainedDemo:
    """The committed trained U-Net and the character it was trained for (its look is a function of seed and size)."""

    path: Path
    width: int
    seed: int
    size: tuple[int, int]


TRAINED = TrainedDemo(Path(__file__).parents[2] / "assets" / "demo_unet_w4.pth", width=4, seed=0, size=(256, 256))


def trained_unet_state(width: int, seed: int, size: tuple[int, int]) -> dict[str, torch.Tensor]:
    """The committed trained weights, refused for a character they were not trained on."""
    if (width, seed, tuple(size)) != (TRAINED.width, TRAINED.seed, TRAINED.size):
        raise InvalidInput(
            f"the trained demo weights are for width {TRAINED.width}, seed {TRAINED.seed}, "
            f"{TRAINED.size[0]}x{TRAINED.size[1]} frames; got width {width}, seed {seed}, {size[0]}x{size[1]}: "
            "use those, or ask for random weights (--random-weights)"
        )
    if not TRAINED.path.is_file():
        raise InvalidInput(f"{TRAINED.path} is missing: regenerate it with `make demo-weights`")
    return load_checkpoint(TRAINED.path, "trained demo U-Net")


def write_checkpoints(out_dir, mode: str = "ave", width: int = 8, seed: int = 0, unet_state=None) -> tuple[Path, Path]:
    """Seeded U-Net (or ``unet_state``) and AVE encoder as SyncTalk_2D writes them: torch.save(state_dict)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    unet_path, encoder_path = out_dir / UNET_FILE, out_dir / AUDIO_ENCODER_FILE
    torch.save(unet_state if unet_state is not None else demo_unet(mode, width, seed).state_dict(), unet_path)
    torch.save(demo_audio_encoder(seed).state_dict(), encoder_path)
    return unet_path, encoder_path

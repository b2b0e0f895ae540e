"""SyncTalk_2D's networks: the 328 U-Net (three audio modes) and the AVE audio encoder.

Module and attribute names are chosen so that ``state_dict()`` keys are exactly the ones
SyncTalk_2D writes (``inc.inconv.0.conv.0.weight``, ``audio_model.conv3.weight``, ...), and a
SyncTalk_2D checkpoint loads with ``strict=True``. The AVE encoder's checkpoint
(``audio_visual_encoder.pth``) is stored without the ``audio_encoder.`` prefix, so the encoder here is
itself the ``Sequential`` those keys index.

``base_width`` (32 in SyncTalk_2D) scales every U-Net channel count; narrower widths give tiny models for
tests and demos. The audio input channels are fixed by the feature shape, whatever the width.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import IO, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from inference_pod.core.templates import TEMPLATE_CROP_SIZE
from inference_pod.errors import CheckpointError

M = TypeVar("M", bound=nn.Module)

# Audio window tensor per output frame, by mode: the 16 per-frame feature vectors reshaped.
AUDIO_FEATURE_SHAPES: dict[str, tuple[int, int, int]] = {
    "ave": (32, 16, 16),  # 16 x 512 AVE embeddings
    "hubert": (32, 32, 32),  # 16 x (2 x 1024) HuBERT hidden states
    "wenet": (256, 16, 32),  # 16 x 8192 WeNet encoder outputs
}
# Frames per second of the video the features are aligned to.
MODE_FPS = {"ave": 25, "hubert": 25, "wenet": 20}
DEFAULT_WIDTH = 32
MODEL_INPUT_SIZE = 320  # inner region of the 328 crop
CROP_SIZE = TEMPLATE_CROP_SIZE


def _channels(base_width: int) -> list[int]:
    if base_width < 2 or base_width % 2:
        raise ValueError(f"model width must be an even number >= 2, got {base_width}")
    return [base_width * (2**i) for i in range(5)]


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 project, each with BatchNorm."""

    def __init__(self, inp: int, oup: int, stride: int, use_res_connect: bool, expand_ratio: int = 2):
        super().__init__()
        hidden = inp * expand_ratio
        self.use_res_connect = use_res_connect
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, 1, 0, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return x + y if self.use_res_connect else y


class DoubleConvDW(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int = 2):
        super().__init__()
        self.double_conv = nn.Sequential(
            InvertedResidual(in_channels, out_channels, stride=stride, use_res_connect=False),
            InvertedResidual(out_channels, out_channels, stride=1, use_res_connect=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.double_conv(x)


class InConvDw(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.inconv = nn.Sequential(InvertedResidual(in_channels, out_channels, stride=1, use_res_connect=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inconv(x)


class Down(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.maxpool_conv = nn.Sequential(DoubleConvDW(in_channels, out_channels, stride=2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool_conv(x)


class Up(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
        self.conv = DoubleConvDW(in_channels, out_channels, stride=1)

    def forward(self, low: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        low = self.up(low)
        dy = skip.shape[2] - low.shape[2]
        dx = skip.shape[3] - low.shape[3]
        if dy or dx:  # only odd sizes need it; 320 inputs never do
            low = F.pad(low, [dx // 2, dx - dx // 2, dy // 2, dy - dy // 2])
        return self.conv(torch.cat([low, skip], dim=1))


class OutConv(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class AudioConv(nn.Module):
    """The audio branch: turns one frame's audio window into a (16w, 10, 10) map.

    The three SyncTalk_2D variants differ only in their first two blocks and conv3's stride:
      ave    (32, 16, 16):  IR(32->2w), IR(2w->4w), conv3 stride 1
      hubert (32, 32, 32):  IR(32->2w), IR(2w->4w), conv3 stride 2
      wenet  (256, 16, 32): IR(8w->8w, residual) x2, conv3 stride (1, 2)
    """

    def __init__(self, mode: str, base_width: int = DEFAULT_WIDTH):
        super().__init__()
        ch = _channels(base_width)
        in_ch = AUDIO_FEATURE_SHAPES[mode][0]
        conv3_stride: int | tuple[int, int]
        if mode == "wenet":
            # At width 32 the input already has ch[3] = 256 channels and both blocks are residual; at other
            # widths the first block must change the channel count, so it cannot be.
            self.conv1 = InvertedResidual(in_ch, ch[3], stride=1, use_res_connect=in_ch == ch[3])
            self.conv2 = InvertedResidual(ch[3], ch[3], stride=1, use_res_connect=True)
            conv3_in, conv3_stride = ch[3], (1, 2)
        else:
            self.conv1 = InvertedResidual(in_ch, ch[1], stride=1, use_res_connect=False)
            self.conv2 = InvertedResidual(ch[1], ch[2], stride=1, use_res_connect=False)
            conv3_in, conv3_stride = ch[2], (2, 2) if mode == "hubert" else 1
        self.conv3 = nn.Conv2d(conv3_in, ch[3], kernel_size=3, padding=1, stride=conv3_stride)
        self.bn3 = nn.BatchNorm2d(ch[3])
        self.conv4 = InvertedResidual(ch[3], ch[3], stride=1, use_res_connect=True)
        self.conv5 = nn.Conv2d(ch[3], ch[4], kernel_size=3, padding=3, stride=2)
        self.bn5 = nn.BatchNorm2d(ch[4])
        self.relu = nn.ReLU()
        self.conv6 = InvertedResidual(ch[4], ch[4], stride=1, use_res_connect=True)
        self.conv7 = InvertedResidual(ch[4], ch[4], stride=1, use_res_connect=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(self.conv1(x))
        x = self.relu(self.bn3(self.conv3(x)))
        x = self.conv4(x)
        x = self.relu(self.bn5(self.conv5(x)))
        return self.conv7(self.conv6(x))


class LipSyncUNet(nn.Module):
    """SyncTalk_2D's ``unet_328.Model``: (B, 6, 320, 320) image + audio window -> (B, 3, 320, 320) in [0, 1]."""

    def __init__(self, mode: str = "ave", base_width: int = DEFAULT_WIDTH, n_channels: int = 6):
        super().__init__()
        if mode not in AUDIO_FEATURE_SHAPES:
            raise ValueError(f"unknown audio mode {mode!r}; expected one of {sorted(AUDIO_FEATURE_SHAPES)}")
        ch = _channels(base_width)
        self.mode = mode
        self.base_width = base_width
        self.n_channels = n_channels
        self.audio_model = AudioConv(mode, base_width)
        self.fuse_conv = nn.Sequential(DoubleConvDW(ch[4] * 2, ch[4], stride=1), DoubleConvDW(ch[4], ch[3], stride=1))
        self.inc = InConvDw(n_channels, ch[0])
        self.down1 = Down(ch[0], ch[0])
        self.down2 = Down(ch[0], ch[1])
        self.down3 = Down(ch[1], ch[2])
        self.down4 = Down(ch[2], ch[3])
        self.down5 = Down(ch[3], ch[4])
        self.up1 = Up(ch[4], ch[3] // 2)
        self.up2 = Up(ch[3], ch[2] // 2)
        self.up3 = Up(ch[2], ch[1] // 2)
        self.up4 = Up(ch[1], ch[0])
        self.up5 = Up(ch[1], ch[0] // 2)
        self.outc = OutConv(ch[0] // 2, 3)

    def forward(self, image: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        x1 = self.inc(image)
        x2 = self.down1(x1)
        x3 = self.down2(x2)
        x4 = self.down3(x3)
        x5 = self.down4(x4)
        x6 = self.down5(x5)
        fused = self.fuse_conv(torch.cat([x6, self.audio_model(audio)], dim=1))
        x = self.up1(fused, x5)
        x = self.up2(x, x4)
        x = self.up3(x, x3)
        x = self.up4(x, x2)
        x = self.up5(x, x1)
        return torch.sigmoid(self.outc(x))


class _AveConvBlock(nn.Module):
    """Conv + BatchNorm (+ residual) + ReLU: the unit of the AVE audio encoder."""

    def __init__(self, cin: int, cout: int, kernel_size: int, stride: int | tuple[int, int], padding: int, residual: bool = False):
        super().__init__()
        self.conv_block = nn.Sequential(nn.Conv2d(cin, cout, kernel_size, stride, padding), nn.BatchNorm2d(cout))
        self.act = nn.ReLU()
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv_block(x)
        return self.act(y + x if self.residual else y)


class AveAudioEncoder(nn.Sequential):
    """SyncTalk_2D's AVE audio encoder: one (1, 80, 16) mel window -> one 512-d embedding."""

    def __init__(self) -> None:
        # (cin, cout, kernel, stride, padding, residual)
        spec: list[tuple[int, int, int, int | tuple[int, int], int, bool]] = [
            (1, 32, 3, 1, 1, False), (32, 32, 3, 1, 1, True), (32, 32, 3, 1, 1, True),
            (32, 64, 3, (3, 1), 1, False), (64, 64, 3, 1, 1, True), (64, 64, 3, 1, 1, True),
            (64, 128, 3, 3, 1, False), (128, 128, 3, 1, 1, True), (128, 128, 3, 1, 1, True),
            (128, 256, 3, (3, 2), 1, False), (256, 256, 3, 1, 1, True),
            (256, 512, 3, 1, 0, False), (512, 512, 1, 1, 0, False),
        ]  # fmt: skip
        super().__init__(*(_AveConvBlock(*s) for s in spec))

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        return super().forward(mel).flatten(1)


def load_tensors(path: str | os.PathLike[str] | IO[bytes], what: str, rule: str = "packages may hold only tensors") -> object:
    """``torch.load(weights_only=True)``: no code from the file runs. A refusal says what was refused, never
    torch's advice to load with weights_only=False, which would run the file's code."""
    import pickle
    import re

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if found:  # a class or function the file would have us import and call
            raise CheckpointError(f"{what} contains pickled Python objects other than tensors ({found[1]}); {rule}") from None
        raise CheckpointError(f"{what} cannot be loaded: it is not a PyTorch checkpoint of tensors") from None
    except Exception as exc:  # zip and storage errors: not a checkpoint at all
        raise CheckpointError(f"{what} cannot be loaded: {_first_line(exc)}") from None


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def normalize_state_dict(state: Mapping[str, torch.Tensor], strip_prefixes: tuple[str, ...] = ("module.",)) -> dict[str, torch.Tensor]:
    """Accept a raw state_dict, a ``{"state_dict": ...}`` wrapper, or DataParallel's ``module.`` keys."""
    if "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    out = dict(state)
    for prefix in strip_prefixes:
        if out and all(k.startswith(prefix) for k in out):
            out = {k[len(prefix):]: v for k, v in out.items()}
    return out


def load_strict(module: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    """``load_state_dict(strict=True)`` with an error that names missing, unexpected and mis-shaped keys."""
    state = normalize_state_dict(state)
    check_fits(module.state_dict(), state, what)
    module.load_state_dict(state, strict=True)


def build_strict(factory: Callable[[], M], state: Mapping[str, torch.Tensor], what: str) -> M:
    """``factory()`` loaded with ``state``; the state's keys and shapes are checked first against the module
    built on the meta device (shapes, no storage). A width a manifest merely claims therefore costs nothing:
    only a state dict whose real tensors fit gets a module built, and that module is the size of the tensors."""
    state = normalize_state_dict(state)
    with torch.device("meta"):
        module = factory()
    check_fits(module.state_dict(), state, what)
    # The checkpoint's tensors become the module's (assign): no random initialisation to overwrite, no copy.
    module.load_state_dict(state, strict=True, assign=True)
    left = [name for name, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:  # a non-persistent buffer a checkpoint never holds
        raise CheckpointError(f"{what}: {left[0]} is not in the checkpoint")
    return module


def build_unet(mode: str, width: int, state: Mapping[str, torch.Tensor], what: str = "U-Net") -> LipSyncUNet:
    """The U-Net a package's manifest describes, loaded with its weights. The width is the manifest's claim and
    the weights are what is there: a width they do not have is refused by name, before anything is built."""
    state = normalize_state_dict(state)
    try:
        _, actual = infer_unet_config(state)
    except CheckpointError:
        actual = width  # not a U-Net at all: build_strict names what is missing
    if actual != width:
        raise CheckpointError(f"{what} checkpoint does not fit: it holds a width-{actual} U-Net, not model_width {width}")
    return build_strict(lambda: LipSyncUNet(mode, width), state, what)


def check_fits(own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], what: str) -> None:
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} != model {tuple(own[k].shape)}"
        for k in set(own) & set(state)
        if tuple(state[k].shape) != tuple(own[k].shape)
    )
    if missing or unexpected or wrong:
        parts = []
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong)):
            if items:
                shown = ", ".join(items[:5]) + (f", ... ({len(items)} in all)" if len(items) > 5 else "")
                parts.append(f"{label}: {shown}")
        raise CheckpointError(f"{what} checkpoint does not fit: " + "; ".join(parts))


def infer_unet_config(state: Mapping[str, torch.Tensor]) -> tuple[str, int]:
    """Work out (mode, base_width) from a U-Net state_dict, for checkpoints that arrive without a manifest."""
    state = normalize_state_dict(state)
    try:
        base_width = int(state["inc.inconv.0.conv.6.weight"].shape[0])
        conv2_in = int(state["audio_model.conv2.conv.0.weight"].shape[1])
    except KeyError as exc:
        raise CheckpointError(f"not a SyncTalk_2D U-Net checkpoint (no {exc.args[0]})") from None
    if conv2_in == base_width * 8:  # wenet's conv2 keeps 8w channels; ave/hubert's maps 2w -> 4w
        return "wenet", base_width
    # ave and hubert share every shape and differ only in conv3's stride, which a state_dict does not
    # record: the caller must say which (SyncTalk_2D's --asr flag). Default to ave.
    return "ave", base_width


def random_weights(module: M, seed: int) -> M:
    """Seeded random weights, with non-trivial BatchNorm statistics so that folding and precision are exercised."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if not tensor.is_floating_point():
                continue
            if name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=gen) * 0.5 + 0.75)
            elif name.endswith("running_mean") or name.endswith(".bias"):
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.05)
            elif tensor.dim() == 1:  # BatchNorm weight
                tensor.copy_(torch.rand(tensor.shape, generator=gen) * 0.5 + 0.75)
            else:
                fan_in = tensor[0].numel()
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * (1.0 / fan_in) ** 0.5)
    return module

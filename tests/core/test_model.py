"""The networks: SyncTalk_2D's key names, shapes, cost, strict loading, BatchNorm folding."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from inference_pod.core.engine import fold_batchnorm
from inference_pod.core.model import (
    AUDIO_FEATURE_SHAPES,
    AveAudioEncoder,
    LipSyncUNet,
    infer_unet_config,
    load_strict,
    normalize_state_dict,
    random_weights,
)
from inference_pod.errors import CheckpointError

# A sample of the keys SyncTalk_2D's unet_328.Model writes, across every kind of block.
SYNCTALK_UNET_KEYS = [
    "inc.inconv.0.conv.0.weight",
    "down1.maxpool_conv.0.double_conv.0.conv.3.weight",
    "down5.maxpool_conv.0.double_conv.1.conv.7.running_var",
    "audio_model.conv1.conv.0.weight",
    "audio_model.conv3.weight",
    "audio_model.conv3.bias",
    "audio_model.bn3.num_batches_tracked",
    "audio_model.bn5.running_mean",
    "audio_model.conv7.conv.7.bias",
    "fuse_conv.0.double_conv.0.conv.1.weight",
    "fuse_conv.1.double_conv.1.conv.6.weight",
    "up1.conv.double_conv.0.conv.0.weight",
    "up5.conv.double_conv.1.conv.4.running_mean",
    "outc.conv.weight",
    "outc.conv.bias",
]
SYNCTALK_AVE_KEYS = ["0.conv_block.0.weight", "0.conv_block.1.running_var", "3.conv_block.0.bias", "12.conv_block.1.weight"]


@pytest.mark.parametrize("mode", sorted(AUDIO_FEATURE_SHAPES))
def test_unet_forward_shape_every_mode(mode):
    net = LipSyncUNet(mode, base_width=4).eval()
    with torch.no_grad():
        out = net(torch.rand(2, 6, 320, 320), torch.randn(2, *AUDIO_FEATURE_SHAPES[mode]))
    assert out.shape == (2, 3, 320, 320)
    assert float(out.min()) >= 0 and float(out.max()) <= 1  # sigmoid


@pytest.mark.parametrize("mode", sorted(AUDIO_FEATURE_SHAPES))
def test_state_dict_uses_synctalk_key_names(mode):
    keys = set(LipSyncUNet(mode).state_dict())
    assert set(SYNCTALK_UNET_KEYS) <= keys
    assert not any(k.startswith(("audio_encoder.", "module.")) for k in keys)


def test_full_width_model_costs_about_4_9_gmac():
    net = LipSyncUNet("ave").eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(torch.zeros(1, 6, 320, 320), torch.zeros(1, 32, 16, 16))
    gmacs = counter.get_total_flops() / 2e9
    assert 4.8 < gmacs < 5.0, gmacs
    assert sum(p.numel() for p in net.parameters()) == 12_186_935


def test_ave_encoder_keys_have_no_prefix_and_give_512():
    enc = AveAudioEncoder().eval()
    assert set(SYNCTALK_AVE_KEYS) <= set(enc.state_dict())
    with torch.no_grad():
        assert enc(torch.randn(3, 1, 80, 16)).shape == (3, 512)


@pytest.mark.parametrize("mode", sorted(AUDIO_FEATURE_SHAPES))
def test_strict_round_trip_and_config_inference(mode):
    src = random_weights(LipSyncUNet(mode, base_width=4), seed=1)
    state = {f"module.{k}": v for k, v in src.state_dict().items()}  # as DataParallel saves it
    expected_mode = "wenet" if mode == "wenet" else "ave"  # ave and hubert share every shape
    assert infer_unet_config(state) == (expected_mode, 4)
    dst = LipSyncUNet(mode, base_width=4)
    load_strict(dst, state, "U-Net")
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k


def test_strict_loading_names_every_problem():
    state = LipSyncUNet("ave", base_width=4).state_dict()
    state.pop("outc.conv.bias")
    state["extra.weight"] = torch.zeros(1)
    state["inc.inconv.0.conv.0.weight"] = torch.zeros(1, 1, 1, 1)
    with pytest.raises(CheckpointError) as err:
        load_strict(LipSyncUNet("ave", base_width=4), state, "U-Net")
    message = str(err.value)
    assert "missing keys: outc.conv.bias" in message
    assert "unexpected keys: extra.weight" in message
    assert "inc.inconv.0.conv.0.weight" in message and "wrong shapes" in message


def test_width_mismatch_is_refused():
    with pytest.raises(CheckpointError, match="wrong shapes"):
        load_strict(LipSyncUNet("ave", base_width=8), LipSyncUNet("ave", base_width=4).state_dict(), "U-Net")


def test_not_a_unet_checkpoint():
    with pytest.raises(CheckpointError, match="not a SyncTalk_2D U-Net"):
        infer_unet_config(AveAudioEncoder().state_dict())


def test_normalize_unwraps_state_dict_wrapper():
    inner = {"a.weight": torch.zeros(1)}
    assert normalize_state_dict({"state_dict": {"module.a.weight": inner["a.weight"]}}) == inner


@pytest.mark.parametrize("width", [0, 3, -2])
def test_bad_width(width):
    with pytest.raises(ValueError, match="width"):
        LipSyncUNet("ave", base_width=width)


def test_unknown_mode():
    with pytest.raises(ValueError, match="unknown audio mode"):
        LipSyncUNet("mfcc")


def test_batchnorm_folding_keeps_the_function():
    net = random_weights(LipSyncUNet("ave", base_width=4), seed=3).eval()
    image, audio = torch.rand(2, 6, 320, 320), torch.randn(2, 32, 16, 16)
    with torch.no_grad():
        before = net(image, audio)
        folded = fold_batchnorm(net)
        after = folded(image, audio)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)

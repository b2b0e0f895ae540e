"""The inference engine: one character's network (network.py), templates (template_store.py) and
compositing (compositing.py) on one device, behind ``Engine`` (engine.py). Importing this imports torch."""

from inference_pod.core.engine.compositing import (
    DEFAULT_JPEG_CACHE_BYTES,
    FEATHER_PIXELS,
    Compositor,
    FullFrameJpeg,
    feather_weights,
)
from inference_pod.core.engine.engine import CharacterSource, Engine
from inference_pod.core.engine.network import (
    ENCODER_BATCH,
    MASK_RECT,
    PRECISIONS,
    Network,
    fold_batchnorm,
    mouth_mask,
    no_audio_encoder,
)
from inference_pod.core.engine.template_store import INNER, PNG_LEVEL, CropBox, TemplateFrames, TemplateStore
from inference_pod.core.memory import MemoryUse
from inference_pod.core.model import CROP_SIZE, MODEL_INPUT_SIZE
from inference_pod.core.templates import PASTE_MODES, TEMPLATE_STORAGES, pingpong_index

__all__ = [
    "CROP_SIZE",
    "DEFAULT_JPEG_CACHE_BYTES",
    "ENCODER_BATCH",
    "FEATHER_PIXELS",
    "INNER",
    "MASK_RECT",
    "MODEL_INPUT_SIZE",
    "PASTE_MODES",
    "PNG_LEVEL",
    "PRECISIONS",
    "TEMPLATE_STORAGES",
    "CharacterSource",
    "Compositor",
    "CropBox",
    "Engine",
    "FullFrameJpeg",
    "MemoryUse",
    "Network",
    "TemplateFrames",
    "TemplateStore",
    "feather_weights",
    "fold_batchnorm",
    "mouth_mask",
    "no_audio_encoder",
    "pingpong_index",
]

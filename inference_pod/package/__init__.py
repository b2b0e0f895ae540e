"""The character package, format v1: one zip holding everything a pod needs to serve one character.

Layout (see docs/PACKAGE_FORMAT.md)::

    manifest.json                  identity, model config, frame info, {member: {sha256, size}}
    weights/unet.pth               U-Net state_dict, exactly as SyncTalk_2D saves it
    weights/audio_encoder.pth      AVE encoder state_dict, keys without "audio_encoder." (required for ave)
    frames/000000.jpg ...          template frames, byte-exact copies of the source frames
    crop_boxes.npy                 (N, 4) int32: x1, y1, x2, y2 per frame
    audio/default_features.npy     (T, D) float32 default-track features, as SyncTalk_2D's aud_ave.npy (optional)
    audio/default.wav              16 kHz mono PCM16 default track (optional, only with the features)

Packages are untrusted input. Extraction accepts only the members the layout names (no traversal, links
or duplicates), enforces ``PackageLimits`` on declared sizes and again on the bytes actually inflated,
checks every checksum while streaming, validates the contents (crop boxes, arrays, wav, tensor shapes)
in a temporary sibling directory, and renames that into place only when all of it passed. Weights load
with ``torch.load(weights_only=True)`` and arrays with ``allow_pickle=False``: opening a package runs no
code from it.

One module per concern, data flowing one way: ``manifest`` (names, the checked manifest) <- ``images``
(frame headers) <- ``checks`` (contents, tensors) <- ``character`` (the package on disk) <- ``extract``
(reading zips) ; ``writer`` (building zips) and ``display`` (summaries) sit beside them. This module
re-exports the public contract, so ``from inference_pod.package import X`` is all callers need.
"""

from inference_pod.package.character import CharacterPackage
from inference_pod.package.checks import (
    check_audio_encoder_state,
    check_crop_boxes,
    check_default_audio,
    check_default_features,
    check_unet_state,
)
from inference_pod.package.display import package_summary
from inference_pod.package.extract import (
    CHUNK,
    PackageLimits,
    check_extracted_source,
    default_cache_dir,
    extract_package,
    open_package,
    read_manifest,
    verify_package,
)
from inference_pod.package.images import image_dimensions
from inference_pod.package.manifest import (
    AUDIO_ENCODER,
    CROP_BOXES,
    DEFAULT_AUDIO,
    DEFAULT_FEATURES,
    FORMAT_NAME,
    FORMAT_VERSION,
    FRAME_EXTS,
    IDENTIFIER,
    LAYOUT_DIRS,
    MANIFEST,
    SHA256_HEX,
    UNET,
    Manifest,
    feature_dim,
    frame_member,
    validate_identifier,
)
from inference_pod.package.writer import ZIP_EPOCH, write_package

__all__ = [
    "AUDIO_ENCODER", "CHUNK", "CROP_BOXES", "DEFAULT_AUDIO", "DEFAULT_FEATURES", "FORMAT_NAME", "FORMAT_VERSION",
    "FRAME_EXTS", "IDENTIFIER", "LAYOUT_DIRS", "MANIFEST", "SHA256_HEX", "UNET", "ZIP_EPOCH",
    "CharacterPackage", "Manifest", "PackageLimits",
    "check_audio_encoder_state", "check_crop_boxes", "check_extracted_source", "check_default_audio", "check_default_features",
    "check_unet_state", "default_cache_dir", "extract_package", "feature_dim", "frame_member",
    "image_dimensions", "open_package", "package_summary", "read_manifest", "validate_identifier",
    "verify_package", "write_package",
]

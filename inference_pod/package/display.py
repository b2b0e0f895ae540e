"""Human-readable package summaries (``lipsync package inspect``)."""

from __future__ import annotations

from inference_pod.package.manifest import AUDIO_ENCODER, DEFAULT_AUDIO, Manifest


def package_summary(manifest: Manifest) -> str:
    """Human-readable manifest summary (``lipsync package inspect``)."""
    width, height = manifest.image_size
    audio = "none"
    if manifest.has_default_audio:
        audio = "features" + (" + wav" if DEFAULT_AUDIO in manifest.members else "")
    lines = [
        f"name:          {manifest.name}",
        f"version:       {manifest.version}",
        f"format:        {manifest.format} v{manifest.format_version}",
        f"created:       {manifest.created}",
        f"audio mode:    {manifest.audio_mode} ({manifest.fps} fps)",
        f"model width:   {manifest.model_width}",
        f"frames:        {manifest.frame_count} x {width}x{height} {manifest.frame_ext}",
        f"audio encoder: {'yes' if AUDIO_ENCODER in manifest.members else 'no'}",
        f"default audio: {audio}",
        f"members:       {len(manifest.members) + 1} ({_human_bytes(manifest.total_bytes)} uncompressed)",
    ]
    return "\n".join(lines)


def _human_bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    value, unit = n / 1024, "KiB"
    for bigger in ("MiB", "GiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{value:.1f} {unit}"

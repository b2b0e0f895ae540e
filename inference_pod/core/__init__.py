"""Numerics: SyncTalk_2D's U-Net and audio encoder, audio features (whole tracks and live), the batched
engine, image codecs and JPEG splicing. Pure computation on arrays and tensors: no network, no event loop, no
settings; imports only ``inference_pod.errors`` and other ``core`` modules (checked by import-linter)."""

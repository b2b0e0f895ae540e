"""The synthetic demo character: drawn frames, plausible landmarks, a voice track, seeded or trained weights.

It is written in SyncTalk_2D's own layout (full_body_img/, landmarks/, aud.wav, aud_ave.npy, .pth
checkpoints) and packaged through the real converter, so a demo package exercises the same path as a
trained character. Everything is a pure function of the seed (and of the speech): same inputs, same bytes.

The drawn mouth follows the voice: frame i's opening comes from the loudness of the audio around frame
i's time and its width from the balance of high to low speech bands (see ``mouth_track``). Audio -> mouth
is therefore a function the U-Net can learn from the audio window it sees, which is what ``lipsync
train`` does; the weights trained that way ship in inference_pod/assets/ (``TRAINED``).
"""

from inference_pod.tools.demo_character.dataset import (
    DEFAULT_SIZE,
    JPEG_QUALITY,
    MIN_SIZE,
    build_demo_package,
    write_synctalk_dataset,
)
from inference_pod.tools.demo_character.drawing import (
    DEMO_FPS,
    MOUTH_INTERIOR,
    character_style,
    draw_frame,
    mouth_track,
)
from inference_pod.tools.demo_character.voice import (
    DEFAULT_SPEECH,
    PAUSE_S,
    TRAINING_SPEECH,
    Utterance,
    default_speech,
    espeak,
    speech_like_audio,
    speech_track,
)
from inference_pod.tools.demo_character.weights import (
    AUDIO_ENCODER_FILE,
    TRAINED,
    UNET_FILE,
    TrainedDemo,
    demo_audio_encoder,
    demo_unet,
    trained_unet_state,
    write_checkpoints,
)

__all__ = [
    "AUDIO_ENCODER_FILE", "DEFAULT_SIZE", "DEFAULT_SPEECH", "DEMO_FPS", "JPEG_QUALITY", "MIN_SIZE", "MOUTH_INTERIOR",
    "PAUSE_S", "TRAINED", "TRAINING_SPEECH", "UNET_FILE", "TrainedDemo", "Utterance", "character_style", "build_demo_package",
    "default_speech", "demo_audio_encoder", "demo_unet", "draw_frame", "espeak", "mouth_track", "speech_like_audio",
    "speech_track", "trained_unet_state", "write_checkpoints", "write_synctalk_dataset",
]

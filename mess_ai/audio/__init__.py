"""Audio in: find files, check them, decode them to mono at the model's rate, cut them into windows."""

from mess_ai.audio.discovery import AUDIO_EXTENSIONS, AudioSource, audio_source_at, discover_audio, make_track_id
from mess_ai.audio.loading import load_mono
from mess_ai.audio.validation import AudioInfo, probe_audio
from mess_ai.audio.windows import WindowSpec, frame_windows, window_bounds

__all__ = [
    "AUDIO_EXTENSIONS",
    "AudioInfo",
    "AudioSource",
    "WindowSpec",
    "audio_source_at",
    "discover_audio",
    "frame_windows",
    "load_mono",
    "make_track_id",
    "probe_audio",
    "window_bounds",
]

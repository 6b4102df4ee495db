"""Audio in: find files, open them safely, check them, decode them to mono at the model's rate, cut them into
windows."""

from mess_ai.audio.discovery import AUDIO_EXTENSIONS, AudioSource, audio_source_at, discover_audio, make_track_id
from mess_ai.audio.loading import load_mono
from mess_ai.audio.opening import OpenedAudio, identity, open_audio, sha256_fd
from mess_ai.audio.validation import AudioInfo, AudioLimits, probe_audio
from mess_ai.audio.windows import WindowSpec, frame_windows, window_bounds, window_times

__all__ = [
    "AUDIO_EXTENSIONS",
    "AudioInfo",
    "AudioLimits",
    "AudioSource",
    "OpenedAudio",
    "WindowSpec",
    "audio_source_at",
    "discover_audio",
    "frame_windows",
    "identity",
    "load_mono",
    "make_track_id",
    "open_audio",
    "probe_audio",
    "sha256_fd",
    "window_bounds",
    "window_times",
]

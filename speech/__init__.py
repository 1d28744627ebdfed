"""Speech to states: log-mel features, the Conformer encoder, BEST-RQ, the speech adapter."""
from speech.adapter import SpeechAdapter
from speech.audio import AUDIO_EXTENSIONS, SAMPLE_RATE, LogMel, audio_from_bytes, feature_frames, load_audio, resample
from speech.bestrq import BestRQ, BestRQConfig
from speech.conformer import ConformerEncoder, SpeechAdapterConfig, SpeechConfig
from speech.processor import AudioFeatures, AudioProcessor

__all__ = ["AUDIO_EXTENSIONS", "SAMPLE_RATE", "LogMel", "audio_from_bytes", "feature_frames", "load_audio", "resample",
           "AudioFeatures", "AudioProcessor", "BestRQ", "BestRQConfig", "ConformerEncoder", "SpeechAdapter",
           "SpeechAdapterConfig", "SpeechConfig"]

"""Recordings -> padded log-mel batches for the Conformer."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from speech.conformer import SpeechConfig


@dataclass
class AudioFeatures:
    """Log-mel features of n recordings, zero-padded: features [n, T, n_mels], lengths [n]."""

    features: Tensor
    lengths: Tensor

    def __len__(self) -> int:
        return self.features.shape[0]

    def to(self, device) -> "AudioFeatures":
        return AudioFeatures(self.features.to(device), self.lengths.to(device))

    @staticmethod
    def pad(items: list[Tensor]) -> "AudioFeatures":
        lengths = torch.tensor([f.shape[0] for f in items], dtype=torch.long)
        out = items[0].new_zeros(len(items), int(lengths.max()), items[0].shape[1])
        for i, f in enumerate(items):
            out[i, : f.shape[0]] = f
        return AudioFeatures(out, lengths)


class AudioProcessor:
    """A recording (path, bytes, or (samples, sample_rate)) -> normalised log-mel [T, n_mels]."""

    def __init__(self, config: SpeechConfig) -> None:
        self.config = config
        self.log_mel = None  # built on first use (a model may be built on the meta device)

    def wave(self, source) -> Tensor:
        """The recording as float32 samples [n], mono, 16 kHz (speech/audio.py, load_audio)."""
        from speech.audio import load_audio

        if isinstance(source, tuple) and len(source) == 2:
            return load_audio(source[0], source[1], max_seconds=self.config.max_seconds)
        return load_audio(source, max_seconds=self.config.max_seconds)

    def features(self, source) -> Tensor:
        return self.log_mel_of(self.wave(source))

    def log_mel_of(self, wave: Tensor) -> Tensor:
        """16 kHz mono samples [n] -> normalised log-mel [T, n_mels]."""
        from speech.audio import LogMel

        if self.log_mel is None:
            self.log_mel = LogMel(n_mels=self.config.n_mels)
        return self.log_mel(wave)

    def __call__(self, sources: list) -> AudioFeatures:
        return AudioFeatures.pad([self.features(s) for s in sources])

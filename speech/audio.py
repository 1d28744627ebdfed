"""Recordings -> 16 kHz mono float samples -> normalised 80-dim log-mel features.

    wave = load_audio("question.mp3")          # float32 [n], mono, 16 kHz
    feats = LogMel()(wave)                     # float32 [1 + n // 160, 80]: 25 ms windows, 10 ms hop

Files are read with soundfile (libsndfile: wav, flac, ogg/vorbis, opus, mp3, aiff, ...); what it
does not recognise (m4a, webm, aac, wma, ...) is decoded with PyAV (FFmpeg). Several channels
are averaged; other rates are resampled to 16 kHz with torchaudio (sinc interpolation).

Memory stays bounded: a file's length is read from its header or stream info before anything is
decoded, and a recording over `max_seconds` is refused without decoding it; a stream that does
not declare its length is decoded only until it passes the limit.

Samples given directly (tensor or numpy array, [n] or [channels, n], with their sample rate):
floating point is taken as is (full scale = 1.0); int16 and int32 are PCM and are scaled to
[-1, 1) (x / 32768, x / 2**31); other integer types (uint8, int8, int64, bool) are refused,
because their scale is a guess (8-bit PCM is offset, int64 is usually a mistake).

Refused as InputError naming the input: missing, directory, zero-byte, not audio, corrupt or
truncated files; no samples; NaN/inf samples; silence (peak below SILENCE_PEAK, -80 dBFS: there is
nothing to transcribe); too long; tensors of another dtype/shape or without a sample rate.
A truncated MP3 or compressed stream whose header gives only an estimate of its length decodes to
the part that is there, as media players do; WAV and FLAC files cut short are refused.
"""
from __future__ import annotations

import io
import math
import os

import av
import numpy as np
import soundfile as sf
import torch
import torchaudio
from torch import Tensor

from mm.errors import InputError, existing_file
from mm.ffmpeg import ffmpeg_errors


SAMPLE_RATE = 16000
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".m4a", ".aac", ".webm", ".wma",
                    ".aiff", ".aif", ".caf", ".mka")
MAX_SECONDS = 60.0
SILENCE_PEAK = 1e-4  # -80 dBFS, about 3 steps of 16-bit PCM: dither, not speech
MIN_RATE, MAX_RATE = 1000, 768_000
MAX_CHANNELS = 64
N_FFT, HOP_LENGTH, N_MELS = 400, 160, 80  # 25 ms windows every 10 ms at 16 kHz
_PCM_SCALE = {torch.int16: 2.0 ** 15, torch.int32: 2.0 ** 31}
_TORCHAUDIO_KERNEL_LIMIT = 20_000_000  # resample kernel entries; beyond this use libswresample


# ---- loading -----------------------------------------------------------------------------------
def load_audio(source, sample_rate: int | None = None, *, max_seconds: float | None = MAX_SECONDS) -> Tensor:
    """A recording -> float32 [n] samples, mono, 16 kHz.

    source: a path (str/Path), encoded bytes, a float/int16/int32 tensor or numpy array of
    samples [n] or [channels, n] (then sample_rate is required), or a (samples, sample_rate)
    tuple. max_seconds: longer recordings are refused (None: no limit).

    Raises InputError naming the input; see the module docstring for what is refused.
    """
    if isinstance(source, tuple):
        if len(source) != 2:
            raise InputError("audio tuple", "expected (samples, sample_rate)")
        samples, rate = source
        if sample_rate is not None and rate != sample_rate:
            raise InputError("audio tuple", f"sample rate {rate} in the tuple differs from sample_rate={sample_rate}")
        return load_audio(samples, rate, max_seconds=max_seconds)
    if isinstance(source, (Tensor, np.ndarray)):
        return _from_samples(source, sample_rate, max_seconds)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return audio_from_bytes(bytes(source), "audio data", max_seconds=max_seconds)
    if not isinstance(source, (str, os.PathLike)):
        raise InputError(type(source).__name__, "not audio: expected a path, bytes, or a tensor of samples "
                                                "with its sample rate")
    if sample_rate is not None:
        raise InputError(source, "sample_rate is only for tensors of samples (a file has its own rate)")
    path = existing_file(source, "an audio")
    return _decode(lambda: str(path), path.stat().st_size, path, max_seconds)


def audio_from_bytes(data: bytes, name: str, *, max_seconds: float | None = MAX_SECONDS) -> Tensor:
    """Encoded audio (a file's bytes, e.g. from a shard) -> float32 [n] at 16 kHz; errors name `name`."""
    if not data:
        raise InputError(name, "empty audio data")
    return _decode(lambda: io.BytesIO(data), len(data), name, max_seconds)


def _decode(opener, size: int, name, max_seconds) -> Tensor:
    """soundfile first; what libsndfile does not recognise goes to PyAV, and so does MP3 (libsndfile's
    mpg123 prints its complaints about a damaged MP3 on stderr). size: the file's bytes."""
    if _looks_like_mp3(_head(opener)):
        return _decode_av(opener, name, max_seconds)
    try:
        info = sf.info(opener())
    except sf.LibsndfileError as e:
        if e.code in (1, 4):  # unrecognised format / unsupported encoding: FFmpeg may know it
            return _decode_av(opener, name, max_seconds)
        raise InputError(name, f"corrupt or truncated audio file ({_sf_reason(e)})") from None
    except (RuntimeError, ValueError, OSError) as e:  # e.g. a header that declares absurd sizes
        raise InputError(name, f"corrupt audio file ({e})") from None
    if info.format == "MP3":
        return _decode_av(opener, name, max_seconds)
    _check_rate(info.samplerate, name)
    _check_length(info.frames / info.samplerate, name, max_seconds)
    try:
        samples, rate = sf.read(opener(), dtype="float32", always_2d=True)  # [n, channels]
    except (sf.LibsndfileError, RuntimeError, ValueError, OSError) as e:
        raise InputError(name, f"corrupt or truncated audio file ({_sf_reason(e)})") from None
    if info.format in ("WAV", "WAVEX"):
        _check_riff_size(_head(opener), size, name)
    return _finish(torch.from_numpy(samples.T), rate, name)


def _head(opener) -> bytes:
    source = opener()
    with open(source, "rb") if isinstance(source, str) else source as f:
        return f.read(12)


def _looks_like_mp3(head: bytes) -> bool:
    """An ID3 tag or an MPEG audio frame sync at the start."""
    return head[:3] == b"ID3" or (len(head) > 1 and head[0] == 0xFF and head[1] & 0xE6 in (0xE2, 0xE4, 0xE6))


def _sf_reason(e: Exception) -> str:
    text = str(getattr(e, "error_string", "") or e).strip()
    return text[7:].strip() if text.startswith("Error :") else text


def _check_riff_size(head: bytes, size: int, name) -> None:
    """libsndfile silently reads a cut WAV to its end: compare the RIFF size with the real size.
    Recorders that stream a WAV write 0 or 0xFFFFFFFF there (size unknown): accepted."""
    declared = int.from_bytes(head[4:8], "little") + 8 if head[:4] == b"RIFF" else 8
    if declared not in (8, 0xFFFFFFFF + 8) and size < declared:
        raise InputError(name, f"truncated WAV file: its header declares {declared} bytes, there are {size}")


def _decode_av(opener, name, max_seconds) -> Tensor:
    with ffmpeg_errors(name, "audio"), av.open(opener(), mode="r", metadata_errors="ignore") as container:
        if not container.streams.audio:
            raise InputError(name, "not audio: no audio stream in the file "
                                   f"(FFmpeg reads it as {container.format.name})")
        stream = container.streams.audio[0]
        if stream.codec_context is None or not stream.codec_context.name:
            raise InputError(name, "unsupported audio codec (FFmpeg has no decoder for it)")
        declared = _av_duration(container, stream)
        if declared is not None:
            _check_length(declared, name, max_seconds)
        rate = stream.codec_context.sample_rate
        _check_rate(rate, name)
        limit = math.inf if max_seconds is None else max_seconds * rate
        to_float = av.AudioResampler(format="fltp", rate=rate)  # keeps each frame's channels
        chunks, n = [], 0
        for frame in container.decode(stream):
            for out in to_float.resample(frame):
                chunks.append(out.to_ndarray().mean(axis=0))  # mono now: the channel count may change
                n += chunks[-1].shape[0]
            if n > limit:  # a stream without a declared length: stop as soon as it is too long
                _check_length(n / rate, name, max_seconds)
        for out in to_float.resample(None):
            chunks.append(out.to_ndarray().mean(axis=0))
    if not chunks:
        raise InputError(name, "no audio samples (empty audio)")
    return _finish(torch.from_numpy(np.concatenate(chunks))[None], rate, name)


def _av_duration(container, stream) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    return None


def _check_length(seconds: float, name, max_seconds: float | None) -> None:
    if max_seconds is not None and seconds > max_seconds:
        raise InputError(name, f"recording too long: {seconds:.1f} s, the limit is {max_seconds:g} s")


def _check_rate(rate, name) -> None:
    if isinstance(rate, bool) or not isinstance(rate, (int, float, np.integer, np.floating)) or rate != int(rate):
        raise InputError(name, f"sample rate must be a whole number of Hz, got {rate!r}")
    if not MIN_RATE <= rate <= MAX_RATE:
        raise InputError(name, f"sample rate {int(rate)} Hz is out of range ({MIN_RATE}..{MAX_RATE})")


def _from_samples(x, sample_rate, max_seconds) -> Tensor:
    name = "audio tensor" if isinstance(x, Tensor) else "audio array"
    if isinstance(x, np.ndarray):
        if x.dtype == object or x.dtype.kind not in "fiub":
            raise InputError(name, f"dtype must be float, int16 or int32, got {x.dtype}")
        x = torch.from_numpy(np.ascontiguousarray(x))
    if sample_rate is None:
        raise InputError(name, "sample_rate is required with samples (e.g. load_audio(x, 44100))")
    _check_rate(sample_rate, name)
    if x.dtype in _PCM_SCALE:
        x = x.double() / _PCM_SCALE[x.dtype]
    elif not x.is_floating_point():
        raise InputError(name, f"dtype must be float, int16 or int32 (PCM), got {x.dtype}")
    if x.dim() == 2 and x.shape[0] > MAX_CHANNELS and x.shape[1] <= MAX_CHANNELS:
        raise InputError(name, f"shape {list(x.shape)} looks like [n, channels]; pass [channels, n] (transpose it)")
    if x.dim() not in (1, 2) or (x.dim() == 2 and x.shape[0] > MAX_CHANNELS):
        raise InputError(name, f"shape must be [n] or [channels, n] (at most {MAX_CHANNELS} channels), "
                               f"got {list(x.shape)}")
    x = x.detach().cpu()
    x = x[None] if x.dim() == 1 else x  # [channels, n]
    _check_length(x.shape[1] / sample_rate, name, max_seconds)
    return _finish(x, int(sample_rate), name)


def _finish(x: Tensor, rate: int, name) -> Tensor:
    """[channels, n] samples at `rate` -> checked float32 [n] mono at 16 kHz."""
    if x.numel() == 0:
        raise InputError(name, "no audio samples (empty audio)")
    if not bool(torch.isfinite(x).all()):
        raise InputError(name, "audio contains NaN or infinite samples")
    wave = x.float().mean(dim=0)
    peak = float(wave.abs().max())
    if peak < SILENCE_PEAK:
        raise InputError(name, f"silent audio (peak {peak:.1e}, below {SILENCE_PEAK:g}): nothing to transcribe")
    return resample(wave, int(rate)).contiguous()


def resample(wave: Tensor, rate: int, target: int = SAMPLE_RATE) -> Tensor:
    """float [n] at `rate` -> float32 [m] at `target`. torchaudio's sinc resampler, except for
    rates whose ratio reduces to a huge kernel (e.g. 44101 -> 16000), which go to libswresample."""
    if rate == target:
        return wave.float()
    g = math.gcd(rate, target)
    if (rate // g) * (target // g) <= _TORCHAUDIO_KERNEL_LIMIT:
        return torchaudio.functional.resample(wave.float(), rate, target)
    converter = av.AudioResampler(format="flt", layout="mono", rate=target)
    frame = av.AudioFrame.from_ndarray(wave.float().numpy()[None, :], format="flt", layout="mono")
    frame.sample_rate = rate
    out = [f.to_ndarray()[0] for f in [*converter.resample(frame), *converter.resample(None)]]
    return torch.from_numpy(np.concatenate(out)) if out else wave.new_zeros(0)


# ---- features ------------------------------------------------------------------------------------
def feature_frames(samples: int, hop_length: int = HOP_LENGTH) -> int:
    """Feature frames LogMel gives for `samples` samples (centred windows: 1 + n // hop)."""
    return 1 + samples // hop_length


class LogMel:
    """16 kHz wave [n] -> per-utterance normalised log-mel features [1 + n // 160, n_mels].

    torchaudio's MelSpectrogram (power, HTK mels, 25 ms Hann windows every 10 ms, centred with
    zero padding, so a wave of any length works), log of the power clamped at 1e-10, then each mel
    bin scaled to zero mean and unit variance over the utterance (silence or a level change of
    the whole recording moves nothing).
    """

    def __init__(self, n_mels: int = N_MELS, n_fft: int = N_FFT, hop_length: int = HOP_LENGTH,
                 sample_rate: int = SAMPLE_RATE) -> None:
        self.n_mels, self.hop_length = n_mels, hop_length
        self.mel = torchaudio.transforms.MelSpectrogram(sample_rate, n_fft=n_fft, win_length=n_fft,
                                                        hop_length=hop_length, n_mels=n_mels, center=True,
                                                        pad_mode="constant", power=2.0)

    def to(self, device) -> "LogMel":
        self.mel = self.mel.to(device)
        return self

    def frames(self, samples: int) -> int:
        return feature_frames(samples, self.hop_length)

    @torch.no_grad()
    def __call__(self, wave: Tensor) -> Tensor:
        if wave.dim() != 1 or wave.shape[0] == 0:
            raise InputError("audio tensor", f"features need a 1-D wave [n], got shape {list(wave.shape)}")
        device = self.mel.spectrogram.window.device
        x = self.mel(wave.to(device, torch.float32)).clamp(min=1e-10).log().T  # [T, n_mels]
        return ((x - x.mean(dim=0)) / (x.std(dim=0, unbiased=False) + 1e-5)).contiguous()


class SpecAugment:
    """SpecAugment's masking (Park et al. 2019) of a training recording's normalised log-mel
    features [T, n_mels]: `freq_masks` bands of up to `freq_width` mel channels and `time_masks`
    stretches of up to `time_width` frames (each at most `time_ratio` of the recording) set to 0,
    the utterance mean after normalisation. Widths and places are drawn uniformly (torchaudio's
    masking, from torch's global generator)."""

    def __init__(self, freq_masks: int, freq_width: int, time_masks: int, time_width: int,
                 time_ratio: float) -> None:
        self.freq_masks, self.time_masks = freq_masks, time_masks
        self.freq = torchaudio.transforms.FrequencyMasking(freq_width)
        self.time = torchaudio.transforms.TimeMasking(time_width, p=time_ratio)

    @torch.no_grad()
    def __call__(self, features: Tensor) -> Tensor:
        x = features.T[None]  # [1, n_mels, T]: torchaudio's (channel, freq, time)
        for _ in range(self.freq_masks):
            x = self.freq(x)
        for _ in range(self.time_masks):
            x = self.time(x)
        return x[0].T.contiguous()


class SpeedPerturbation:
    """Speed perturbation (Ko et al. 2015) of a training recording: the 16 kHz wave played f times
    as fast, tempo and pitch changing together as on a tape (torchaudio.functional.speed, a
    resampling), f drawn uniformly from `factors` (torch's global generator); f = 1 leaves it as
    it is. Each factor reads the corpus as if by a voice that speaks faster and higher, or slower
    and lower."""

    def __init__(self, factors: list[float]) -> None:
        self.factors = [float(f) for f in factors]

    @torch.no_grad()
    def __call__(self, wave: Tensor) -> Tensor:
        f = self.factors[int(torch.randint(len(self.factors), ()))]
        if f == 1.0:
            return wave
        return torchaudio.functional.speed(wave, SAMPLE_RATE, f)[0]

"""Whether a recording ends on a rising pitch: the question mark that speech carries and its
words may not. "You can't say this?" and "You can't say this." read the same; spoken, the
question rises at the end, and that is what `final_rise` measures: the pitch (log F0) at the end
of the voiced speech against its median before. `question_log_odds` turns the rise into evidence
for a closing "?" (speech/punctuation.py), next to the decoder's own view of the words.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

FRAME_SECONDS = 0.02
PITCH_SMOOTHING = 9  # frames: the median filter of torchaudio's pitch track
VOICED = 0.1  # a frame is voiced when its RMS is at least this share of the loudest frame's
END_FRAMES = 6  # the end: the last voiced frames (its pitch: the median of their last half)
OCTAVE_ERROR = 0.5  # log F0 this far from the median is the pitch track's error...
MULTIPLES = (1.0, 2.0, 3.0, 1 / 2, 1 / 3)  # ...at one of these multiples of the true pitch


def final_rise(wave: Tensor, sample_rate: int = 16000) -> float | None:
    """log F0 at the end of the voiced speech minus its median before (natural log: 0.2 is a rise
    of about a fifth); None when the recording holds too little voiced speech to tell."""
    import torchaudio

    frame = int(round(sample_rate * FRAME_SECONDS))
    if wave.numel() < 4 * frame * END_FRAMES:
        return None
    f0 = torchaudio.functional.detect_pitch_frequency(wave.float()[None], sample_rate, frame_time=FRAME_SECONDS,
                                                      win_length=PITCH_SMOOTHING, freq_low=60, freq_high=400)[0]
    rms = wave.float()[: wave.numel() // frame * frame].reshape(-1, frame).pow(2).mean(1).sqrt()
    n = min(len(f0), len(rms))
    f0, rms = f0[:n], rms[:n]
    if float(rms.max()) <= 0:
        return None
    pitch = f0[rms >= VOICED * rms.max()].log()
    if len(pitch) < 2 * END_FRAMES + 2:
        return None
    # the track's octave errors (a loud last syllable read at a third of its pitch): a frame more
    # than OCTAVE_ERROR from the median is taken at the multiple of its pitch nearest the median
    middle = pitch.median()
    folded = pitch[:, None] + torch.tensor(MULTIPLES).log()[None]
    nearest = folded.gather(1, (folded - middle).abs().argmin(1, keepdim=True))[:, 0]
    pitch = torch.where((pitch - middle).abs() > OCTAVE_ERROR, nearest, pitch)
    end = pitch[-(END_FRAMES // 2):].median()
    return float(end - pitch[:-END_FRAMES].median())


# Log likelihood ratios of a closing "?" against any other ending, by final rise, fitted on
# espeak-ng speech of the proof's training sentences (the first 4000 of asr_train: 291 questions,
# 3709 others; counts per bin "questions / others", each count + 0.5; `speech_proof.py
# fit-intonation` counts them again). A rise past 0.1 is mostly
# the pitch track's error, hence its weak evidence.
RISE_LOG_ODDS = (
    (-0.15, -3.2),  # below -0.15: 9 / 2856 (a statement's fall)
    (-0.10, -0.6),  # 18 / 437
    (-0.05, 1.5),  # 49 / 147
    (0.10, 2.9),  # -0.05 to 0.10: 201 / 140 (a question's end)
    (math.inf, 0.4),  # 14 / 129
)


def question_log_odds(rise: float | None, weight: float = 1.0) -> float:
    """How much likelier a closing question mark is than not after this final rise, as a log
    likelihood ratio (RISE_LOG_ODDS) times weight; 0 when the rise is unknown."""
    if rise is None or math.isnan(rise):
        return 0.0
    return weight * next(llr for upper, llr in RISE_LOG_ODDS if rise < upper)

"""The final rise of a recording's pitch and the question mark it argues for (speech/intonation.py)."""
from __future__ import annotations

import math
import shutil
import subprocess

import pytest
import torch

from speech.intonation import RISE_LOG_ODDS, final_rise, question_log_odds

RATE = 16000


def voice(pitch: list[tuple[float, float]], seconds: float) -> torch.Tensor:
    """A buzz of harmonics whose pitch follows (time, Hz) points, linearly between them."""
    t = torch.arange(int(seconds * RATE)) / RATE
    times, hz = zip(*pitch)
    f0 = torch.from_numpy(__import__("numpy").interp(t.numpy(), times, hz)).float()
    phase = 2 * math.pi * torch.cumsum(f0, 0) / RATE
    return sum(torch.sin(k * phase) / k for k in range(1, 6)) * 0.2


def test_a_rising_end_rises_and_a_falling_end_falls():
    rising = final_rise(voice([(0, 140), (1.2, 140), (1.5, 190)], 1.5))
    falling = final_rise(voice([(0, 140), (1.2, 140), (1.5, 105)], 1.5))
    level = final_rise(voice([(0, 140), (1.5, 140)], 1.5))
    assert rising > 0.15 and falling < -0.15 and abs(level) < 0.03  # log(190 / 140) = 0.31: the
    # pitch track's median filter blunts the end
    # silence after the voice is not the end of the voice (and spares the filter its edge)
    tail = torch.cat([voice([(0, 140), (1.2, 140), (1.5, 190)], 1.5), torch.zeros(RATE // 2)])
    assert final_rise(tail) == pytest.approx(math.log(190 / 140), abs=0.05)


def test_no_rise_without_voiced_speech():
    assert final_rise(torch.zeros(2 * RATE)) is None
    assert final_rise(voice([(0, 140), (0.1, 140)], 0.1)) is None  # too short to tell


def test_question_log_odds():
    assert question_log_odds(-0.2) < -2.5 < 2.5 < question_log_odds(0.02)  # a statement's fall, a question's rise
    assert question_log_odds(None) == question_log_odds(float("nan")) == 0.0
    assert question_log_odds(0.02, weight=0.0) == 0.0 and question_log_odds(0.02, 0.5) == 0.5 * question_log_odds(0.02)
    uppers = [upper for upper, _ in RISE_LOG_ODDS]
    assert uppers == sorted(uppers) and uppers[-1] == math.inf


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed (scripts/setup.sh)")
def test_espeak_ng_asks_with_a_rise(tmp_path):
    from speech.audio import load_audio

    for name in ("en-us", "en-gb-x-rp", "en-029"):
        odds = {}
        for mark in "?.":  # the same words; only the voice tells
            path = tmp_path / f"said{mark}.wav"
            subprocess.run(["espeak-ng", "-v", name, "-w", str(path), f"It is raining today{mark}"], check=True)
            odds[mark] = question_log_odds(final_rise(load_audio(path)))
        assert odds["?"] > 1 and odds["."] < -1, (name, odds)

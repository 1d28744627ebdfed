"""CTC forced alignment: where in a recording each character of a known labelling was read.

The Viterbi path through the blank-extended labelling (blank, l1, blank, l2, ..., blank): at
each frame a path stays, moves to the next state, or skips a blank between two different
labels. Used to measure the pauses between words (speech/punctuation.py: a comma is where the
speaker paused).
"""
from __future__ import annotations

import torch
from torch import Tensor


def ctc_align(log_probs: Tensor, labels: list[int], blank: int = 0) -> list[tuple[int, int]] | None:
    """log_probs [T, C] of one recording, labels (no blanks) -> (first frame, last frame) of each
    label on the likeliest frame path that reads them; None when T frames cannot read them."""
    x = log_probs.float().cpu()
    states = [blank]
    for label in labels:
        states += [label, blank]
    s, frames = len(states), x.shape[0]
    if frames == 0 or not labels and s == 0:
        return None
    ids = torch.tensor(states)
    skip = torch.zeros(s, dtype=torch.bool)  # may come from two states back: a label after a blank
    for i in range(2, s):
        skip[i] = states[i] != blank and states[i] != states[i - 2]
    neg = torch.tensor(float("-inf"))
    score = torch.full((s,), float("-inf"))
    score[0] = x[0, states[0]]
    if s > 1:
        score[1] = x[0, states[1]]
    back = torch.zeros(frames, s, dtype=torch.long)
    for t in range(1, frames):
        stay = score
        step = torch.cat([neg[None], score[:-1]])
        jump = torch.where(skip, torch.cat([neg[None].expand(2), score[:-2]]), neg)
        best = torch.stack([stay, step, jump])
        choice = best.argmax(0)
        score = best.gather(0, choice[None])[0] + x[t, ids]
        back[t] = torch.arange(s) - choice
    end = s - 1 if s < 2 or score[s - 1] >= score[s - 2] else s - 2
    if score[end] == float("-inf"):
        return None
    path = [end]
    for t in range(frames - 1, 0, -1):
        path.append(int(back[t, path[-1]]))
    path.reverse()
    spans: list[list[int]] = [[-1, -1] for _ in labels]
    for t, state in enumerate(path):
        if state % 2:  # odd states are the labels
            span = spans[state // 2]
            span[0] = t if span[0] < 0 else span[0]
            span[1] = t
    return [(a, b) for a, b in spans]

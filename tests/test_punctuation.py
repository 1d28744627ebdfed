"""Casing and punctuation of character transcripts by the decoder (speech/punctuation.py)."""
from __future__ import annotations

import itertools
import math

import torch

from mm.decoders import load_decoder
from speech.lm_beam import WordLM
from speech.punctuation import ENDS, MIDDLE, forms, punctuate


def test_forms_of_a_word():
    assert forms("where", True) == ("Where",)
    assert forms("where", False) == ("where", "Where")
    assert forms("i", False) == ("I",) and forms("i'm", True) == ("I'm",)
    assert forms("1984", False) == ("1984",)


def log_prob(decoder, lm: WordLM, words: tuple[str, ...]) -> float:
    ids = lm.ids(words)
    with torch.no_grad():
        log_probs = decoder(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)
    return sum(float(log_probs[i, ids[i + 1]]) for i in range(len(ids) - 1))


def test_a_wide_beam_finds_the_likeliest_written_sentence():
    decoder, tokenizer = load_decoder("tiny")
    words = ["ab", "i", "ba"]
    choices = [forms(w, n == 0) for n, w in enumerate(words)]
    marks = [MIDDLE] * (len(words) - 1) + [ENDS]
    every = [tuple(f + m for f, m in zip(fs, ms)) for fs in itertools.product(*choices)
             for ms in itertools.product(*marks)]
    assert len(every) == 2 * 2 * 2 * 3  # ba or Ba; after ab and after I nothing or a comma; . ? or !
    lm = WordLM(decoder, tokenizer)
    best = max(every, key=lambda s: log_prob(decoder, lm, s))
    found = punctuate(words, WordLM(decoder, tokenizer), beam=len(every))
    assert found == " ".join(best)
    # a narrow beam still writes the same words, capitalised first, ended by a mark
    narrow = punctuate("ab i ba", WordLM(decoder, tokenizer), beam=1)
    assert narrow[0] == "A" and narrow[-1] in ENDS and narrow.lower().replace(",", "")[:-1] == "ab i ba"
    assert punctuate([], WordLM(decoder, tokenizer)) == ""
    assert math.isfinite(log_prob(decoder, lm, best))

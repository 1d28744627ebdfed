"""Casing and punctuation of character transcripts by the decoder (speech/punctuation.py)."""
from __future__ import annotations

import math

import torch

from mm.decoders import load_decoder
from speech.align import ctc_align
from speech.lm_beam import WordLM
from speech.lm_beam import lockstep
from speech.punctuation import (CAPITAL_COST, ENDS, HYPHEN_COST, MIDDLE, forms, pause_log_odds, punctuate,
                                punctuation_steps, recase_steps, word_gaps)
from tests.test_lm_beam import sentence_log_prob


def test_forms_of_a_word():
    assert forms("where", True) == ("Where",)
    assert forms("where", False) == ("where", "Where")
    assert forms("i", False) == ("I",) and forms("i'm", True) == ("I'm",)
    assert forms("1984", False) == ("1984",)
    assert forms("iowa", False, {"iowa"}) == ("Iowa",)  # a word list's name


def written(words: list[str]) -> list[tuple[str, ...]]:
    """Every written sentence punctuate may choose from, by brute force: each word in each of
    its forms, then a mark (or, inside, a hyphen joining it to the next word)."""
    out = []

    def grow(n: int, done: tuple[str, ...], open_word: str | None) -> None:
        if n == len(words):
            return
        last = n == len(words) - 1
        heads = [open_word + "-" + words[n]] if open_word is not None else list(forms(words[n], n == 0))
        for head in heads:
            for mark in ENDS if last else MIDDLE:
                if last:
                    out.append(done + (head + mark,))
                else:
                    grow(n + 1, done + (head + mark,), None)
            if not last:
                grow(n + 1, done, head)  # joined to the next word

    grow(0, (), None)
    return out


def test_a_wide_beam_finds_the_likeliest_written_sentence():
    decoder, tokenizer = load_decoder("tiny")
    words = ["ab", "i", "ba"]
    every = written(words)
    assert ("Ab-i", "ba?") in every and ("Ab,", "I", "Ba.") in every and len(set(every)) == len(every)
    lm = WordLM(decoder, tokenizer)

    def score(s: tuple[str, ...]) -> float:  # the decoder's, less the charges for hyphens and capitals
        capitals = sum(w[0].isupper() for w in " ".join(s).replace("-", " ").split()[1:] if not w.startswith("I"))
        return sentence_log_prob(decoder, lm, s) - HYPHEN_COST * " ".join(s).count("-") - CAPITAL_COST * capitals

    best = max(every, key=score)
    assert punctuate(words, WordLM(decoder, tokenizer), beam=len(every)) == " ".join(best)
    # pauses: a long one after "ab" buys its comma, a short one costs it
    pauses = {gap: punctuate(words, WordLM(decoder, tokenizer), len(every), [gap, 2.0], pause_weight=100.0)
              for gap in (9.0, 1.0)}
    assert pauses[9.0].startswith("Ab, ") and not pauses[1.0].startswith("Ab,")
    # the voice's rise: strong evidence for a question mark buys it, against one costs it
    asked = {q: punctuate(words, WordLM(decoder, tokenizer), len(every), question=q) for q in (100.0, -100.0)}
    assert asked[100.0].endswith("?") and not asked[-100.0].endswith("?")
    # a narrow beam still writes the same words, capitalised first, ended by a mark
    narrow = punctuate("ab i ba", WordLM(decoder, tokenizer), beam=1)
    assert narrow[0] == "A" and narrow[-1] in ENDS
    assert narrow.lower().replace(",", "").replace("-", " ")[:-1] == "ab i ba"
    assert punctuate([], WordLM(decoder, tokenizer)) == ""
    assert math.isfinite(sentence_log_prob(decoder, lm, best))


def test_recasing_ends_where_no_flip_of_one_to_three_words_gains():
    """recase_steps: a local search over capitals with the whole sentence scored (by one plain
    decoder call here), a run of capitals charged once; "I" and the first word stay as they are."""
    decoder, tokenizer = load_decoder("tiny")
    start = ("Ab", "ba", "I", "ab", "ba,", "b-a", "ab.")
    lm = WordLM(decoder, tokenizer)
    found = lockstep([recase_steps(start, lm, rounds=10)], lm)[0]
    assert found[0] == "Ab" and found[2] == "I"
    assert [w.lower() for w in found] == [w.lower() for w in start]
    free = [1, 3, 4, 5, 6]

    def score(s: tuple[str, ...]) -> float:
        capital = [n for n in free if s[n][0].isupper()]
        return sentence_log_prob(decoder, lm, s) - CAPITAL_COST * sum(n - 1 not in capital for n in capital)

    def flipped(s: tuple[str, ...], at: range) -> tuple[str, ...]:
        return tuple(w.swapcase()[0] + w[1:] if n in at else w for n, w in enumerate(s))

    best = score(found)
    assert best >= score(start) - 1e-4
    for n in free:
        for k in (1, 2, 3):
            if all(m in free for m in range(n, n + k)):
                assert score(flipped(found, range(n, n + k))) <= best + 1e-4
    # recasing is a step of punctuate's when asked for, and leaves the words and marks as they were
    words = "ab ba i ab ba".split()
    plain, recased = lockstep([punctuation_steps(words, lm), punctuation_steps(words, lm, recase=3)], lm)
    assert recased.lower() == plain.lower()


def test_pause_log_odds_grow_with_the_pause_and_are_bounded():
    odds = [pause_log_odds(f) for f in (0, 2, 3, 4, 5, 20)]
    assert odds == sorted(odds) and odds[0] == odds[1] < 0 < odds[3] and odds[-1] == odds[-2]
    assert pause_log_odds(5, weight=0.0) == 0.0


def spoken(frames: list[str], alphabet: str) -> torch.Tensor:
    """Log-probabilities that read each frame's character for sure ('_' a blank)."""
    x = torch.full((len(frames), 1 + len(alphabet)), -20.0)
    for t, c in enumerate(frames):
        x[t, 0 if c == "_" else alphabet.index(c) + 1] = 0.0
    return x.log_softmax(-1)


def test_alignment_finds_each_character_and_the_pauses_between_words():
    alphabet = " abc"
    frames = list("_aa_b_ ____cc_a_") + list("__ _b")
    spans = ctc_align(spoken(frames, alphabet), [alphabet.index(c) + 1 for c in "ab ca b"])
    assert spans == [(1, 2), (4, 4), (6, 6), (11, 12), (14, 14), (18, 18), (20, 20)]
    assert word_gaps(spoken(frames, alphabet), ["ab", "ca", "b"], alphabet) == [7.0, 6.0]
    # a head reading two labels a frame (speech.ctc_upsample 2), each character where it was,
    # then a blank (or itself, held): the same pauses, in 40 ms frames
    two = [label for c, after in zip(frames, frames[1:] + ["_"]) for label in (c, c if after == c else "_")]
    assert word_gaps(spoken(two, alphabet), ["ab", "ca", "b"], alphabet, per_frame=2) == [7.0, 6.0]
    finer = list("_ab_ ___c_a_") + list("_ _b")  # "ca" 6 labels after "ab" (3 frames), "b" 5 after "ca"
    assert word_gaps(spoken(finer, alphabet), ["ab", "ca", "b"], alphabet, per_frame=2) == [3.0, 2.5]
    assert ctc_align(spoken(list("a"), alphabet), [2, 2]) is None  # "bb" needs three frames
    assert ctc_align(spoken(list("_b_b_"), alphabet), [2, 2]) == [(1, 1), (3, 3)]

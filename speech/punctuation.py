"""Casing and punctuation of a character transcript, chosen by the frozen decoder.

The character search (speech/lm_beam.py) reads lower-case words without punctuation. A reader,
and the decoder when it replies to what was said, expect a written sentence: "where can i sign
up" asks for "Where can I sign up?", and the bare decoder's greedy reply to a question changes
with its question mark and commas. `punctuate` picks, word by word, each word's form (as read,
or with a capital: names) and what follows it (nothing or a comma; after the last word a full
stop, question mark or exclamation mark) by the decoder's log-probability of the text: a beam
search in which every candidate is ranked together with the next word as read, so that a comma
is judged by what comes after it. The first word is capitalised, and so is the word "I".

The decoder is only read (through `WordLM`, under no_grad).
"""
from __future__ import annotations

from speech.lm_beam import WordLM

MIDDLE = ("", ",")  # what may follow a word inside the sentence
ENDS = (".", "?", "!")  # what may end it


def forms(word: str, first: bool) -> tuple[str, ...]:
    """The written forms a word as read may take."""
    if word == "i" or word.startswith("i'"):
        return ("I" + word[1:],)
    if first:
        return (word[:1].upper() + word[1:],)
    capital = word[:1].upper() + word[1:]
    return (word,) if capital == word else (word, capital)


def punctuate(words: list[str] | str, lm: WordLM, beam: int = 4) -> str:
    """The likeliest written sentence of `words` (lower-case, as read) under lm's decoder."""
    if isinstance(words, str):
        words = words.split()
    if not words:
        return ""
    plain = [forms(w, n == 0)[0] for n, w in enumerate(words)]
    beams: list[tuple[str, ...]] = [()]
    for n, word in enumerate(words):
        last = n == len(words) - 1
        marks = ENDS if last else MIDDLE
        grown = [b + (form + mark,) for b in beams for form in forms(word, n == 0) for mark in marks]
        # ranked with the next word as read after them: a comma pays off (or not) there
        judged = {g: g if last else g + (plain[n + 1],) for g in grown}
        lm.add(list(judged.values()))
        beams = sorted(grown, key=lambda g: lm.total(judged[g]), reverse=True)[:beam]
    return " ".join(beams[0])

"""Casing and punctuation of a character transcript, chosen by the frozen decoder.

The character search (speech/lm_beam.py) reads lower-case words without punctuation. A reader,
and the decoder when it replies to what was said, expect a written sentence: "where can i sign
up" asks for "Where can I sign up?", and the bare decoder's greedy reply to a question changes
with its question mark and commas. `punctuate` picks, word by word, each word's form (as read,
or with a capital: names) and what follows it (nothing, a comma, or a hyphen joining the next
word; after the last word a full stop, question mark or exclamation mark) by the decoder's
log-probability of the text: a beam search in which every candidate is ranked together with the
next word as read, so that a comma is judged by what comes after it. The first word is
capitalised, and so is the word "I". Where the recording is at hand, the pause the speaker made
after each word (on the character head's alignment, `word_gaps`) weighs for or against a comma
there (`pause_log_odds`): the decoder alone cannot tell "Why, what did she tell you?" from "Why
what did she tell you?". Likewise the pitch at the end of the recording weighs for or against a
closing question mark (speech/intonation.py): "You can't say this?" is a question only in its
voice. Last, `recase_steps` chooses the capitals again with the whole sentence in view, for the
names whose capitals the beam's view of one word ahead cannot see ("Faye Dunaway").

The text is scored where the decoder meets it in spoken dialogue: as a user's turn of its chat
template (`user_turn`), closing tokens included, so that how it ends counts: a document may
well end "Why not go out on a limb." where a user's message rarely does.

The decoder is only read (through `WordLM`, under no_grad).
"""
from __future__ import annotations

from collections.abc import Collection

from torch import Tensor

from speech.align import ctc_align
from speech.lm_beam import Requests, WordLM, as_written, lockstep

MIDDLE = ("", ",")  # what may follow a word inside the sentence
ENDS = (".", "?", "!")  # what may end it
# Charged (log-probability) per hyphen join and per capital after the first word: on misheard
# words the decoder likes "The El May Sour" and "boy-adjusts-clearance-scrub". The 100 dev
# sentences' own words, written out with their pauses, came out to the letter 67 times with no
# charges, 68 with the hyphen's, 70 with the capital's, 72 with both.
HYPHEN_COST = 2.0
CAPITAL_COST = 2.0


def pause_log_odds(frames: float, weight: float = 2.8, center: float = 3.1) -> float:
    """How much likelier a comma is than none after a pause of `frames` 40 ms encoder frames
    (from the last character of a word to the first of the next, on the character head's
    alignment), as a log-odds: weight * clamp(frames - center, -1, 1.5). The defaults fit
    espeak-ng speech of the proof's training sentences, whose gaps were (frames: count without
    a comma / with one) 2: 2312/6, 3: 638/26, 4: 38/22, 5: 14/39, 6 and more: 9/69 -- log
    likelihood ratios -3.0, -0.3, 2.4, 4.0, 5.0 (the first 400 utterances of asr_train)."""
    return weight * min(max(frames - center, -1.0), 1.5)


def forms(word: str, first: bool, names: Collection[str] = ()) -> tuple[str, ...]:
    """The written forms a word as read may take (`names`: as_written's)."""
    written = as_written(word, first, names)
    if written != word:
        return (written,)
    capital = as_written(word, first=True)
    return (word,) if capital == word else (word, capital)


def word_gaps(log_probs: Tensor, words: list[str], alphabet: str, per_frame: int = 1) -> list[float] | None:
    """40 ms frames between each word and the next where the character head read `words` (one
    recording's log-probabilities [T, 1 + len(alphabet)], blank first; speech/align.py): the
    next word's first frame less this one's last. None when they cannot be aligned. A head
    reading `per_frame` labels a frame (speech.ctc_upsample) is aligned in its own labels and the
    time between the two characters counted in frames, what the pause weights were fitted on."""
    labels = [alphabet.index(c) + 1 for c in " ".join(words)]
    spans = ctc_align(log_probs, labels) if words else None
    if spans is None:
        return None
    gaps, at = [], 0
    for word in words[:-1]:
        at += len(word)
        gaps.append((spans[at + 1][0] - spans[at - 1][1]) / per_frame)  # first of the next word - last of this one
        at += 1
    return gaps


def user_turn(tokenizer) -> tuple[list[int] | None, list[int]]:
    """The tokens before and after a user's message in the tokenizer's chat template; (None, [])
    without a template (the text is then scored as a document of its own)."""
    if not getattr(tokenizer, "chat_template", None):
        return None, []
    marker = "\x00"
    text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False)
    before, _, after = text.partition(marker)
    return (tokenizer(before, add_special_tokens=False).input_ids,
            tokenizer(after, add_special_tokens=False).input_ids)


def punctuate(words: list[str] | str, lm: WordLM, beam: int = 4, pauses: list[float] | None = None,
              pause_weight: float = 2.8, pause_frames: float = 3.1, question: float = 0.0, recase: int = 0) -> str:
    """The likeliest written sentence of `words` (lower-case, as read) under lm's decoder (with
    lm.end after it when lm has one: context and end from `user_turn`). `pauses` (frames
    between each word and the next) weigh for a comma where the speaker paused and against one
    where they did not (`pause_log_odds`). `question` is the log-odds the voice gives a closing
    question mark (speech/intonation.py, question_log_odds). A word may also join the one before
    with a hyphen. `recase`: rounds of `recase_steps` after the beam (0: none). Several
    transcripts: `lockstep([punctuation_steps(...) for ...], lm)`."""
    return lockstep([punctuation_steps(words, lm, beam, pauses, pause_weight, pause_frames, question, recase)],
                    lm)[0]


def punctuation_steps(words: list[str] | str, lm: WordLM, beam: int = 4, pauses: list[float] | None = None,
                      pause_weight: float = 2.8, pause_frames: float = 3.1, question: float = 0.0,
                      recase: int = 0) -> Requests[str]:
    """`punctuate` as steps: yields the word sequences each word needs scored, returns the text."""
    if isinstance(words, str):
        words = words.split()
    if not words:
        return ""
    plain = [forms(w, n == 0, lm.names)[0] for n, w in enumerate(words)]
    closing = (WordLM.END,) if lm.end else ()
    beams: dict[tuple[str, ...], float] = {(): 0.0}  # written so far: the pauses' share of its score
    for n, word in enumerate(words):
        last = n == len(words) - 1
        marks = ENDS if last else MIDDLE
        pause = 0.0 if pauses is None or last else pause_log_odds(pauses[n], pause_weight, pause_frames)
        grown: dict[tuple[str, ...], float] = {}
        for b, evidence in beams.items():
            for mark in marks:
                bonus = evidence + (pause if mark == "," else question if mark == "?" else 0.0)
                choices = forms(word, n == 0, lm.names)
                for form in choices:
                    grown[b + (form + mark,)] = bonus - (CAPITAL_COST if form != choices[0] else 0.0)
                if b and b[-1][-1].isalnum() and word[0].isalnum():  # "three cornered" -> "three-cornered"
                    grown[b[:-1] + (b[-1] + "-" + word + mark,)] = bonus - HYPHEN_COST
        # ranked with what follows them: the next word as read (a comma pays off, or not, there),
        # or how the text closes
        judged = {g: g + (closing if last else (plain[n + 1],)) for g in grown}
        yield list(judged.values())
        ranked = sorted(grown, key=lambda g: lm.total(judged[g]) + grown[g], reverse=True)[:beam]
        beams = {g: grown[g] for g in ranked}
    best = next(iter(beams))
    if recase:
        best = yield from recase_steps(best, lm, recase)
    return " ".join(best)


def recase_steps(written: tuple[str, ...], lm: WordLM, rounds: int = 3) -> Requests[tuple[str, ...]]:
    """Capitals with the whole sentence in view. The beam judges a capital by the next word as
    read: "Faye" before "dunaway" loses to "faye", so "Faye Dunaway" never comes up. Each round
    here tries every word after the first with its case flipped (as read <-> capitalised),
    alone and with the one or two words after it, and keeps the likeliest written sentence
    (closing included), less CAPITAL_COST per run of capitals (a name costs once, however many
    words), until no flip gains or `rounds` rounds are done. -> the sentence as written."""
    closing = (WordLM.END,) if lm.end else ()
    # the words that may take either case: not the first, not "I", not "1984"
    marks = "".join(MIDDLE + ENDS)
    free = [n for n, w in enumerate(written)
            if n and len(forms(w.split("-")[0].lower().rstrip(marks), False, lm.names)) == 2]

    def flip(s: tuple[str, ...], at: tuple[int, ...]) -> tuple[str, ...]:
        out = list(s)
        for n in at:
            head = out[n][:1]
            out[n] = (head.lower() if head.isupper() else head.upper()) + out[n][1:]
        return tuple(out)

    def score(s: tuple[str, ...]) -> float:
        capital = [n for n in free if s[n][:1].isupper()]
        return lm.total(s + closing) - CAPITAL_COST * sum(n - 1 not in capital for n in capital)

    spans = [tuple(range(n, n + k)) for n in free for k in (1, 2, 3) if all(m in free for m in range(n, n + k))]
    for _ in range(rounds):
        tried = [written] + [flip(written, at) for at in spans]
        yield [s + closing for s in tried]
        best = max(tried, key=score)
        if best == written:
            break
        written = best
    return written

"""Character CTC prefix beam search with the frozen decoder as a word-level language model.

The Conformer's character head (trained by speech_ctc) spells what it hears; alone it has no
idea which spellings are words ("emurgencies", "nitwit i deas"). Shallow fusion (Hannun et al.,
2014, "first-pass large vocabulary continuous speech recognition using bi-directional recurrent
DNNs") searches the prefixes of the character labelling with

    log p_ctc(prefix) + alpha * log p_lm(completed words) + beta * completed words

where p_ctc is the total probability of the frame paths that read the prefix (kept per prefix as
the probability of those ending in a blank and in a character), and the language model is the
frozen decoder itself: each word is scored when the space after it (or the end of the recording)
completes it, as log p(" word" tokens | the words before it), so a word's spelling only pays once
it is whole. beta offsets the per-word cost that the language model adds. Since an unfinished
word pays nothing yet, a search left at that would run words together ("nitwitideasare..."):
a partial word that no word of the lexicon starts with (`Lexicon`: the decoder's whole-word
tokens and a word list's words) is charged
`unknown`, and `unknown_char` more for each further character past the longest start of a word,
until it ends, when the language model's own score takes over. The charge grows with the word as
the language model's score of a word it does not know does: a fixed charge let one unknown word,
once made, go on through the spaces of the words after it for nothing ("repensiblefortheworld"),
its spellings filling the beam.

The decoder is only read: `WordLM` runs it under no_grad on token ids and never changes it.
"""
from __future__ import annotations

import bisect
import math
import warnings
from collections.abc import Collection, Generator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from torch import Tensor
from transformers import DynamicCache

NEG = float("-inf")
T = TypeVar("T")


def logaddexp(a: float, b: float) -> float:
    if a == NEG:
        return b
    if b == NEG:
        return a
    m = max(a, b)
    return m + math.log1p(math.exp(-abs(a - b)))


def as_written(word: str, first: bool, names: Collection[str] = ()) -> str:
    """A word as read (lower case) as it is written where it stands: the first of a text, the
    pronoun I ("i", "i'm", "i'll") and the `names` (lower case, as `Lexicon.names`: "iowa",
    "einstein's") with a capital."""
    capital = first or word == "i" or word.startswith("i'") or word.partition("'")[0] in names
    return word[:1].upper() + word[1:] if capital else word


class WordLM:
    """log p(word | words before it) under a frozen causal LM (words joined by single spaces, the
    first, "I" and `names` capitalised: `as_written`), cached per word sequence. The text follows
    `context` (token ids; by default the decoder's document separator); the word END stands for
    the tokens `end` (say, those that close a chat turn), so that how a text ends can be scored
    too.

    Keys and values are kept per scored sequence, for the tokens of its last word only (a chain:
    a sequence's keys are its parent's followed by its own), with the decoder's last hidden state
    there; a new sequence runs only the tokens after its longest scored prefix. The search asks
    for one more word after a beam entry at a time, so a call runs a token or two per row instead
    of re-reading the whole sentence."""

    END = "\x00end"

    def __init__(self, decoder, tokenizer, batch_size: int = 64, context: list[int] | None = None,
                 end: list[int] = (), names: Collection[str] = frozenset()) -> None:
        self.decoder, self.tokenizer, self.batch_size = decoder, tokenizer, batch_size
        self.names = names  # words written with a capital wherever they stand (`as_written`)
        separator = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.start = list(context) if context else [separator]
        self.end = list(end)
        self.totals: dict[tuple[str, ...], float] = {(): 0.0}  # log p(all the words) per sequence
        self._pieces: dict[tuple[str, bool], list[int]] = {}
        self._keys: dict[tuple[str, ...], Tensor] = {}  # [layers, 2 (keys, values), heads, tokens, head dim]
        self._hidden: dict[tuple[str, ...], Tensor] = {}  # the last token's final hidden state [width]

    def pieces(self, word: str, first: bool) -> list[int]:
        if word == self.END:
            return self.end
        key = (word, first)
        if key not in self._pieces:
            text = as_written(word, first, self.names)
            self._pieces[key] = self.tokenizer(text if first else " " + text, add_special_tokens=False).input_ids
        return self._pieces[key]

    def ids(self, words: tuple[str, ...]) -> list[int]:
        return self.start + [i for n, w in enumerate(words) for i in self.pieces(w, n == 0)]

    def total(self, words: tuple[str, ...]) -> float:
        return self.totals[words]

    @torch.no_grad()
    def add(self, sequences: list[tuple[str, ...]]) -> None:
        """Score each new word sequence, and every shorter sequence it starts with."""
        todo = [s for s in dict.fromkeys(sequences) if s not in self.totals]
        if () not in self._keys:
            self._run([((), [((), self.start)])])
        rows = []
        for s in todo:
            cut = next(n for n in range(len(s), -1, -1) if s[:n] in self._keys)
            rows.append((s[:cut], [(s[:n], self.pieces(s[n - 1], n == 1)) for n in range(cut + 1, len(s) + 1)]))
        # batches of rows with as many new tokens: less padding
        rows.sort(key=lambda row: sum(len(piece) for _, piece in row[1]))
        for i in range(0, len(rows), self.batch_size):
            self._run(rows[i:i + self.batch_size])

    def _run(self, rows: list[tuple[tuple[str, ...], list[tuple[tuple[str, ...], list[int]]]]]) -> None:
        """rows: (a scored prefix, [(each longer sequence, the tokens it adds)]) -> their totals,
        keys and hidden states, in one decoder call over the new tokens only."""
        device = self.decoder.get_input_embeddings().weight.device
        pasts = [torch.cat([self._keys[p[:n]] for n in range(len(p) + 1)], dim=3) if p in self._keys else None
                 for p, _ in rows]
        news = [[i for _, piece in grown for i in piece] for _, grown in rows]
        held = max((0 if past is None else past.shape[3]) for past in pasts)
        width = max(map(len, news))
        ids = torch.full((len(rows), width), self.start[0], dtype=torch.long)
        mask = torch.zeros(len(rows), held + width, dtype=torch.long)
        positions = torch.zeros(len(rows), width, dtype=torch.long)
        cache = None
        if held:
            layers, _, heads, _, dim = pasts[0].shape
            kv = torch.zeros(layers, 2, len(rows), heads, held, dim, dtype=pasts[0].dtype)
        for r, (past, new) in enumerate(zip(pasts, news)):
            length = 0 if past is None else past.shape[3]
            if length:
                kv[:, :, r, :, held - length:] = past  # left-padded: the new tokens follow on directly
            mask[r, held - length:held + len(new)] = 1
            ids[r, :len(new)] = torch.tensor(new)
            positions[r] = torch.arange(length, length + width)
        if held:
            cache = DynamicCache([(kv[layer, 0].to(device), kv[layer, 1].to(device)) for layer in range(kv.shape[0])],
                                 config=self.decoder.config)
        out = self.decoder.model(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 position_ids=positions.to(device), past_key_values=cache, use_cache=True)
        hidden = out.last_hidden_state
        fresh = torch.stack([torch.stack([layer.keys[:, :, held:], layer.values[:, :, held:]])
                             for layer in out.past_key_values.layers]).cpu()  # [layers, 2, rows, heads, width, dim]
        # the states that predict each row's new tokens: its prefix's last one (none for the
        # start token, which is predicted by nothing), then its own but the last; one head call
        states, targets, rooted = [], [], [prefix in self._hidden for prefix, _ in rows]
        for r, ((prefix, _), new) in enumerate(zip(rows, news)):
            if rooted[r]:
                states.append(self._hidden[prefix][None].to(device=device, dtype=hidden.dtype))
            states.append(hidden[r, :len(new) - 1])
            targets.extend(new if rooted[r] else new[1:])
        scores = []
        if targets:
            log_probs = self.decoder.lm_head(torch.cat(states)).float().log_softmax(-1)
            scores = log_probs.gather(1, torch.tensor(targets, device=device)[:, None]).squeeze(1).cpu().tolist()
        at_score = 0
        for r, ((prefix, grown), new) in enumerate(zip(rows, news)):
            running, at = self.totals.get(prefix, 0.0), 0
            for words, piece in grown:
                k = len(piece) - (not rooted[r] and at == 0)  # tokens scored
                running += sum(scores[at_score:at_score + k])
                at_score += k
                self.totals.setdefault(words, running)
                self._keys[words] = fresh[:, :, r, :, at:at + len(piece)].clone()
                self._hidden[words] = hidden[r, at + len(piece) - 1].cpu()
                at += len(piece)


CONTRACTIONS = ("s", "t", "ll", "ve", "re", "d", "m")


class Lexicon:
    """Which partial words could still become a word: the decoder's own whole-word tokens
    (a leading-space token of letters only), the words of a word list (`words`: say, Debian's
    /usr/share/dict/words, lower-cased; its possessives are the contractions below), contractions
    of either (word + 's, 't, 'll, 've, 're, 'd, 'm) and numbers; and the list's `names`, which
    the search and the writing-out spell with a capital (`as_written`). Used only to charge, not to
    forbid: a word outside it still scores. Without a word list, a word the decoder spells in
    pieces ("loathing", "shudder", "niagara") is charged as it is read, and the search drops it
    for a spelling that is the start of one token word ("loading", "shuder")."""

    def __init__(self, tokenizer, words: Iterable[str] = ()) -> None:
        vocab = {t[1:] for t in tokenizer.get_vocab() if t.startswith("Ġ") and t[1:].isalpha() and t[1:].islower()}
        words = [w for w in words if w.isalpha() and w.isascii()]
        listed = {w.lower() for w in words}
        self.words = vocab | listed
        # the list's names: words it has only with a capital ("Iowa", "Einstein"; not "Bill", as
        # it has "bill" too, nor "SunOS")
        lower = {w for w in words if w.islower()}
        self.names = frozenset(w.lower() for w in words if w[:1].isupper() and w[1:].islower()) - lower
        self._sorted = sorted(self.words)  # a prefix is a start of a word when the next word up starts with it
        self.tails = {c[:i] for c in CONTRACTIONS for i in range(len(c) + 1)}
        self._unknown: dict[str, int] = {}  # partial word -> unknown_length, as asked

    def starts_a_word(self, partial: str) -> bool:
        at = bisect.bisect_left(self._sorted, partial)
        return at < len(self._sorted) and self._sorted[at].startswith(partial)

    def could_be(self, partial: str) -> bool:
        if not partial or partial.isdigit() or self.starts_a_word(partial):
            return True
        head, apostrophe, tail = partial.partition("'")
        return bool(apostrophe) and head in self.words and tail in self.tails

    def unknown_length(self, partial: str) -> int:
        """Characters of `partial` past its longest start that could still be a word (0: it could)."""
        if partial not in self._unknown:
            if len(self._unknown) >= 200_000:  # a long-lived model's lexicon: bounded memory
                self._unknown.clear()
            known = next(n for n in range(len(partial), -1, -1) if self.could_be(partial[:n]))
            self._unknown[partial] = len(partial) - known
        return self._unknown[partial]

    def charge(self, partial: str, unknown: float, per_char: float) -> float:
        """What a partial word pays for not being the start of a word: 0 when it is, else
        unknown for its first character past the longest start that is, per_char for each after."""
        extra = self.unknown_length(partial)
        return unknown + per_char * (extra - 1) if extra else 0.0


def read_word_list(path: str | None) -> list[str]:
    """The words of a word list file, one a line (speech.transcriber.word_list); none for "" or None. A
    missing file is a warning, not an error: the search still reads, knowing fewer words."""
    if not path:
        return []
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace").split()
    except OSError as e:
        warnings.warn(f"speech.transcriber.word_list: {path}: {e.strerror or e}; the character search knows only "
                      f"the decoder's whole-word tokens (install Debian's wamerican, or leave word_list empty)",
                      stacklevel=2)
        return []


@dataclass
class Beam:
    blank: float = NEG  # log p of the paths reading the prefix and ending in a blank
    char: float = NEG  # ... ending in the prefix's last character

    @property
    def ctc(self) -> float:
        return logaddexp(self.blank, self.char)


def words_of(prefix: str, complete: bool) -> tuple[str, ...]:
    """The words of a prefix that are whole: all of them when `complete` (the recording ended),
    else those followed by a space."""
    words = prefix.split(" ")
    return tuple(w for w in (words if complete else words[:-1]) if w)


Requests = Generator[list[tuple[str, ...]], None, T]  # asks for word sequences to be scored, returns T


def lockstep(searches: list[Requests], lm: WordLM | None) -> list:
    """Run searches side by side: each step, every search's requests go to the language model in
    one `lm.add` (a batch of recordings costs about the decoder calls of one), then each goes on.
    -> each search's result, in order."""
    results: list = [None] * len(searches)
    asked: dict[int, list[tuple[str, ...]]] = {}
    for i, search in enumerate(searches):
        try:
            asked[i] = next(search)
        except StopIteration as done:
            results[i] = done.value
    while asked:
        if lm is not None:
            lm.add([s for request in asked.values() for s in request])
        for i in list(asked):
            try:
                asked[i] = next(searches[i])
            except StopIteration as done:
                results[i] = done.value
                del asked[i]
    return results


def prefix_search(log_probs: Tensor, alphabet: str, lm: WordLM | None, alpha: float = 0.5, beta: float = 1.0,
                  beam: int = 16, char_floor: float = -9.0, lexicon: Lexicon | None = None,
                  unknown: float = 10.0, unknown_char: float = 1.0) -> dict[str, float]:
    """Search one recording's character log-probabilities [T, 1 + len(alphabet)] (blank = class
    0, class i + 1 is alphabet[i], ' ' the word separator) -> the labellings left in the beam at
    the end, words joined by single spaces, best first (by the fused score; by log p_ctc when lm
    is None): {text: log p_ctc}. Characters below `char_floor` (log-probability) in a frame are
    not tried there; `lexicon` charges `unknown` to a partial word that no word starts with, and
    `unknown_char` for each character after its first past the longest start of a word.
    Several recordings: `lockstep([search_steps(...) for ...], lm)`."""
    return lockstep([search_steps(log_probs, alphabet, lm, alpha, beta, beam, char_floor, lexicon, unknown,
                                  unknown_char)], lm)[0]


def search_steps(log_probs: Tensor, alphabet: str, lm: WordLM | None, alpha: float = 0.5, beta: float = 1.0,
                 beam: int = 16, char_floor: float = -9.0, lexicon: Lexicon | None = None,
                 unknown: float = 10.0, unknown_char: float = 1.0) -> Requests[dict[str, float]]:
    """`prefix_search` as steps: yields the word sequences each frame needs scored (the caller
    scores them with lm.add), returns its result."""
    x = log_probs.float().cpu()
    space = alphabet.index(" ") + 1
    beams: dict[str, Beam] = {"": Beam(blank=0.0)}

    def score(prefix: str, b: Beam, complete: bool = False) -> float:
        if lm is None:
            return b.ctc
        words = words_of(prefix, complete)
        total = b.ctc + alpha * lm.total(words) + beta * len(words)
        if not complete and lexicon is not None:
            total -= lexicon.charge(prefix.rpartition(" ")[2], unknown, unknown_char)
        return total

    for t in range(x.shape[0]):
        row = x[t].tolist()
        tried = [c for c in range(1, len(row)) if row[c] >= char_floor]
        nxt: dict[str, Beam] = {}

        def at(prefix: str) -> Beam:
            if prefix not in nxt:
                nxt[prefix] = Beam()
            return nxt[prefix]

        for prefix, b in beams.items():
            total = b.ctc
            here = at(prefix)
            here.blank = logaddexp(here.blank, total + row[0])
            last = prefix[-1] if prefix else ""
            for c in tried:
                ch, p = alphabet[c - 1], row[c]
                if c == space and (not prefix or last == " "):
                    # no leading or doubled separators: a space here reads as staying put
                    here.char = logaddexp(here.char, total + p) if last == " " else here.char
                    here.blank = logaddexp(here.blank, total + p) if not prefix else here.blank
                    continue
                if ch == last:
                    here.char = logaddexp(here.char, b.char + p)  # the same character, held
                    if b.blank > NEG:  # a doubled letter needs a blank between
                        longer = at(prefix + ch)
                        longer.char = logaddexp(longer.char, b.blank + p)
                else:
                    longer = at(prefix + ch)
                    longer.char = logaddexp(longer.char, total + p)
        if lm is not None:
            # A prefix that just completed a word needs the LM; its score is at most the bound
            # below (log p_lm <= 0), so only those whose bound could still make the beam ask.
            fresh = {p: w for p in nxt if p.endswith(" ") and (w := words_of(p, False)) not in lm.totals}
            scores = {p: score(p, b) for p, b in nxt.items() if p not in fresh}
            floor = sorted(scores.values(), reverse=True)[beam - 1] if len(scores) >= beam else NEG
            ask = {p: w for p, w in fresh.items()
                   if nxt[p].ctc + alpha * lm.totals.get(w[:-1], 0.0) + beta * len(w) > floor}
            yield list(ask.values())
            scores.update({p: score(p, nxt[p]) for p in ask})
        else:
            scores = {p: b.ctc for p, b in nxt.items()}
        beams = {p: nxt[p] for p in sorted(scores, key=scores.get, reverse=True)[:beam]}
    out: dict[str, float] = {}  # the labellings, spaces normalised: {text: log p_ctc}
    for prefix, b in beams.items():
        text = " ".join(prefix.split())
        out[text] = logaddexp(out.get(text, NEG), b.ctc)
    if lm is None:
        return dict(sorted(out.items(), key=lambda kv: kv[1], reverse=True))
    yield [tuple(t.split()) for t in out]
    return rank(out, lm, alpha, beta)


def rank(hypotheses: dict[str, float], lm: WordLM, alpha: float, beta: float) -> dict[str, float]:
    """{text: log p_ctc} ordered best first by log p_ctc + alpha * log p_lm(text) + beta * words."""
    words = {t: tuple(t.split()) for t in hypotheses}
    lm.add(list(words.values()))
    fused = {t: p + alpha * lm.total(words[t]) + beta * len(words[t]) for t, p in hypotheses.items()}
    return {t: hypotheses[t] for t in sorted(hypotheses, key=fused.get, reverse=True)}


def rescore(hypotheses: dict[str, float], lm: WordLM, alpha: float, beta: float) -> str:
    """The best of {text: log p_ctc} by the fused score (`rank`)."""
    return next(iter(rank(hypotheses, lm, alpha, beta)))

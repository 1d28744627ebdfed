"""The character search with the decoder as language model (speech/lm_beam.py): prefix scores
against a brute-force sum over every frame path, word scores against the decoder's own sentence
log-probability, and the fused search against exhaustive rescoring."""
import itertools
import math

import pytest
import torch

from mm.decoders import load_decoder
from speech.lm_beam import Lexicon, WordLM, as_written, prefix_search, read_word_list, rescore

ALPHABET = " ab"


def brute_force(log_probs: torch.Tensor) -> dict[str, float]:
    """Every frame path -> CTC collapse -> words joined by single spaces: {text: log probability}."""
    p = log_probs.exp().double()
    totals: dict[str, float] = {}
    for path in itertools.product(range(p.shape[1]), repeat=p.shape[0]):
        labels = [c for j, c in enumerate(path) if c and (j == 0 or c != path[j - 1])]
        text = " ".join("".join(ALPHABET[c - 1] for c in labels).split())
        totals[text] = totals.get(text, 0.0) + math.prod(float(p[t, c]) for t, c in enumerate(path))
    return {k: math.log(v) for k, v in totals.items()}


def test_prefix_search_sums_every_frame_path_of_a_labelling():
    torch.manual_seed(0)
    log_probs = torch.randn(5, 4).mul(2).log_softmax(-1)  # blank, space, a, b
    truth = brute_force(log_probs)
    found = prefix_search(log_probs, ALPHABET, None, beam=10_000, char_floor=-math.inf)
    assert set(found) == set(truth)
    for text, score in found.items():
        assert math.isclose(score, truth[text], rel_tol=1e-6, abs_tol=1e-9), text
    # a narrow beam drops paths, never invents them: its sums are at most the true ones
    narrow = prefix_search(log_probs, ALPHABET, None, beam=4, char_floor=-math.inf)
    assert 0 < len(narrow) <= 4 and all(score <= truth[text] + 1e-9 for text, score in narrow.items())
    assert list(narrow.values()) == sorted(narrow.values(), reverse=True)


def sentence_log_prob(decoder, lm: WordLM, words: tuple[str, ...]) -> float:
    """log p(words) from one plain decoder call over the whole text."""
    ids = lm.ids(words)
    with torch.no_grad():
        log_probs = decoder(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)
    return sum(float(log_probs[i, ids[i + 1]]) for i in range(len(ids) - 1))


def test_word_scores_add_up_to_the_decoders_sentence_probability():
    decoder, tokenizer = load_decoder("tiny")
    lm = WordLM(decoder, tokenizer, batch_size=2)
    words = ("ab", "ba", "a")
    lm.add([words, ("b",), ("ab", "b")])
    assert math.isclose(lm.total(words), sentence_log_prob(decoder, lm, words), rel_tol=1e-5)
    assert lm.total(("ab",)) > lm.total(words)  # every shorter sequence was scored on the way
    assert lm.total(()) == 0.0 and lm.total(("ab", "b")) < 0
    # scored as written: the first word and "I" with capitals, whatever the search read
    said = ("where", "can", "i", "go", "i'm", "ia")
    assert lm.ids(said) == lm.start + tokenizer("Where can I go I'm ia", add_special_tokens=False).input_ids
    lm.add([said])
    assert math.isclose(lm.total(said), sentence_log_prob(decoder, lm, said), rel_tol=1e-5)


def test_cached_keys_give_the_same_scores_as_reading_the_whole_text():
    decoder, tokenizer = load_decoder("tiny")
    lm = WordLM(decoder, tokenizer, batch_size=3)
    # grown a word at a time, as the search does, then rows of different past and new lengths together
    for n in range(1, 5):
        lm.add([("ab", "ba", "a", "bb")[:n]])
    mixed = [("ab", "ba", "a", "bb", "a"), ("b",), ("ab", "bab", "b"), ("ab", "ba", "a", "ab", "ba", "bb"), ("ba", "a")]
    lm.add(mixed)
    for words in mixed + [("ab", "ba")]:
        assert math.isclose(lm.total(words), sentence_log_prob(decoder, lm, words), rel_tol=1e-5, abs_tol=1e-5), words


def test_fused_search_picks_what_exhaustive_rescoring_picks():
    decoder, tokenizer = load_decoder("tiny")
    torch.manual_seed(1)
    log_probs = torch.randn(6, 4).mul(2).log_softmax(-1)
    truth = brute_force(log_probs)
    for alpha, beta in ((0.0, 0.0), (1.0, 0.5), (3.0, 2.0)):
        lm = WordLM(decoder, tokenizer)
        found = prefix_search(log_probs, ALPHABET, lm, alpha, beta, beam=10_000, char_floor=-math.inf)
        assert next(iter(found)) == rescore(truth, WordLM(decoder, tokenizer), alpha, beta), (alpha, beta)
    # the language model changes the choice when it is weighted heavily enough
    choices = {rescore(truth, WordLM(decoder, tokenizer), alpha, 0.0) for alpha in (0.0, 2.0, 8.0)}
    assert len(choices) > 1


def test_lexicon_of_a_tokenizer_without_word_tokens_knows_only_numbers():
    _, tokenizer = load_decoder("tiny")  # bytes only: no whole-word tokens
    lexicon = Lexicon(tokenizer)
    assert lexicon.could_be("") and lexicon.could_be("1984")
    assert not lexicon.could_be("ab")


def test_lexicon_knows_the_words_of_a_word_list(tmp_path):
    _, tokenizer = load_decoder("tiny")
    listed = tmp_path / "words"
    listed.write_text("Loathing\nshudder\nAaron's\ncafé\n")
    lexicon = Lexicon(tokenizer, read_word_list(str(listed)))
    assert lexicon.words == {"loathing", "shudder"}  # lower-cased; possessives and accents left out
    assert lexicon.could_be("loath") and lexicon.could_be("shudder") and lexicon.could_be("shudder's")
    assert lexicon.unknown_length("shuder") == 2 and lexicon.unknown_length("loathings") == 1
    # its names: the words it has only with a capital
    names = Lexicon(tokenizer, ["Iowa", "Bill", "bill", "SunOS", "Einstein", "Einstein's"]).names
    assert names == {"iowa", "einstein"}
    assert [as_written(w, False, names) for w in ("iowa", "einstein's", "bill")] == ["Iowa", "Einstein's", "bill"]
    with pytest.warns(UserWarning, match="no-such-list"):
        assert read_word_list(str(tmp_path / "no-such-list")) == []
    assert read_word_list("") == [] and read_word_list(None) == []


def test_recordings_searched_side_by_side_read_as_each_alone():
    from speech.lm_beam import lockstep, search_steps
    from speech.punctuation import punctuate, punctuation_steps

    decoder, tokenizer = load_decoder("tiny")
    torch.manual_seed(2)
    recordings = [torch.randn(frames, 4).mul(2).log_softmax(-1) for frames in (5, 8, 3)]
    alone = [prefix_search(x, ALPHABET, WordLM(decoder, tokenizer), 1.0, 0.5, beam=6) for x in recordings]
    shared = WordLM(decoder, tokenizer, batch_size=4)
    together = lockstep([search_steps(x, ALPHABET, shared, 1.0, 0.5, beam=6) for x in recordings], shared)
    for a, b in zip(alone, together):
        assert list(a) == list(b) and all(math.isclose(a[t], b[t], abs_tol=1e-9) for t in a)
    texts = [next(iter(f)) for f in alone]
    assert lockstep([punctuation_steps(t, shared) for t in texts], shared) == [
        punctuate(t, WordLM(decoder, tokenizer)) for t in texts]

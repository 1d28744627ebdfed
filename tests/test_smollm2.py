"""The bundled SmolLM2-135M-Instruct: untrained adapters leave it exactly as it was."""
from __future__ import annotations

import pytest
import torch

import mm
from tests.conftest import make_image


@pytest.fixture(scope="module")
def smol():
    return mm.load("smollm2")


def test_bundled_decoder_is_smollm2(smol):
    c = smol.decoder.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.vocab_size) == (
        30, 576, 9, 3, 49152)
    assert smol.image_layers == [3, 7, 11, 15, 19, 23, 27]


def test_logits_equal_bare_decoder(smol):
    ids = smol.prepare([smol.user_messages("Why is the sky blue?", [])]).ids
    with torch.no_grad():
        assert torch.equal(smol(ids).logits, smol.decoder(input_ids=ids).logits)


def test_text_reply_is_the_bare_decoders(smol):
    prompt = "What is the capital of France?"
    batch = smol.prepare([smol.user_messages(prompt, [])])
    bare = smol.decoder.generate(batch.ids, attention_mask=batch.attention_mask, max_new_tokens=24, do_sample=False)
    expected = smol.tokenizer.decode(bare[0, batch.ids.shape[1]:], skip_special_tokens=True)
    assert smol.generate(prompt, max_new_tokens=24) == expected
    assert "Paris" in expected


def test_closed_gates_ignore_the_image_content(smol):
    a = smol.generate("Describe the picture.", images=[make_image(300, 200, 0)], max_new_tokens=16)
    b = smol.generate("Describe the picture.", images=[make_image(120, 400, 1)], max_new_tokens=16)
    assert a == b and len(a) > 0


def spelled(text: str, doubt: dict[int, tuple[str, float]] | None = None) -> torch.Tensor:
    """Character log-probabilities [frames, 1 + 38] that spell `text`, one frame per character
    and a blank frame after each; doubt {i: (other, p)} gives character i's frame another
    reading with probability p ("" for blank)."""
    from speech.conformer import CHARACTERS

    probs = []
    for i, ch in enumerate(text):
        frame = torch.full((len(CHARACTERS) + 1,), 1e-4)
        frame[CHARACTERS.index(ch) + 1] = 1.0
        if doubt and i in doubt:
            other, p = doubt[i]
            frame[CHARACTERS.index(ch) + 1], frame[CHARACTERS.index(other) + 1 if other else 0] = 1 - p, p
        blank = torch.full_like(frame, 1e-4)
        blank[0] = 1.0
        probs += [frame / frame.sum(), blank / blank.sum()]
    return torch.stack(probs).log()


def test_the_decoder_as_language_model_corrects_a_misheard_spelling(smol):
    """The character search with SmolLM2 as its word-level LM: 'emergencies' heard as
    'emurgencies' (the head's likelier reading) comes out right; the decoder is only read."""
    from speech.conformer import CHARACTERS
    from speech.lm_beam import Lexicon, WordLM, prefix_search

    before = smol.decoder_sha256()
    lexicon = Lexicon(smol.tokenizer)
    assert lexicon.could_be("emerg") and lexicon.could_be("don't") and lexicon.could_be("you'l")
    assert not lexicon.could_be("nitwitideas") and not lexicon.could_be("emurg")
    log_probs = spelled("ideas are for emergencies", doubt={16: ("u", 0.6)})
    plain = prefix_search(log_probs, CHARACTERS, None, beam=8)
    assert next(iter(plain)) == "ideas are for emurgencies"
    lm = WordLM(smol.decoder, smol.tokenizer)
    fused = prefix_search(log_probs, CHARACTERS, lm, 0.5, 2.0, beam=8, lexicon=lexicon)
    assert next(iter(fused)) == "ideas are for emergencies"
    lm.add([("for", "emergencies"), ("for", "emurgencies")])
    assert lm.total(("for", "emergencies")) > lm.total(("for", "emurgencies"))
    assert smol.decoder_sha256() == before


def test_an_unknown_word_does_not_run_on_through_the_spaces_after_it(smol):
    """Misspelled names, every space heard at 0.6 against blank: with only a fixed charge for a
    partial word that starts no word, the first unknown word went on through all the spaces after
    it (once unknown, more letters cost nothing); charged per character, the words stay apart
    (at the default, 5: at 1 the first two still ran together, "Usetceclarance" costing the
    decoder less as a sentence's first word than "Usetce clarance")."""
    from speech.conformer import CHARACTERS
    from speech.lm_beam import Lexicon, WordLM, prefix_search

    text = "usetce clarance scrub and he almost"
    log_probs = spelled(text, doubt={i: ("", 0.4) for i, ch in enumerate(text) if ch == " "})
    lexicon = Lexicon(smol.tokenizer)
    assert lexicon.unknown_length("usetce") == 3 and lexicon.unknown_length("clar") == 0

    def read(unknown_char: float) -> str:
        lm = WordLM(smol.decoder, smol.tokenizer)
        return next(iter(prefix_search(log_probs, CHARACTERS, lm, 0.5, 2.0, beam=8, lexicon=lexicon,
                                       unknown=10.0, unknown_char=unknown_char)))

    assert read(0.0) == "usetceclarancescrubandhealmost"
    assert read(smol.config.speech.transcriber.unknown_char) == text


def test_the_decoder_cases_and_punctuates_what_was_read(smol):
    """A character transcript is written out by SmolLM2: question mark, capitals, the word I."""
    from speech.lm_beam import WordLM
    from speech.punctuation import punctuate

    before = smol.decoder_sha256()
    lm = WordLM(smol.decoder, smol.tokenizer)
    assert punctuate("where can i sign up", lm) == "Where can I sign up?"
    assert punctuate("what am i going to do with this", lm) == "What am I going to do with this?"
    assert punctuate("the cat sat on the mat", lm) == "The cat sat on the mat."
    assert smol.decoder_sha256() == before


def test_words_read_are_written_out_with_the_voice(smol, monkeypatch):
    """model.write_out, how transcribe writes what the character search read: the same words
    close on "?" after a rising voice, on "." after a falling one; with transcriber.punctuate off
    only the first word and "I" get capitals. The figures behind the defaults: README, Speech."""
    from tests.test_intonation import voice

    words = "you are leaving".split()
    rising = voice([(0, 140), (1.2, 140), (1.5, 150)], 1.5)
    falling = voice([(0, 140), (1.2, 140), (1.5, 105)], 1.5)
    assert smol.write_out([words, words, []], [rising, falling, rising]) == ["You are leaving?", "You are leaving.", ""]
    # a question in its words stays one in a falling voice (question_prior: the decoder alone
    # expects statements), and a name's capitals come with the whole sentence in view (recase)
    asked = ["where would you put it".split(), "what does the white house think about it".split()]
    assert smol.write_out(asked, [falling, falling]) == [
        "Where would you put it?", "What does the White House think about it?"]
    t = smol.config.speech.transcriber
    monkeypatch.setattr(t, "question_prior", 0.0)
    monkeypatch.setattr(t, "question_weight", 1.0)
    monkeypatch.setattr(t, "recase", 0)
    assert smol.write_out(asked, [falling, falling]) == [
        "Where would you put it.", "What does the white house think about it."]
    monkeypatch.setattr(smol.config.speech.transcriber, "punctuate", False)
    assert smol.write_out([["so", "i", "can't"]], [falling]) == ["So I can't"]

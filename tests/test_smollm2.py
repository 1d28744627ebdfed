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

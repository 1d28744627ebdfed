"""The lean decode step (mm.llama_step) computes what the decoder's forward computes."""
from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from mm.errors import ConfigError
from mm.generation import Sampler
from mm.llama_step import LlamaDecodeStep, supports
from mm.model import _positions
from tests.conftest import make_image, open_gates


def _batch(model):
    """Three rows of different lengths (left padding), images in two of them."""
    return model.prepare([
        model.user_messages("What is in this picture, in detail?", [make_image(40, 30)]),
        model.user_messages("Hi", []),
        model.user_messages("<|image|> and <|image|>: which is brighter?", [make_image(20, 70, 1), make_image(50, 50, 2)]),
    ])


def _tokens(model, batch, mode: str, n: int = 12) -> torch.Tensor:
    model.decode_mode = mode
    return torch.stack(list(model.decode(batch, n, Sampler(), min_new_tokens=n)), dim=1)


def test_step_logits_equal_decoder_forward(tiny):
    """Token by token, the step's logits are the decoder forward's (same cache, same blocks)."""
    open_gates(tiny)
    batch = _batch(tiny)
    media = tiny.media_inputs(batch.ids, batch.attention_mask, **batch.media()).media
    ids, mask = batch.ids, batch.attention_mask
    positions, query = _positions(mask), torch.arange(ids.shape[1])
    cache = DynamicCache(config=tiny.decoder.config)
    for context in media.values():
        if context is not None:
            context.set_queries(query)
    with torch.no_grad(), tiny.fusion.media(**media):
        tiny.decoder(inputs_embeds=tiny.embed(ids), attention_mask=mask, position_ids=positions, past_key_values=cache,
                     use_cache=True)
        media["image"].set_queries(query[-1:] + 1)
        blocks = [tiny.fusion.active(i) for i in range(len(tiny.decoder.model.layers))]
    step = LlamaDecodeStep(tiny.decoder)
    step.start(cache, mask, positions[:, -1:] + 1, 5, blocks)
    assert sum(len(b) for b in blocks) == len(tiny.xattn["image"])
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        token = torch.randint(0, 200, (3, 1), generator=g)
        mask = torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], dim=1)
        positions = positions[:, -1:] + 1
        with torch.no_grad(), tiny.fusion.media(**media):
            expected = tiny.decoder(inputs_embeds=tiny.embed(token), attention_mask=mask, position_ids=positions,
                                    past_key_values=cache, use_cache=True).logits[:, -1]
        got = step(tiny.embed(token))
        assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
        assert expected.abs().max() > 0.1


def test_lean_decode_gives_the_plain_tokens_and_keeps_its_cache_in_place(tiny):
    open_gates(tiny)
    batch = _batch(tiny)
    plain = _tokens(tiny, batch, "plain")
    tiny.decode_mode = "lean"
    steps = tiny.decode(batch, 12, Sampler(), min_new_tokens=12)
    lean = [next(steps), next(steps)]
    buffer = tiny._lean.keys[0]
    lean += list(steps)
    assert torch.equal(torch.stack(lean, 1), plain)
    assert tiny._lean.keys[0] is buffer and buffer.shape[2] == batch.ids.shape[1] + 12  # allocated once


def test_compiled_decode_gives_the_plain_tokens(tiny):
    open_gates(tiny)
    batch = _batch(tiny)
    assert torch.equal(_tokens(tiny, batch, "compile", 6), _tokens(tiny, batch, "plain", 6))


def test_unknown_decoders_use_the_plain_forward(tiny):
    open_gates(tiny)
    batch = _batch(tiny)
    tiny.decoder.config.sliding_window = 4  # a layout the step does not reproduce
    assert not supports(tiny.decoder)
    expected = _tokens(tiny, batch, "plain")
    tiny._lean = None
    assert torch.equal(_tokens(tiny, batch, "lean"), expected)
    assert tiny._lean is None


def test_bad_decode_mode_is_a_config_error(tiny):
    tiny.decode_mode = "fast"
    with pytest.raises(ConfigError, match="decode_mode"):
        tiny.generate("hi", max_new_tokens=2)

"""The composite model computes exactly the frozen decoder until its gates open."""
from __future__ import annotations

import torch

import mm
from mm.decoders import tiny_decoder
from tests.conftest import make_image, open_gates


def _text_ids(model, n: int = 20, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.decoder.config.vocab_size, (2, n), generator=g)


def test_logits_equal_bare_decoder_for_text(tiny):
    ids = _text_ids(tiny)
    with torch.no_grad():
        ours = tiny(ids).logits
        bare = tiny.decoder(input_ids=ids).logits
    assert torch.equal(ours, bare)


def test_closed_gates_make_images_invisible(tiny):
    """Gates at 0: the logits with images equal the decoder's on the same embeddings."""
    batch = tiny.prepare([tiny.user_messages("what is this?", [make_image(40, 30), make_image(90, 20, 1)])])
    with torch.no_grad():
        ours = tiny(batch.ids, batch.attention_mask, batch.images, batch.image_rows).logits
        bare = tiny.decoder(inputs_embeds=tiny.embed(batch.ids)).logits
    assert torch.equal(ours, bare)


def test_text_reply_equals_bare_decoder_reply(tiny):
    prompt = "Tell me a story about a cat."
    batch = tiny.prepare([tiny.user_messages(prompt, [])])
    bare = tiny.decoder.generate(batch.ids, attention_mask=batch.attention_mask, max_new_tokens=24,
                                 do_sample=False, min_new_tokens=24)
    expected = tiny.tokenizer.decode(bare[0, batch.ids.shape[1]:], skip_special_tokens=True)
    assert tiny.generate(prompt, max_new_tokens=24) == expected
    assert len(expected) > 0


def test_decoder_is_frozen_and_stays_in_eval(tiny):
    tiny.train()
    assert not tiny.decoder.training
    assert all(not p.requires_grad for p in tiny.decoder.parameters())
    trainable = [n for n, p in tiny.named_parameters() if p.requires_grad]
    assert trainable and not any(n.startswith("decoder.") for n in trainable)


def test_wrapping_keeps_decoder_state_dict():
    plain, _ = tiny_decoder()
    expected = {k: v.clone() for k, v in plain.state_dict().items()}
    model = mm.load("tiny")
    got = model.decoder.state_dict()
    assert list(got) == list(expected)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    # and a plain Llama state dict loads into the wrapped decoder, strictly
    model.decoder.load_state_dict(expected, strict=True)


def test_plain_llama_checkpoint_loads_as_decoder(tmp_path):
    plain, tokenizer = tiny_decoder(seed=3)
    plain.save_pretrained(tmp_path / "llama")
    tokenizer.save_pretrained(tmp_path / "llama")
    model = mm.load(tmp_path / "llama", overrides=["vision=vit_tiny"])
    for name, tensor in plain.state_dict().items():
        assert torch.equal(model.decoder.state_dict()[name], tensor), name
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, plain(input_ids=ids).logits)


def test_media_keys_values_computed_once_per_prompt(tiny):
    open_gates(tiny)
    calls = []
    for block in tiny.xattn["image"]:
        block.cross_attn.k_proj.register_forward_hook(lambda *a: calls.append(1))
    tiny.generate("describe", images=[make_image(40, 30)], max_new_tokens=12)
    steps = 12
    assert tiny.last_context is not None
    assert tiny.last_context.kv_computations == len(tiny.xattn["image"])
    assert len(calls) == len(tiny.xattn["image"]) < steps


def test_rows_before_media_unchanged_and_finite(tiny):
    open_gates(tiny)
    ids = torch.tensor([tiny.tokenizer("abc def<|image|> what", add_special_tokens=False).input_ids])
    at = int((ids[0] == tiny.media_token_ids["image"]).nonzero()[0])
    images = tiny.image_processor([make_image(40, 30)])
    with torch.no_grad():
        ours = tiny(ids, images=images, image_rows=torch.tensor([0])).logits
        bare = tiny.decoder(inputs_embeds=tiny.embed(ids)).logits
    assert torch.isfinite(ours).all()
    assert torch.equal(ours[:, :at], bare[:, :at])
    assert not torch.allclose(ours[:, at:], bare[:, at:])


def test_each_image_visible_from_its_own_token_on(tiny):
    open_gates(tiny)
    ids = torch.tensor([tiny.tokenizer("a<|image|>bcd<|image|>ef", add_special_tokens=False).input_ids])
    first, second = (ids[0] == tiny.media_token_ids["image"]).nonzero()[:, 0].tolist()
    rows = torch.tensor([0, 0])

    def logits(images):
        with torch.no_grad():
            return tiny(ids, images=tiny.image_processor(images), image_rows=rows).logits

    base = logits([make_image(40, 30, 0), make_image(30, 30, 1)])
    other_second = logits([make_image(40, 30, 0), make_image(30, 30, 2)])
    other_first = logits([make_image(40, 30, 3), make_image(30, 30, 1)])
    assert torch.equal(base[:, :second], other_second[:, :second])  # image 2 unseen before its token
    assert not torch.allclose(base[:, second:], other_second[:, second:])
    assert torch.equal(base[:, :first], other_first[:, :first])
    assert not torch.allclose(base[:, first:second], other_first[:, first:second])
    assert not torch.allclose(base[:, second:], other_first[:, second:])  # image 1 still seen after image 2


def test_batch_mixing_text_and_image_rows_matches_single_rows(tiny):
    open_gates(tiny)
    prompts = ["what is it?", "hello, how are you doing today?", "and these two?"]
    images = [[make_image(40, 30)], [], [make_image(20, 70, 1), make_image(64, 64, 2)]]
    batched = tiny.generate(prompts, images=images, max_new_tokens=10)
    single = [tiny.generate(p, images=i, max_new_tokens=10) for p, i in zip(prompts, images)]
    assert batched == single


def test_sampling_is_reproducible_with_a_seed(tiny):
    a = tiny.generate("hi", max_new_tokens=16, temperature=1.0, top_p=0.9, seed=7)
    b = tiny.generate("hi", max_new_tokens=16, temperature=1.0, top_p=0.9, seed=7)
    c = tiny.generate("hi", max_new_tokens=16, temperature=1.0, top_p=0.9, seed=8)
    greedy = tiny.generate("hi", max_new_tokens=16)
    assert a == b
    assert a != c or a != greedy


def test_stream_and_chat_agree_with_generate(tiny):
    open_gates(tiny)
    image = make_image(40, 30)
    full = tiny.generate("what is this?", images=[image], max_new_tokens=12)
    assert "".join(tiny.stream("what is this?", images=[image], max_new_tokens=12)) == full
    messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": "what is this?"}]}]
    assert tiny.chat(messages, max_new_tokens=12) == full

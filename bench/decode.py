"""Generation against its references: text-only decoding against the bare LlamaForCausalLM,
image question answering against transformers' MllamaForConditionalGeneration built with the
same sizes and weights, and decode cost as images and prompt length grow.

Both sides of every ratio run in the same process, alternating, on the same token ids and
pixels; greedy decoding with end-of-turn tokens suppressed, so that both produce exactly the
requested number of tokens (and the same ones: `same_tokens` records it).
"""
from __future__ import annotations

import time

import numpy as np
import torch
from PIL import Image
from transformers import MllamaForConditionalGeneration
from transformers.generation.streamers import BaseStreamer
from transformers.models.mllama.image_processing_mllama import convert_aspect_ratios_to_ids

import mm
from bench.common import Setting, TokenClock, median
from mm.decoders import load_decoder
from mm.generation import Sampler
from mm.mllama import _mllama_state, exportable_problems
from mm.model import Batch
from vision.tiling import supported_grids

# the composite model in Mllama's conventions (exportable_problems() is empty), so that
# transformers' implementation computes the same function with the same weights
MLLAMA_COMPATIBLE = ["vision.attn_bias=false", "vision.pad_tokens_to=8", "vision.padding_mask=pairs",
                     "image_adapter.attend_without_media=true"]
STORY = "Write a long story about a lighthouse keeper who finds a map in a bottle."
QUESTION = "Describe this picture in as much detail as you can."


class _Ticks(BaseStreamer):
    """A transformers streamer that timestamps each generated token (not the prompt)."""

    def __init__(self, clock: TokenClock) -> None:
        self.clock, self.prompt_seen = clock, False

    def put(self, value) -> None:
        if self.prompt_seen:
            self.clock.tick()
        self.prompt_seen = True

    def end(self) -> None:
        pass


def _ours(model, batch: Batch, n: int, clock: TokenClock) -> list[int]:
    clock.start()
    tokens = []
    for token in model.decode(batch, n, Sampler(), min_new_tokens=n):
        clock.tick()
        tokens.append(int(token[0]))
    return tokens


def _hf(reference, inputs: dict, n: int, stop: list[int], pad: int, clock: TokenClock) -> list[int]:
    clock.start()
    with torch.inference_mode():
        out = reference.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=stop,
                                 pad_token_id=pad, streamer=_Ticks(clock))
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def _compare(setting: Setting, ours, theirs, repeats: int) -> dict:
    """Run both sides `repeats` times, alternating, after one warm-up each -> medians and ratios."""
    t0 = time.perf_counter()
    ours(TokenClock(setting.device))  # warm-up: allocator, lazy initialisation, compilation if any
    first_call_s = time.perf_counter() - t0
    theirs(TokenClock(setting.device))
    rows = {"ours": [], "reference": []}
    same = True
    for _ in range(repeats):
        for side, run in (("ours", ours), ("reference", theirs)):
            clock = TokenClock(setting.device)
            tokens = run(clock)
            rows[side].append((clock.prefill_s, clock.decode_s_per_token, tokens))
        same &= rows["ours"][-1][2] == rows["reference"][-1][2]
    result = {"same_tokens": same, "tokens": len(rows["ours"][0][2]), "repeats": repeats,
              "ours_first_call_s": first_call_s}
    for side, runs in rows.items():
        result[side] = {"prefill_s": median([r[0] for r in runs]), "decode_s_per_token": median([r[1] for r in runs])}
    result["prefill_speed_ratio"] = result["reference"]["prefill_s"] / result["ours"]["prefill_s"]
    result["decode_speed_ratio"] = result["reference"]["decode_s_per_token"] / result["ours"]["decode_s_per_token"]
    return result


# ---- 1. text only -----------------------------------------------------------------------------------
def text_only(setting: Setting) -> dict:
    """The composite model (adapters attached, no media) against the bare decoder it wraps."""
    model = mm.load("smollm2", device=setting.device).to(setting.dtype).eval()
    model.decode_mode = setting.decode_mode
    bare, _ = load_decoder(model.config.decoder, setting.dtype)
    bare = bare.to(setting.device).eval()
    n = 16 if setting.quick else 128
    batch = model.prepare([model.user_messages(STORY, [])], n)
    stop, pad = sorted(model.eos_token_ids()), model.tokenizer.pad_token_id
    inputs = {"input_ids": batch.ids, "attention_mask": batch.attention_mask}
    result = _compare(setting, lambda clock: _ours(model, batch, n, clock),
                      lambda clock: _hf(bare, inputs, n, stop, pad, clock),
                      setting.repeats)
    # whole-generation time per token (prefill included), the number a user of generate() sees
    for side in ("ours", "reference"):
        r = result[side]
        r["total_s"] = r["prefill_s"] + r["decode_s_per_token"] * (n - 1)
    result["total_speed_ratio"] = result["reference"]["total_s"] / result["ours"]["total_s"]
    result["prompt_tokens"] = batch.ids.shape[1]
    return result


# ---- 2. image question answering against Mllama ------------------------------------------------------
def mllama_pair(setting: Setting, seed: int = 0):
    """The smollm2 composite model in Mllama conventions with random open gates, and the
    MllamaForConditionalGeneration holding the same weights (random weights: timing only)."""
    torch.manual_seed(seed)
    model = mm.load("smollm2", overrides=MLLAMA_COMPATIBLE)
    assert not exportable_problems(model), exportable_problems(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gate.scale") or name.endswith(("gate_attn", "gate_ffn")):
                p.uniform_(0.2, 0.8)  # open gates: the blocks change what the decoder computes
    config, tensors = _mllama_state(model)
    reference = MllamaForConditionalGeneration(config)
    reference.load_state_dict(tensors, strict=True)
    model = model.to(setting.device, setting.dtype).eval()
    model.decode_mode = setting.decode_mode
    reference = reference.to(setting.device, setting.dtype).eval()
    return model, reference


def picture(width: int, height: int, seed: int) -> Image.Image:
    """A smooth random colour field (photo-like statistics, not white noise)."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((height // 16 + 1, width // 16 + 1, 3))
    img = Image.fromarray((coarse * 255).astype(np.uint8)).resize((width, height), Image.BICUBIC)
    return img


def hf_image_inputs(model, batch: Batch) -> dict:
    """The composite model's batch in Mllama's input format (one prompt; same pixels and grids)."""
    images, ids = batch.images, batch.ids
    max_tiles = model.config.vision.max_tiles
    grids = [supported_grids(max_tiles)[int(i) - 1] for i in images.aspect_ratio_ids]
    image_id = model.media_token_ids["image"]
    starts = (ids[0] == image_id).nonzero()[:, 0]
    visible = torch.arange(ids.shape[1], device=ids.device)[:, None] >= starts[None]  # [L, n]
    used = torch.arange(max_tiles, device=ids.device) < images.n_tiles[:, None]  # [n, tiles]
    return {
        "input_ids": ids, "attention_mask": batch.attention_mask,
        "pixel_values": images.tiles[None].to(model.media_embedding.weight.dtype),
        "aspect_ratio_ids": convert_aspect_ratios_to_ids([[(r, c) for c, r in grids]], max_tiles).to(ids.device),
        "aspect_ratio_mask": used.long()[None],
        "cross_attention_mask": (visible[:, :, None] & used[None]).long()[None],
    }


def _image_run(setting, model, reference, batch: Batch, n: int, repeats: int) -> dict:
    stop, pad = sorted(model.eos_token_ids()), model.tokenizer.pad_token_id
    inputs = hf_image_inputs(model, batch)
    result = _compare(setting, lambda clock: _ours(model, batch, n, clock),
                      lambda clock: _hf(reference, inputs, n, stop, pad, clock),
                      repeats)
    context = model.last_contexts["image"]
    result["kv_computations_per_prompt"] = context.kv_computations  # one per image block: cached after
    result["image_blocks"] = len(model.xattn["image"])
    return result


def image_qa(setting: Setting, pair=None) -> dict:
    """One photo-sized image (a 2 x 2 tile grid) and a question, 128 new tokens."""
    model, reference = pair or mllama_pair(setting)
    n = 16 if setting.quick else 128
    batch = model.prepare([model.user_messages(QUESTION, [picture(640, 480, 1)])], n)
    result = _image_run(setting, model, reference, batch, n, setting.repeats)
    result.update(prompt_tokens=batch.ids.shape[1], tiles=int(batch.images.n_tiles.sum()))
    return result


# ---- 3. scaling ---------------------------------------------------------------------------------------
def scaling(setting: Setting, pair=None) -> dict:
    """Decode time per token for 0-8 images (one tile each, 200 media tokens) after a short
    prompt, and for prompts of 128-2048 tokens with one image."""
    model, reference = pair or mllama_pair(setting)
    n = 8 if setting.quick else 32
    repeats = 1 if setting.quick else setting.repeats
    filler = model.tokenizer(" the quick brown fox jumps over the lazy dog" * 400, add_special_tokens=False).input_ids
    image_id = model.media_token_ids["image"]

    def batch_of(n_images: int, length: int) -> Batch:
        ids = torch.tensor([[image_id] * n_images + filler[: length - n_images]], device=setting.device)
        images = (model.image_processor([picture(224, 224, s) for s in range(n_images)]).to(setting.device)
                  if n_images else None)
        rows = torch.zeros(n_images, dtype=torch.long, device=setting.device) if n_images else None
        return Batch(ids, torch.ones_like(ids), images, rows)

    def point(n_images: int, length: int) -> dict:
        batch = batch_of(n_images, length)
        if n_images:
            r = _image_run(setting, model, reference, batch, n, repeats)
        else:
            stop, pad = sorted(model.eos_token_ids()), model.tokenizer.pad_token_id
            inputs = {"input_ids": batch.ids, "attention_mask": batch.attention_mask}
            r = _compare(setting, lambda clock: _ours(model, batch, n, clock),
                         lambda clock: _hf(reference, inputs, n, stop, pad, clock),
                         repeats)
        return {"images": n_images, "prompt_tokens": length, **r}

    counts = [0, 1, 2] if setting.quick else [0, 1, 2, 4, 8]
    lengths = [128, 256] if setting.quick else [128, 256, 512, 1024, 2048]
    return {"new_tokens": n, "by_images": [point(k, 128) for k in counts],
            "by_prompt": [point(1, length) for length in lengths]}

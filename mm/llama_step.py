"""One-token decoding over a frozen LlamaForCausalLM, without transformers' per-call machinery.

A generated token goes through the same modules and the same arithmetic as
`LlamaForCausalLM.forward` (the decoder's own norms, projections, MLPs, rotary embedding and
transformers' `apply_rotary_pos_emb`), but:
  - keys and values live in buffers allocated once for the whole reply (a token writes one
    slot) instead of a DynamicCache that concatenates, i.e. copies, every layer's cache at
    every token;
  - the attention mask is a view of one boolean row per sequence, not rebuilt per call;
  - the rotary cos/sin of every future position come from one call before the first token;
  - no output dataclasses, kwargs routing, cache bookkeeping or mask-building per call.
The decoder's modules and parameters are only read: it stays the unmodified decoder, and
`MultimodalModel.decode` falls back to the plain forward for decoders this path does not know.

    step = LlamaDecodeStep(decoder)
    step.start(prefill_cache, attention_mask, first_position, max_new_tokens, blocks_per_layer)
    logits = step(embeds)   # [b, 1, d] -> [b, vocab], one call per new token
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaForCausalLM, apply_rotary_pos_emb


def supports(decoder: nn.Module) -> bool:
    """Whether `decoder` is a plain Llama this step reproduces: LlamaAttention in every layer,
    attention through sdpa or eager (both are softmax(q k^T * scaling) v here), no sliding window."""
    config = decoder.config
    return (type(decoder) is LlamaForCausalLM
            and all(type(layer.self_attn) is LlamaAttention for layer in decoder.model.layers)
            and config._attn_implementation in ("sdpa", "eager")
            and not getattr(config, "sliding_window", None))


class LlamaDecodeStep:
    """Runs one new token per row through the decoder, with the cross-attention blocks that
    `start` was given before their layers.

    compile: run the step through torch.compile (inductor). The cache then always spans its
    full length (masked), so that every token has the same shapes and one compiled graph
    serves a whole reply; later replies reuse it (a new batch size, media count or cache
    length compiles once more, then dynamically). The first reply pays the compilation.
    """

    def __init__(self, decoder: nn.Module, compile: bool = False) -> None:
        self.decoder, self.compile = decoder, compile
        self.layers = list(decoder.model.layers)
        attn = self.layers[0].self_attn
        self.head_dim, self.scaling, self.groups = attn.head_dim, attn.scaling, attn.num_key_value_groups
        self._step = torch.compile(self._run, dynamic=None) if compile else self._run

    @torch.no_grad()
    def start(self, cache, attention_mask: Tensor, next_position: Tensor, max_new_tokens: int,
              blocks: list[list[tuple[nn.Module, object]]]) -> None:
        """Take over the prompt's keys/values from a transformers cache (its `layers[i].keys`,
        `.values`: [b, kv_heads, L, hd]); next_position [b, 1] is the position id of the first
        new token; blocks[i]: the (CrossAttentionBlock, MediaContext) pairs to run before layer i
        (contexts whose queries are set for the new tokens). Room is made for max_new_tokens more."""
        b, length = attention_mask.shape
        total = length + max_new_tokens
        self.keys, self.values = [], []
        for layer in cache.layers:
            for source, buffers in ((layer.keys, self.keys), (layer.values, self.values)):
                buffer = source.new_zeros(*source.shape[:2], total, source.shape[-1])  # zeros: masked, never NaN
                buffer[:, :, :length] = source
                buffers.append(buffer)
        self.valid = torch.ones(b, 1, 1, total, dtype=torch.bool, device=attention_mask.device)
        self.valid[:, 0, 0, :length] = attention_mask.bool()
        self.padded = not bool(attention_mask.all())
        self.slots = torch.arange(total, device=attention_mask.device)
        positions = next_position + torch.arange(max_new_tokens, device=next_position.device)  # [b, n]
        self.cos, self.sin = self.decoder.model.rotary_emb(self.keys[0], positions)  # [b, n, hd]
        self.media = [[(block, *context.keys_values(block), context.mask, context.row_on) for block, context in at]
                      for at in blocks]
        self.prompt_length, self.step = length, 0

    @torch.no_grad()
    def __call__(self, x: Tensor) -> Tensor:
        """x [b, 1, d] (the new tokens' embeddings) -> next-token logits [b, vocab]."""
        t, slot = self.step, self.step + self.prompt_length
        if self.compile:  # tensors, not ints: the compiled graph must not specialise on them
            t, slot = torch.tensor([t], device=x.device), torch.tensor([slot], device=x.device)
        logits = self._step(x, t, slot, self.keys, self.values, self.valid, self.slots, self.cos, self.sin, self.media)
        self.step += 1
        return logits

    def _run(self, x, t, slot, keys, values, valid, slots, cos, sin, media):
        """t: the new token's index in the reply, slot: its cache slot (ints, or [1] tensors when compiled)."""
        if self.compile:  # full-length cache, future slots masked: the same shapes at every token
            cos, sin = cos.index_select(1, t), sin.index_select(1, t)
            mask = valid & (slots <= slot)
        else:  # the filled part of the cache only
            cos, sin = cos[:, t: t + 1], sin[:, t: t + 1]
            mask = valid[..., : slot + 1] if self.padded else None  # no padding: every filled slot is visible
        for i, layer in enumerate(self.layers):
            for block, k, v, block_mask, row_on in media[i]:
                x = block.attend(x, k, v, block_mask, row_on)
            x = x + self._attention(layer.self_attn, layer.input_layernorm(x), keys[i], values[i], slot, cos, sin, mask)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.decoder.lm_head(self.decoder.model.norm(x))[:, -1]

    def _attention(self, attn: nn.Module, h: Tensor, keys: Tensor, values: Tensor, slot, cos: Tensor, sin: Tensor,
                   mask: Tensor) -> Tensor:
        b = h.shape[0]
        q = attn.q_proj(h).view(b, 1, -1, self.head_dim).transpose(1, 2)  # [b, heads, 1, hd]
        k = attn.k_proj(h).view(b, 1, -1, self.head_dim).transpose(1, 2)  # [b, kv_heads, 1, hd]
        v = attn.v_proj(h).view(b, 1, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if self.compile:
            keys.index_copy_(2, slot, k)
            values.index_copy_(2, slot, v)
        else:
            keys[:, :, slot: slot + 1], values[:, :, slot: slot + 1] = k, v
            keys, values = keys[:, :, : slot + 1], values[:, :, : slot + 1]
        # one query: the query heads sharing a kv head become that head's rows (no repeat of k/v)
        q = q.reshape(b, -1, self.groups, self.head_dim)  # [b, kv_heads, groups, hd]
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scaling)
        return attn.o_proj(out.reshape(b, 1, -1))

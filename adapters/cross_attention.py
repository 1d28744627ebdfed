"""Gated cross-attention from text states to media states (Llama 3 / Llama 3.2 Vision style).

A block is a no-op at initialisation: both gates are tanh(0) = 0, so the decoder computes
exactly what it computed before the block was attached.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm


class TanhGate(nn.Module):
    """Scales its input by tanh(scale); scale starts at 0, so the gated branch starts closed."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale.tanh()


class SwiGLU(nn.Module):
    """Llama's feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


@dataclass
class MediaContext:
    """The media one forward pass attends to, and the per-prompt key/value cache.

    states: [b, n_media * tokens_per_media, d]  media states already at the decoder width
    start:  [b, n_media]  index in the token sequence of each media's placeholder token; a row
            with fewer media pads with a huge index (never visible)
    valid:  [b, n_media * tokens_per_media]  False for padding (unused tiles, absent media)

    Media j is visible to the query at sequence index p iff p >= start[:, j].
    Keys/values are computed once per block per context (i.e. once per prompt) and reused
    for every generated token; `kv_computations` counts how often that happened.
    """

    states: Tensor
    start: Tensor
    valid: Tensor
    tokens_per_media: int
    kv_cache: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)
    kv_computations: int = 0
    mask: Tensor | None = None  # [b, 1, q, kv] additive: 0 may attend, -inf may not
    row_on: Tensor | None = None  # [b, q, 1]  1.0 where the row sees any media

    def set_queries(self, query_index: Tensor) -> None:
        """query_index: [q] or [b, q] sequence indices of the rows about to be computed."""
        if query_index.dim() == 1:
            query_index = query_index[None]
        visible = query_index[:, :, None] >= self.start[:, None, :]  # [b, q, n]
        visible = visible.repeat_interleave(self.tokens_per_media, dim=-1) & self.valid[:, None, :]
        row_on = visible.any(-1, keepdim=True)  # [b, q, 1]
        # Rows that see nothing attend everywhere (avoids an all-masked softmax -> NaN);
        # their output is multiplied by 0 afterwards. Additive (0 / -inf): SDPA would convert
        # a bool mask in every block.
        allowed = (visible | ~row_on)[:, None]
        self.mask = torch.zeros(allowed.shape, dtype=self.states.dtype, device=allowed.device).masked_fill_(
            ~allowed, float("-inf"))
        self.row_on = row_on.to(self.states.dtype)

    def keys_values(self, block: CrossAttentionBlock) -> tuple[Tensor, Tensor]:
        key = id(block)
        if key not in self.kv_cache:
            self.kv_cache[key] = block.cross_attn.project_kv(self.states)
            self.kv_computations += 1
        return self.kv_cache[key]


class CrossAttention(nn.Module):
    """Grouped-query cross-attention with per-head RMSNorm on q and k and no RoPE."""

    def __init__(self, *, dim: int, n_heads: int, n_kv_heads: int, head_dim: int, norm_eps: float):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.q_proj = nn.Linear(dim, n_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * head_dim, dim, bias=False)
        self.q_norm = LlamaRMSNorm(head_dim, eps=norm_eps)
        self.k_norm = LlamaRMSNorm(head_dim, eps=norm_eps)

    def project_kv(self, media: Tensor) -> tuple[Tensor, Tensor]:
        """media [b, m, d] -> keys, values [b, n_kv_heads, m, head_dim]."""
        b, m, _ = media.shape
        k = self.k_proj(media).view(b, m, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(media).view(b, m, self.n_kv_heads, self.head_dim).transpose(1, 2)
        # contiguous once per prompt: the attention kernel would otherwise copy them at every token
        return self.k_norm(k).contiguous(), v.contiguous()

    def forward(self, x: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
        """x [b, q, d], k/v [b, kv_heads, m, hd], mask [b, 1, q, m] (additive) -> [b, q, d]."""
        b, q, _ = x.shape
        queries = self.q_norm(self.q_proj(x).view(b, q, self.n_heads, self.head_dim).transpose(1, 2))
        out = F.scaled_dot_product_attention(
            queries, k, v, attn_mask=mask, enable_gqa=self.n_heads != self.n_kv_heads
        )
        return self.o_proj(out.transpose(1, 2).reshape(b, q, -1))


class CrossAttentionBlock(nn.Module):
    """RMSNorm -> cross-attention -> tanh gate, then RMSNorm -> SwiGLU -> tanh gate.

    Shapes: x [b, q, d] -> [b, q, d]. Rows that see no media get exactly zero update, unless
    `attend_without_media`: then such rows keep their attention branch (attending to every media
    token, padding included) and only their MLP branch is zeroed, as in transformers'
    MllamaForConditionalGeneration (needed to reproduce its outputs exactly).
    """

    def __init__(
        self, *, dim: int, n_heads: int, n_kv_heads: int, head_dim: int, mlp_dim: int,
        norm_eps: float = 1e-5, attend_without_media: bool = False,
    ) -> None:
        super().__init__()
        self.attend_without_media = attend_without_media
        self.input_layernorm = LlamaRMSNorm(dim, eps=norm_eps)
        self.cross_attn = CrossAttention(
            dim=dim, n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim, norm_eps=norm_eps
        )
        self.attn_gate = TanhGate()
        self.post_attention_layernorm = LlamaRMSNorm(dim, eps=norm_eps)
        self.mlp = SwiGLU(dim, mlp_dim)
        self.mlp_gate = TanhGate()

    def forward(self, x: Tensor, media: MediaContext) -> Tensor:
        return self.attend(x, *media.keys_values(self), media.mask, media.row_on)

    def attend(self, x: Tensor, k: Tensor, v: Tensor, mask: Tensor, row_on: Tensor) -> Tensor:
        """forward with the context's tensors given: k/v [b, kv_heads, m, hd] from `keys_values`,
        mask [b, 1, q, m] and row_on [b, q, 1] from `set_queries`."""
        h = self.cross_attn(self.input_layernorm(x), k, v, mask)
        if not self.attend_without_media:
            h = h * row_on
        x = x + self.attn_gate(h)
        h = self.mlp(self.post_attention_layernorm(x)) * row_on
        return x + self.mlp_gate(h)

"""The speech adapter: Conformer states (40 ms) -> decoder-width embeddings (80 ms).

    [b, L, d_enc] -> conv1d (kernel 3, stride 2) -> one pre-norm rotary transformer layer
      -> linear to the decoder width -> [b, ceil(L / 2), d_model]

Its outputs are the decoder's input embeddings at the positions of the audio tokens (or, with
speech.attach: cross_attention, the states the audio cross-attention blocks read).
"""
from __future__ import annotations

from torch import Tensor, nn

from speech.conformer import RotarySelfAttention, SpeechConfig, length_mask


class SpeechAdapter(nn.Module):
    def __init__(self, config: SpeechConfig, d_model: int) -> None:
        super().__init__()
        a = config.adapter
        self.stride = a.stride
        self.conv = nn.Conv1d(config.width, a.width, a.kernel, stride=a.stride, padding=a.kernel // 2)
        self.attn_norm = nn.LayerNorm(a.width)
        self.attn = RotarySelfAttention(a.width, a.heads, config.rope_theta)
        self.mlp_norm = nn.LayerNorm(a.width)
        self.mlp = nn.Sequential(nn.Linear(a.width, a.ffn_dim), nn.GELU(), nn.Linear(a.ffn_dim, a.width))
        self.norm = nn.LayerNorm(a.width)
        self.proj = nn.Linear(a.width, d_model)

    def forward(self, states: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """states [b, L, d_enc], mask [b, L] -> [b, ceil(L / stride), d_model], mask."""
        x = self.conv((states * mask[..., None]).transpose(1, 2)).transpose(1, 2)
        lengths = -(-mask.sum(1) // self.stride)
        out_mask = length_mask(lengths, x.shape[1])
        x = x + self.attn(self.attn_norm(x), out_mask)
        x = x + self.mlp(self.mlp_norm(x))
        return self.proj(self.norm(x)) * out_mask[..., None], out_mask

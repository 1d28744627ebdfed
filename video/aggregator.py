"""The temporal aggregator: a perceiver resampler that merges each run of M frames into one.

    frame states [n, F, N, d_vis] (the image encoder's tokens of every frame)
      -> linear to the aggregator width (none when width is 0: the encoder's own width),
         + time-in-group and group embeddings
      -> per group of M consecutive frames: N latent queries (a learned table plus the mean
         of the group's frames, token by token) attend to the group's M*N frame tokens and
         to themselves, `layers` times (perceiver layers: attention, then MLP, pre-norm)
      -> [n, (F / M) * N, width]

At initialisation the aggregator is the mean of each run of frames: the attention and MLP
outputs, the time and group embeddings start at zero and the latent table near it. In the
encoder's own width its output is then what the image path already reads (a mean frame), and
training adds what time tells.

Without the time embedding, attention over a group would be blind to frame order (it is a set
operation); with it, "which digit came first" is answerable. The time embedding is a learned
projection of sinusoids of the frame's relative position in its group, (t + 0.5) / M, so one
aggregator serves M = 16 in pretraining and M = 32 in fine-tuning (the paper's values).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class VideoConfig:
    frames: int = 16  # F frames sampled uniformly per clip (the paper: up to 64)
    merge: int = 16  # M consecutive frames merged into one (paper: 16 pretraining, 32 fine-tuning)
    width: int = 256  # aggregator width; 0: the image encoder's output width (no input projection)
    layers: int = 2
    heads: int = 4
    mlp_ratio: float = 4.0
    every: int = 4  # a video cross-attention block before every k-th image cross-attention block
    chunk: int = 16  # frames per pass through the image encoder (bounds memory for long clips)

    def validate(self) -> list[str]:
        problems = []
        if self.frames < 1 or self.merge < 1 or self.frames % self.merge:
            problems.append(f"frames ({self.frames}) must be a positive multiple of merge ({self.merge})")
        if self.width < 0 or (self.width and self.width % self.heads):
            problems.append(f"width {self.width} is not 0 or a positive multiple of heads {self.heads}")
        if self.layers < 1 or self.every < 1 or self.chunk < 1:
            problems.append("layers, every and chunk must be >= 1")
        return problems

    @property
    def groups(self) -> int:
        return self.frames // self.merge


def sinusoids(position: Tensor, dim: int) -> Tensor:
    """[...] positions (any real scale) -> [..., dim] sin/cos features over geometric frequencies."""
    freqs = torch.exp(torch.arange(dim // 2, device=position.device) * (-math.log(1000.0) / max(1, dim // 2 - 1)))
    angles = position[..., None].float() * freqs * 2 * math.pi
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class PerceiverLayer(nn.Module):
    """Latents attend to [media; latents], then an MLP; both residual, pre-norm."""

    def __init__(self, width: int, heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm_media = nn.LayerNorm(width)
        self.norm_latents = nn.LayerNorm(width)
        self.q_proj = nn.Linear(width, width, bias=False)
        self.kv_proj = nn.Linear(width, 2 * width, bias=False)
        self.o_proj = nn.Linear(width, width, bias=False)
        self.norm_mlp = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, width))
        for out in (self.o_proj, self.mlp[-1]):  # residual branches start closed
            nn.init.zeros_(out.weight)
            if out.bias is not None:
                nn.init.zeros_(out.bias)

    def forward(self, latents: Tensor, media: Tensor) -> Tensor:
        n, q_len, w = latents.shape
        lat = self.norm_latents(latents)
        kv_in = torch.cat([self.norm_media(media), lat], dim=1)
        q = self.q_proj(lat).view(n, q_len, self.heads, -1).transpose(1, 2)
        k, v = self.kv_proj(kv_in).view(n, kv_in.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, q_len, w)
        latents = latents + self.o_proj(attended)
        return latents + self.mlp(self.norm_mlp(latents))


class TemporalAggregator(nn.Module):
    def __init__(self, config: VideoConfig, in_dim: int, tokens_per_frame: int) -> None:
        super().__init__()
        self.config = config
        self.width = w = config.width or in_dim
        if w % config.heads:
            raise ValueError(f"aggregator width {w} is not divisible by heads {config.heads}")
        self.input = nn.Linear(in_dim, w) if w != in_dim else nn.Identity()
        self.latents = nn.Parameter(torch.randn(tokens_per_frame, w) * 0.02)
        self.time = nn.Linear(w, w)  # sinusoids of the position within the group -> embedding
        self.group = nn.Linear(w, w)  # sinusoids of the group index -> embedding
        for embedding in (self.time, self.group):
            nn.init.zeros_(embedding.weight)
            nn.init.zeros_(embedding.bias)
        mlp = int(w * config.mlp_ratio)
        self.layers = nn.ModuleList([PerceiverLayer(w, config.heads, mlp) for _ in range(config.layers)])

    def forward(self, frames: Tensor, merge: int | None = None) -> Tensor:
        """frames [n, T, N, d_vis] -> [n, (T / M) * N, width]."""
        n, t, tokens, _ = frames.shape
        m = merge or self.config.merge
        if t % m:
            raise ValueError(f"{t} frames are not a multiple of merge {m}")
        g, w = t // m, self.width
        x = self.input(frames)
        index = torch.arange(t, device=x.device)
        x = x + self.time(sinusoids((index % m + 0.5) / m, w).to(x.dtype))[None, :, None]
        x = x + self.group(sinusoids(index // m, w).to(x.dtype))[None, :, None]
        x = x.view(n * g, m, tokens, w)
        latents = self.latents.expand(n * g, -1, -1) + x.mean(1)
        media = x.reshape(n * g, m * tokens, w)
        for layer in self.layers:
            latents = layer(latents, media)
        return latents.view(n, g * tokens, w)

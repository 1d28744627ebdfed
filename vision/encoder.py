"""ViT image encoder in the Llama 3 / Llama 3.2 Vision layout.

    tiles -> patch embedding (+ gated pre-tile embedding) -> class token
          -> positional embedding, blended with a gated tile-position embedding
          -> local transformer layers (features tapped at chosen depths)
          -> ln_post (+ gated post-tile embedding) -> gated global layers
          -> concat(final, taps...)   [n, tiles * (patches + 1), width * (1 + len(taps))]

All tiles of one image attend to each other; unused tiles are masked out. The trunk's
parameter names are those of open_clip's VisionTransformer (conv1, class_embedding,
positional_embedding, ln_pre, transformer.resblocks.N.{ln_1,attn,ln_2,mlp}, ln_post), so an
open_clip image tower's state dict loads into it directly (vision/openclip.py).

Three options reproduce the released Llama 3.2 Vision encoder (transformers'
MllamaVisionModel) exactly; their defaults keep the behaviour above:
    attn_bias: false      no biases on the attention projections
    pad_tokens_to: 8      each tile's tokens are zero-padded to a multiple of 8 after ln_pre;
                          the padding runs through the layers and is dropped from the output
    padding_mask: pairs   attention is blocked only between two padding tokens (tokens of unused
                          tiles or padding positions): real tokens also attend to padding, as
                          Llama 3.2 was trained. The default, keys, hides padding from everyone.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vision.tiling import supported_grids

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class VisionConfig:
    """Sizes of the image encoder. ViT-H/14 of the paper: width 1280, 32 layers, 16 heads."""

    image_size: int = 224  # side of one tile, pixels
    patch_size: int = 14
    width: int = 1280
    layers: int = 32
    heads: int = 16
    mlp_dim: int = 5120
    taps: list[int] | None = None  # hidden states after this many local layers, concatenated
    global_layers: int = 8
    max_tiles: int = 4
    norm_eps: float = 1e-5
    mean: list[float] | None = None
    std: list[float] | None = None
    act: str = "gelu"  # MLP activation: gelu (exact) | gelu_tanh | quick_gelu (OpenAI CLIP)
    attn_bias: bool = True  # biases on the q/k/v and output projections (Llama 3.2 Vision: none)
    pad_tokens_to: int = 1  # pad each tile's tokens to a multiple of this (Llama 3.2 Vision: 8)
    padding_mask: str = "keys"  # keys: padding is never attended to; pairs: only padding->padding
    # is blocked (Llama 3.2 Vision)

    def __post_init__(self) -> None:
        self.taps = list(self.taps if self.taps is not None else [])
        self.mean = list(self.mean if self.mean is not None else CLIP_MEAN)
        self.std = list(self.std if self.std is not None else CLIP_STD)

    def validate(self) -> list[str]:
        problems = []
        if self.image_size % self.patch_size:
            problems.append(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.width % self.heads:
            problems.append(f"width {self.width} is not divisible by heads {self.heads}")
        bad = [t for t in self.taps if not 0 <= t <= self.layers]
        if bad:
            problems.append(f"taps {bad} outside 0..{self.layers}")
        if self.max_tiles < 1:
            problems.append("max_tiles must be >= 1")
        if self.act not in ACTIVATIONS:
            problems.append(f"act '{self.act}' is not one of {', '.join(ACTIVATIONS)}")
        if self.pad_tokens_to < 1:
            problems.append("pad_tokens_to must be >= 1")
        if self.padding_mask not in ("keys", "pairs"):
            problems.append(f"padding_mask '{self.padding_mask}' is not keys or pairs")
        return problems

    @property
    def tokens_per_tile(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1

    @property
    def output_dim(self) -> int:
        return self.width * (1 + len(self.taps))

    @property
    def padded_tokens_per_tile(self) -> int:
        return -(-self.tokens_per_tile // self.pad_tokens_to) * self.pad_tokens_to


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the activation of OpenAI's CLIP ViTs."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"gelu": nn.GELU, "gelu_tanh": lambda: nn.GELU(approximate="tanh"), "quick_gelu": QuickGELU}


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused input projection (open_clip / nn.MultiheadAttention names)."""

    def __init__(self, width: int, heads: int, bias: bool = True) -> None:
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width)) if bias else None
        self.out_proj = nn.Linear(width, width, bias=bias)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        b, s, d = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # (b, h, s, hd)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(out.transpose(1, 2).reshape(b, s, d))


class ViTLayer(nn.Module):
    """Pre-norm transformer layer: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int, mlp_dim: int, eps: float, act: str = "gelu",
                 attn_bias: bool = True) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=eps)
        self.attn = SelfAttention(width, heads, attn_bias)
        self.ln_2 = nn.LayerNorm(width, eps=eps)
        self.mlp = nn.Sequential(  # "gelu" is open_clip's name for the activation, whichever it is
            OrderedDict(c_fc=nn.Linear(width, mlp_dim), gelu=ACTIVATIONS[act](), c_proj=nn.Linear(mlp_dim, width))
        )

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        x = x + self.attn(self.ln_1(x), mask)
        return x + self.mlp(self.ln_2(x))


class GatedViTLayer(ViTLayer):
    """A ViTLayer whose two residual branches are scaled by tanh gates (start at pi/4, as in Llama 3.2)."""

    def __init__(self, width: int, heads: int, mlp_dim: int, eps: float, act: str = "gelu",
                 attn_bias: bool = True) -> None:
        super().__init__(width, heads, mlp_dim, eps, act, attn_bias)
        self.gate_attn = nn.Parameter(torch.full((1,), math.pi / 4))
        self.gate_ffn = nn.Parameter(torch.full((1,), math.pi / 4))

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        x = x + self.gate_attn.tanh() * self.attn(self.ln_1(x), mask)
        return x + self.gate_ffn.tanh() * self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(layers)


class TileEmbedding(nn.Module):
    """A learned vector per (aspect ratio, tile position), added behind a tanh gate (starts at 0)."""

    def __init__(self, n_ratios: int, max_tiles: int, width: int) -> None:
        super().__init__()
        self.max_tiles, self.width = max_tiles, width
        self.embedding = nn.Embedding(n_ratios + 1, max_tiles * width)
        self.gate = nn.Parameter(torch.zeros(1))
        nn.init.normal_(self.embedding.weight, std=width**-0.5)

    def forward(self, x: Tensor, aspect_ratio_ids: Tensor) -> Tensor:
        """x [n, tiles, tokens, width]; tiles may be fewer than max_tiles (video frames: 1)."""
        e = self.embedding(aspect_ratio_ids).view(-1, self.max_tiles, 1, self.width)
        return x + self.gate.tanh() * e[:, : x.shape[1]]


class GatedPositionalEmbedding(nn.Module):
    """x + (1 - tanh g) * positional + tanh g * tile_positional[aspect ratio]; g starts at 0."""

    def __init__(self, n_ratios: int, max_tiles: int, tokens: int, width: int) -> None:
        super().__init__()
        self.max_tiles, self.tokens, self.width = max_tiles, tokens, width
        self.tile_embedding = nn.Embedding(n_ratios + 1, max_tiles * tokens * width)
        self.gate = nn.Parameter(torch.zeros(1))
        nn.init.normal_(self.tile_embedding.weight, std=width**-0.5)

    def forward(self, x: Tensor, positional: Tensor, aspect_ratio_ids: Tensor) -> Tensor:
        """x [n, tiles, tokens, width], positional [tokens, width]."""
        g = self.gate.tanh()
        tile_pos = self.tile_embedding(aspect_ratio_ids).view(-1, self.max_tiles, self.tokens, self.width)
        return x + (1 - g) * positional + g * tile_pos[:, : x.shape[1]]


class ImageEncoder(nn.Module):
    """Tiles -> per-token features, see the module docstring.

    Example:
        enc = ImageEncoder(VisionConfig(image_size=32, patch_size=8, width=64, layers=2, heads=2,
                                        mlp_dim=128, taps=[1], global_layers=1))
        feats = enc(tiles, aspect_ratio_ids, n_tiles)   # [n, 4 * 17, 128]
    """

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        c = self.config = config
        n_ratios = len(supported_grids(c.max_tiles))
        scale = c.width**-0.5
        # open_clip VisionTransformer trunk
        self.conv1 = nn.Conv2d(3, c.width, kernel_size=c.patch_size, stride=c.patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(c.width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(c.tokens_per_tile, c.width))
        self.ln_pre = nn.LayerNorm(c.width, eps=c.norm_eps)
        layer = dict(width=c.width, heads=c.heads, mlp_dim=c.mlp_dim, eps=c.norm_eps, act=c.act, attn_bias=c.attn_bias)
        self.transformer = Transformer([ViTLayer(**layer) for _ in range(c.layers)])
        self.ln_post = nn.LayerNorm(c.width, eps=c.norm_eps)
        # tiling and global layers
        self.pre_tile_embedding = TileEmbedding(n_ratios, c.max_tiles, c.width)
        self.tile_positional_embedding = GatedPositionalEmbedding(n_ratios, c.max_tiles, c.tokens_per_tile, c.width)
        self.post_tile_embedding = TileEmbedding(n_ratios, c.max_tiles, c.width)
        self.global_transformer = Transformer(
            [GatedViTLayer(**layer) for _ in range(c.global_layers)]
        )

    def forward(self, tiles: Tensor, aspect_ratio_ids: Tensor, n_tiles: Tensor) -> Tensor:
        """tiles [n, T, 3, S, S], aspect_ratio_ids [n], n_tiles [n] -> [n, T * tokens, output_dim]."""
        c = self.config
        n, t = tiles.shape[:2]
        x = self.conv1(tiles.flatten(0, 1).to(self.conv1.weight.dtype))  # (n*T, w, g, g)
        x = x.flatten(2).transpose(1, 2).view(n, t, -1, c.width)  # (n, T, P, w)
        x = self.pre_tile_embedding(x, aspect_ratio_ids)
        cls = self.class_embedding.to(x.dtype).expand(n, t, 1, -1)
        x = torch.cat([cls, x], dim=2)  # (n, T, P+1, w)
        x = self.tile_positional_embedding(x, self.positional_embedding, aspect_ratio_ids)
        x = self.ln_pre(x)
        pad = c.padded_tokens_per_tile - c.tokens_per_tile
        if pad:
            x = F.pad(x, (0, 0, 0, pad))  # zero tokens after each tile's own: (n, T, P+1+pad, w)
        x = x.flatten(1, 2)  # (n, T*(P+1+pad), w)
        # additive (0 / -inf) rather than bool: SDPA turns a bool mask into this in every call
        mask = _additive(self._attention_mask(n_tiles, t), x.dtype)

        taps = []
        for i, layer in enumerate(self.transformer.resblocks):
            if i in c.taps:
                taps.append(x)
            x = layer(x, mask)
        if c.layers in c.taps:
            taps.append(x)

        x = self.ln_post(x).view(n, t, -1, c.width)
        x = self.post_tile_embedding(x, aspect_ratio_ids).flatten(1, 2)
        for layer in self.global_transformer.resblocks:
            x = layer(x, mask)
        out = torch.cat([x, *taps], dim=-1)
        if pad:  # drop the padding tokens
            out = out.view(n, t, c.padded_tokens_per_tile, -1)[:, :, : c.tokens_per_tile].flatten(1, 2)
        return out

    def _attention_mask(self, n_tiles: Tensor, max_tiles: int) -> Tensor:
        """Bool mask (True = may attend) over the padded token sequence: [n, 1, 1, L] for
        padding_mask keys, [n, 1, L, L] for pairs."""
        c = self.config
        if c.padding_mask == "keys" and c.pad_tokens_to == 1:
            return self._tile_mask(n_tiles, max_tiles, c.tokens_per_tile)
        per_tile = c.padded_tokens_per_tile
        real = self._tile_mask(n_tiles, max_tiles, per_tile)[:, 0, 0]  # (n, L): token of a used tile
        real = real & (torch.arange(per_tile, device=real.device) < c.tokens_per_tile).repeat(max_tiles)
        if c.padding_mask == "keys":
            return real[:, None, None, :]
        return (real[:, :, None] | real[:, None, :])[:, None]

    def resize_tensor(self, name: str, tensor: Tensor) -> Tensor:
        """Resample a positional tensor trained at another tile resolution to this encoder's
        patch grid (bicubic over the patch grid; the class token's row is kept). Other tensors
        are returned unchanged."""
        c = self.config
        if name == "positional_embedding":
            return _resample_positions(tensor, c.tokens_per_tile - 1)
        if name == "tile_positional_embedding.tile_embedding.weight":
            rows = tensor.shape[0]
            old_tokens = tensor.shape[1] // (c.max_tiles * c.width)
            per_tile = tensor.view(rows * c.max_tiles, old_tokens, c.width)
            resized = torch.stack([_resample_positions(t, c.tokens_per_tile - 1) for t in per_tile])
            return resized.reshape(rows, -1)
        return tensor

    @staticmethod
    def _tile_mask(n_tiles: Tensor, max_tiles: int, tokens: int) -> Tensor:
        """[n, 1, 1, T*tokens] bool: keys in used tiles (True) may be attended to."""
        used = torch.arange(max_tiles, device=n_tiles.device)[None] < n_tiles[:, None]  # (n, T)
        return used.repeat_interleave(tokens, dim=1)[:, None, None, :]

    def token_mask(self, n_tiles: Tensor, max_tiles: int) -> Tensor:
        """[n, T*tokens] bool: which output tokens come from used tiles."""
        return self._tile_mask(n_tiles, max_tiles, self.config.tokens_per_tile)[:, 0, 0]


def _additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """Bool attention mask (True = may attend) -> 0 where True, -inf where False."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def _resample_positions(pos: Tensor, patches: int) -> Tensor:
    """[1 + g*g, w] -> [1 + patches, w]: class row kept, the g x g grid resized bicubically."""
    old = round(math.sqrt(pos.shape[0] - 1))
    new = round(math.sqrt(patches))
    if old == new:
        return pos
    grid = pos[1:].reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    return torch.cat([pos[:1], grid.permute(0, 2, 3, 1).reshape(new * new, -1).to(pos.dtype)])

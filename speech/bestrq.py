"""BEST-RQ self-supervised pretraining of the Conformer (Chiu et al. 2022; Llama 3's speech_ssl).

    log-mel -> stack 4 frames (the encoder's own 40 ms input frames)
    targets: each stacked frame -> frozen random projection to `dim` dims -> for each of
             `codebooks` frozen random codebooks of `vocab` unit vectors, the index of the
             nearest codeword (cosine) -> [b, L, codebooks] labels
    input:   spans of `span` input frames (rounded to stacked frames) start with probability
             `mask_prob` per frame; masked stacked frames are replaced by noise N(0, noise_std)
    loss:    the encoder reads the masked input; one linear softmax head per codebook predicts
             the labels of the masked frames; cross-entropy on masked frames only, averaged
             over the codebooks (multi-softmax)

The projection and codebooks are buffers, fixed by the seed and never trained, so targets are
the same in every process and every resumed run. Only the encoder and the heads train; the
heads are dropped afterwards (the encoder goes on to speech_sft).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from speech.conformer import ConformerEncoder


@dataclass
class BestRQConfig:
    dim: int = 16  # projection size (the paper: 16)
    vocab: int = 8192  # codewords per codebook (the paper: 8192)
    codebooks: int = 16  # (the paper: 16)
    mask_prob: float = 0.025  # probability that a masked span starts at a frame
    span: int = 32  # input frames (10 ms) per masked span
    noise_std: float = 0.1
    seed: int = 0  # the frozen random projection and codebooks

    def validate(self) -> list[str]:
        if min(self.dim, self.vocab, self.codebooks, self.span) < 1 or not 0 < self.mask_prob < 1:
            return ["bestrq: dim, vocab, codebooks, span must be >= 1 and 0 < mask_prob < 1"]
        return []


class RandomProjectionQuantizer(nn.Module):
    """Stacked frames [b, L, n_in] -> codeword indices [b, L, codebooks] (frozen, not trained)."""

    def __init__(self, n_in: int, c: BestRQConfig) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(c.seed)
        projection = torch.empty(n_in, c.dim)
        bound = (6 / (n_in + c.dim)) ** 0.5  # Xavier uniform
        projection.uniform_(-bound, bound, generator=g)
        codebooks = F.normalize(torch.randn(c.codebooks, c.vocab, c.dim, generator=g), dim=-1)
        self.register_buffer("projection", projection, persistent=False)
        self.register_buffer("codebooks", codebooks, persistent=False)

    @torch.no_grad()
    @torch.autocast("cuda", enabled=False)
    @torch.autocast("cpu", enabled=False)
    def forward(self, stacked: Tensor) -> Tensor:  # float32 under autocast: the targets don't move
        z = F.normalize(stacked.float() @ self.projection, dim=-1)  # [b, L, dim]
        return torch.stack([(z @ book.T).argmax(-1) for book in self.codebooks], dim=-1)  # one book at a time


def span_mask(lengths: Tensor, length: int, prob: float, span: int, generator: torch.Generator | None = None) -> Tensor:
    """[b, length] bool: spans of `span` frames starting where a uniform draw falls below prob;
    only real frames (below each row's length) are masked, and at least one per row is."""
    b = lengths.shape[0]
    real = torch.arange(length)[None] < lengths.cpu()[:, None]
    starts = (torch.rand(b, length, generator=generator) < prob) & real
    starts[torch.arange(b), (torch.rand(b, generator=generator) * lengths.cpu()).long().clamp(max=length - 1)] = True
    covered = F.max_pool1d(F.pad(starts.float()[:, None], (span - 1, 0)), span, stride=1)[:, 0] > 0
    return (covered & real).to(lengths.device)


class BestRQ(nn.Module):
    """The speech_ssl objective around a ConformerEncoder: forward(features, lengths) -> (loss, logged)."""

    def __init__(self, encoder: ConformerEncoder, config: BestRQConfig) -> None:
        super().__init__()
        self.encoder, self.config = encoder, config
        c = encoder.config
        self.quantizer = RandomProjectionQuantizer(c.stack * c.n_mels, config)
        self.heads = nn.Linear(c.width, config.codebooks * config.vocab)
        self.span = max(1, round(config.span / c.stack))  # in stacked (encoder) frames

    def forward(self, features: Tensor, lengths: Tensor, **_) -> tuple[Tensor, Tensor]:
        from mm.stages import all_reduce_sum, world

        stacked, frames = self.encoder.stack(features, lengths)
        targets = self.quantizer(stacked)  # from the clean input
        masked = span_mask(frames, stacked.shape[1], self.config.mask_prob, self.span)
        noise = torch.randn_like(stacked) * self.config.noise_std
        states, _ = self.encoder.forward_stacked(torch.where(masked[..., None], noise, stacked), frames)
        logits = self.heads(states[masked]).view(-1, self.config.codebooks, self.config.vocab)
        loss_sum = F.cross_entropy(logits.float().flatten(0, 1), targets[masked].flatten(), reduction="sum")
        count = all_reduce_sum(masked.sum().to(loss_sum)) * self.config.codebooks
        logged = all_reduce_sum(loss_sum.detach()) / count
        return loss_sum * world()[1] / count, logged

    @torch.no_grad()
    def accuracy(self, features: Tensor, lengths: Tensor) -> float:
        """Share of masked frames whose codeword the heads predict (all codebooks), for evaluation."""
        stacked, frames = self.encoder.stack(features, lengths)
        targets = self.quantizer(stacked)
        masked = span_mask(frames, stacked.shape[1], self.config.mask_prob, self.span,
                           torch.Generator().manual_seed(0))
        noise = torch.randn(stacked.shape, generator=torch.Generator().manual_seed(1)) * self.config.noise_std
        states, _ = self.encoder.forward_stacked(torch.where(masked[..., None], noise.to(stacked), stacked), frames)
        logits = self.heads(states[masked]).view(-1, self.config.codebooks, self.config.vocab)
        return float((logits.argmax(-1) == targets[masked]).float().mean())

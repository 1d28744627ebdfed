"""The speech adapter: Conformer states (40 ms) -> decoder-width embeddings (80 ms).

    [b, L, d_enc] -> conv1d (kernel 3, stride 2) -> one pre-norm rotary transformer layer
      -> linear to the decoder width -> [b, ceil(L / 2), d_model]

Its outputs are the decoder's input embeddings at the positions of the audio tokens (or, with
speech.attach: cross_attention, the states the audio cross-attention blocks read).

With adapter.tokens, a TokenHead reads every output as one of the decoder's own tokens or a
blank, by its distance to the rows of the frozen decoder's input-embedding table (trained with
CTC on the decoder's tokens of what was said), and the decoder reads one embedding per run of
the same token, blank outputs dropped: the mixture of token embeddings by the run's class
probabilities. Speech then reaches the decoder in the space its own tokens live in, at about
one position per spoken token instead of one per 80 ms.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from speech.conformer import RotarySelfAttention, SpeechConfig, length_mask

BLANK = 0  # class 0 of TokenHead's logits; class i + 1 is decoder token i


class TokenHead(nn.Module):
    """Adapter outputs h [b, m, d] -> logits [b, m, 1 + vocab] over blank and the decoder's tokens.

    logit(v) = (2 h.e_v - |e_v|^2) / temperature = (|h|^2 - |h - e_v|^2) / temperature: the
    nearer h is to a token's embedding e_v, the likelier that token (|h|^2 is the same for every
    class). Blank is a learned vector of the same space. The table is the decoder's, never a copy.
    `mask` [b, m] (the valid outputs) is not needed for the logits; it is an argument so that a
    forward hook (speech_sft's token CTC) sees which outputs count.
    """

    temperature = 1.0

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.blank = nn.Parameter(torch.zeros(d_model))

    def forward(self, h: Tensor, mask: Tensor, table: Tensor) -> Tensor:
        table = table.to(h.dtype)
        classes = torch.cat([self.blank[None].to(h.dtype), table])
        logits = 2 * h @ classes.T - (classes * classes).sum(-1)
        return logits / self.temperature


def best_path(logits: Tensor, mask: Tensor) -> list[list[int]]:
    """Greedy CTC decoding of frame logits [b, T, C] (blank = class 0) with a frame mask [b, T]:
    per row, the best class of each frame, repeats merged and blanks dropped (classes >= 1)."""
    best = logits.argmax(-1)
    out = []
    for row, n in zip(best.tolist(), mask.sum(1).tolist()):
        out.append([c for j, c in enumerate(row[:n]) if c != BLANK and (j == 0 or c != row[j - 1])])
    return out


def token_runs(logits: Tensor, mask: Tensor, table: Tensor) -> tuple[Tensor, Tensor]:
    """Best-path runs of TokenHead logits [b, m, 1 + V] -> (embeddings [K, d] of all runs, in
    row-major order; runs per row [b]).

    A run is a stretch of consecutive outputs whose best class is the same token; outputs whose
    best class is blank are dropped and end a run. A run's embedding is its outputs' mean
    distribution over the tokens (blank left out) times the table: the token's own embedding
    when the head is sure, a blend of the candidates when it is not, and differentiable."""
    best = logits.argmax(-1)
    keep = (best != BLANK) & mask
    before = F.pad(best[:, :-1], (1, 0), value=BLANK)
    kept_before = F.pad(keep[:, :-1], (1, 0), value=False)
    starts = keep & ~(kept_before & (before == best))
    run_of = torch.cumsum(starts.flatten(), 0)[keep.flatten()] - 1  # run index of each kept output
    n_runs = int(starts.sum())
    probs = logits[keep][:, 1:].float().softmax(-1)  # [kept, V]
    mixed = probs.to(table.dtype) @ table
    sums = mixed.new_zeros(n_runs, table.shape[1]).index_add(0, run_of, mixed)
    sizes = torch.bincount(run_of, minlength=n_runs).clamp(min=1)
    return sums / sizes[:, None].to(sums.dtype), starts.sum(1)


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
        self.tokens = TokenHead(d_model) if a.tokens else None

    def forward(self, states: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """states [b, L, d_enc], mask [b, L] -> [b, ceil(L / stride), d_model], mask."""
        x = self.conv((states * mask[..., None]).transpose(1, 2)).transpose(1, 2)
        lengths = -(-mask.sum(1) // self.stride)
        out_mask = length_mask(lengths, x.shape[1])
        x = x + self.attn(self.attn_norm(x), out_mask)
        x = x + self.mlp(self.mlp_norm(x))
        return self.proj(self.norm(x)) * out_mask[..., None], out_mask

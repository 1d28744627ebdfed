"""New placeholder tokens (<|image|>, ...) with trainable embeddings beside a frozen table."""
from __future__ import annotations

import torch
from torch import Tensor, nn


class MediaTokenEmbedding(nn.Module):
    """Embeds token ids with the decoder's (frozen, unchanged) table, except the new ids,
    which get rows of a small trainable table of their own.

    Shapes: ids [b, s] -> [b, s, d].
    """

    def __init__(self, new_ids: list[int], init: Tensor) -> None:
        super().__init__()
        self.register_buffer("new_ids", torch.tensor(new_ids, dtype=torch.long), persistent=False)
        self.weight = nn.Parameter(init.detach().clone().expand(len(new_ids), -1).contiguous())

    def forward(self, ids: Tensor, table: nn.Embedding) -> Tensor:
        match = ids[..., None] == self.new_ids  # [b, s, n_new]
        embeds = table(ids.clamp(max=table.num_embeddings - 1))
        if not bool(match.any()):
            return embeds
        new = match.to(self.weight.dtype) @ self.weight
        return torch.where(match.any(-1, keepdim=True), new, embeds)

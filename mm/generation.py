"""Token selection and incremental detokenisation for the decode loop."""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Sampler:
    """Greedy when temperature == 0; otherwise temperature, top-k and nucleus (top-p) sampling."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError(f"bad sampling settings: {self}")
        self._generator: torch.Generator | None = None

    def bind(self, inputs) -> "Sampler":
        """The sampler for one decode of these DecoderInputs: itself (a sampler that reads the
        media, such as speech.ctc_prefix.JointSampler, starts from them here)."""
        return self

    def __call__(self, logits: Tensor) -> Tensor:
        """logits [b, vocab] -> token ids [b]."""
        if self.temperature == 0:
            return logits.argmax(-1)
        logits = logits.float() / self.temperature
        if self.top_k:
            kth = logits.topk(min(self.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p < 1:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            cumulative = sorted_logits.softmax(-1).cumsum(-1)
            # drop a token when the ones ranked above it already hold top_p of the mass
            drop = cumulative - sorted_logits.softmax(-1) >= self.top_p
            logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
        if self._generator is None:
            self._generator = torch.Generator(device=logits.device)
            self._generator.manual_seed(self.seed if self.seed is not None else torch.seed())
        return torch.multinomial(logits.softmax(-1), 1, generator=self._generator).squeeze(-1)


def incremental_text(tokenizer, tokens: Iterable[int]) -> Iterator[str]:
    """Yield the text each new token adds, holding back pieces that end mid-character."""
    ids: list[int] = []
    emitted = ""
    for token in tokens:
        ids.append(token)
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            continue
        if len(text) > len(emitted):
            yield text[len(emitted):]
        emitted = text
    final = tokenizer.decode(ids, skip_special_tokens=True)  # whatever was held back
    if len(final) > len(emitted):
        yield final[len(emitted):]

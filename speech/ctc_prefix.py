"""Joint CTC / decoder transcription: the decoder picks each next token of a transcript with the
adapter's token head (CTC over the decoder's own tokens) holding it to what was said.

The decoder alone may rewrite, drop or repeat words (a frozen chat model "repeating after" its
input is a weak copier); the token head alone has no language model. Hybrid CTC/attention
decoding (Watanabe et al., 2017) scores a candidate next token c of a prefix g by

    (1 - w) * log p_decoder(c | g) + w * (log psi(g + c) - log psi(g))

where psi(h) is the CTC prefix probability: the total probability of the frame paths whose
labelling starts with h. Ending the transcript (an end-of-turn token) scores the CTC probability
of g being everything that was said, log p_ctc(g) - log psi(g): a transcript that stops before
the speech did, or runs past it, scores badly. Here the search is greedy (one hypothesis per
row); the candidates of a step are the decoder's top k tokens, the tokens the head's best path
reads anywhere in the recording, and the end-of-turn tokens.

The prefix probabilities are kept per row as forward variables over the recording's outputs:
r_n[t] (paths over outputs 0..t whose labelling is g, ending in a non-blank) and r_b[t] (ending
in a blank); each step extends them by the chosen token in O(outputs x candidates).
"""
from __future__ import annotations

import torch
from torch import Tensor

from speech.adapter import BLANK, best_path

NEG = float("-inf")


class CTCPrefixScorer:
    """CTC prefix scores of one greedy hypothesis per row.

    log_probs [b, T, 1 + V]: the token head's log-probabilities (blank = class 0, class i + 1 is
    decoder token i); lengths [b]: valid outputs per row (at least 1)."""

    def __init__(self, log_probs: Tensor, lengths: Tensor) -> None:
        self.x = log_probs.float()
        b, T, _ = self.x.shape
        self.lengths = lengths.to(self.x.device).clamp(min=1)
        self.live = torch.arange(T, device=self.x.device)[None] < self.lengths[:, None]  # [b, T]
        self.x_blank = self.x[..., BLANK].masked_fill(~self.live, 0.0)  # [b, T]
        self.r_b = self.x_blank.cumsum(1)  # empty prefix: only blanks so far
        self.r_n = torch.full_like(self.r_b, NEG)
        self.psi = torch.zeros(b, device=self.x.device)  # log psi(empty) = log 1
        self.last = torch.full((b,), -1, dtype=torch.long, device=self.x.device)  # no token yet

    def full(self) -> Tensor:
        """log p_ctc(g) [b]: the probability that each row's prefix is the whole labelling."""
        end = (self.lengths - 1)[:, None]
        return torch.logaddexp(self.r_n.gather(1, end), self.r_b.gather(1, end)).squeeze(1)

    def extend(self, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Candidate decoder tokens [b, k] -> (log psi(g + c) [b, k], r_n, r_b [b, k, T]) of each
        row's prefix g extended by each candidate."""
        b, T, _ = self.x.shape
        x_c = self.x.gather(2, (tokens + 1)[:, None, :].expand(b, T, tokens.shape[1]))  # [b, T, k]
        x_c = x_c.masked_fill(~self.live[..., None], 0.0)
        # paths into c at t may leave g at t-1 by a blank, or by g's last label only if c differs
        g_any = torch.logaddexp(self.r_n, self.r_b)[..., None]  # [b, T, 1]
        phi = torch.where((tokens == self.last[:, None])[:, None, :], self.r_b[..., None], g_any)
        r_n = torch.full_like(x_c, NEG)
        r_b = torch.full_like(x_c, NEG)
        empty = (self.last < 0)[:, None]
        r_n[:, 0] = torch.where(empty, x_c[:, 0], torch.full_like(x_c[:, 0], NEG))
        psi = r_n[:, 0].clone()
        for t in range(1, T):
            live = self.live[:, t, None]
            n = torch.logaddexp(r_n[:, t - 1], phi[:, t - 1]) + x_c[:, t]
            r_n[:, t] = torch.where(live, n, r_n[:, t - 1])
            r_b[:, t] = torch.where(live, torch.logaddexp(r_b[:, t - 1], r_n[:, t - 1]) + self.x_blank[:, t, None],
                                    r_b[:, t - 1])
            psi = torch.where(live, torch.logaddexp(psi, phi[:, t - 1] + x_c[:, t]), psi)
        return psi, r_n.transpose(1, 2), r_b.transpose(1, 2)

    def advance(self, tokens: Tensor, r_n: Tensor, r_b: Tensor, psi: Tensor) -> None:
        """Make each row's prefix g + tokens[row] (its forward variables from `extend`)."""
        self.r_n, self.r_b, self.psi, self.last = r_n, r_b, psi, tokens


class JointSampler:
    """Greedy next-token choice of the decoder held to the CTC prefix scores of the adapter's
    token head (module docstring); a drop-in for `mm.generation.Sampler` in the decode loop.

    weight: w, the CTC share of the score (0: the decoder alone, 1: the head alone);
    candidates: how many of the decoder's likeliest tokens are scored each step, beside the
    tokens the head's best path reads in the row's recording."""

    def __init__(self, stop: list[int], weight: float = 0.5, candidates: int = 8) -> None:
        if not 0 <= weight <= 1:
            raise ValueError(f"CTC weight {weight} is not in [0, 1]")
        if candidates < 1 or not stop:
            raise ValueError("joint decoding needs at least one candidate and one end-of-turn token")
        self.weight, self.k, self.stop_ids = weight, candidates, list(stop)
        self.scorer: CTCPrefixScorer | None = None

    def bind(self, inputs) -> "JointSampler":
        """Take the token head's logits of the decoder inputs (one recording per row, in row
        order) and start every row's prefix empty."""
        if inputs.token_logits is None:
            raise ValueError("joint CTC decoding needs speech spliced into the input with speech.adapter.tokens")
        logits, valid = inputs.token_logits
        if logits.shape[0] != inputs.ids.shape[0]:
            raise ValueError(f"joint CTC decoding needs one recording per row, got {logits.shape[0]} "
                             f"for {inputs.ids.shape[0]} rows")
        self.scorer = CTCPrefixScorer(logits.float().log_softmax(-1), valid.sum(1))
        self.stop = torch.tensor(self.stop_ids, dtype=torch.long, device=logits.device)
        paths = best_path(logits, valid)
        width = max(1, max(len(p) for p in paths))
        # rows hear fewer tokens than the widest: padded with an end-of-turn token, never a candidate
        self.heard = torch.tensor([[c - 1 for c in p] + [self.stop_ids[0]] * (width - len(p)) for p in paths],
                                  dtype=torch.long, device=logits.device)
        return self

    def __call__(self, logits: Tensor) -> Tensor:
        """logits [b, vocab] of the decoder -> the chosen tokens [b]; each row's prefix moves on."""
        if self.scorer is None:
            raise RuntimeError("JointSampler.bind(inputs) first")
        log_p = logits.float().log_softmax(-1)
        rows = torch.arange(log_p.shape[0], device=log_p.device)
        top = log_p.topk(min(self.k, log_p.shape[-1]), dim=-1).indices
        tokens = torch.cat([top, self.heard], 1)
        psi, r_n, r_b = self.scorer.extend(tokens)
        score = (1 - self.weight) * log_p.gather(1, tokens) + self.weight * (psi - self.scorer.psi[:, None])
        score = score.masked_fill(torch.isin(tokens, self.stop), NEG)
        best = score.argmax(1)
        stop_log_p = log_p[:, self.stop]
        ending = (1 - self.weight) * stop_log_p.logsumexp(-1) + self.weight * (self.scorer.full() - self.scorer.psi)
        end = ending > score[rows, best]
        chosen = torch.where(end, self.stop[stop_log_p.argmax(-1)], tokens[rows, best])
        self.scorer.advance(tokens[rows, best], r_n[rows, best], r_b[rows, best], psi[rows, best])
        return chosen

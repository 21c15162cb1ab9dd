"""PromptLookup: draft by copying what followed an earlier occurrence of the recent n-gram.

Matches the last n committed tokens (n from ``max_ngram`` down to ``min_ngram``) against the
prompt plus everything generated so far, and proposes the tokens that followed the match. The
search is vectorised over rows and positions, so it runs on the target's device with no host
sync. It needs no model and produces no probabilities (point-mass drafts).
"""
from __future__ import annotations

import torch

from specdec.verifiers.acceptance import StepOutcome
from specdec.verifiers.tree import DraftTree

from .base import DecodeContext


class PromptLookup:
    """Example: ``PromptLookup(num_tokens=8, max_ngram=3)`` copies up to 8 tokens per step."""

    def __init__(self, num_tokens: int = 8, max_ngram: int = 3, min_ngram: int = 1):
        if num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got min_ngram={min_ngram}, max_ngram={max_ngram}")
        self.num_tokens = num_tokens
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram

    @property
    def num_nodes(self) -> int:
        return self.num_tokens

    def begin(self, ctx: DecodeContext) -> None:
        pass

    def observe(self, outcome: StepOutcome) -> None:
        pass

    def propose(self, ctx: DecodeContext) -> DraftTree:
        tokens = ctx.tokens[:, : ctx.max_seq_len]  # [B, L]
        b, length = tokens.shape
        k = self.num_tokens
        dev = tokens.device
        seq, start = ctx.seq_len, ctx.start
        cont = torch.full((b,), -1, dtype=torch.long, device=dev)  # continuation start per row
        for n in range(self.max_ngram, self.min_ngram - 1, -1):
            if length < n + 1:
                continue
            suffix = tokens.gather(1, (seq - n).clamp(min=0).unsqueeze(1) + torch.arange(n, device=dev))
            windows = tokens.unfold(1, n, 1)  # [B, L - n + 1, n]
            w = torch.arange(windows.shape[1], device=dev).unsqueeze(0)  # window start
            match = (windows == suffix.unsqueeze(1)).all(dim=-1)
            match &= (w >= start.unsqueeze(1)) & (w + n < seq.unsqueeze(1))  # real, with a continuation
            match &= (seq - n >= start).unsqueeze(1)  # the suffix itself is real text
            # Prefer the most recent match that still has k tokens after it, else the most recent.
            full = (w + n + k <= seq.unsqueeze(1)).long() * length
            score = torch.where(match, w + full, torch.full_like(w, -1))
            best_score, best = score.max(dim=1)
            take = (cont < 0) & (best_score >= 0)
            cont = torch.where(take, best + n, cont)
        idx = cont.unsqueeze(1) + torch.arange(k, device=dev)
        valid = (cont >= 0).unsqueeze(1) & (idx < seq.unsqueeze(1))
        draft = tokens.gather(1, idx.clamp(min=0, max=length - 1))
        return DraftTree.chain(draft, valid)

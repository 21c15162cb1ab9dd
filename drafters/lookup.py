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
    """Example: ``PromptLookup(num_tokens=8, max_ngram=3)`` copies up to 8 tokens per step.

    With ``num_branches`` > 1 the best distinct matches become sibling branches of a tree
    (``num_tokens`` each), so the target can take whichever continuation is right.
    """

    graph_safe = True  # propose() is static-shape device work: it can run inside a captured chunk
    stateless = True  # keeps nothing between steps: a combining drafter may skip calling it

    def __init__(self, num_tokens: int = 8, max_ngram: int = 3, min_ngram: int = 1, num_branches: int = 1):
        if num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got min_ngram={min_ngram}, max_ngram={max_ngram}")
        if num_branches < 1:
            raise ValueError(f"num_branches must be >= 1, got {num_branches}")
        self.num_tokens = num_tokens
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram
        self.num_branches = num_branches

    @property
    def num_nodes(self) -> int:
        return self.num_tokens * self.num_branches

    def begin(self, ctx: DecodeContext) -> None:
        pass

    def observe(self, outcome: StepOutcome) -> None:
        pass

    def propose(self, ctx: DecodeContext) -> DraftTree:
        tokens = ctx.tokens[:, : ctx.max_seq_len]  # [B, L]
        b, length = tokens.shape
        k, m = self.num_tokens, self.num_branches
        dev = tokens.device
        seq, start = ctx.seq_len, ctx.start
        scores, conts = [], []
        for n in range(self.max_ngram, self.min_ngram - 1, -1):
            if length < n + 1:
                continue
            suffix = tokens.gather(1, (seq - n).clamp(min=0).unsqueeze(1) + torch.arange(n, device=dev))
            windows = tokens.unfold(1, n, 1)  # [B, L - n + 1, n]
            w = torch.arange(windows.shape[1], device=dev).unsqueeze(0)  # window start
            match = (windows == suffix.unsqueeze(1)).all(dim=-1)
            match &= (w >= start.unsqueeze(1)) & (w + n < seq.unsqueeze(1))  # real, with a continuation
            match &= (seq - n >= start).unsqueeze(1)  # the suffix itself is real text
            # Rank: longer n-gram first, then matches with k tokens after them, then the most recent.
            full = (w + n + k <= seq.unsqueeze(1)).long()
            score = (n * 2 + full) * length + w
            scores.append(torch.where(match, score, torch.full_like(score, -1)))
            conts.append((w + n).expand(b, -1))
        if not scores:
            return DraftTree.branches(torch.zeros(b, m, k, dtype=torch.long, device=dev),
                                      torch.zeros(b, m, k, dtype=torch.bool, device=dev))
        score, cont = torch.cat(scores, dim=1), torch.cat(conts, dim=1)
        top, pick = score.topk(min(m, score.shape[1]), dim=1)
        cont = torch.where(top >= 0, cont.gather(1, pick), torch.full_like(pick, -1))  # [B, M']
        if cont.shape[1] < m:
            cont = torch.cat([cont, torch.full((b, m - cont.shape[1]), -1, dtype=torch.long, device=dev)], dim=1)
        # Two n-grams can point at the same continuation; keep the first copy only.
        same = (cont.unsqueeze(2) == cont.unsqueeze(1)).tril(diagonal=-1).any(dim=2)
        cont = torch.where(same, torch.full_like(cont, -1), cont)
        idx = cont.unsqueeze(2) + torch.arange(k, device=dev)  # [B, M, K]
        valid = (cont >= 0).unsqueeze(2) & (idx < seq.view(b, 1, 1))
        draft = tokens.gather(1, idx.clamp(min=0, max=length - 1).view(b, m * k)).view(b, m, k)
        return DraftTree.branches(draft, valid)

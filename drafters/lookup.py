"""PromptLookup: draft by copying what followed an earlier occurrence of the recent n-gram.

Matches the last n committed tokens (n from ``max_ngram`` down to ``min_ngram``) against the
prompt plus everything generated so far, and proposes the tokens that followed the match. The
search is vectorised over rows and positions, so it runs on the target's device with no host
sync. It needs no model and produces no probabilities (point-mass drafts).
"""
from __future__ import annotations

import torch

from specdec.verifiers.tree import DraftTree

from .base import DecodeContext, DraftSpec, Drafter


class PromptLookup(Drafter):
    """Example: ``PromptLookup(num_tokens=8, max_ngram=3)`` copies up to 8 tokens per step.

    With ``num_branches`` > 1 the best distinct matches become sibling branches of a tree
    (``num_tokens`` each), so the target can take whichever continuation is right.
    """

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
        self.spec = DraftSpec(num_nodes=num_tokens * num_branches)  # device work only, no forwards
        self._match_fn = None  # compile()'s compiled _match; None: _match itself (no bound-method cycle)

    @property
    def num_nodes(self) -> int:
        return self.spec.num_nodes

    def propose(self, ctx: DecodeContext) -> DraftTree:
        """One pass over the buffer for every n-gram length at once (a few dozen kernels: inside a
        captured step on the GPU each one is a launch).

        For each end position e of an earlier occurrence, ``run`` counts how many of the last
        ``max_ngram`` committed tokens match going backwards from e; the match length at e is that
        count, capped so the occurrence and the suffix stay inside the row's real text. Ranking:
        longer match first, then a match with ``num_tokens`` tokens after it, then the most
        recent. Each end position proposes its own continuation, so branches never repeat one."""
        return self._tree(self._match_fn or self._match, ctx)

    def compile(self, options: dict | None) -> None:
        """Put the match under ``torch.compile`` (Inductor fuses its few dozen ops into a handful of
        kernels). With compile on, the engine's cache view is fixed, so it compiles once."""
        from specdec.step import compiled

        if self._match_fn is None:
            self._match_fn = compiled(self._match, options or True)

    @staticmethod
    def _tree(match, ctx: DecodeContext) -> DraftTree:
        draft, valid = match(ctx.tokens[:, : ctx.max_seq_len], ctx.seq_len, ctx.start)
        return DraftTree.branches(draft, valid)

    def _match(self, tokens: torch.Tensor, seq_len: torch.Tensor, start: torch.Tensor):
        """``[B, L]`` committed tokens -> drafts ``[B, M, K]`` and their validity."""
        b, length = tokens.shape
        k, m, top_n = self.num_tokens, self.num_branches, self.max_ngram
        dev = tokens.device
        seq, start = seq_len.unsqueeze(1), start.unsqueeze(1)  # [B, 1]
        # suffix[:, i]: the committed token i places before the newest (i = 0 is the newest).
        suffix = tokens.gather(1, (seq - 1 - torch.arange(top_n, device=dev)).clamp(min=0))  # [B, N]
        # back[:, e, i]: the token i places before e (-1 before the buffer), newest first.
        back = torch.nn.functional.pad(tokens, (top_n - 1, 0), value=-1).unfold(1, top_n, 1).flip(-1)  # [B, L, N]
        run = (back == suffix.unsqueeze(1)).long().cumprod(dim=-1).sum(dim=-1)  # [B, L] matched length at e
        after = torch.arange(1, length + 1, device=dev).unsqueeze(0)  # [1, L] the slot after each end e
        # The occurrence starts at or after the row's first real token, as does the suffix itself.
        n = torch.minimum(torch.minimum(run, after - start), (seq - start).clamp(max=length - 1))
        ok = (n >= self.min_ngram) & (after < seq)  # a real match with at least one token after it
        full = after <= seq - k  # bool: k tokens follow the match
        score = torch.where(ok, (2 * n + full) * length + (after - n), -1)
        top, pick = score.topk(min(m, length), dim=1)
        cont = torch.where(top >= 0, pick + 1, -1)  # [B, M'] where each chosen copy starts
        if cont.shape[1] < m:
            cont = torch.cat([cont, torch.full((b, m - cont.shape[1]), -1, dtype=torch.long, device=dev)], dim=1)
        idx = cont.unsqueeze(2) + torch.arange(k, device=dev)  # [B, M, K]
        valid = (cont >= 0).unsqueeze(2) & (idx < seq.view(b, 1, 1))
        draft = tokens.gather(1, idx.clamp(min=0, max=length - 1).view(b, m * k)).view(b, m, k)
        return draft, valid

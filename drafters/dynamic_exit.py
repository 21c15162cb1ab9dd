"""DynamicExit: DEL's context-aware choice of exit layer and draft length, every step.

After DEL (Zarch et al., "DEL: Context-Aware Dynamic Exit Layer for Efficient Self-Speculative
Decoding", 2025). The draft is an early exit of the target (``LayerSkip``); which exit, and how
many tokens to draft, is decided per step from how well each exit would have done recently.

- **Shadow tokens.** The verification step already runs every layer over the root and the
  draft nodes; the engine hands the hidden states after each candidate exit to ``observe``.
  Pushing those through the final norm and LM head gives, for every exit E and every position
  on the accepted path, the token an exit-E draft would have proposed there. Comparing with the
  tokens the target actually emitted gives a per-exit acceptance rate α_E, kept as a decayed
  running ratio, with no extra model forward (only LM-head passes, every ``shadow_every``-th
  step).
- **Choice.** With per-token acceptance α, a γ-token chain yields on average
  ``(1 - α^(γ+1)) / (1 - α)`` tokens per step and costs ``γ·E + L`` layer forwards (γ drafts
  through E layers, one verification through all L). DEL's *tokens per layer*,
  ``TPL(E, γ) = tokens / layers``, is maximised over the candidate exits and γ = 0..num_tokens;
  γ = 0 (no draft) wins when no exit pays for itself, and the shadows keep updating meanwhile.
- Confidence-based stopping inside a draft is ``LayerSkip``'s ``stop_threshold``.
"""
from __future__ import annotations

from typing import Sequence

import torch

from specdec.verifiers.acceptance import StepOutcome
from specdec.verifiers.tree import DraftTree

from .base import DecodeContext, DraftSpec
from .layerskip import LayerSkip


class DynamicExit(LayerSkip):
    """Example::

        drafter = DynamicExit(num_tokens=6)            # candidate exits: every L // 8 layers
        spec = specdec.wrap(model, drafter=drafter)
        spec.generate(...)
        drafter.alpha()                                # {exit layer: running acceptance}
        drafter.choices                                # (exit, γ) chosen at each step
    """

    def __init__(self, num_tokens: int = 6, exit_layers: Sequence[int] | None = None, decay: float = 0.9,
                 stop_threshold: float | None = None, prior_weight: float = 2.0, shadow_every: int = 2):
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"decay must be in (0, 1], got {decay}")
        super().__init__(exit_layer=1, num_tokens=num_tokens, stop_threshold=stop_threshold)
        self.requested_exits = list(exit_layers) if exit_layers is not None else None
        if shadow_every < 1:
            raise ValueError(f"shadow_every must be >= 1, got {shadow_every}")
        self.decay, self.prior_weight, self.shadow_every = decay, prior_weight, shadow_every
        self.exit_points: list[int] = []
        self.choices: list[tuple[int, int]] = []

    def bind(self, target) -> None:
        n = target.num_layers
        exits = self.requested_exits or list(range(max(1, n // 8), n, max(1, n // 8)))
        bad = [e for e in exits if not 1 <= e < n]
        if bad or not exits:
            raise ValueError(f"exit_layers must lie in 1..{n - 1} for this {n}-layer target, got {exits}")
        super().bind(target)
        self.exit_points = sorted(set(exits))
        # The choice of exit and length is made on the host every step: one step per sync. The
        # verification exports the hidden states after every candidate exit (the shadow tokens).
        self.spec = DraftSpec(num_nodes=self.num_tokens, device_only=False, hidden_layers=tuple(self.exit_points),
                              forwards_per_step=self.num_tokens)
        # Prior: acceptance grows with depth, as if each exit had been seen prior_weight times.
        self.hits = [self.prior_weight * e / n for e in self.exit_points]
        self.seen = [self.prior_weight] * len(self.exit_points)

    def begin(self, ctx: DecodeContext) -> None:
        super().begin(ctx)
        self.choices = []

    def alpha(self) -> dict[int, float]:
        return {e: h / s if s > 0 else 0.0 for e, h, s in zip(self.exit_points, self.hits, self.seen)}

    def choose(self) -> tuple[int, int]:
        """``(exit, γ)`` maximising tokens per layer forward; γ = 0 means no draft this step."""
        n = self.runner.num_layers
        best, pick = 1.0 / n, (self.exit_points[0], 0)
        for e, a in self.alpha().items():
            a = min(a, 0.999)
            for gamma in range(1, self.num_tokens + 1):
                tpl = (1.0 - a ** (gamma + 1)) / (1.0 - a) / (gamma * e + n)
                if tpl > best:
                    best, pick = tpl, (e, gamma)
        return pick

    def propose(self, ctx: DecodeContext) -> DraftTree:
        exit_layer, gamma = self.choose()
        self.exit_layer = exit_layer
        self.choices.append((exit_layer, gamma))
        return self.draft_chain(ctx, list(range(exit_layer)), gamma)

    @torch.no_grad()
    def observe(self, ctx: DecodeContext, outcome: StepOutcome) -> None:
        """Update each exit's acceptance from its shadow tokens on this step's accepted path.
        Shadows cost one LM-head pass per candidate exit and accepted token: every
        ``shadow_every``-th step only."""
        hidden = ctx.hidden  # [E, B, N + 1, H]
        if hidden is None or (len(self.choices) - 1) % self.shadow_every:
            return
        e, b, q, h = hidden.shape
        emitted, count = outcome.emitted()  # [B, N + 1]: accepted tokens then the next root
        pos = torch.cat([torch.zeros(b, 1, dtype=torch.long, device=hidden.device), 1 + outcome.path.clamp(min=0)],
                        dim=1)[:, :q]  # Q index whose prediction each emitted token is
        on_path = torch.arange(q, device=hidden.device).unsqueeze(0) < count.unsqueeze(1)  # [B, Q]
        picked = hidden.gather(2, pos.view(1, b, q, 1).expand(e, b, q, h))
        shadow = self.runner.head(picked).argmax(dim=-1)  # [E, B, Q]
        hits = ((shadow == emitted[:, :q].unsqueeze(0)) & on_path).sum(dim=(1, 2))
        total = float(on_path.sum())
        for i, hit in enumerate(hits.tolist()):
            self.hits[i] = self.decay * self.hits[i] + hit
            self.seen[i] = self.decay * self.seen[i] + total

"""Acceptance rules: given the target's logits over a verified DraftTree, decide what to keep.

Glossary (one decoding step, per row):

- **root**: the last committed token; its logits give the target's distribution for the
  children of the root.
- **accepted tokens**: draft nodes on one root-to-node path that the rule keeps.
- **bonus token**: drawn from the target's distribution after a path that was accepted to its
  end, so every step emits at least one token.
- **recovered token**: drawn after a rejection from the residual distribution
  ``norm(max(0, p - q))`` (Leviathan et al. 2023, "Fast Inference from Transformers via
  Speculative Decoding", Algorithm 1). Bonus and recovered tokens both become the next root.

Logit indexing used throughout: ``logits[:, 0]`` is the target's prediction at the root, and
``logits[:, 1 + i]`` its prediction after draft node i. The distribution a node is judged by
is therefore ``logits[:, 1 + parents[i]]``.

Rules here are lossless: greedy decoding reproduces plain greedy decoding token for token, and
speculative sampling leaves the target's sampling distribution unchanged. Nothing here knows
about models or caches.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .tree import DraftTree


@dataclass(frozen=True)
class SamplingParams:
    """How the target's logits become a distribution; applied identically to p and q."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        if self.do_sample and not self.temperature > 0:
            raise ValueError(
                f"temperature must be > 0 when do_sample=True (got {self.temperature}); "
                "use do_sample=False for greedy decoding"
            )
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")


def warp_probs(logits: Tensor, params: SamplingParams) -> Tensor:
    """Temperature, then top-k, then top-p (HF's order), then softmax. ``logits`` is ``[..., V]``."""
    x = logits.float() / params.temperature
    if params.top_k is not None and 0 < params.top_k < x.shape[-1]:
        kth = x.topk(params.top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if params.top_p is not None and params.top_p < 1.0:
        sorted_x, order = x.sort(dim=-1, descending=False)
        cum = sorted_x.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cum <= (1.0 - params.top_p)
        drop_sorted[..., -1] = False  # always keep the most likely token
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        x = x.masked_fill(drop, float("-inf"))
    return x.softmax(dim=-1)


def sample(probs: Tensor) -> Tensor:
    """Draw one index per distribution over the last dim, without a host sync.

    Uses the exponential race: argmax(p / E) with E ~ Exp(1) picks i with probability p_i.
    """
    race = torch.empty_like(probs).exponential_(1.0)
    return (probs / race).argmax(dim=-1)


@dataclass
class StepOutcome:
    """What one verification step keeps, per row."""

    tree: DraftTree
    accept_len: Tensor  # [B] number of accepted draft nodes
    path: Tensor  # [B, N] accepted node indices ordered by depth, -1 padded
    next_token: Tensor  # [B] bonus or recovered token: the next root
    accepted_host: list[int] | None = None  # accept_len of the rows still generating, filled in by the engine

    def emitted(self) -> tuple[Tensor, Tensor]:
        """``(tokens [B, N + 1], count [B])``: accepted tokens, then the next root token."""
        tok = self.tree.tokens.gather(1, self.path.clamp(min=0)) if self.path.shape[1] else self.path
        tok = torch.cat([tok, self.next_token.unsqueeze(1)], dim=1)
        pos = torch.arange(tok.shape[1], device=tok.device).unsqueeze(0)
        # The next token goes right after the last accepted one.
        tok = torch.where(pos == self.accept_len.unsqueeze(1), self.next_token.unsqueeze(1), tok)
        return tok, self.accept_len + 1


def _deepest(tree: DraftTree, accepted: Tensor) -> tuple[Tensor, Tensor]:
    """Deepest accepted node per row (ties: lowest index) -> (node [B] or -1, depth [B])."""
    score = torch.where(accepted, tree.depth, torch.zeros_like(tree.depth))
    if score.shape[1] == 0:
        zero = torch.zeros(score.shape[0], dtype=torch.long, device=score.device)
        return zero - 1, zero
    depth, node = score.max(dim=1)
    return torch.where(depth > 0, node, torch.full_like(node, -1)), depth


class GreedyAcceptance:
    """Keep the longest root path whose every token is the target's argmax at its parent."""

    name = "greedy"
    lossless = True

    def accept(self, logits: Tensor, tree: DraftTree, params: SamplingParams) -> StepOutcome:
        pred = logits.argmax(dim=-1)  # [B, 1 + N]
        ok = tree.valid & (tree.tokens == pred.gather(1, tree.parents + 1))
        # A node survives when it and all its ancestors match.
        accepted = ~(tree.ancestors & ~ok.unsqueeze(1)).any(dim=-1)
        node, depth = _deepest(tree, accepted)
        next_token = pred.gather(1, (node + 1).unsqueeze(1)).squeeze(1)
        return StepOutcome(tree, depth, tree.path_to(node, tree.num_nodes), next_token)


class SpeculativeSampling:
    """Lossless speculative sampling over a chain (Leviathan et al. 2023).

    For draft token x drawn from q: accept with probability min(1, p(x) / q(x)); at the first
    rejection draw the recovered token from norm(max(0, p - q)); if every node is accepted draw
    the bonus token from p. A drafter without q is a point mass (q(x) = 1): x is kept with
    probability p(x), and the residual is p with x removed.
    """

    name = "speculative"
    lossless = True

    def accept(self, logits: Tensor, tree: DraftTree, params: SamplingParams) -> StepOutcome:
        b, n = tree.tokens.shape
        p = warp_probs(logits, params)  # [B, 1 + N, V]
        if n == 0:
            node = torch.full((b,), -1, dtype=torch.long, device=logits.device)
            return StepOutcome(tree, node + 1, tree.path_to(node, 0), sample(p[:, 0]))
        chain = torch.arange(n, device=tree.parents.device) - 1
        if not bool((tree.parents == chain).all()):
            raise NotImplementedError(
                "SpeculativeSampling handles chains; use TreeSpeculativeSampling for branching trees"
            )
        tok = tree.tokens.unsqueeze(-1)
        px = p[:, :n].gather(2, tok).squeeze(-1)  # p(x_i | prefix), [B, N]
        qx = tree.q.gather(2, tok).squeeze(-1) if tree.q is not None else torch.ones_like(px)
        u = torch.rand_like(px)
        ok = tree.valid & (u * qx < px)
        a = ok.long().cumprod(dim=1).sum(dim=1)  # [B] accepted prefix length
        p_next = p.gather(1, a.view(b, 1, 1).expand(b, 1, p.shape[-1])).squeeze(1)  # [B, V]
        rejected = tree.valid.gather(1, a.clamp(max=n - 1).unsqueeze(1)).squeeze(1) & (a < n)
        rej = a.clamp(max=n - 1)
        if tree.q is not None:
            q_rej = tree.q.gather(1, rej.view(b, 1, 1).expand(b, 1, tree.q.shape[-1])).squeeze(1)
        else:
            q_rej = torch.zeros_like(p_next).scatter_(1, tree.tokens.gather(1, rej.unsqueeze(1)), 1.0)
        residual = (p_next - q_rej).clamp(min=0)
        mass = residual.sum(dim=1, keepdim=True)
        # mass == 0 only if p == q, where rejection has probability 0; fall back to p for safety.
        residual = torch.where(mass > 0, residual / mass.clamp(min=1e-30), p_next)
        dist = torch.where(rejected.unsqueeze(1), residual, p_next)
        node = a - 1
        return StepOutcome(tree, a, tree.path_to(node, n), sample(dist))


RULES = {"greedy": GreedyAcceptance, "speculative": SpeculativeSampling}


def make_acceptance(name: str):
    """Build an acceptance rule by name. Example: ``make_acceptance("greedy")``."""
    if name not in RULES:
        raise ValueError(f"unknown acceptance rule {name!r}; known rules: {sorted(RULES)}")
    return RULES[name]()

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

Lossless rules: ``greedy`` reproduces plain greedy decoding token for token, and ``speculative``
leaves the target's sampling distribution unchanged. Lossy rules, labelled ``lossless = False``
and reported so in ``spec_stats``: ``typical`` (Medusa) and ``relaxed`` (DistillSpec's lenience).
Nothing here knows about models or caches.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .processors import LogitsOptions
from .tree import DraftTree


@dataclass(frozen=True)
class SamplingParams:
    """How the target's logits become a distribution; applied identically to p and q."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    processors: LogitsOptions = LogitsOptions()  # applied to the logits first, at every position

    def __post_init__(self) -> None:
        if self.do_sample and not self.temperature > 0:
            raise ValueError(
                f"temperature must be > 0 when do_sample=True (got {self.temperature}); "
                "use do_sample=False for greedy decoding"
            )
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.min_p is not None and not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")


def warp_probs(logits: Tensor, params: SamplingParams) -> Tensor:
    """Temperature, then top-k, top-p and min-p (HF's order), then softmax. ``logits`` is ``[..., V]``."""
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
    if params.min_p:  # drop tokens less likely than min_p times the most likely one
        probs = x.softmax(dim=-1)
        x = x.masked_fill(probs < params.min_p * probs.amax(dim=-1, keepdim=True), float("-inf"))
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
    # [E, B, N + 1, H]: the target's hidden state after each of the drafter's ``collect_hidden`` layer counts at
    # the root and every node (filled in by the engine for drafters that ask for it).
    layer_hidden: Tensor | None = None

    def emitted(self) -> tuple[Tensor, Tensor]:
        """``(tokens [B, N + 1], count [B])``: accepted tokens, then the next root token."""
        tree = self.tree
        tok = tree.tokens.gather(1, self.path.clamp(min=0)) if self.path.shape[1] and not tree.is_chain else tree.tokens
        tok = torch.cat([tok, self.next_token.unsqueeze(1)], dim=1)  # a chain's accepted tokens are its first ones
        # The next token goes right after the last accepted one.
        tok.scatter_(1, self.accept_len.unsqueeze(1), self.next_token.unsqueeze(1))
        return tok, self.accept_len + 1


def _deepest(tree: DraftTree, accepted: Tensor) -> tuple[Tensor, Tensor]:
    """Deepest accepted node per row (ties: lowest index) -> (node [B] or -1, depth [B]).
    ``accepted`` must be closed under ancestors (a node is accepted only with its parent)."""
    if tree.num_nodes == 0:
        zero = torch.zeros(tree.batch, dtype=torch.long, device=accepted.device)
        return zero - 1, zero
    if tree.is_chain:  # the accepted nodes are a prefix
        depth = accepted.sum(dim=1)
        return depth - 1, depth
    depth, node = (accepted * tree.depth).max(dim=1)  # max returns the first index among ties
    return node.masked_fill(depth == 0, -1), depth


class GreedyAcceptance:
    """Keep the longest root path whose every token is the target's argmax at its parent."""

    name = "greedy"
    lossless = True

    def accept(self, logits: Tensor, tree: DraftTree, params: SamplingParams) -> StepOutcome:
        pred = logits.argmax(dim=-1)  # [B, 1 + N]
        ok = tree.valid & (tree.tokens == pred.gather(1, tree.parent_positions()))
        # A node survives when it and all its ancestors match (ancestor implies match).
        accepted = (tree.ancestors <= ok.unsqueeze(1)).all(dim=-1)
        node, depth = _deepest(tree, accepted)
        next_token = pred.gather(1, (node + 1).unsqueeze(1)).squeeze(1)
        return StepOutcome(tree, depth, tree.path_to(node, tree.num_nodes), next_token)


class SpeculativeSampling:
    """Lossless speculative sampling over a tree; on a chain it is Leviathan et al. (2023).

    Walk down from the root. At the current node, with target distribution p and the draft
    distribution q its children were drawn from, try the children in index order: keep child x
    with probability min(1, p(x) / q(x)). After a rejection the target becomes the residual
    norm(max(0, p - q)) and, since siblings are drawn without replacement, the draft becomes q
    with x removed (recursive rejection sampling, as in SpecInfer and EAGLE). When no child is
    kept, the next token is drawn from the (residual) target; after a kept leaf it is the bonus
    token drawn from p.

    A drafter without q is a point mass at each sibling (q(x) = 1): x is kept with probability
    p(x), and the residual is p with x removed, so a duplicate sibling can never be kept twice.

    ``lenience`` < 1 turns this into the lossy "relaxed" rule of DistillSpec: accept with
    min(1, p(x) / (lenience * q(x))) and draw from norm(max(0, p - lenience * q)).
    """

    name = "speculative"

    def __init__(self, lenience: float = 1.0):
        if not 0.0 < lenience <= 1.0:
            raise ValueError(f"lenience must be in (0, 1], got {lenience}")
        self.lenience = lenience
        self.lossless = lenience == 1.0

    def accept(self, logits: Tensor, tree: DraftTree, params: SamplingParams) -> StepOutcome:
        b, n = tree.tokens.shape
        lam = self.lenience
        p_all = warp_probs(logits, params)  # [B, 1 + N, V]
        if tree.is_chain:  # (no draft: nothing to judge, no uniforms to draw)
            u = torch.rand(b, n, device=logits.device) if n else None
            depth, final = self._chain(p_all, tree, u)
            return StepOutcome(tree, depth, tree.path_to(depth - 1, n), sample(final))
        cur = torch.full((b,), -1, dtype=torch.long, device=logits.device)  # deepest kept node
        p_cur = p_all[:, 0]  # [B, V] target (residual) at cur
        q_cur = torch.zeros_like(p_cur) if tree.q is not None else None  # draft (residual) at cur
        fresh = torch.ones(b, dtype=torch.bool, device=logits.device)  # q_cur not loaded yet
        u = torch.rand(b, max(n, 1), device=logits.device)
        for i in range(n):
            x = tree.tokens[:, i : i + 1]
            live = tree.valid[:, i] & (tree.parents[:, i] == cur)  # a child of the current node
            px = p_cur.gather(1, x).squeeze(1)
            if q_cur is not None:
                q_cur = torch.where((fresh & live).unsqueeze(1), tree.q[:, i], q_cur)
                fresh = fresh & ~live
                qx = q_cur.gather(1, x).squeeze(1)
                residual = (p_cur - lam * q_cur).clamp(min=0)
                q_next = q_cur.scatter(1, x, 0.0)
                q_next = q_next / q_next.sum(dim=1, keepdim=True).clamp(min=1e-30)
            else:
                qx = torch.ones_like(px)
                residual = p_cur.scatter(1, x, (px - lam).clamp(min=0).unsqueeze(1))
            kept = live & (u[:, i] * lam * qx < px)
            rejected = live & ~kept
            mass = residual.sum(dim=1, keepdim=True)
            # Zero residual mass means p <= lenience * q everywhere, where rejection has probability 0.
            residual = torch.where(mass > 0, residual / mass.clamp(min=1e-30), p_cur)
            p_cur = torch.where(rejected.unsqueeze(1), residual, p_cur)
            if q_cur is not None:
                q_cur = torch.where(rejected.unsqueeze(1), q_next, q_cur)
            cur = torch.where(kept, torch.full_like(cur, i), cur)
            p_cur = torch.where(kept.unsqueeze(1), p_all[:, i + 1], p_cur)
            fresh = fresh | kept
        depth = tree.depth.gather(1, cur.clamp(min=0).unsqueeze(1)).squeeze(1) if n else cur + 1
        depth = torch.where(cur >= 0, depth, torch.zeros_like(depth))
        return StepOutcome(tree, depth, tree.path_to(cur, n), sample(p_cur))


    def _chain(self, p_all: Tensor, tree: DraftTree, u: Tensor | None) -> tuple[Tensor, Tensor]:
        """The walk above on a chain, all nodes at once: node i is tried only when nodes 0 .. i - 1
        were kept, with the target ``p_all[:, i]`` as it stands (a rejection ends the chain), so
        the kept nodes are the prefix before the first rejection. Same draws ``u``, same result.
        Returns (kept depth [B], the distribution the next token is drawn from [B, V])."""
        b, n = tree.tokens.shape
        if n == 0:
            return torch.zeros(b, dtype=torch.long, device=p_all.device), p_all[:, 0]
        lam, x = self.lenience, tree.tokens.unsqueeze(-1)  # [B, N, 1]
        px = p_all[:, :n].gather(2, x).squeeze(-1)  # [B, N] target at each node's parent
        qx = tree.q.gather(2, x).squeeze(-1) if tree.q is not None else torch.ones_like(px)
        kept = tree.valid & (u * lam * qx < px)
        depth = kept.long().cumprod(dim=1).sum(dim=1)  # [B]
        at = depth.clamp(max=n - 1).unsqueeze(1)  # [B, 1] the rejected node, when there is one
        p_cur = p_all.gather(1, depth.view(b, 1, 1).expand(b, 1, p_all.shape[-1])).squeeze(1)  # [B, V]
        if tree.q is not None:
            q_at = tree.q.gather(1, at.unsqueeze(-1).expand(b, 1, tree.q.shape[-1])).squeeze(1)
            residual = (p_cur - lam * q_at).clamp(min=0)
        else:
            residual = p_cur.scatter(1, x.squeeze(-1).gather(1, at), (px.gather(1, at) - lam).clamp(min=0))
        mass = residual.sum(dim=1, keepdim=True)
        residual = torch.where(mass > 0, residual / mass.clamp(min=1e-30), p_cur)
        rejected = (depth < n) & tree.valid.gather(1, at).squeeze(1)
        return depth, torch.where(rejected.unsqueeze(1), residual, p_cur)


class RelaxedAcceptance(SpeculativeSampling):
    """Lossy: speculative sampling with a lenience factor (DistillSpec's lossy variant)."""

    name = "relaxed"

    def __init__(self, lenience: float = 0.5):
        super().__init__(lenience)
        self.lossless = False


class TypicalAcceptance:
    """Lossy: Medusa's typical acceptance. Keep node x when the target gives it probability above
    min(posterior_threshold, posterior_alpha * exp(-H(p))), H the entropy of the target at the
    parent; take the deepest such path. The next token is sampled from p (argmax when greedy)."""

    name = "typical"
    lossless = False

    def __init__(self, posterior_threshold: float = 0.09, posterior_alpha: float = 0.3):
        self.threshold = posterior_threshold
        self.alpha = posterior_alpha

    def accept(self, logits: Tensor, tree: DraftTree, params: SamplingParams) -> StepOutcome:
        p_all = warp_probs(logits, params) if params.do_sample else logits.float().softmax(dim=-1)
        entropy = -(p_all * p_all.clamp(min=1e-30).log()).sum(dim=-1)  # [B, 1 + N]
        cut = torch.minimum(torch.full_like(entropy, self.threshold), self.alpha * (-entropy).exp())
        parent = tree.parent_positions()
        p_parent = p_all.gather(1, parent.unsqueeze(-1).expand(*parent.shape, p_all.shape[-1]))
        px = p_parent.gather(2, tree.tokens.unsqueeze(-1)).squeeze(-1)
        ok = tree.valid & (px > cut.gather(1, parent))
        accepted = (tree.ancestors <= ok.unsqueeze(1)).all(dim=-1)
        node, depth = _deepest(tree, accepted)
        final = p_all.gather(1, (node + 1).view(-1, 1, 1).expand(-1, 1, p_all.shape[-1])).squeeze(1)
        nxt = sample(final) if params.do_sample else final.argmax(dim=-1)
        return StepOutcome(tree, depth, tree.path_to(node, tree.num_nodes), nxt)


RULES = {"greedy": GreedyAcceptance, "speculative": SpeculativeSampling, "relaxed": RelaxedAcceptance,
         "typical": TypicalAcceptance}


def make_acceptance(name: str, **kwargs):
    """Build an acceptance rule by name. Example: ``make_acceptance("relaxed", lenience=0.5)``."""
    if name not in RULES:
        raise ValueError(f"unknown acceptance rule {name!r}; known rules: {sorted(RULES)}")
    return RULES[name](**kwargs)

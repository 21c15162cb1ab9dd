"""Hierarchical speculative decoding: a fast drafter drafts for a slower drafter, which drafts for
the target (TriForce, Sun et al. 2024, without its StreamingLLM draft model).

Each step runs ``rounds`` rounds. In a round the ``top`` drafter proposes a chain of ``γ_top``
tokens after the current end of the step's proposal; the ``middle`` drafter (a
``SparseSelfDraft``) scores the current root and that chain in one forward over its sparse cache
and keeps the longest prefix it agrees with plus one token of its own:

- greedy: top tokens while they equal the middle's argmax, then the middle's argmax;
- sampling: speculative sampling inside the middle level (accept x with probability
  min(1, p(x) / q(x)), else draw from the residual max(p - q, 0)), so every kept token is
  distributed exactly as the middle's own draft distribution p, which is the ``q`` the target's
  acceptance rule then sees. Top drafters without probabilities are point masses.

So a round yields 1 to γ_top + 1 tokens; the step's proposal (at most ``middle.num_tokens``
tokens) is what the full target verifies, which keeps decoding lossless. Everything is device
work with static shapes (one middle forward per round), so the drafter is ``device_only``.

The top drafter is asked for drafts after tokens the target has not seen, through a shadow
state (the committed tokens followed by the step's proposal so far), and must cope with that:

- ``PromptLookup`` searches the shadow tokens like committed ones;
- ``DraftModel`` (a chain of constant length) runs its own cache over the shadow: each round
  re-reads the last three shadow tokens (its chain's last token and the middle's own token were
  never fed, and after the step the bonus token), so its cache holds exactly what it read, and
  what the target rejects is overwritten by the next step's re-read, as in plain drafting;
- ``EagleHead`` (a chain) reads the target's hidden states at its aux layers for every token
  before the ones it drafts. Committed tokens get them from verification (the hierarchy asks for
  the head's ``hidden_layers`` and passes ``observe`` on); the step's own tokens get them from
  the middle's forward over each round, which runs every target layer, only over the sparse
  cache. So within a step the head drafts from the middle's approximation of the target's states
  (a plain EAGLE chain feeds back the head's own predicted states instead); the next step
  re-reads its last ``num_tokens + 1`` slots with the verified ones. Head cache entries further
  back keep the middle's states when a step commits more than that: a quality matter, never a
  correctness one. EagleHead trees (``tree_topk``) are refused.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch
from torch import Tensor

from specdec.verifiers.acceptance import sample, warp_probs
from specdec.verifiers.processors import DraftPaths
from specdec.verifiers.tree import DraftTree

from .base import DecodeContext, DraftSpec, Drafter
from .draft_model import DraftModel
from .draw import processed
from .head_drafters import EagleHead
from .lookup import PromptLookup
from .sparse_kv import SparseSelfDraft



def _check_top(top: Drafter) -> None:
    """Refuse top drafters the hierarchy cannot drive, saying why."""
    if isinstance(top, PromptLookup):
        if top.num_branches != 1:
            raise ValueError("Hierarchical: the top drafter must propose a chain; use PromptLookup(num_branches=1)")
    elif isinstance(top, DraftModel):
        if top.tree_width != 1 or top.schedule != "constant":
            raise ValueError("Hierarchical: a DraftModel top drafts a fixed-length chain (its γ is the level's "
                             f"num_tokens); got tree_width={top.tree_width}, schedule={top.schedule!r}: use "
                             "DraftModel(model, num_tokens=..., tree_width=1, schedule='constant')")
    elif isinstance(top, EagleHead):
        if top.search is not None:
            raise ValueError("Hierarchical: an EagleHead top drafts a chain; build it without tree_topk")
    else:
        raise ValueError("Hierarchical: the top drafter must be PromptLookup, DraftModel or EagleHead, got "
                         f"{type(top).__name__}")


class Hierarchical(Drafter):
    """``top`` drafts for ``middle``; ``middle``'s verified proposal goes to the target.

    Example::

        Hierarchical(PromptLookup(num_tokens=4), SparseSelfDraft(num_tokens=8, window=64), rounds=3)
        Hierarchical(DraftModel(small, num_tokens=3), SparseSelfDraft(num_tokens=8), rounds=2)

    γ per level: ``top.num_nodes`` tokens per round (a chain), ``middle.num_tokens`` tokens per
    step for the target; ``rounds`` middle forwards per step.
    """

    def __init__(self, top: Drafter, middle: SparseSelfDraft, rounds: int = 2):
        _check_top(top)
        if not isinstance(middle, SparseSelfDraft):
            raise ValueError(f"Hierarchical: the middle drafter must be a SparseSelfDraft, got {type(middle).__name__}")
        if rounds < 1:
            raise ValueError(f"Hierarchical: rounds must be >= 1, got {rounds}")
        self.top, self.middle, self.rounds = top, middle, rounds
        self.gamma_top = top.spec.num_nodes
        room = rounds * (self.gamma_top + 1)  # tokens a step's rounds can make
        middle.reserve_scratch(room + 1)  # the sparse scratch holds every token fed
        if isinstance(top, DraftModel):
            # A round ends with the middle's own token after the top's chain, so a step can leave
            # three tokens its cache never read (the top's last, the middle's, the bonus): re-read 3.
            top.spec = dataclasses.replace(top.spec, lookback=max(top.spec.lookback, 3))
        # The middle's forwards (and tops with caches) write past the root, up to the last round's end.
        scratch = room
        # An EagleHead reads the target's states at its aux layers: verification exports them for
        # committed tokens, the middle's forward gives them for the step's own tokens.
        self.feeds_head = isinstance(top, EagleHead)
        self.collect = top.spec.hidden_layers if self.feeds_head else ()
        k = min(middle.num_tokens, room)
        self.spec = DraftSpec(num_nodes=k, lookback=max(top.spec.lookback, middle.spec.lookback),
                              scratch_slots=scratch, hidden_layers=self.collect,
                              forwards_per_step=rounds + top.spec.forwards_per_step * rounds,
                              prefill_hidden=self.feeds_head and top.spec.prefill_hidden)

    @property
    def num_nodes(self) -> int:
        return self.spec.num_nodes

    def bind(self, target) -> None:
        self.top.bind(target)
        self.middle.bind(target)

    def compile(self, options: dict | None) -> None:
        self.top.compile(options)
        self.middle.compile(options)

    def reserve(self, ctx: DecodeContext) -> None:
        self.top.reserve(ctx)  # an EagleHead top takes the prompt's states from the prefill

    def observe_prefill(self, ctx: DecodeContext, slots, layer_hidden) -> None:
        self.top.observe_prefill(ctx, slots, layer_hidden)

    def begin(self, ctx: DecodeContext) -> None:
        self.top.begin(ctx)
        self.middle.begin(ctx)

    def resync(self, ctx: DecodeContext, since: int) -> None:
        self.top.resync(ctx, since)
        self.middle.resync(ctx, since)

    def observe(self, ctx: DecodeContext, outcome) -> None:
        self.top.observe(ctx, outcome)  # an EagleHead stores the verified states of the kept tokens

    def memory_bytes(self, batch: int, cache_len: int, new_tokens: int) -> int:
        return (self.top.memory_bytes(batch, cache_len, new_tokens)
                + self.middle.memory_bytes(batch, cache_len, new_tokens))

    def propose(self, ctx: DecodeContext) -> DraftTree:
        self.middle.select(ctx)
        b, dev, k = ctx.tokens.shape[0], ctx.tokens.device, self.num_nodes
        room = self.rounds * (self.gamma_top + 1)
        out = torch.zeros(b, room, dtype=torch.long, device=dev)  # the step's proposal, per row
        q = torch.zeros(b, room, self.middle.runner.vocab_size, device=dev) if ctx.params.do_sample else None
        shadow = torch.cat([ctx.tokens[:, : ctx.max_seq_len], torch.zeros(b, room, dtype=torch.long, device=dev)], 1)
        made = torch.zeros(b, dtype=torch.long, device=dev)  # tokens proposed so far
        for r in range(self.rounds):
            view = dataclasses.replace(ctx, tokens=shadow, seq_len=ctx.seq_len + made,
                                       max_seq_len=ctx.max_seq_len + r * (self.gamma_top + 1),
                                       capacity=shadow.shape[1])
            kept, probs, count = self.round(ctx, shadow, made, self.top.propose(view))
            where = made[:, None] + torch.arange(self.gamma_top + 1, device=dev)  # [B, γ_top + 1]
            fresh = torch.arange(self.gamma_top + 1, device=dev)[None, :] < count[:, None]
            target = torch.where(fresh, where, room)  # entries past count go nowhere (dropped column)
            out = torch.cat([out, out[:, :1]], 1).scatter(1, target, kept)[:, :room]
            if q is not None:
                q = torch.cat([q, q[:, :1]], 1).scatter(1, target[..., None].expand_as(probs), probs)[:, :room]
            shadow = shadow.scatter(1, (ctx.seq_len[:, None] + where).clamp(max=shadow.shape[1] - 1),
                                    torch.where(fresh, kept, shadow.gather(1, (ctx.seq_len[:, None] + where)
                                                                          .clamp(max=shadow.shape[1] - 1))))
            made = made + count
        valid = torch.arange(k, device=dev)[None, :] < made[:, None]
        return DraftTree.chain(out[:, :k].contiguous(), valid, q=None if q is None else q[:, :k].contiguous())

    def round(self, ctx: DecodeContext, shadow: Tensor, made: Tensor, tree: DraftTree):
        """One middle forward over the current root and the top's chain.

        Returns the round's tokens ``[B, γ_top + 1]`` (the first ``count`` are kept), the middle's
        draft distribution at each ``[B, γ_top + 1, V]`` (None when greedy) and ``count`` ``[B]``.
        """
        b, g = tree.tokens.shape
        root = shadow.gather(1, (ctx.seq_len + made - 1).unsqueeze(1))
        fed = torch.cat([root, tree.tokens], 1)  # [B, g + 1] at shadow slots seq_len + made - 1 on
        out = self.middle.forward_sparse(ctx, fed, made, collect=self.collect)
        if self.feeds_head:  # the head's features there, for the next round (the kept ones are right)
            slots = (ctx.seq_len + made - 1)[:, None] + torch.arange(g + 1, device=fed.device)
            self.store_head_features(ctx, slots, out.layer_hidden, fed)
        logits, draft = out.logits, tree.tokens  # [B, g + 1, V], [B, g]
        if ctx.params.processors.active:  # position j continues the shadow prefix with the top's first j tokens
            paths = DraftPaths(tree.tokens.unsqueeze(1).expand(b, g + 1, g), torch.arange(g + 1, device=root.device)
                               .expand(b, g + 1))
            logits = processed(dataclasses.replace(ctx, tokens=shadow, seq_len=ctx.seq_len + made), logits, paths)[0]
        if not ctx.params.do_sample:
            agree = (logits[:, :g].argmax(-1) == draft) & tree.valid
            a = agree.long().cumprod(1).sum(1)  # [B] top tokens kept
            own = logits.argmax(-1).gather(1, a[:, None])  # the middle's token after them
            return self._join(draft, own, a), None, a + 1
        p = warp_probs(logits, ctx.params)  # [B, g + 1, V]
        p_x = p[:, :g].gather(2, draft[..., None]).squeeze(-1)
        q_x = torch.ones_like(p_x) if tree.q is None else tree.q.gather(2, draft[..., None]).squeeze(-1)
        ok = (torch.rand_like(p_x) * q_x < p_x) & tree.valid
        a = ok.long().cumprod(1).sum(1)
        p_a = p.gather(1, a.view(b, 1, 1).expand(b, 1, p.shape[2])).squeeze(1)  # [B, V]
        rejected = (a < g) & tree.valid.gather(1, a.clamp(max=g - 1)[:, None]).squeeze(1)
        if tree.q is None:
            q_a = torch.zeros_like(p_a).scatter_(1, draft.gather(1, a.clamp(max=g - 1)[:, None]), 1.0)
        else:
            q_a = tree.q.gather(1, a.clamp(max=g - 1).view(b, 1, 1).expand(b, 1, p.shape[2])).squeeze(1)
        residual = (p_a - q_a).clamp(min=0)
        residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_a)
        own = sample(torch.where(rejected[:, None], residual / residual.sum(-1, keepdim=True), p_a))
        return self._join(draft, own[:, None], a), p, a + 1

    def store_head_features(self, ctx: DecodeContext, slots: Tensor, states: Tensor | None, tokens: Tensor) -> None:
        """Put the EagleHead's fused features of ``tokens`` [B, Q] at ``slots`` [B, Q] of its feature
        buffer, from the middle's states ``states`` [E, B, Q, H] after the head's aux layers."""
        self.top.store_features(ctx, slots, states, tokens)  # as the head's own observe stores them

    @staticmethod
    def _join(draft: Tensor, own: Tensor, a: Tensor) -> Tensor:
        """``draft`` ``[B, g]`` with ``own`` ``[B, 1]`` placed at column ``a``: ``[B, g + 1]``."""
        out = torch.cat([draft, own], 1)
        return out.scatter(1, a[:, None], own)


def TriForce(top: Drafter | Mapping | None = None, num_tokens: int = 8, rounds: int = 2, sink: int = 4, window: int = 256,
             chunk: int = 16, top_chunks: int = 8) -> Hierarchical:
    """TriForce's hierarchy: ``top`` (default prompt lookup of 4 tokens; or a ``DraftModel`` or
    ``EagleHead`` chain) drafts for a sparse-KV self-draft of ``num_tokens`` tokens per step, which
    drafts for the full target. ``top`` may be a drafter config mapping (Hydra's
    ``conf/drafter/triforce.yaml``), e.g. ``{"_target_": "specdec.drafters.DraftModel.from_pretrained",
    "spec": "zoo:qwen2.5-coder-0.5b-instruct", "num_tokens": 3}``.

    Example: ``specdec.wrap(model, drafter=TriForce(window=128, top_chunks=4))``.
    """
    if isinstance(top, Mapping):  # a config: {"_target_": "specdec.drafters.PromptLookup", ...}
        from specdec.drafters import build_drafter

        top = build_drafter(top)
    top = PromptLookup(num_tokens=4) if top is None else top
    middle = SparseSelfDraft(num_tokens=num_tokens, sink=sink, window=window, chunk=chunk, top_chunks=top_chunks)
    return Hierarchical(top, middle, rounds=rounds)

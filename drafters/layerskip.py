"""Self-drafting from the target's own layers: no extra weights, no second cache.

A *layer-skip draft* is the target model run over a subset of its decoder layers, then through
its own final norm and LM head. Two shapes of subset:

- **early exit** after the first E layers (LayerSkip, Elhoushi et al. 2024; Kangaroo);
- **a skip set**: every layer except the skipped ones (Draft & Verify, SWIFT).

KV sharing. The draft reads the committed prefix's K/V straight from the target's cache and
writes its draft tokens' K/V into the cache's scratch slots (from the root's slot on), which
the verification step overwrites. For an early exit this is exact: the first E layers' K/V of
the prefix *are* the draft's own. For a skip set, layers after the first skipped one see K/V
that the full model computed; SWIFT drafts the same way. The draft is only a proposal, so this
never changes what is emitted, and it saves a second cache and a draft prefill.

Variants built on the same drafting loop:

- ``LayerSkip``: a fixed exit layer or skip set, with Kangaroo-style halting
  (``stop_threshold``: stop a row's draft once the draft's top probability drops below it).
- ``Swift``: searches the skip set on the fly (Xia et al., "SWIFT: On-the-Fly Self-Speculative
  Decoding for LLM Inference Acceleration", ICLR 2025), see ``specdec.drafters.swift``.
- ``DynamicExit``: DEL (Zarch et al. 2025), chooses the exit layer and draft length every step
  from per-layer acceptance of shadow tokens, see ``specdec.drafters.dynamic_exit``.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from specdec.verifiers.acceptance import sample, warp_probs
from specdec.verifiers.tree import DraftTree

from .base import DecodeContext, DraftSpec, Drafter, chain_constants
from .draw import process_chain


class LayerSkip(Drafter):
    """Draft with a subset of the target's layers.

    Example::

        spec = specdec.wrap(model, drafter=LayerSkip(exit_layer=8, num_tokens=4))   # early exit
        spec = specdec.wrap(model, drafter=LayerSkip(skip_layers=[3, 5, 7, 9]))      # skip set
        LayerSkip(exit_layer=8, stop_threshold=0.6)                                  # Kangaroo halting

    ``num_tokens`` is the longest draft per step (the static node budget). With
    ``stop_threshold`` set, a row's draft ends at the first token whose draft probability is
    below it: later nodes are masked (invalid) on the device, so the step stays static and
    capturable, and the draft always runs ``num_tokens`` forwards.
    """

    def __init__(self, exit_layer: int | None = None, skip_layers: Sequence[int] | None = None, num_tokens: int = 4,
                 stop_threshold: float | None = None):
        if (exit_layer is None) == (skip_layers is None):
            raise ValueError("give exactly one of exit_layer (early exit) or skip_layers (skip set)")
        if num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
        if stop_threshold is not None and not 0.0 <= stop_threshold < 1.0:
            raise ValueError(f"stop_threshold must be in [0, 1), got {stop_threshold}")
        self.exit_layer = exit_layer
        self.skip_layers = sorted(set(skip_layers)) if skip_layers is not None else None
        self.num_tokens = num_tokens
        self.stop_threshold = stop_threshold
        self.runner = None
        self.spec = DraftSpec(num_nodes=num_tokens, forwards_per_step=num_tokens)
        self._forward = None  # the target runner's forward, compiled by compile()

    @classmethod
    def kangaroo(cls, exit_layer: int, num_tokens: int = 6, stop_threshold: float = 0.6) -> "LayerSkip":
        """Kangaroo-style drafting: a shallow early exit that drafts long chains and halts when unsure.

        (Kangaroo, Liu et al. 2024, also trains a small adapter after the exit; this uses the
        target's own norm and head.)"""
        return cls(exit_layer=exit_layer, num_tokens=num_tokens, stop_threshold=stop_threshold)

    # ------------------------------------------------------------------ protocol
    @property
    def num_nodes(self) -> int:
        return self.spec.num_nodes

    def compile(self, options: dict | None) -> None:
        """The draft layers' forwards under ``torch.compile`` too (``wrap(..., compile=True)``)."""
        from specdec.step import compiled

        self._forward = compiled(self.runner.forward, options or True)

    def bind(self, target) -> None:
        """Bind to the target's runner and check the layer choice fits it."""
        n = target.num_layers
        if self.exit_layer is not None and not 1 <= self.exit_layer < n:
            raise ValueError(f"exit_layer must be in 1..{n - 1} for this {n}-layer target, got {self.exit_layer}")
        if self.skip_layers is not None:
            bad = [i for i in self.skip_layers if not 0 <= i < n]
            if bad or len(self.skip_layers) >= n:
                raise ValueError(f"skip_layers must name some (not all) of the target's layers 0..{n - 1}; "
                                 f"got {self.skip_layers}")
        if self.runner is not target:
            self._forward = target.forward
        self.runner = target

    def layers(self) -> list[int]:
        """The target layers the draft runs, in order."""
        n = self.runner.num_layers
        if self.exit_layer is not None:
            return list(range(self.exit_layer))
        skip = set(self.skip_layers)
        return [i for i in range(n) if i not in skip]

    def begin(self, ctx: DecodeContext) -> None:
        if self.runner is not ctx.target:
            self.bind(ctx.target)

    def propose(self, ctx: DecodeContext) -> DraftTree:
        return self.draft_chain(ctx, self.layers(), self.num_tokens)

    # ------------------------------------------------------------------ drafting
    def draft_forward(self, ctx: DecodeContext, tokens: Tensor, slot: Tensor, position: Tensor, layers: list[int],
                      view_len: int) -> Tensor:
        """Feed ``tokens`` ``[B]`` at ``slot`` ``[B, 1]`` (``position`` ``[B, 1]``) through ``layers``;
        next-token logits ``[B, V]``.

        The cache is told that every slot before that one is readable: the committed prefix and
        the draft tokens fed so far in this step. A lone token sees itself, so its masks are constants.
        """
        alone = chain_constants(tokens.shape[0], 1, tokens.device).alone
        ctx.cache.lengths.copy_(slot.squeeze(1))
        out = self._forward(ctx.cache, tokens.unsqueeze(1), position, slot, alone, view_len=view_len, layers=layers,
                            contiguous=True, tree_mask=alone)
        return out.logits[:, -1]

    def draft_chain(self, ctx: DecodeContext, layers: list[int], length: int) -> DraftTree:
        """Draft up to ``length`` tokens per row through ``layers`` (padded to ``num_nodes``).

        Per drafted token: one forward through ``layers`` and its choice (argmax or a draw); the
        slots, positions and masks are laid out once per step, and Kangaroo halting is one
        comparison over the whole chain at the end (a row's draft stops at its first unsure token).
        """
        b, dev, k = ctx.tokens.shape[0], ctx.tokens.device, self.num_nodes
        sampling, halting = ctx.params.do_sample, self.stop_threshold is not None
        if length == 0:
            return _padded_chain([], [], [], None, (b, k, self.runner.vocab_size, dev), sampling)
        slots = (ctx.seq_len - 1).unsqueeze(1) + chain_constants(b, k, dev).offsets  # [B, K] root's slot, then on
        positions = slots - ctx.start.unsqueeze(1)
        current = ctx.tokens.gather(1, slots[:, :1]).squeeze(1)  # the root
        drafted, dists, top = [], [], []
        try:
            for i in range(length):
                logits = self.draft_forward(ctx, current, slots[:, i:i + 1], positions[:, i:i + 1], layers,
                                            ctx.max_seq_len + i)
                logits = process_chain(ctx, logits, drafted)
                if sampling:
                    probs = warp_probs(logits, ctx.params)
                    current = sample(probs)
                    dists.append(probs)
                else:
                    current = logits.argmax(dim=-1)
                    probs = logits.softmax(dim=-1) if halting else None
                if halting:
                    top.append(probs.max(dim=-1).values)
                drafted.append(current)
        finally:
            ctx.cache.lengths.copy_(ctx.seq_len - 1)
        return _padded_chain(drafted, top, dists, self.stop_threshold, (b, k, self.runner.vocab_size, dev), sampling)


def _padded_chain(drafted: list[Tensor], top: list[Tensor], dists: list[Tensor], threshold: float | None,
                  shape: tuple, sampling: bool) -> DraftTree:
    """The chain of ``drafted`` tokens (``[B]`` each), padded with invalid nodes to ``K``; with
    ``threshold``, nodes from a row's first draft probability below it on are invalid too."""
    b, k, vocab, dev = shape
    pad = k - len(drafted)
    tokens = torch.stack(drafted, dim=1) if drafted else torch.zeros(b, 0, dtype=torch.long, device=dev)
    valid = torch.stack(top, dim=1) >= threshold if threshold is not None and drafted else None
    q = torch.stack(dists, dim=1) if sampling and drafted else None
    if pad:
        tokens = torch.cat([tokens, tokens.new_zeros(b, pad)], dim=1)
        shown = valid if valid is not None else torch.ones(b, k - pad, dtype=torch.bool, device=dev)
        valid = torch.cat([shown, shown.new_zeros(b, pad)], dim=1)
        if sampling:
            q = torch.zeros(b, k, vocab, device=dev) if q is None else torch.cat([q, q.new_zeros(b, pad, vocab)], dim=1)
    return DraftTree.chain(tokens, valid, q=q)

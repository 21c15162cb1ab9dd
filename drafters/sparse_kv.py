"""Self-drafting over a sparse KV cache: TriForce's middle level (Sun et al., "TriForce: Lossless
Acceleration of Long Sequence Generation with Hierarchical Speculative Decoding", 2024).

The target drafts for itself with all of its layers and no extra weights, but each draft token
attends to a small selected part of the committed cache instead of all of it:

- the *attention sinks*, the first ``sink`` real tokens of the row;
- the *recent window*, the last ``window`` committed tokens;
- the ``top_chunks`` best of the remaining fixed-size chunks of ``chunk`` slots, scored as
  TriForce's retrieval cache does: the mean key of each chunk against a query, per layer and
  head, summed. The cache keeps keys, not queries, so the query is the key of the newest
  committed token at each layer (a proxy: it lies in the same rotated space as the chunk keys).

Once per step the selected slots' K/V are gathered, per row, into a small private cache of
``budget = sink + window + top_chunks * chunk`` slots (rows with fewer selected slots are left
padded there, so the per-row ``start`` and ``lengths`` of the tree-attention kernel describe it),
and the draft tokens' own K/V go after it, in scratch slots that the next step overwrites.
Selection is device work with static shapes (a sort and a top-k per row), so the drafter is
``device_only``. The full target verifies every proposal, which keeps decoding lossless.

It knows caches, chunks and selection; not trees beyond the chain it returns.
"""
from __future__ import annotations

import torch
from torch import Tensor

from specdec.cache import KVCache
from specdec.verifiers.tree import DraftTree

from .base import DecodeContext, DraftSpec, Drafter
from .draw import choose


class SparseSelfDraft(Drafter):
    """Draft ``num_tokens`` tokens with the whole target over sinks + window + the top chunks.

    Example::

        spec = specdec.wrap(model, drafter=SparseSelfDraft(num_tokens=4, sink=4, window=256, chunk=16,
                                                           top_chunks=8))

    After each ``propose``, ``selected`` ``[B]`` holds how many committed slots each row's draft
    attended to (at most ``budget``), and ``context`` ``[B]`` how many it had.
    """

    def __init__(self, num_tokens: int = 4, sink: int = 4, window: int = 256, chunk: int = 16, top_chunks: int = 8):
        for name, value, low in (("num_tokens", num_tokens, 1), ("sink", sink, 0), ("window", window, 1),
                                 ("chunk", chunk, 1), ("top_chunks", top_chunks, 0)):
            if value < low:
                raise ValueError(f"SparseSelfDraft: {name} must be >= {low}, got {value}")
        self.num_tokens, self.sink, self.window, self.chunk, self.top_chunks = num_tokens, sink, window, chunk, top_chunks
        self.budget = sink + window + top_chunks * chunk  # committed slots a draft token may read
        self.spec = DraftSpec(num_nodes=num_tokens, forwards_per_step=num_tokens)
        self.runner = None
        self.small: KVCache | None = None  # the gathered sparse cache: budget + scratch slots per row
        self.selected: Tensor | None = None  # [B] committed slots selected at the last step
        self.context: Tensor | None = None  # [B] committed slots the row had
        self._forward = None

    @property
    def num_nodes(self) -> int:
        return self.spec.num_nodes

    def bind(self, target) -> None:
        if self.runner is not target:
            self._forward = target.forward
        self.runner = target

    def compile(self, options: dict | None) -> None:
        from specdec.step import compiled

        self._forward = compiled(self.runner.forward, options or True)

    def begin(self, ctx: DecodeContext) -> None:
        if self.runner is not ctx.target:
            self.bind(ctx.target)
        windows = [w for w in self.runner.windows if w is not None and w < ctx.capacity]
        if windows:  # a window longer than every sequence of this call never cuts anything
            raise ValueError(f"SparseSelfDraft cannot draft over sliding-window layers (window {windows[0]} < "
                             f"{ctx.capacity} slots): its sparse cache keeps no positions; shorten the call or use "
                             "another drafter")
        big, extra = ctx.cache, self.scratch()
        b, h, _, d = big.k[0].shape
        if self.small is None or self.small.batch != b or self.small.max_len != self.budget + extra:
            self.small = KVCache(len(big.k), b, h, d, self.budget + extra, big.k[0].dtype, big.k[0].device)

    def scratch(self) -> int:
        """Slots after the gathered prefix that drafting writes (the root and the draft tokens)."""
        return self.num_tokens + 1

    # ------------------------------------------------------------------ selection
    def select(self, ctx: DecodeContext) -> None:
        """Choose each row's slots and gather their K/V into ``self.small`` (static shapes)."""
        big, s = ctx.cache, ctx.max_seq_len
        width = max(s, self.budget)
        j = torch.arange(width, device=big.lengths.device)
        start, end = ctx.start[:, None], (ctx.seq_len - 1)[:, None]  # committed: start <= j < end
        real = (j >= start) & (j < end)  # [B, W]
        keep = real & ((j < start + self.sink) | (j >= end - self.window))
        if self.top_chunks:
            keep |= real & self._top_chunks(big, real & ~keep, end.squeeze(1), s, width)
        # Unselected slots first, then the selected ones in order: the small cache is left padded.
        order = (keep.long() * width + j).argsort(dim=1)[:, width - self.budget:]  # [B, budget]
        count = keep.sum(dim=1)
        idx = order.clamp(max=s - 1) if s > 0 else order.zero_()
        for src_k, src_v, dst_k, dst_v in zip(big.k, big.v, self.small.k, self.small.v):
            gather = idx.view(idx.shape[0], 1, -1, 1).expand(-1, src_k.shape[1], -1, src_k.shape[3])
            dst_k[:, :, : self.budget].copy_(src_k[:, :, :s].gather(2, gather))
            dst_v[:, :, : self.budget].copy_(src_v[:, :, :s].gather(2, gather))
        self.small.start.copy_(self.budget - count)
        self.small.lengths.fill_(self.budget)
        self.selected, self.context = count, (end - start).squeeze(1)

    def _top_chunks(self, big: KVCache, free: Tensor, end: Tensor, s: int, width: int) -> Tensor:
        """``[B, W]`` bool: slots of the ``top_chunks`` chunks scoring best among ``free`` slots."""
        b, c = free.shape[0], -(-width // self.chunk)
        pad = c * self.chunk - width
        score = torch.zeros(b, width, device=free.device)
        last = (end - 1).clamp(min=0).view(b, 1, 1, 1)
        for k in big.k:  # mean key . query == mean of (key . query): score slots, then average per chunk
            query = k.gather(2, last.expand(-1, k.shape[1], 1, k.shape[3])).float()  # [B, H, 1, D]
            per_slot = (k[:, :, :s].float() * query).sum(dim=(1, 3))  # [B, S]
            score[:, :s] += per_slot
        free_c = torch.nn.functional.pad(free, (0, pad)).view(b, c, self.chunk)
        score_c = torch.nn.functional.pad(score * free, (0, pad)).view(b, c, self.chunk).sum(-1)
        n = free_c.sum(-1)
        score_c = torch.where(n > 0, score_c / n.clamp(min=1), torch.full_like(score_c, float("-inf")))
        k = min(self.top_chunks, c)
        top = score_c.topk(k, dim=1)
        chosen = torch.zeros(b, c, dtype=torch.bool, device=free.device)
        chosen.scatter_(1, top.indices, top.values > float("-inf"))
        return chosen.repeat_interleave(self.chunk, dim=1)[:, :width] & free

    # ------------------------------------------------------------------ drafting
    def forward_sparse(self, ctx: DecodeContext, tokens: Tensor, offset: Tensor) -> Tensor:
        """Feed a causal run ``tokens`` ``[B, Q]`` at per-row offsets ``offset`` ``[B]`` past the root's
        slot of the sparse cache; returns the next-token logits ``[B, Q, V]``.

        Slots before the run hold the gathered prefix and the tokens of this step fed before it.
        """
        b, q = tokens.shape
        ar = torch.arange(q, device=tokens.device)
        slots = (self.budget + offset)[:, None] + ar
        positions = (ctx.seq_len - 1 - ctx.start + offset)[:, None] + ar
        among = torch.ones(q, q, dtype=torch.bool, device=tokens.device).tril().expand(b, q, q)
        self.small.lengths.copy_(self.budget + offset)
        try:
            out = self._forward(self.small, tokens, positions, slots, among,
                                view_len=self.budget + self.scratch(), contiguous=True)
        finally:
            self.small.lengths.fill_(self.budget)
        return out.logits

    def propose(self, ctx: DecodeContext) -> DraftTree:
        self.select(ctx)
        b, dev, k = ctx.tokens.shape[0], ctx.tokens.device, self.num_tokens
        tokens = torch.zeros(b, k, dtype=torch.long, device=dev)
        q = torch.zeros(b, k, self.runner.vocab_size, device=dev) if ctx.params.do_sample else None
        current = ctx.tokens.gather(1, (ctx.seq_len - 1).unsqueeze(1))  # [B, 1] the root
        offset = torch.zeros(b, dtype=torch.long, device=dev)
        for i in range(k):
            token, dist = choose(ctx, self.forward_sparse(ctx, current, offset + i)[:, -1], tokens[:, :i])
            if q is not None:
                q[:, i] = dist
            current = token.unsqueeze(1)
            tokens[:, i] = token
        return DraftTree.chain(tokens, q=q)

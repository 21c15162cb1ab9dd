"""Self-drafting over a sparse KV cache: TriForce's middle level (Sun et al., "TriForce: Lossless
Acceleration of Long Sequence Generation with Hierarchical Speculative Decoding", 2024).

The target drafts for itself with all of its layers and no extra weights, but each draft token
attends to a small selected part of the committed cache instead of all of it:

- the *attention sinks*, the first ``sink`` real tokens of the row;
- the *recent window*, the last ``window`` committed tokens (after the sinks);
- the ``top_chunks`` best chunks of ``chunk`` slots, scored as TriForce's retrieval cache does:
  the mean key of each chunk against a query, per layer and head, summed. Chunks tile each row's
  committed slots from ``start + sink`` on; a chunk is eligible once it is wholly committed and
  ends before the recent window (the fewer than ``chunk`` slots between the last eligible chunk
  and the window are left out). The cache keeps keys, not queries, so the query is the key of
  the newest committed token at each layer (a proxy: it lies in the same rotated space).

Chunk means are kept, not recomputed: ``means`` ``[L, B, H_kv, C + 1, D]`` (fp32, C chunks to
the cache's capacity) is filled from scratch at ``begin`` and ``resync``, and each step adds the
chunks completed since the last one (at most ``per_step`` per row, read from the committed keys,
which never change once committed). So a step's selection reads ``per_step * chunk`` keys per
layer, scores one mean per chunk slot, and gathers ``budget`` slots: nothing scales with the
committed length beyond the one score per chunk.

Once per step the selected slots are listed, per row, in a block table of
``budget = sink + window + top_chunks * chunk`` entries (left padded: a row with fewer selected
slots starts later in it), followed by the slots of the tokens the step's drafting feeds. The
draft tokens' own K/V go into the target's cache after the root, in the scratch slots that
verification overwrites next, and every layer attends through the table
(``kernels.block_table``: the Triton kernel on CUDA, its torch reference elsewhere), reading the
selected K/V where they are: nothing is gathered or copied. Selection is device work with static
shapes (a top-k over chunks and a sort over ``budget`` slots per row), so the drafter is
``device_only``. The full target verifies every proposal, which keeps decoding lossless.

It knows caches, chunks and selection; not trees beyond the chain it returns.
"""
from __future__ import annotations

import torch
from torch import Tensor

from specdec.runner import RunnerOutput
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
        # The block table, [B, budget + fed] int32: the selected committed slots (left padded from
        # ``first`` [B] on), then the slots of the tokens one step feeds, from the root's on.
        self.table: Tensor | None = None
        self.first: Tensor | None = None
        self.selected: Tensor | None = None  # [B] committed slots selected at the last step
        self.context: Tensor | None = None  # [B] committed slots the row had
        # Per-chunk mean keys, [L, B, H_kv, C + 1, D] fp32 for C chunk slots of the cache (the last
        # one is a trash chunk for writes that go nowhere); ``filled`` [B] counts the chunks with a mean.
        self.means: Tensor | None = None
        self.filled: Tensor | None = None
        self.fed = num_tokens + 1  # tokens the draft forwards of one step feed (the root included)
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
        big = ctx.cache
        b, h, _, d = big.k[0].shape
        if self.table is None or tuple(self.table.shape) != (b, self.budget + self.fed) or self.table.device != big.k[0].device:
            self.table = torch.zeros(b, self.budget + self.fed, dtype=torch.int32, device=big.k[0].device)
            self.first = torch.zeros(b, dtype=torch.long, device=big.k[0].device)
        if self.top_chunks:  # buffers are reused in place: captured steps read them
            shape = (len(big.k), b, h, -(-ctx.capacity // self.chunk) + 1, d)
            if self.means is None or tuple(self.means.shape) != shape or self.means.device != big.k[0].device:
                self.means = torch.zeros(shape, dtype=torch.float32, device=big.k[0].device)
                self.filled = torch.zeros(b, dtype=torch.long, device=big.k[0].device)
            self._rebuild_means(ctx)

    def resync(self, ctx: DecodeContext, since: int) -> None:
        """After undrafted steps: the chunks they completed get their means (host-side catch-up)."""
        if self.top_chunks:
            self._rebuild_means(ctx)

    def reserve_scratch(self, fed: int) -> None:
        """Make room for ``fed`` tokens per step in the sparse cache's scratch (a drafter feeding
        it itself, as ``Hierarchical`` does, calls this before ``begin``)."""
        self.fed = max(fed, self.num_tokens + 1)

    @property
    def per_step(self) -> int:
        """Chunks one drafted step can complete: it commits at most ``num_tokens + 1`` slots."""
        return -(-(self.num_tokens + 1) // self.chunk)

    def memory_bytes(self, batch: int, cache_len: int, new_tokens: int) -> int:
        """The block table and the chunk means (the draft's own K/V use the target's scratch slots)."""
        from specdec.memory import kv_slot_bytes

        key_floats = kv_slot_bytes(self.runner) // (2 * self.runner.dtype.itemsize)  # one slot's keys, every layer
        means = key_floats * 4 * (-(-cache_len // self.chunk) + 1) if self.top_chunks else 0
        return batch * ((self.budget + self.fed) * 4 + means)

    # ------------------------------------------------------------------ chunk means
    def _layer_means(self, k: Tensor, start: Tensor, chunks: Tensor) -> Tensor:
        """Mean key ``[B, H, M, D]`` (fp32) of chunks ``chunks`` ``[B, M]`` of one layer's keys ``k``."""
        b, m = chunks.shape
        j = torch.arange(self.chunk, device=k.device)
        slots = (start[:, None, None] + self.sink + chunks[..., None] * self.chunk + j).clamp(max=k.shape[2] - 1)
        idx = slots.view(b, 1, m * self.chunk, 1).expand(-1, k.shape[1], -1, k.shape[3])
        return k.gather(2, idx).float().view(b, k.shape[1], m, self.chunk, k.shape[3]).mean(3)

    def complete_chunks(self, ctx: DecodeContext) -> Tensor:
        """``[B]`` how many chunks of each row are wholly committed (the ones that have a mean)."""
        n = ctx.seq_len - 1 - ctx.start  # committed slots in the cache
        return ((n - self.sink).clamp(min=0) // self.chunk).clamp(max=self.means.shape[3] - 1)

    def _rebuild_means(self, ctx: DecodeContext) -> None:
        """Recompute every complete chunk's mean in place (begin, resync), one layer at a time."""
        c = self.means.shape[3] - 1
        chunks = torch.arange(c, device=ctx.start.device).expand(ctx.start.shape[0], c)
        for layer, k in enumerate(ctx.cache.k):
            self.means[layer, :, :, :c] = self._layer_means(k, ctx.start, chunks)
        self.filled.copy_(self.complete_chunks(ctx))

    def _refresh_means(self, ctx: DecodeContext) -> None:
        """Add the means of the chunks completed since the last step: at most ``per_step`` chunks
        per row (what one drafted step can complete), read from the cache's committed keys.

        Committed keys never change, so a chunk's mean is final once it is complete; rejected draft
        tokens never reach committed slots. Rows with nothing new write to the trash chunk ``C``.
        """
        b, dev = ctx.start.shape[0], ctx.start.device
        trash = self.means.shape[3] - 1
        chunks = self.filled[:, None] + torch.arange(self.per_step, device=dev)  # [B, M]
        complete = self.complete_chunks(ctx)
        fresh = chunks < complete[:, None]
        values = torch.stack([self._layer_means(k, ctx.start, chunks.clamp(max=trash - 1)) for k in ctx.cache.k])
        where = torch.where(fresh, chunks, trash)
        layers = torch.arange(values.shape[0], device=dev).view(-1, 1, 1, 1)
        heads = torch.arange(values.shape[2], device=dev).view(1, 1, -1, 1)
        self.means.index_put_((layers, torch.arange(b, device=dev).view(1, -1, 1, 1), heads, where[None, :, None]),
                              values)
        self.filled.copy_(torch.minimum(self.filled + self.per_step, complete))

    # ------------------------------------------------------------------ selection
    def select(self, ctx: DecodeContext) -> None:
        """Choose each row's slots and list them in ``self.table``: budget-sized work, plus one
        score per chunk slot of the cache (static shapes, no host sync)."""
        big, dev = ctx.cache, ctx.start.device
        start, end = ctx.start[:, None], (ctx.seq_len - 1)[:, None]  # committed: start <= j < end
        sink, window = torch.arange(self.sink, device=dev), torch.arange(self.window, device=dev)
        parts = [(start + sink, start + sink < end),  # the sinks
                 (end - self.window + window, end - self.window + window >= start + self.sink)]  # the window
        if self.top_chunks:
            self._refresh_means(ctx)
            parts.append(self._top_chunks(ctx, start, end))
        idx, keep = torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1)  # [B, budget]
        # Unselected slots first, then the selected ones in order: the table is left padded.
        order = keep.long().argsort(dim=1, stable=True)
        idx = idx.gather(1, order).clamp(min=0, max=big.max_len - 1)
        fed = end + torch.arange(self.fed, device=dev)  # the root's slot, then the step's drafted tokens'
        self.table.copy_(torch.cat([idx, fed.clamp(max=big.max_len - 1)], 1))
        count = keep.sum(dim=1)
        self.first.copy_(self.budget - count)
        self.selected, self.context = count, (end - start).squeeze(1)

    def _top_chunks(self, ctx: DecodeContext, start: Tensor, end: Tensor) -> tuple[Tensor, Tensor]:
        """Slots ``[B, top_chunks * chunk]`` of the best-scoring chunks, and whether each is kept.

        A chunk's score is its mean key against the query proxy (the newest committed key), per
        layer and head, summed. Eligible: chunks with a mean that end before the recent window.
        """
        b, dev = start.shape[0], start.device
        c = min(self.means.shape[3] - 1, max(1, -(-ctx.max_seq_len // self.chunk)))  # chunks a row can have
        last = (end - 1).clamp(min=0).view(b, 1, 1, 1)
        query = torch.stack([k.gather(2, last.expand(-1, k.shape[1], 1, k.shape[3])).squeeze(2) for k in ctx.cache.k])
        score = torch.einsum("lbhcd,lbhd->bc", self.means[:, :, :, :c], query.float())  # [B, C]
        before = ((end - start - self.sink - self.window).clamp(min=0) // self.chunk)  # [B, 1] end before the window
        ids = torch.arange(c, device=dev)
        eligible = (ids < torch.minimum(before, self.filled[:, None]))
        score = torch.where(eligible, score, torch.full_like(score, float("-inf")))
        top = score.topk(min(self.top_chunks, c), dim=1)
        ok = top.values > float("-inf")  # [B, K]
        if ok.shape[1] < self.top_chunks:  # fewer chunk slots than top_chunks: pad with unkept chunks
            pad = self.top_chunks - ok.shape[1]
            ok = torch.nn.functional.pad(ok, (0, pad))
            chosen = torch.nn.functional.pad(top.indices, (0, pad))
        else:
            chosen = top.indices
        j = torch.arange(self.chunk, device=dev)
        slots = start[:, :, None] + self.sink + chosen[..., None] * self.chunk + j  # [B, K, chunk]
        return slots.view(b, -1), ok[..., None].expand(-1, -1, self.chunk).reshape(b, -1)

    # ------------------------------------------------------------------ drafting
    def forward_sparse(self, ctx: DecodeContext, tokens: Tensor, offset: Tensor,
                       collect: tuple[int, ...] = ()) -> RunnerOutput:
        """Feed a causal run ``tokens`` ``[B, Q]`` at per-row offsets ``offset`` ``[B]`` past the root's
        slot of the target's cache; returns the next-token logits ``[B, Q, V]`` and, for the layer
        counts ``collect``, the hidden states ``[E, B, Q, H]`` after them (``layer_hidden``).

        Each token reads the selected slots, the tokens of this step fed before the run (table
        entries ``budget .. budget + offset - 1``) and the run's earlier tokens.
        """
        b, q = tokens.shape
        ar = torch.arange(q, device=tokens.device)
        slots = (ctx.seq_len - 1 + offset)[:, None] + ar
        positions = (ctx.seq_len - 1 - ctx.start + offset)[:, None] + ar
        among = torch.ones(q, q, dtype=torch.bool, device=tokens.device).tril().expand(b, q, q)
        return self._forward(ctx.cache, tokens, positions, slots, among, view_len=ctx.cache.max_len,
                             contiguous=True, collect=collect or None,
                             table=(self.table, self.first, self.budget + offset))

    def propose(self, ctx: DecodeContext) -> DraftTree:
        self.select(ctx)
        b, dev, k = ctx.tokens.shape[0], ctx.tokens.device, self.num_tokens
        tokens = torch.zeros(b, k, dtype=torch.long, device=dev)
        q = torch.zeros(b, k, self.runner.vocab_size, device=dev) if ctx.params.do_sample else None
        current = ctx.tokens.gather(1, (ctx.seq_len - 1).unsqueeze(1))  # [B, 1] the root
        offset = torch.zeros(b, dtype=torch.long, device=dev)
        for i in range(k):
            token, dist = choose(ctx, self.forward_sparse(ctx, current, offset + i).logits[:, -1], tokens[:, :i])
            if q is not None:
                q[:, i] = dist
            current = token.unsqueeze(1)
            tokens[:, i] = token
        return DraftTree.chain(tokens, q=q)

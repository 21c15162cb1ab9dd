"""Head drafters: `EagleHead` and `MedusaHeads`, drafting from the target's own hidden states.

Both read the hidden states the engine's verification already computes (``spec.hidden_layers``):
after each drafted step ``observe`` picks them out at the accepted path, and the next ``propose``
drafts from them. ``propose`` and ``observe`` are static-shape device work (capturable);
``begin`` and ``resync`` are host-side catch-ups.

Slots. Everything is laid out slot for slot like the target's cache: slot j holds the j-th
token of the row's buffer (left padding first). ``feature[j]`` is the target's state at slot j
(after it read token j). As in training (`specdec.training.heads`), the EAGLE head's entry at
slot j reads (token j, fused feature j - 1) and predicts token j + 1; Medusa head k reads the
target's final normed state at slot j and predicts token j + k + 2.

Prompt features (``begin``). The engine's prefill exports no hidden states, so ``begin`` re-runs
the target's first layers over the committed slots (`target_states`): each query attends to the
prefix's K/V already in the target's cache and writes its own K/V only into scratch slots past
the root, which verification overwrites. So the target's committed cache is never touched, and
outputs stay exactly those of plain decoding whatever the features are. ``resync`` does the same
for the tokens committed while drafting was paused.

This module knows the drafter contract, slots and head models; not acceptance rules or the host loop.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from specdec.cache import KVCache
from specdec.verifiers.acceptance import StepOutcome, sample, warp_probs
from specdec.verifiers.tree import DraftTree

from .base import DecodeState, DraftSpec, Drafter, VocabularyMismatchError
from .heads import EagleHeadModel, MedusaHeadsModel
from .tree_search import Children, TreeSearch, top_children

CHUNK = 256  # queries per catch-up forward in begin/resync


def target_states(state: DecodeState, slots: Tensor, counts: Sequence[int]) -> Tensor:
    """[E, B, Q, H] the target's hidden states after each of ``counts`` layers at committed ``slots`` [B, Q].

    Each query sees the row's committed K/V at slots ``start .. own slot`` from the target's cache
    (its own K/V included) and writes its new K/V into the scratch slots ``seq_len - 1 + i``,
    which no query reads: the committed cache is left as it was. Queries at left padding (or past
    a row's committed length) give garbage that callers never read. Host-side (begin/resync).
    """
    b, q = slots.shape
    dev, runner = slots.device, state.target
    hi = int(state.seq_len.max())
    if q > state.capacity - hi + 1:
        raise ValueError(f"target_states: {q} queries need scratch slots past the root; at most "
                         f"{state.capacity - hi + 1} are free")
    write = state.seq_len.unsqueeze(1) - 1 + torch.arange(q, device=dev)              # [B, Q]
    view = hi + q - 1  # covers the last write slot, hi + q - 2 < capacity
    j = torch.arange(view, device=dev)
    seen = ((j >= state.start[:, None, None]) & (j <= slots[:, :, None])
            & (j < (state.seq_len - 1)[:, None, None]))                                # [B, Q, S]
    empty = ~seen.any(dim=-1, keepdim=True)
    seen |= empty & (j == write[:, :, None])   # a query with nothing to read sees its own write
    among = torch.eye(q, dtype=torch.bool, device=dev).expand(b, q, q)
    out = runner.forward(state.cache, state.tokens.gather(1, slots), (slots - state.start[:, None]).clamp(min=0),
                         write, among, view_len=view, layers=range(max(counts)), compute_logits=False,
                         mask=seen, collect=counts)
    return out.layer_hidden


def _chunks(lo: int, hi: int, size: int):
    for a in range(lo, hi, size):
        yield a, min(a + size, hi)


class EagleHead(Drafter):
    """An EAGLE-3 style head (`EagleHeadModel`) drafting a chain of ``num_tokens``, or an EAGLE-2
    dynamic tree when ``tree_topk`` is given.

    Example::

        head = EagleHeadModel.from_pretrained("runs/eagle/head")
        spec = specdec.wrap(target, drafter=EagleHead(head, num_tokens=4))
        tree = specdec.wrap(target, drafter=EagleHead(head, tree_topk=4, tree_depth=5, tree_nodes=24))

    Per step: the head re-reads the last ``D + 1`` committed slots (D the depth: ``num_tokens``
    or ``tree_depth``), which hold every slot the previous step committed, now with the target's
    true features: the accepted path's head K/V is recomputed in this one forward rather than
    copied from scratch (computed from the head's own guessed states), and rollback is just
    overwriting scratch slots. The root's output gives the first draft tokens.

    - Chain: ``num_tokens - 1`` one-token forwards on the head's own output state extend it in
      scratch slots of its cache. With sampling each token is drawn from the warped head
      distribution, mapped to the target vocabulary (``d2t``), and ``q`` carries it.
    - Tree (`specdec.drafters.tree_search.TreeSearch`): the root's top ``tree_topk`` tokens,
      then ``tree_depth - 1`` forwards of the ``tree_topk`` best frontier nodes at once (each
      reads its parent's output state, under an ancestor mask over ``(tree_depth - 1) *
      tree_topk`` scratch slots), then the ``tree_nodes`` best by cumulative log-probability.
      ``tree_depth`` defaults to ``num_tokens`` and ``tree_nodes`` to ``tree_topk * tree_depth``.
      Sampling draws siblings without replacement; each node's ``q`` is its parent's warped
      distribution, as the tree's speculative sampling needs.
    """

    def __init__(self, head: EagleHeadModel, num_tokens: int = 4, tree_topk: int | None = None,
                 tree_depth: int | None = None, tree_nodes: int | None = None):
        if num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
        if not isinstance(head, EagleHeadModel):
            raise TypeError(f"EagleHead needs an EagleHeadModel, got {type(head).__name__}")
        self.search = TreeSearch.from_args("EagleHead", tree_topk, tree_depth, tree_nodes, num_tokens)
        if self.search and self.search.topk > head.draft_vocab_size:
            raise ValueError(f"EagleHead: tree_topk={tree_topk} exceeds the draft vocabulary ({head.draft_vocab_size})")
        self.head, self.num_tokens = head.eval(), num_tokens
        depth = self.search.depth if self.search else num_tokens
        self.window = depth + 1  # committed slots re-read per step: a step commits at most this many
        self.counts = tuple(sorted({a for a in head.aux_layers if a > 0}))  # aux id 0 is the embedding
        # Entry j - window reads feature j - window - 1: the engine left-pads so that slot exists.
        self.spec = DraftSpec(num_nodes=self.search.nodes if self.search else num_tokens, lookback=self.window + 1,
                              scratch_slots=self.search.scratch if self.search else 0,
                              hidden_layers=self.counts, forwards_per_step=depth)
        self.runner = None
        self.feature: Tensor | None = None  # [B, L, H] fused target features by slot (head dtype)
        self.cache: KVCache | None = None   # the head's own K/V by slot
        self.vocab_ids: Tensor | None = None  # [Vd] target id of each draft id
        self._forward = self.head.forward

    @classmethod
    def from_pretrained(cls, folder, num_tokens: int = 4, target=None, device=None,
                        dtype: torch.dtype | str | None = None, tree_topk: int | None = None,
                        tree_depth: int | None = None, tree_nodes: int | None = None) -> "EagleHead":
        """Load a speculators folder (`EagleHeadModel.save_pretrained`); ``target`` supplies a
        left-out embedding. ``dtype`` (e.g. ``"bf16"``) casts the head; default fp32. The tree
        arguments are the constructor's."""
        return cls(_cast(EagleHeadModel.from_pretrained(folder, target=target, device=device), dtype),
                   num_tokens=num_tokens, tree_topk=tree_topk, tree_depth=tree_depth, tree_nodes=tree_nodes)

    def compile(self, options: dict | None) -> None:
        from specdec.step import compiled

        self._forward = compiled(self.head.forward, options or True)

    def bind(self, target) -> None:
        """Check the head fits ``target``: hidden size, vocabulary, aux layers, device."""
        cfg, n = self.head.config, target.num_layers
        _check_fits("EagleHead", cfg.hidden_size, self.head.embed_tokens.num_embeddings, self.head.lm_head.weight.device,
                    target)
        bad = [a for a in self.head.aux_layers if not 0 <= a < n]
        if bad:
            raise ValueError(f"EagleHead: aux layers {bad} are outside this {n}-layer target's 0..{n - 1}; "
                             "the head was trained for another target")
        self.runner = target
        self.vocab_ids = self.head.to_target(torch.arange(self.head.draft_vocab_size, device=target.device))

    # ------------------------------------------------------------------ features
    def _fused(self, state: DecodeState, layer_hidden: Tensor | None, tokens: Tensor) -> Tensor:
        """[B, Q, H] ``fc`` of the aux states: ``layer_hidden`` [E, B, Q, H] at ``self.counts``;
        aux id 0 (the embedding output) is the target's embedding of ``tokens`` [B, Q]."""
        parts = [state.target.base.embed_tokens(tokens) if a == 0 else layer_hidden[self.counts.index(a)]
                 for a in self.head.aux_layers]
        return self.head.fuse(torch.cat(parts, dim=-1).to(self.feature.dtype))

    def _catch_up(self, state: DecodeState, lo: int) -> None:
        """Recompute features of slots ``lo ..`` and head entries of slots ``max(lo, 1) ..`` up to
        where ``propose`` takes over (``seq_len - window``). Host-side."""
        hi, b, dev = int(state.seq_len.max()), state.tokens.shape[0], state.tokens.device
        room = min(CHUNK, state.capacity - hi + 1)
        for a, z in _chunks(lo, hi - 1, room):
            slots = torch.arange(a, z, device=dev).expand(b, z - a)
            states = target_states(state, slots, self.counts) if self.counts else None
            self.feature[:, a:z] = self._fused(state, states, state.tokens[:, a:z])
        for a, z in _chunks(max(lo, 1), hi - self.window, CHUNK):
            self._feed(state, a, z)

    def _feed(self, state: DecodeState, lo: int, hi: int) -> None:
        """Head entries of slots ``lo .. hi - 1`` (token j, feature j - 1), causal over the head cache."""
        b, dev = state.tokens.shape[0], state.tokens.device
        slots = torch.arange(lo, hi, device=dev).expand(b, hi - lo)
        self._head_step(state, state.tokens[:, lo:hi], self.feature[:, lo - 1:hi - 1], slots, slots, hi)

    def _head_step(self, state: DecodeState, tokens: Tensor, hidden: Tensor, slots: Tensor, sees_to: Tensor,
                   view: int):
        """One head forward: ``tokens`` [B, Q] with input states ``hidden`` [B, Q, H] written at
        ``slots`` [B, Q]; query i attends to head slots ``start .. sees_to[:, i]`` and itself."""
        j = torch.arange(view, device=tokens.device)
        mask = (j >= state.start[:, None, None]) & (j <= sees_to[:, :, None]) | (j == slots[:, :, None])
        positions = (slots - state.start[:, None]).clamp(min=0)
        return self._masked_step(tokens, hidden, positions, slots, mask, view)

    def _masked_step(self, tokens: Tensor, hidden: Tensor, positions: Tensor, slots: Tensor, mask: Tensor,
                     view: int):
        """One head forward writing at ``slots`` [B, Q], attending where ``mask`` [B, Q, view] allows."""
        self.cache.write_slots, self.cache.view_len = slots, view
        return self._forward(tokens, hidden, positions, cache=self.cache, mask=mask.unsqueeze(1))

    def _tree_step(self, *args) -> tuple[Tensor, Tensor]:
        out = self._masked_step(*args)
        return out.logits, out.hidden

    # ------------------------------------------------------------------ protocol
    def begin(self, state: DecodeState) -> None:
        """Allocate the feature buffer and head cache, then compute the prompt's features and
        head entries (one forward of the target's first ``max(aux)`` layers over the prompt)."""
        if self.runner is not state.target:
            self.bind(state.target)
        b, cap = state.tokens.shape
        if self.cache is None or self.cache.batch != b or self.cache.max_len < cap:
            dtype, dev = self.head.lm_head.weight.dtype, state.tokens.device
            self.cache = KVCache.for_model(self.head.config, b, cap, dtype, dev)
            self.feature = torch.zeros(b, cap, self.head.config.hidden_size, dtype=dtype, device=dev)
        self.cache.start.copy_(state.start)
        self._catch_up(state, 0)

    def resync(self, state: DecodeState, since: int) -> None:
        """After undrafted steps (from committed length ``since`` on): recompute what they skipped."""
        self._catch_up(state, max(since - self.window - 2, 0))

    def _read_root(self, state: DecodeState, view: int) -> tuple[Tensor, Tensor]:
        """Re-read the last ``window`` committed slots with their true features; return the
        root's draft logits [B, Vd] and output state [B, 1, H]."""
        b, dev, w = state.tokens.shape[0], state.tokens.device, self.window
        slots = state.seq_len.unsqueeze(1) - w + torch.arange(w, device=dev)               # [B, W]
        feats = self.feature.gather(1, (slots - 1).unsqueeze(-1).expand(b, w, self.feature.shape[-1]))
        out = self._head_step(state, state.tokens.gather(1, slots), feats, slots, slots, view)
        return out.logits[:, -1], out.hidden[:, -1:]

    def propose(self, state: DecodeState) -> DraftTree:
        if self.search is not None:
            return self._propose_tree(state)
        k = self.num_tokens
        view = state.max_seq_len + k  # committed head entries plus the chain's scratch slots
        logits, hidden = self._read_root(state, view)                                     # [B, Vd], [B, 1, H]
        drafted, dists = [], []
        for d in range(k):
            token, q = self._choose(logits, state)
            drafted.append(token)
            dists.append(q)
            if d + 1 < k:  # feed token d at its slot; the chain sees every committed entry and itself
                slot = (state.seq_len + d).unsqueeze(1)                                   # [B, 1]
                out = self._head_step(state, token.unsqueeze(1), hidden, slot, slot, view)
                logits, hidden = out.logits[:, -1], out.hidden
        q = torch.stack(dists, dim=1) if state.params.do_sample else None                 # [B, K, V]
        return DraftTree.chain(torch.stack(drafted, dim=1), q=q)

    def _propose_tree(self, state: DecodeState) -> DraftTree:
        view = state.max_seq_len + self.search.scratch
        logits, hidden = self._read_root(state, view)
        vocab = None if self.head.draft_vocab_size == self.runner.vocab_size else self.vocab_ids

        def expand(lg: Tensor) -> Children:
            return top_children(lg, state.params, self.search.topk, vocab, self.runner.vocab_size)

        return self.search.run(expand(logits.unsqueeze(1)), hidden, self._tree_step, state.seq_len, state.start,
                               view, expand)

    def _choose(self, logits: Tensor, state: DecodeState) -> tuple[Tensor, Tensor | None]:
        """(token [B] target id, warped q [B, V] over the target vocabulary or None) from draft
        logits [B, Vd]: greedy argmax, or a draw when sampling."""
        if not state.params.do_sample:
            return self.vocab_ids[logits.argmax(dim=-1)], None
        full = logits.new_full((logits.shape[0], self.runner.vocab_size), float("-inf"))
        q = warp_probs(full.index_copy(1, self.vocab_ids, logits), state.params)
        return sample(q), q

    def observe(self, state: DecodeState, outcome: StepOutcome) -> None:
        """Store the fused target features of the root and the accepted nodes at their slots."""
        b, n = outcome.path.shape
        kept = outcome.accept_len * state.active
        root = state.seq_len - (kept + 1) * state.active - 1                                # [B] old root slot
        slots = root.unsqueeze(1) + torch.arange(n + 1, device=root.device)                 # [B, N + 1]
        states = None
        if self.counts:
            pick = torch.cat([torch.zeros_like(root).unsqueeze(1), 1 + outcome.path.clamp(min=0)], dim=1)
            hid = state.hidden                                                              # [E, B, N + 1, H]
            states = hid.gather(2, pick.view(1, b, n + 1, 1).expand(hid.shape[0], b, n + 1, hid.shape[-1]))
        fused = self._fused(state, states, state.tokens.gather(1, slots))                   # [B, N + 1, H]
        self.feature.scatter_(1, slots.unsqueeze(-1).expand_as(fused), fused)


class MedusaHeads(Drafter):
    """Medusa heads (`MedusaHeadsModel`) drafting a static tree template (Medusa's "choices").

    ``tree`` lists node paths: ``[0]`` is head 0's top token (the root's child), ``[0, 1]`` head
    1's second-best token under it, and so on; path length d uses head d - 1, which predicts the
    token d places after the root. Every prefix of a path must be a path too. Default
    (`default_choices`): the top-1 chain through every head plus, at every depth, the second-best
    token as a sibling. Nodes are point masses (``q=None``), lossless under both rules.

    Example::

        spec = specdec.wrap(target, drafter=MedusaHeads(heads, tree=[[0], [1], [0, 0], [0, 0, 0]]))
    """

    def __init__(self, heads: MedusaHeadsModel, tree: Sequence[Sequence[int]] | None = None):
        if not isinstance(heads, MedusaHeadsModel):
            raise TypeError(f"MedusaHeads needs a MedusaHeadsModel, got {type(heads).__name__}")
        self.heads = heads.eval()
        self.choices = _check_choices(tree if tree is not None else default_choices(heads.num_heads), heads.num_heads)
        self.spec = DraftSpec(num_nodes=len(self.choices), hidden_layers=(heads.config.num_hidden_layers,),
                              forwards_per_step=1)
        self.ranks = max(c[-1] for c in self.choices) + 1  # top-k read per head
        self.template: tuple[Tensor, Tensor, Tensor] | None = None  # (head, rank, parent) [N] each
        self.last: Tensor | None = None  # [B, 1, H] the target's final normed state at the newest root's parent
        self.runner = None

    @classmethod
    def from_pretrained(cls, folder, tree: Sequence[Sequence[int]] | None = None, device=None,
                        dtype: torch.dtype | str | None = None) -> "MedusaHeads":
        return cls(_cast(MedusaHeadsModel.from_pretrained(folder, device=device), dtype), tree=tree)

    def bind(self, target) -> None:
        cfg = self.heads.config
        _check_fits("MedusaHeads", cfg.hidden_size, self.heads.vocab_size,
                    self.heads.blocks[0].layers[0].weight.device, target)
        self.heads.share_lm_head(target.model)
        if cfg.num_hidden_layers != target.num_layers:
            raise ValueError(f"MedusaHeads were trained on a {cfg.num_hidden_layers}-layer target; this one has "
                             f"{target.num_layers} layers")
        index = {tuple(c): i for i, c in enumerate(self.choices)}
        head = [len(c) - 1 for c in self.choices]
        rank = [c[-1] for c in self.choices]
        parent = [index[tuple(c[:-1])] if len(c) > 1 else -1 for c in self.choices]
        self.template = tuple(torch.tensor(x, dtype=torch.long, device=target.device) for x in (head, rank, parent))
        self.runner = target

    def _store(self, state: DecodeState, last: Tensor) -> None:
        """``last`` [B, 1, H]: the target's last-layer output (before its final norm), as trained."""
        normed = state.target.base.norm(last).to(self.heads.blocks[0].layers[0].weight.dtype)
        if self.last is None or self.last.shape != normed.shape:
            self.last = normed.clone()
        else:
            self.last.copy_(normed)

    def begin(self, state: DecodeState) -> None:
        """The state at each row's slot ``seq_len - 2``, which predicted the root (one target
        forward of one query per row against its committed cache)."""
        if self.runner is not state.target:
            self.bind(state.target)
        slots = (state.seq_len - 2).clamp(min=0).unsqueeze(1)
        self._store(state, target_states(state, slots, self.spec.hidden_layers)[0])

    def resync(self, state: DecodeState, since: int) -> None:
        self.begin(state)

    def propose(self, state: DecodeState) -> DraftTree:
        head, rank, parent = self.template
        logits = self.heads(self.last)[:, :, 0]                                 # [K, B, V]
        top = logits.topk(self.ranks, dim=-1).indices                           # [K, B, R]
        tokens = top[head, :, rank].T.contiguous()                              # [B, N]
        b, n = tokens.shape
        return DraftTree(tokens=tokens, parents=parent.expand(b, n).contiguous(),
                         valid=torch.ones(b, n, dtype=torch.bool, device=tokens.device))

    def observe(self, state: DecodeState, outcome: StepOutcome) -> None:
        """Keep the state at the deepest accepted node (the root when none was): it predicted the bonus token."""
        a = outcome.accept_len
        deepest = outcome.path.gather(1, (a - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
        at = torch.where(a > 0, deepest + 1, torch.zeros_like(a))                # [B] index into root + nodes
        hid = state.hidden[0]                                                   # [B, N + 1, H]
        self._store(state, hid.gather(1, at.view(-1, 1, 1).expand(-1, 1, hid.shape[-1])))


def default_choices(num_heads: int) -> list[list[int]]:
    """The top-1 chain through every head plus a second-best sibling at every depth.

    Example: ``default_choices(2) == [[0], [1], [0, 0], [0, 1]]``.
    """
    chain = [[0] * d for d in range(1, num_heads + 1)]
    return sorted(chain + [[0] * (d - 1) + [1] for d in range(1, num_heads + 1)], key=lambda c: (len(c), c))


def _check_choices(tree, num_heads: int) -> list[list[int]]:
    """Validate Medusa choices and order them parents first (by depth, then lexicographically)."""
    choices = sorted({tuple(int(i) for i in c) for c in tree}, key=lambda c: (len(c), c))
    if not choices:
        raise ValueError("MedusaHeads tree is empty; give paths such as [[0], [0, 0]] or tree=None")
    for c in choices:
        if not c or len(c) > num_heads or min(c) < 0:
            raise ValueError(f"MedusaHeads tree path {list(c)}: paths need 1..{num_heads} (num_heads) ranks >= 0")
        if len(c) > 1 and c[:-1] not in set(choices):
            raise ValueError(f"MedusaHeads tree path {list(c)} has no parent path {list(c[:-1])}; add it")
    return [list(c) for c in choices]


def _cast(module, dtype):
    """``module`` in ``dtype`` (a torch dtype or a name such as "bf16"); None or "auto" keep fp32."""
    from specdec.loading import resolve_dtype

    dtype = resolve_dtype(dtype)
    return module if dtype in (None, "auto") else module.to(dtype)


def _check_fits(name: str, hidden: int, vocab: int, device, target) -> None:
    target_hidden = target.config.hidden_size
    if hidden != target_hidden:
        raise ValueError(f"{name}: hidden size {hidden} does not match the target's {target_hidden}")
    if vocab != target.vocab_size:
        raise VocabularyMismatchError(f"{name}: vocabulary of {vocab} tokens does not match the target's "
                                      f"{target.vocab_size}")
    if torch.device(device) != target.device:
        raise ValueError(f"{name} is on {device} but the target is on {target.device}; move the head "
                         "(from_pretrained(..., device=...) or .to(device))")

"""`EagleHead`: an EAGLE-3 style head drafting from the target's own hidden states, a chain or an
EAGLE-2 dynamic tree. (`MedusaHeads` lives in `specdec.drafters.medusa_heads`; both are
importable from here too.)

The head reads the hidden states the engine's verification already computes
(``spec.hidden_layers``): after each drafted step ``observe`` picks them out at the accepted
path, and the next ``propose`` drafts from them. ``propose`` and ``observe`` are static-shape
device work (capturable); ``begin`` and ``resync`` are host-side catch-ups. The head's forwards
run through `specdec.drafters.head_layer.EagleStep`, the head layer written out with few kernels;
everything a step's forwards share (slots, positions, rotary tables, masks) is made once per step.

Slots. Everything is laid out slot for slot like the target's cache: slot j holds the j-th
token of the row's buffer (left padding first). ``feature[j]`` is the target's state at slot j
(after it read token j). As in training (`specdec.training.heads`), the EAGLE head's entry at
slot j reads (token j, fused feature j - 1) and predicts token j + 1.

Prompt features. The target's prefill collects the head's aux layers and hands them to
``observe_prefill`` chunk by chunk (``DraftSpec.prefill_hidden``; inside the captured prefill on
CUDA), which stores the fused features and writes the head's own K/V over the prompt; ``begin``
then has nothing to run. Without that hand-over (a spec with ``prefill_hidden=False``), and in
``resync`` for the tokens committed while drafting was paused, the target's first layers are
re-run over the committed slots (`target_states`): each query attends to the prefix's K/V already
in the target's cache and writes its own K/V only into scratch slots past the root, which
verification overwrites. Either way the target's committed cache is never touched, and outputs
stay exactly those of plain decoding whatever the features are.

This module knows the drafter contract, slots and head models; not acceptance rules or the host loop.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from specdec.cache import KVCache
from specdec.verifiers.acceptance import StepOutcome
from specdec.verifiers.processors import DraftPaths
from specdec.verifiers.tree import DraftTree

from .base import DecodeState, DraftSpec, Drafter
from .draw import choose, processed
from .head_layer import EagleStep, StepOutput, additive_mask
from .head_common import CHUNK, cast, check_fits, chunks, target_states
from .heads import EagleHeadModel
from .medusa_heads import MedusaHeads, default_choices  # noqa: F401  (their former home: old imports keep working)
from .tree_search import Children, TreeSearch, top_children


@dataclass
class Plan:
    """What every head forward of one drafting step shares, made once per step."""

    slots: Tensor                # [B, P] head-cache slots: the re-read window, then the chain's (tree's levels')
    rope: tuple[Tensor, Tensor]  # cos, sin [B, P, D] at those slots' positions
    mask: Tensor | None          # [B, 1, M, view] additive masks of the first M slots (None: not needed)


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
                              hidden_layers=self.counts, forwards_per_step=depth, prefill_hidden=True)
        self.runner = None
        self.feature: Tensor | None = None  # [B, L, H] fused target features by slot (head dtype)
        self.cache: KVCache | None = None   # the head's own K/V by slot
        self.vocab_ids: Tensor | None = None  # [Vd] target id of each draft id (None: the target's own)
        self.step = EagleStep(self.head)
        self._forward = self.step.forward
        self._arange: Tensor | None = None   # [capacity] 0, 1, ...: slot indices, made once per cache
        self._offsets: Tensor | None = None  # [W + D - 1] slots of a step's forwards relative to seq_len

    @classmethod
    def from_pretrained(cls, folder, num_tokens: int = 4, target=None, device=None,
                        dtype: torch.dtype | str | None = None, tree_topk: int | None = None,
                        tree_depth: int | None = None, tree_nodes: int | None = None) -> "EagleHead":
        """Load a speculators folder (`EagleHeadModel.save_pretrained`) or a shipped head by zoo
        name, e.g. ``"zoo:smollm2-135m-instruct-eagle"``. A left-out embedding comes from
        ``target``, or from the target the drafter binds to. ``dtype`` (e.g. ``"bf16"``) casts the
        head; default fp32. The tree arguments are the constructor's."""
        return cls(cast(EagleHeadModel.from_pretrained(folder, target=target, device=device), dtype),
                   num_tokens=num_tokens, tree_topk=tree_topk, tree_depth=tree_depth, tree_nodes=tree_nodes)

    def compile(self, options: dict | None) -> None:
        from specdec.step import compiled

        self._forward = compiled(self.step.forward, options or True)

    def bind(self, target) -> None:
        """Check the head fits ``target``: verifier, hidden size, vocabulary, aux layers, device;
        a head saved without its embedding takes the target's here."""
        cfg, n = self.head.config, target.num_layers
        check_fits("EagleHead", cfg.hidden_size, self.head.embed_tokens.num_embeddings, self.head.lm_head.weight.device,
                    target, self.head.verifier)
        bad = [a for a in self.head.aux_layers if not 0 <= a < n]
        if bad:
            raise ValueError(f"EagleHead: aux layers {bad} are outside this {n}-layer target's 0..{n - 1}; "
                             "the head was trained for another target")
        if self.head.borrows_embedding:
            self.head.take_embedding(target.model)
        self.runner = target
        full = self.head.draft_vocab_size == target.vocab_size and not bool(self.head.d2t.any())
        self.vocab_ids = None if full else self.head.to_target(torch.arange(self.head.draft_vocab_size,
                                                                            device=target.device))
        depth = self.window - 1
        self._offsets = torch.arange(self.window + depth - 1, device=target.device) - self.window

    # ------------------------------------------------------------------ features
    def fuse_features(self, state: DecodeState, layer_hidden: Tensor | None, tokens: Tensor) -> Tensor:
        """[B, Q, H] the head's depth-0 input state for ``tokens`` [B, Q]: ``fc`` of the target's
        states at the head's aux layers. ``layer_hidden`` [E, B, Q, H] holds the target's states
        after each layer count of ``spec.hidden_layers`` (as verification exports them; None when
        the head reads only the embedding); aux id 0 (the embedding output) is the target's
        embedding of ``tokens``. Device work; used by ``observe`` and by drafters that feed the
        head states of their own (`specdec.drafters.hierarchical`)."""
        parts = [state.target.base.embed_tokens(tokens) if a == 0 else layer_hidden[self.counts.index(a)]
                 for a in self.head.aux_layers]
        return self.head.fuse(torch.cat(parts, dim=-1).to(self.feature.dtype))

    def store_features(self, state: DecodeState, slots: Tensor, layer_hidden: Tensor | None, tokens: Tensor) -> None:
        """Put `fuse_features` of ``tokens`` [B, Q] at ``slots`` [B, Q] of the feature buffer, where
        the next ``propose`` reads them (entry j reads the feature of slot j - 1)."""
        fused = self.fuse_features(state, layer_hidden, tokens)                               # [B, Q, H]
        self.feature.scatter_(1, slots.unsqueeze(-1).expand_as(fused), fused)

    def _catch_up(self, state: DecodeState, lo: int, features: bool = True) -> None:
        """Recompute features of slots ``lo ..`` (unless ``features`` is false: they are in place)
        and head entries of slots ``max(lo, 1) ..`` up to where ``propose`` takes over
        (``seq_len - window``). Host-side."""
        hi, b, dev = int(state.seq_len.max()), state.tokens.shape[0], state.tokens.device
        room = min(CHUNK, state.capacity - hi + 1)
        for a, z in chunks(lo, hi - 1, room) if features else ():
            slots = torch.arange(a, z, device=dev).expand(b, z - a)
            states = target_states(state, slots, self.counts) if self.counts else None
            self.feature[:, a:z] = self.fuse_features(state, states, state.tokens[:, a:z])
        for a, z in chunks(max(lo, 1), hi - self.window, CHUNK):
            self._feed(state, a, z)

    def _feed(self, state: DecodeState, lo: int, hi: int) -> None:
        """Head entries of slots ``lo .. hi - 1`` (token j, feature j - 1), causal over the head
        cache: only their K/V, eagerly (the shapes follow the prompt length, so compiling this
        would recompile for every new length)."""
        b = state.tokens.shape[0]
        plan = self._plan(state, self._arange[lo:hi].expand(b, hi - lo), hi, hi - lo)
        self.cache.write_slots, self.cache.view_len = plan.slots, hi
        self.step.forward(state.tokens[:, lo:hi], self.step.carry(self.feature[:, lo - 1:hi - 1]), plan.rope,
                          plan.mask, self.cache, kv_only=True)

    def _plan(self, state: DecodeState, slots: Tensor, view: int, masked: int) -> Plan:
        """The `Plan` of forwards at ``slots`` [B, P], the first ``masked`` of which get a mask:
        query i attends to head slots ``start .. slots[:, i]``, and always to itself."""
        positions = (slots - state.start[:, None]).clamp(min=0)
        mask = None
        if masked:
            j, s = self._arange[:view], slots[:, :masked, None]
            mask = additive_mask((j >= state.start[:, None, None]) & (j <= s) | (j == s))   # [B, 1, M, view]
        return Plan(slots, self.step.rope(positions), mask)

    def _run(self, plan: Plan, a: int, z: int, tokens: Tensor, carry: Tensor, view: int, mask: Tensor | None = None,
             slots: Tensor | None = None, **kw) -> StepOutput:
        """The head forward of plan entries ``a .. z - 1`` (compiled when `compile` was called);
        ``mask``/``slots`` override the plan's (the tree's levels bring their own)."""
        self.cache.write_slots = plan.slots[:, a:z] if slots is None else slots
        self.cache.view_len = view
        rope = (plan.rope[0][:, a:z], plan.rope[1][:, a:z])
        return self._forward(tokens, carry, rope, plan.mask[:, :, a:z] if mask is None else mask, self.cache, **kw)

    # ------------------------------------------------------------------ protocol
    def reserve(self, state: DecodeState) -> None:
        """The feature buffer and head cache for ``state``'s batch and capacity (kept while they
        fit), the head's fused weights (`EagleStep.refresh`) and the rows' first real slots: all
        that ``observe_prefill`` writes through, set before the prefill."""
        if self.runner is not state.target:
            self.bind(state.target)
        b, cap = state.tokens.shape
        if self.cache is None or self.cache.batch != b or self.cache.max_len < cap:
            dtype, dev = self.head.lm_head.weight.dtype, state.tokens.device
            self.cache = KVCache.for_model(self.head.config, b, cap, dtype, dev)
            self.feature = torch.zeros(b, cap, self.head.config.hidden_size, dtype=dtype, device=dev)
            self._arange = torch.arange(cap, device=dev)
        self.step.refresh()
        self.cache.start.copy_(state.start)

    @torch.no_grad()
    def observe_prefill(self, state: DecodeState, slots: Tensor, layer_hidden: Tensor) -> None:
        """A prefill chunk's features, then the head's K/V there (token j over feature j - 1, the
        first slot's from the chunk before), from the target's own prefill: ``begin`` has nothing
        left to run. Static shapes (one captured prefill serves every chunk). Entries at slots
        from ``seq_len - window`` on are rewritten by ``propose`` before it reads them; left
        padding is never attended."""
        tokens = state.tokens.gather(1, slots)
        self.store_features(state, slots, layer_hidden, tokens)
        b, c, h = *slots.shape, self.feature.shape[-1]
        before = self.feature.gather(1, (slots - 1).clamp(min=0).unsqueeze(-1).expand(b, c, h))   # [B, C, H]
        self.cache.write_slots, self.cache.view_len = slots, self.cache.max_len
        rope = self.step.rope((slots - state.start[:, None]).clamp(min=0))
        self.step.forward(tokens, self.step.carry(before), rope, None, self.cache, kv_only=True)

    def begin(self, state: DecodeState) -> None:
        """Allocate the feature buffer and head cache and refresh the head's fused weights
        (`reserve`). The prefill has then already written the prompt's features and head entries
        (``observe_prefill``); without it (``state.prompt_states`` false) they come from one more
        forward of the target's first ``max(aux)`` layers over the prompt, then the head's."""
        self.reserve(state)
        if not state.prompt_states:
            self._catch_up(state, 0)

    def resync(self, state: DecodeState, since: int) -> None:
        """After undrafted steps (from committed length ``since`` on): recompute what they skipped."""
        self._catch_up(state, max(since - self.window - 2, 0))

    def _read_root(self, state: DecodeState, view: int, masked: int) -> tuple[Plan, StepOutput]:
        """The step's `Plan`, and the head's re-read of the last ``window`` committed slots with
        their true features: the root's draft logits [B, 1, Vd] and carry [B, 1, 2, H]."""
        w, h = self.window, self.feature.shape[-1]
        slots = state.seq_len.unsqueeze(1) + self._offsets                                  # [B, W + D - 1]
        plan = self._plan(state, slots, view, masked)
        b = slots.shape[0]
        feats = self.feature.gather(1, (plan.slots[:, :w] - 1).unsqueeze(-1).expand(b, w, h))
        root = self._run(plan, 0, w, state.tokens.gather(1, plan.slots[:, :w]), self.step.carry(feats), view,
                         last_only=True)
        return plan, root

    @torch.no_grad()  # whatever the caller's grad mode (step_profile's was on): no autograd, no grad on buffers
    def propose(self, state: DecodeState) -> DraftTree:
        if self.search is not None:
            return self._propose_tree(state)
        k, w = self.num_tokens, self.window
        view = state.max_seq_len + k  # committed head entries plus the chain's scratch slots
        plan, out = self._read_root(state, view, w + k - 1)
        drafted, dists = [], []
        for d in range(k):
            token, q = choose(state, out.logits[:, -1], drafted, self.vocab_ids)  # processed with the chain so far
            drafted.append(token)
            dists.append(q)
            if d + 1 < k:  # feed token d at slot seq_len + d; it sees every committed entry, the chain and itself
                out = self._run(plan, w + d, w + d + 1, token.unsqueeze(1), out.carry, view, carry_out=d + 2 < k)
        q = torch.stack(dists, dim=1) if state.params.do_sample else None                 # [B, K, V]
        return DraftTree.chain(torch.stack(drafted, dim=1), q=q)

    def _propose_tree(self, state: DecodeState) -> DraftTree:
        view = state.max_seq_len + self.search.scratch
        plan, out = self._read_root(state, view, self.window)
        vocab, b, w = self.vocab_ids, state.tokens.shape[0], self.window
        levels = iter(range(self.search.depth - 1))  # the search feeds levels 1, 2, ... in order

        def step(tokens, carry, positions, slots, mask, view_len) -> tuple[Tensor, Tensor]:
            i = w + next(levels)  # level l's nodes sit at position seq_len - 1 - start + l: plan entry w + l - 1
            rope = tuple(t[:, i:i + 1].expand(-1, tokens.shape[1], -1) for t in plan.rope)
            out = self._run(Plan(plan.slots, rope, None), 0, tokens.shape[1], tokens,
                            carry.view(b, tokens.shape[1], 2, -1), view_len, additive_mask(mask), slots)
            return out.logits, out.carry.flatten(2)

        def expand(lg: Tensor, paths: DraftPaths | None) -> Children:
            lg, ids = processed(state, lg, paths, vocab)
            return top_children(lg, state.params, self.search.topk, ids, self.runner.vocab_size)

        root = expand(out.logits, DraftPaths.chain(state.tokens[:, :0]) if state.params.processors.active else None)
        return self.search.run(root, out.carry.flatten(2), step, state.seq_len, state.start, view, expand,
                               track_paths=state.params.processors.active)

    @torch.no_grad()
    def observe(self, state: DecodeState, outcome: StepOutcome) -> None:
        """Store the fused target features of the root and the accepted nodes at their slots."""
        b, n = outcome.path.shape
        root = state.seq_len - 1 - (outcome.accept_len + 1) * state.active                 # [B] old root slot
        slots = root.unsqueeze(1) + self._arange[:n + 1]                                   # [B, N + 1]
        states = None
        if self.counts:
            pick = torch.nn.functional.pad(outcome.path.clamp(min=0) + 1, (1, 0))           # [B, N + 1], 0 the root
            hid = state.hidden                                                              # [E, B, N + 1, H]
            states = hid.gather(2, pick.view(1, b, n + 1, 1).expand(hid.shape[0], b, n + 1, hid.shape[-1]))
        self.store_features(state, slots, states, state.tokens.gather(1, slots))

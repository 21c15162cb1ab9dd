"""`MedusaHeads`: Medusa heads (`MedusaHeadsModel`) drafting a static tree template from the target's
last hidden state.

``observe`` keeps the target's final normed state at the deepest accepted node (verification
exports it, ``spec.hidden_layers``); the next ``propose`` runs the K heads on it once and reads
each template node's token from its head's top ranks. The template is a fixed tree shape
(`DraftTree.from_paths`), so verification spends no kernels compiling it.

This module knows the drafter contract and Medusa's templates; not acceptance rules or the host loop.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from specdec.verifiers.acceptance import StepOutcome
from specdec.verifiers.tree import DraftTree

from .base import DecodeState, DraftSpec, Drafter
from .draw import template_tokens
from .head_common import cast, check_fits, target_states
from .heads import MedusaHeadsModel


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
        self.paths: list[list[int]] = []  # each node's root-to-node path of node indices (DraftTree.from_paths)
        self.last: Tensor | None = None  # [B, 1, H] the target's final normed state at the newest root's parent
        self.runner = None

    @classmethod
    def from_pretrained(cls, folder, tree: Sequence[Sequence[int]] | None = None, device=None,
                        dtype: torch.dtype | str | None = None) -> "MedusaHeads":
        """Load a speculators folder (`MedusaHeadsModel.save_pretrained`) or a shipped head by zoo
        name, e.g. ``"zoo:smollm2-135m-instruct-medusa"``; ``dtype`` casts the heads."""
        return cls(cast(MedusaHeadsModel.from_pretrained(folder, device=device), dtype), tree=tree)

    def bind(self, target) -> None:
        cfg = self.heads.config
        check_fits("MedusaHeads", cfg.hidden_size, self.heads.vocab_size,
                    self.heads.blocks[0].layers[0].weight.device, target, self.heads.verifier)
        self.heads.share_lm_head(target.model)
        if cfg.num_hidden_layers != target.num_layers:
            raise ValueError(f"MedusaHeads were trained on a {cfg.num_hidden_layers}-layer target; this one has "
                             f"{target.num_layers} layers")
        index = {tuple(c): i for i, c in enumerate(self.choices)}
        head = [len(c) - 1 for c in self.choices]
        rank = [c[-1] for c in self.choices]
        parent = [index[tuple(c[:-1])] if len(c) > 1 else -1 for c in self.choices]
        self.template = tuple(torch.tensor(x, dtype=torch.long, device=target.device) for x in (head, rank, parent))
        self.paths = [[index[tuple(c[:d])] for d in range(1, len(c) + 1)] for c in self.choices]  # node index paths
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

    @torch.no_grad()  # whatever the caller's grad mode (step_profile's was on): no autograd, no grad on buffers
    def propose(self, state: DecodeState) -> DraftTree:
        head, rank, parent = self.template
        logits = self.heads(self.last)[:, :, 0]                                 # [K, B, V]
        if state.params.processors.active:  # each node ranks its head's logits processed with its parent's path
            depth = len(self.choices[-1])
            tokens = template_tokens(state, logits[head].transpose(0, 1), parent, rank, self.ranks, depth)
        else:
            top = logits.topk(self.ranks, dim=-1).indices                       # [K, B, R]
            tokens = top[head, :, rank].T.contiguous()                          # [B, N]
        return DraftTree.from_paths(self.paths, tokens)  # a fixed shape: verification compiles nothing

    @torch.no_grad()
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

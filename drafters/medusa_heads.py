"""`MedusaHeads`: Medusa heads (`MedusaHeadsModel`) drafting a static tree template from the target's
last hidden state.

``observe`` keeps the target's final normed state at the deepest accepted node (verification
exports it, ``spec.hidden_layers``); the next ``propose`` runs the K heads on it once and reads
each template node's token from its head's top ranks. The template is a fixed tree shape
(`DraftTree.from_paths`), so verification spends no kernels compiling it. The K heads run batched
(`MedusaHeads.logits`): each residual layer of every head in one matmul, over stacked copies of
the heads' weights that ``begin`` rebuilds when the weights changed.

This module knows the drafter contract and Medusa's templates; not acceptance rules or the host loop.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from specdec.verifiers.acceptance import StepOutcome
from specdec.verifiers.tree import DraftTree

from .base import DecodeState, DraftSpec, Drafter
from .draw import template_tokens
from .head_common import cast, check_fits, target_states
from .head_layer import refill, version_key
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
                              forwards_per_step=1, prefill_hidden=True)
        self.ranks = max(c[-1] for c in self.choices) + 1  # top-k read per head
        self.template: tuple[Tensor, Tensor, Tensor] | None = None  # (head, rank, parent) [N] each
        self.paths: list[list[int]] = []  # each node's root-to-node path of node indices (DraftTree.from_paths)
        self.pick: Tensor | None = None   # [N] each node's (head, rank) as head * ranks + rank
        self._stacked: list[tuple[Tensor, Tensor]] = []  # per residual layer: weights and biases of every head
        self._key: tuple | None = None    # the heads' weights the stacked copies were made from
        self.last: Tensor | None = None  # [B, 1, H] the target's final normed state at the newest root's parent
        self.prompt_last: Tensor | None = None  # [B, 1, H] the prefill's last-layer state at slot seq_len - 2
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
        self.pick = self.template[0] * self.ranks + self.template[1]
        self.runner = target

    def _store(self, state: DecodeState, last: Tensor) -> None:
        """``last`` [B, 1, H]: the target's last-layer output (before its final norm), as trained."""
        normed = state.target.base.norm(last).to(self.heads.blocks[0].layers[0].weight.dtype)
        if self.last is None or self.last.shape != normed.shape:
            self.last = normed.clone()
        else:
            self.last.copy_(normed)

    def reserve(self, state: DecodeState) -> None:
        b, h = state.tokens.shape[0], state.target.config.hidden_size
        if self.prompt_last is None or self.prompt_last.shape[0] != b:
            self.prompt_last = torch.zeros(b, 1, h, dtype=state.target.dtype, device=state.tokens.device)

    @torch.no_grad()
    def observe_prefill(self, state: DecodeState, slots: Tensor, layer_hidden: Tensor) -> None:
        """Keep the state at slot ``seq_len - 2`` (the prompt's last committed slot) when this chunk holds it."""
        at = (state.seq_len - 2).clamp(min=0) - slots[:, 0]                    # [B] its index in the chunk
        inside = (at >= 0) & (at < slots.shape[1])
        hid = layer_hidden[0]                                                   # [B, C, H]
        got = hid.gather(1, at.clamp(0, slots.shape[1] - 1).view(-1, 1, 1).expand(-1, 1, hid.shape[-1]))
        self.prompt_last.copy_(torch.where(inside.view(-1, 1, 1), got.to(self.prompt_last.dtype), self.prompt_last))

    def begin(self, state: DecodeState) -> None:
        """The state at each row's slot ``seq_len - 2``, which predicted the root: from the prefill
        (``observe_prefill``), or else one target forward of one query per row against its cache."""
        self._catch_up(state, from_prefill=state.prompt_states)

    def resync(self, state: DecodeState, since: int) -> None:
        self._catch_up(state, from_prefill=False)

    def _catch_up(self, state: DecodeState, from_prefill: bool) -> None:
        if self.runner is not state.target:
            self.bind(state.target)
        self._refresh()
        if from_prefill:
            self._store(state, self.prompt_last)
            return
        slots = (state.seq_len - 2).clamp(min=0).unsqueeze(1)
        self._store(state, target_states(state, slots, self.spec.hidden_layers)[0])

    @torch.no_grad()  # whatever the caller's grad mode (step_profile's was on): no autograd, no grad on buffers
    def propose(self, state: DecodeState) -> DraftTree:
        head, rank, parent = self.template
        logits = self.logits(self.last[:, 0])                                   # [B, K, V]
        if state.params.processors.active:  # each node ranks its head's logits processed with its parent's path
            tokens = template_tokens(state, logits[:, head], parent, rank, self.ranks, len(self.choices[-1]))
        else:
            tokens = logits.topk(self.ranks, dim=-1).indices.flatten(1).index_select(1, self.pick)  # [B, N]
        return DraftTree.from_paths(self.paths, tokens)  # a fixed shape: verification compiles nothing

    def logits(self, x: Tensor) -> Tensor:
        """[B, H] the target's final normed state -> [B, K, V]: what ``heads(x)`` gives (head k
        predicts the token k + 2 places ahead), every head's residual layer j in one matmul."""
        b, k = x.shape[0], self.heads.num_heads
        h = None
        for j, (weight, bias) in enumerate(self._stacked):
            if j == 0:  # every head reads x: one [B, H] x [H, K * H] matmul
                y = nn.functional.linear(x, weight, bias).view(b, k, -1)
                h = x.unsqueeze(1) + nn.functional.silu(y)                      # [B, K, H]
            else:  # head k's layer j on its own state: a batched matmul over the heads
                h = h + nn.functional.silu(torch.baddbmm(bias, h.transpose(0, 1), weight).transpose(0, 1))
        if self.heads.shared_lm_head:
            return self.heads.head_logits(0, h)
        return torch.stack([self.heads.head_logits(i, h[:, i]) for i in range(k)], dim=1)

    def _refresh(self) -> None:
        """Refill the stacked residual weights (in place, for captured graphs) when the heads'
        weights were replaced or written into (host-side: ``begin``)."""
        key = version_key(self.heads.blocks.parameters())
        if key == self._key:
            return
        with torch.no_grad():
            first = [blk.layers[0] for blk in self.heads.blocks]
            stacked = [(torch.cat([m.weight for m in first]), torch.cat([m.bias for m in first]))]
            for j in range(1, self.heads.num_layers):
                layers = [blk.layers[j] for blk in self.heads.blocks]
                stacked.append((torch.stack([m.weight.T for m in layers]),                        # [K, H, H]
                                torch.stack([m.bias for m in layers]).unsqueeze(1)))              # [K, 1, H]
            old = self._stacked or [(None, None)] * len(stacked)
            self._stacked = [(refill(ow, w), refill(ob, b)) for (ow, ob), (w, b) in zip(old, stacked)]
        self._key = key

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

"""EAGLE-2 style dynamic draft trees with a static shape: expand the top-K frontier, rerank to N.

Li et al. 2024, "EAGLE-2: Faster Inference of Language Models with Dynamic Draft Trees". A
drafter that scores tokens one forward at a time builds its tree level by level:

1. the root's top ``topk`` tokens are the depth-1 candidates;
2. each further level feeds the ``topk`` best candidates of the level before (the *frontier*,
   by cumulative log-probability) through the drafter at once, in scratch slots of the
   drafter's own cache under an ancestor mask, and takes each one's top ``topk`` children;
3. after ``depth`` levels, the ``nodes`` best of all ``topk + (depth - 1) * topk^2`` candidates
   are kept and numbered parents-first into a `DraftTree` of exactly ``nodes`` nodes.

A candidate's score (its *rank*) never exceeds its parent's, and ties are broken by creation
order, in which parents come before children; so the kept set is ancestor-closed. When
sampling, each node's children are drawn without replacement (Gumbel top-k) and ranked by the
perturbed score, so kept siblings are always a prefix of their draw order, and each node's ``q``
is the distribution it was drawn from: what recursive rejection sampling
(`specdec.verifiers.acceptance.SpeculativeSampling`) needs to stay lossless.

Every shape is fixed by (topk, depth, nodes) and nothing syncs with the host, so a search runs
inside captured steps. This module knows trees, scores and masks; not models or caches.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from specdec.verifiers.acceptance import SamplingParams, warp_probs
from specdec.verifiers.processors import DraftPaths
from specdec.verifiers.tree import DraftTree

# step(tokens [B, K], hidden [B, K, H] or None, positions [B, K], slots [B, K], mask [B, K, view], view)
#   -> (logits [B, K, Vd], hidden [B, K, H] or None): one drafter forward of the frontier.
Step = Callable[[Tensor, Tensor | None, Tensor, Tensor, Tensor, int], tuple[Tensor, Tensor | None]]
# expand(logits [B, K, Vd], paths) -> Children: the frontier's children; ``paths`` holds each frontier
#   node's draft path (its ancestors and itself) when the search tracks them, else None.
Expand = Callable[[Tensor, DraftPaths | None], "Children"]


@dataclass
class Children:
    """The top ``topk`` children of M nodes (greedy: most likely first; sampling: draw order)."""

    tokens: Tensor  # [B, M, K] target ids
    logq: Tensor  # [B, M, K] log q of each child (-inf: outside the warped support)
    key: Tensor  # [B, M, K] selection score: logq, plus Gumbel noise when sampling
    q: Tensor | None  # [B, M, V] warped draft distribution over the target vocabulary, or None


def top_children(logits: Tensor, params: SamplingParams, topk: int, vocab_ids: Tensor | None,
                 vocab_size: int) -> Children:
    """Children of every node from draft ``logits`` [B, M, Vd]; ``vocab_ids`` [Vd] maps draft ids
    to target ids (None: the same vocabulary, ``Vd == vocab_size``)."""
    if not params.do_sample:
        logq = logits.float().log_softmax(dim=-1)
        key, idx = logq.topk(topk, dim=-1)
        return Children(idx if vocab_ids is None else vocab_ids[idx], key, key, None)
    if vocab_ids is not None:
        logits = logits.new_full((*logits.shape[:-1], vocab_size), float("-inf")).index_copy(-1, vocab_ids, logits)
    q = warp_probs(logits, params)
    logq = q.clamp(min=1e-30).log().masked_fill(q == 0, float("-inf"))
    gumbel = -torch.empty_like(logq).exponential_(1.0).log()
    key, tokens = (logq + gumbel).topk(topk, dim=-1)
    return Children(tokens, logq.gather(-1, tokens), key, q)


class TreeSearch:
    """The static-shape search: ``topk`` K children per node, ``depth`` D levels, ``nodes`` N kept.

    Example (K 2, D 2, N 3): the root's top two "a" (log q -0.1) and "b" (-2.3); feeding "a"
    and "b" gives "a c" (-0.1 - 0.2), "a d", "b e", ...; the three best are a, "a c" and b, so
    ``tokens [a, b, c]``, ``parents [-1, -1, 0]``.
    """

    def __init__(self, topk: int, depth: int, nodes: int):
        for name, value in (("tree_topk", topk), ("tree_depth", depth), ("tree_nodes", nodes)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        self.topk, self.depth, self.nodes = topk, depth, nodes
        self._made: dict[torch.device, tuple[Tensor, Tensor]] = {}  # see _constants
        if nodes > self.candidates:
            raise ValueError(f"tree_nodes={nodes} exceeds the {self.candidates} candidates that tree_topk={topk} and "
                             f"tree_depth={depth} make (topk + (depth - 1) * topk^2); lower tree_nodes or raise "
                             "tree_topk / tree_depth")

    @classmethod
    def from_args(cls, owner: str, topk: int | None, depth: int | None, nodes: int | None,
                  default_depth: int) -> "TreeSearch | None":
        """A drafter's search from its optional tree arguments; None (a chain) when ``topk`` is None.
        ``depth`` defaults to ``default_depth`` and ``nodes`` to ``topk * depth``."""
        if topk is None:
            if depth is not None or nodes is not None:
                raise ValueError(f"{owner}: tree_depth={depth} / tree_nodes={nodes} need tree_topk (children per "
                                 "node); give tree_topk to draft a tree, or drop them to draft a chain")
            return None
        depth = default_depth if depth is None else depth
        if nodes is None and isinstance(topk, int) and isinstance(depth, int):
            nodes = topk * depth
        return cls(topk, depth, nodes)

    @property
    def candidates(self) -> int:
        return self.topk + (self.depth - 1) * self.topk * self.topk

    @property
    def scratch(self) -> int:
        """Scratch slots past the root the search writes in the drafter's cache: (D - 1) * K."""
        return (self.depth - 1) * self.topk

    def run(self, root: Children, root_hidden: Tensor | None, step: Step, seq_len: Tensor, start: Tensor,
            view: int, expand: Expand, track_paths: bool = False) -> DraftTree:
        """Grow the tree from the root's ``root`` children and keep the best ``nodes``.

        ``root_hidden`` [B, 1, H] is what the root's children read (the drafter's output state at
        the root; None for drafters without one); ``seq_len``/``start`` [B] locate each row's root
        (slot ``seq_len - 1``) and first slot; ``view`` covers ``max(seq_len) + scratch`` slots;
        ``expand`` turns a frontier forward's logits into `Children`; with ``track_paths`` it also
        gets each frontier node's draft path (for the logits processors, `specdec.drafters.draw`).

        A level's frontier is always among the candidates of the level before, so each level
        gathers from that level's tensors alone; all candidates are joined once, at the end.
        """
        b, k, dev = seq_len.shape[0], self.topk, seq_len.device
        own, src = self._constants(dev)
        # Per level: token, rank and draft distribution (None when greedy) of its candidates. A
        # candidate is valid (inside its parent's warped support, and so were its ancestors) exactly
        # when its rank is finite: an invalid node's key is -inf, and a rank never exceeds its parent's.
        tok, rank, dists = [root.tokens[:, 0]], [root.key[:, 0]], [root.q]
        frontiers = []  # [B, K] per fed level: each frontier node's candidate index (its children's parent)
        j = torch.arange(view, device=dev)
        prefix = (j >= start[:, None]) & (j < seq_len[:, None])                                   # [B, view]
        cols = (seq_len[:, None, None] + torch.arange(self.scratch, device=dev)).expand(b, k, self.scratch)
        pos = (seq_len - 1 - start)[:, None] + torch.arange(1, self.depth, device=dev)            # [B, D - 1]
        h_in = None if root_hidden is None else root_hidden.expand(b, k, root_hidden.shape[-1])
        # [B, K, scratch]: each fed node's fed ancestors and itself (depth 1 feeds no level: no scratch)
        seen = own[0].expand(b, k, self.scratch) if self.depth > 1 else None
        front = root.tokens[:, 0].unsqueeze(-1) if track_paths else None                       # [B, K, level]
        best, n_c = None, 0  # best: the frontier's index among the previous level's candidates
        for level in range(1, self.depth):
            if best is None:  # level 1: the root's children, in order
                f_tok, f_rank = tok[-1], rank[-1]
                frontiers.append(torch.arange(k, device=dev).expand(b, k))
            else:
                f_tok, f_rank = tok[-1].gather(1, best), rank[-1].gather(1, best)
                frontiers.append(best + n_c)
                parent = torch.div(best, k, rounding_mode="floor")  # [B, K] among the previous level's fed nodes
                seen = seen.gather(1, parent.unsqueeze(-1).expand(b, k, self.scratch)) | own[level - 1]
                h_in = None if h_in is None else _pick(h_out, parent)
            n_c += tok[-1].shape[1]
            mask = prefix.unsqueeze(1).expand(b, k, view).scatter(2, cols, seen)
            slots = cols[:, 0, (level - 1) * k:level * k]                                        # [B, K]
            logits, h_out = step(f_tok, h_in, pos[:, level - 1:level].expand(b, k), slots, mask, view)
            kids = expand(logits, None if front is None else DraftPaths(front, torch.full((b, k), level, device=dev)))
            tok.append(kids.tokens.reshape(b, k * k))
            r = torch.minimum(f_rank[:, :, None], f_rank[:, :, None] + kids.key).reshape(b, k * k)
            rank.append(r)
            dists.append(kids.q)
            best = r.topk(k, dim=1).indices
            if front is not None:  # the new frontier's paths: its parent's path, then its own token
                grown = torch.cat([front.unsqueeze(2).expand(b, k, k, level), kids.tokens.unsqueeze(-1)], dim=-1)
                front = grown.reshape(b, k * k, level + 1).gather(1, best.unsqueeze(-1).expand(b, k, level + 1))
        par = [torch.full((b, k), -1, device=dev)]  # the root's children, then each fed level's k children each
        if frontiers:
            par.append(torch.stack(frontiers, 1).unsqueeze(-1).expand(b, self.depth - 1, k, k).reshape(b, -1))
        par = torch.cat(par, dim=1)
        rank = torch.cat(rank, 1)
        return self._keep(torch.cat(tok, 1), rank, par, rank > float("-inf"), src.expand(b, -1),
                          None if root.q is None else torch.cat(dists, 1))

    def _constants(self, dev: torch.device) -> tuple[Tensor, Tensor]:
        """What every search of this shape shares, made once per device: ``own`` [D - 1, K, scratch]
        each level's own scratch slots, and ``src`` [candidates] the output each candidate was
        scored from (0 the root, 1 + i the i-th fed node)."""
        if dev not in self._made:
            k, scratch = self.topk, self.scratch
            node = torch.arange(self.depth - 1, device=dev)[:, None, None] * k + torch.arange(k, device=dev)[:, None]
            own = torch.arange(scratch, device=dev) == node
            src = torch.cat([torch.zeros(k, dtype=torch.long, device=dev),
                             (1 + torch.arange(scratch, device=dev)).repeat_interleave(k)])
            self._made[dev] = (own, src)
        return self._made[dev]

    def _keep(self, tok: Tensor, rank: Tensor, par: Tensor, valid: Tensor, src: Tensor, q: Tensor | None) -> DraftTree:
        """The ``nodes`` best candidates, numbered parents-first (creation order is topological).

        A stable sort by descending rank puts every ancestor before its descendants (rank never
        rises along a path and ancestors were created first), so any top-N prefix is a forest."""
        b, n_c = tok.shape
        score = torch.where(valid, rank, torch.full_like(rank, float("-inf")))
        kept = score.neg().argsort(dim=1, stable=True)[:, :self.nodes].sort(dim=1).values          # [B, N]
        new_of_old = torch.full((b, n_c), -1, dtype=torch.long, device=tok.device)
        new_of_old.scatter_(1, kept, torch.arange(self.nodes, device=tok.device).expand(b, self.nodes))
        old_par = par.gather(1, kept)
        parents = torch.where(old_par >= 0, new_of_old.gather(1, old_par.clamp(min=0)), old_par)
        if q is not None:
            q = q.gather(1, src.gather(1, kept).unsqueeze(-1).expand(b, self.nodes, q.shape[-1]))
        return DraftTree(tokens=tok.gather(1, kept), parents=parents, valid=valid.gather(1, kept), q=q)


def _pick(x: Tensor, index: Tensor) -> Tensor:
    """``x`` [B, S, H] at ``index`` [B, K] -> [B, K, H]."""
    return x.gather(1, index.unsqueeze(-1).expand(*index.shape, x.shape[-1]))

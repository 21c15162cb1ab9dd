"""DraftTree: the one structure every drafter returns and the verifier consumes.

A draft is a forest hanging off each row's *root*, the last committed token (whose K/V is not
in the cache yet). Each of the N nodes has a token and a parent index; ``-1`` means "child of
the root". Parents always come before children (``parents[b, i] < i``), so index order is a
topological order. A chain is the special case ``parents = [-1, 0, 1, ...]``: there is one
code path for chains and trees.

The tree compiles once per step into:

- ``ancestors`` ``[B, N, N]`` bool: ``ancestors[b, i, j]`` is True when node j is node i or one
  of its ancestors (the attention mask among the nodes);
- ``depth`` ``[B, N]``: 1 for children of the root, 2 for their children, ...;

from which the engine derives positions (row length + depth) and the accepted root-to-leaf path.

The knowledge here is structural only: nothing about models, caches or sampling.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


class MalformedDraftTree(ValueError):
    """A DraftTree whose parents do not make a forest in index order (see ``DraftTree.check``)."""


@dataclass
class DraftTree:
    """Draft tokens for B rows with a static budget of N nodes per row.

    Example (one row, N = 4): the chain "a b" plus a sibling "c" of "a", and "d" under "c"::

        tokens  = [[a, b, c, d]]
        parents = [[-1, 0, -1, 2]]
        valid   = [[True, True, True, True]]

    Padding nodes (``valid == False``) are never accepted; give them parent -1.

    Every node's parent must be -1 or an earlier node, which rules out self-loops, cycles,
    forward references and indices out of range. Trees on the CPU are checked on construction
    (``check``); elsewhere checking needs a host sync, so the engine's step marks a bad tree on
    the device (``malformed``) and the driver raises at its next sync.
    """

    tokens: Tensor  # [B, N] long
    parents: Tensor  # [B, N] long, -1 = child of the root, else an index < own index
    valid: Tensor  # [B, N] bool
    # Draft distribution each node's token was drawn from, i.e. q(. | parent), or None when the
    # drafter is deterministic (lookup, greedy drafting): then each node is a point mass.
    q: Tensor | None = None  # [B, N, V] float
    _compiled: tuple[Tensor, Tensor] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.tokens.shape != self.parents.shape or self.tokens.shape != self.valid.shape:
            raise ValueError(
                f"DraftTree fields must share shape [B, N]; got tokens {tuple(self.tokens.shape)}, "
                f"parents {tuple(self.parents.shape)}, valid {tuple(self.valid.shape)}"
            )
        if self.q is not None and self.q.shape[:2] != self.tokens.shape:
            raise ValueError(f"q must be [B, N, V]; got {tuple(self.q.shape)} for tokens {tuple(self.tokens.shape)}")
        for name in ("tokens", "parents"):
            dtype = getattr(self, name).dtype
            if dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
                raise MalformedDraftTree(f"DraftTree.{name} must hold integer indices, got dtype {dtype}")
        if self.parents.device.type == "cpu":
            self.check()

    def malformed(self) -> Tensor:
        """``[B]`` bool, computed on the device with no sync: rows with a node whose parent is
        neither -1 nor an earlier node."""
        idx = torch.arange(self.num_nodes, device=self.parents.device)
        return ((self.parents < -1) | (self.parents >= idx)).any(dim=1)

    def check(self) -> None:
        """Raise ``MalformedDraftTree`` naming the first node whose parent is not -1 or an
        earlier node, and what is wrong with it (a host sync on a GPU).

        Example: ``parents = [[-1, 2, 1]]`` fails with "row 0: node 1 has parent 2, a cycle 1 -> 2 -> 1".
        """
        bad = self.malformed()
        if not bool(bad.any()):
            return
        row = int(bad.nonzero()[0])
        parents = self.parents[row].tolist()
        node = next(i for i, p in enumerate(parents) if not -1 <= p < i)
        raise MalformedDraftTree(
            f"DraftTree row {row}: node {node} has parent {parents[node]}, {_fault(parents, node)}; each node's "
            f"parent must be -1 (the root) or an earlier node (0 <= parent < {node}), so that index order is a "
            "topological order. Number the nodes parents-first (DraftTree.chain, branches and from_paths do)")

    # ------------------------------------------------------------------ constructors
    @classmethod
    def empty(cls, batch: int, device: torch.device | str) -> "DraftTree":
        """No draft at all: the step verifies only the root (plain autoregressive decoding)."""
        z = torch.zeros(batch, 0, dtype=torch.long, device=device)
        return cls(tokens=z, parents=z.clone(), valid=z.bool())

    @classmethod
    def chain(cls, tokens: Tensor, valid: Tensor | None = None, q: Tensor | None = None) -> "DraftTree":
        """A chain per row: node i is the child of node i - 1. ``tokens`` is ``[B, K]``.

        Example: ``DraftTree.chain(torch.tensor([[5, 7, 9]]))`` drafts "5 7 9" after the root.
        """
        b, k = tokens.shape
        parents = (torch.arange(k, device=tokens.device) - 1).expand(b, k).contiguous()
        if valid is None:
            valid = torch.ones(b, k, dtype=torch.bool, device=tokens.device)
        # A chain's valid nodes must form a prefix: a node after an invalid one is unreachable.
        valid = valid.long().cumprod(dim=1).bool()
        return cls(tokens=tokens, parents=parents, valid=valid, q=q)

    @classmethod
    def branches(cls, tokens: Tensor, valid: Tensor, q: Tensor | None = None) -> "DraftTree":
        """Several chains hanging off the root: ``tokens``/``valid`` are ``[B, M, K]`` (M branches
        of K tokens); node ``m * K + t`` is the child of ``m * K + t - 1``.

        Example: two lookup matches "5 6" and "5 9" become ``branches([[[5, 6], [5, 9]]], ...)``.
        """
        b, m, k = tokens.shape
        t = torch.arange(k, device=tokens.device)
        par = torch.where(t == 0, -1, t - 1).unsqueeze(0) + (torch.arange(m, device=tokens.device) * k).unsqueeze(1)
        par = torch.where(t.unsqueeze(0) == 0, torch.full_like(par, -1), par)
        valid = valid.long().cumprod(dim=2).bool()
        return cls(tokens=tokens.reshape(b, m * k), parents=par.reshape(1, m * k).expand(b, m * k).contiguous(),
                   valid=valid.reshape(b, m * k), q=q.reshape(b, m * k, -1) if q is not None else None)

    @classmethod
    def from_paths(cls, paths: list[list[int]], tokens: Tensor, q: Tensor | None = None) -> "DraftTree":
        """A static template (Medusa style): ``paths`` lists root-to-leaf index paths over N nodes.

        Example: ``paths=[[0, 1], [0, 2], [3]]`` makes nodes 1 and 2 children of node 0, and node 3
        a second child of the root. ``tokens`` is ``[B, N]`` in the same node numbering.
        """
        n = tokens.shape[1]
        parent = [-2] * n
        for path in paths:
            prev = -1
            for node in path:
                if not prev < node < n:
                    raise ValueError(f"path {path}: node indices must increase along a path and be < {n}")
                if parent[node] not in (-2, prev):
                    raise ValueError(f"node {node} has two parents ({parent[node]} and {prev})")
                parent[node] = prev
                prev = node
        if -2 in parent:
            raise ValueError(f"nodes {[i for i, p in enumerate(parent) if p == -2]} appear in no path")
        parents = torch.tensor(parent, dtype=torch.long, device=tokens.device).expand_as(tokens).contiguous()
        valid = torch.ones_like(tokens, dtype=torch.bool)
        return cls(tokens=tokens, parents=parents, valid=valid, q=q)

    # ------------------------------------------------------------------ compiled views
    @property
    def batch(self) -> int:
        return self.tokens.shape[0]

    @property
    def num_nodes(self) -> int:
        return self.tokens.shape[1]

    def compile(self) -> tuple[Tensor, Tensor]:
        """Return ``(ancestors [B, N, N] bool, depth [B, N] long)``; computed once and cached.

        Uses pointer jumping on the parent relation: squaring the reachability matrix
        ceil(log2 N) times closes it transitively, with no per-node Python loop.
        """
        if self._compiled is None:
            b, n = self.tokens.shape
            dev = self.tokens.device
            eye = torch.eye(n, dtype=torch.float32, device=dev).expand(b, n, n)
            if n == 0:
                anc = eye.bool()
            else:
                par = self.parents.clamp(min=0, max=n - 1)  # in range even for a tree the step will refuse
                has_parent = (self.parents >= 0).float()
                step = torch.zeros(b, n, n, device=dev)
                step.scatter_(2, par.unsqueeze(-1), has_parent.unsqueeze(-1))
                reach = (eye + step).clamp(max=1.0)
                for _ in range(max(1, (n - 1).bit_length())):
                    reach = torch.bmm(reach, reach).clamp(max=1.0)
                anc = reach > 0.5
            depth = anc.sum(dim=-1)
            self._compiled = (anc, depth)
        return self._compiled

    @property
    def ancestors(self) -> Tensor:
        return self.compile()[0]

    @property
    def depth(self) -> Tensor:
        return self.compile()[1]

    def path_to(self, node: Tensor, max_depth: int) -> Tensor:
        """Node indices on the root-to-``node`` path, ordered by depth, -1 padded.

        ``node`` is ``[B]`` (use -1 for "just the root", giving an all -1 path). Returns
        ``[B, max_depth]``.
        """
        b, n = self.tokens.shape
        if n == 0 or max_depth == 0:
            return torch.full((b, max_depth), -1, dtype=torch.long, device=self.tokens.device)
        on_path = self.ancestors.gather(1, node.clamp(min=0).view(b, 1, 1).expand(b, 1, n)).squeeze(1)
        on_path &= (node >= 0).unsqueeze(1)
        idx = torch.arange(n, device=self.tokens.device).expand(b, n)
        # Ancestors have smaller indices than descendants, so sorting by index sorts by depth.
        key = torch.where(on_path, idx, idx + n)
        order = key.argsort(dim=1)[:, :max_depth]
        picked = on_path.gather(1, order)
        path = torch.where(picked, order, torch.full_like(order, -1))
        if path.shape[1] < max_depth:
            pad = torch.full((b, max_depth - path.shape[1]), -1, dtype=torch.long, device=path.device)
            path = torch.cat([path, pad], dim=1)
        return path


def _fault(parents: list[int], node: int) -> str:
    """What is wrong with ``node``'s parent, in words (for ``DraftTree.check``)."""
    n, p = len(parents), parents[node]
    if p == node:
        return "a self-loop"
    if not -1 <= p < n:
        return f"out of range (nodes are 0 .. {n - 1}, and -1 is the root)"
    walk = [node]
    while 0 <= walk[-1] < n and parents[walk[-1]] not in walk and 0 <= parents[walk[-1]] < n:
        walk.append(parents[walk[-1]])
    last = parents[walk[-1]]
    if last in walk:
        cycle = walk[walk.index(last):] + [last]
        return ("a cycle " if node in cycle else "leading into the cycle ") + " -> ".join(map(str, cycle))
    return "a forward reference (the parent comes after its child)"

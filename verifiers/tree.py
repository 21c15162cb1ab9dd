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

A tree built by ``empty``, ``chain``, ``branches`` or ``from_paths`` has parents fixed on the host
(its *shape*, the same for every row): it is a forest by construction, and its compiled views
are device constants made once per shape and device (``_Shape``), so a step spends no kernels
on them. Trees with data-dependent parents (dynamic trees) compile on the device each step.

The knowledge here is structural only: nothing about models, caches or sampling.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
from torch import Tensor


class MalformedDraftTree(ValueError):
    """A DraftTree whose parents do not make a forest in index order (see ``DraftTree.check``)."""


@dataclass(frozen=True)
class _Shape:
    """One tree shape's structure as device constants, shared by every row (views expand them).

    Built from host lists, so it is made outside any CUDA-graph capture: the step's warm-up run
    makes it, and a capture, which may not copy from the host, only reuses it."""

    parents: Tensor  # [N] long
    ancestors: Tensor  # [N, N] bool, ancestors-or-self
    depth: Tensor  # [N] long
    among: Tensor  # [N + 1, N + 1] bool: the root, then the nodes; each sees its ancestors-or-self
    offsets: Tensor  # [N + 1] long: 0 for the root, then the node depths
    index: Tensor  # [N] long, 0 .. N - 1
    parent_pos: Tensor  # [N] long, parents + 1: the parent's position among the root and the nodes
    chain: bool  # node i is the child of node i - 1 for every i


@functools.cache  # never evicted: a captured CUDA graph reads these tensors for as long as it lives
def _shape(parents: tuple[int, ...], device: torch.device) -> _Shape:
    n = len(parents)
    anc = [[False] * n for _ in range(n)]
    for i, p in enumerate(parents):
        anc[i][i] = True
        if p >= 0:
            anc[i] = [a or b for a, b in zip(anc[i], anc[p])]
            anc[i][i] = True
    depth = [sum(row) for row in anc]
    among = [[True] + [False] * n] + [[True] + row for row in anc]
    return _Shape(parents=torch.tensor(parents, dtype=torch.long, device=device),
                  ancestors=torch.tensor(anc, dtype=torch.bool, device=device).reshape(n, n),
                  depth=torch.tensor(depth, dtype=torch.long, device=device),
                  among=torch.tensor(among, dtype=torch.bool, device=device),
                  offsets=torch.tensor([0] + depth, dtype=torch.long, device=device),
                  index=torch.arange(n, dtype=torch.long, device=device),
                  parent_pos=torch.tensor([p + 1 for p in parents], dtype=torch.long, device=device),
                  chain=parents == tuple(range(-1, n - 1)))


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
    the device (``malformed``) and the driver raises at its next sync. Trees from ``empty``,
    ``chain``, ``branches`` and ``from_paths`` are forests by construction and need neither, until
    their ``parents`` is written into or replaced: the tree is then compiled and checked like any other.
    """

    tokens: Tensor  # [B, N] long
    parents: Tensor  # [B, N] long, -1 = child of the root, else an index < own index
    valid: Tensor  # [B, N] bool
    # Draft distribution each node's token was drawn from, i.e. q(. | parent), or None when the
    # drafter is deterministic (lookup, greedy drafting): then each node is a point mass.
    q: Tensor | None = None  # [B, N, V] float
    _compiled: tuple[Tensor, Tensor] | None = field(default=None, repr=False, compare=False)
    # Every row's parents when the constructor fixed them on the host (see the module docstring).
    _shape: tuple[int, ...] | None = field(default=None, repr=False, compare=False)

    def __setattr__(self, name: str, value) -> None:
        if name == "parents" and "_shape" in self.__dict__:  # new parents: what came from the old ones goes
            object.__setattr__(self, "_compiled", None)
            object.__setattr__(self, "_shape", None)
        object.__setattr__(self, name, value)

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
        if self._shape is not None and len(self._shape) != self.num_nodes:
            raise ValueError(f"DraftTree: a shape of {len(self._shape)} nodes for {self.num_nodes} nodes")
        if self.parents.device.type == "cpu" and self._shape is None:
            self.check()
        object.__setattr__(self, "_parents_version", _version(self.parents))  # see _structure

    @property
    def known_forest(self) -> bool:
        """Whether the constructor fixed the parents on the host (``empty``, ``chain``, ``branches``,
        ``from_paths``), which makes the tree a forest without a check on the device."""
        return self._structure() is not None

    @property
    def is_chain(self) -> bool:
        """Whether node i is the child of node i - 1 for every i, known on the host (``chain``, or
        ``branches`` of one branch, or no nodes): the accepted nodes are always a prefix."""
        shape = self._structure()
        return shape is not None and shape.chain

    def _structure(self) -> _Shape | None:
        """The fixed shape's constants, or None for a tree without one, or whose ``parents`` was
        written into since construction (torch's version counter says so, with no sync): that
        tree is compiled and checked from its parents like any other."""
        if self._shape is not None and _version(self.parents) != self._parents_version:
            object.__setattr__(self, "_shape", None)
            object.__setattr__(self, "_compiled", None)
        return None if self._shape is None else _shape(self._shape, self.tokens.device)

    def malformed(self) -> Tensor:
        """``[B]`` bool, computed on the device with no sync: rows with a node whose parent is
        neither -1 nor an earlier node."""
        if self._structure() is not None:
            return torch.zeros(self.batch, dtype=torch.bool, device=self.tokens.device)
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
        return cls(tokens=z, parents=z.clone(), valid=z.bool(), _shape=())

    @classmethod
    def chain(cls, tokens: Tensor, valid: Tensor | None = None, q: Tensor | None = None) -> "DraftTree":
        """A chain per row: node i is the child of node i - 1. ``tokens`` is ``[B, K]``.

        Example: ``DraftTree.chain(torch.tensor([[5, 7, 9]]))`` drafts "5 7 9" after the root.
        """
        b, k = tokens.shape
        if valid is None:  # every node valid: already a prefix
            valid = torch.ones(b, k, dtype=torch.bool, device=tokens.device)
        else:  # a chain's valid nodes must form a prefix: a node after an invalid one is unreachable
            valid = valid.long().cumprod(dim=1).bool()
        return cls._fixed(tuple(range(-1, k - 1)), tokens, valid, q)

    @classmethod
    def branches(cls, tokens: Tensor, valid: Tensor, q: Tensor | None = None) -> "DraftTree":
        """Several chains hanging off the root: ``tokens``/``valid`` are ``[B, M, K]`` (M branches
        of K tokens); node ``m * K + t`` is the child of ``m * K + t - 1``.

        Example: two lookup matches "5 6" and "5 9" become ``branches([[[5, 6], [5, 9]]], ...)``.
        """
        b, m, k = tokens.shape
        parents = tuple(-1 if t == 0 else i - 1 for i, t in ((j, j % k) for j in range(m * k)))
        valid = valid.long().cumprod(dim=2).bool()
        return cls._fixed(parents, tokens.reshape(b, m * k), valid.reshape(b, m * k),
                          q.reshape(b, m * k, -1) if q is not None else None)

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
        return cls._fixed(tuple(parent), tokens, torch.ones_like(tokens, dtype=torch.bool), q)

    @classmethod
    def _fixed(cls, parents: tuple[int, ...], tokens: Tensor, valid: Tensor, q: Tensor | None) -> "DraftTree":
        """A tree whose rows all have ``parents`` (its own copy: writing into it makes the tree
        an ordinary one, see ``_structure``)."""
        parent = _shape(parents, tokens.device).parents.expand(tokens.shape[0], len(parents)).clone()
        return cls(tokens=tokens, parents=parent, valid=valid, q=q, _shape=parents)

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
        shape = self._structure()
        if self._compiled is None and shape is not None:
            b, n = self.tokens.shape
            self._compiled = (shape.ancestors.expand(b, n, n), shape.depth.expand(b, n))
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

    def rooted(self) -> tuple[Tensor, Tensor]:
        """The root and the nodes together, as one verification step lays them out:
        ``(among [B, N + 1, N + 1] bool, offsets [B, N + 1] long)``. Position 0 is the root, which
        sees itself; node i (position 1 + i) sees the root and its ancestors-or-self. ``offsets``
        is each position's depth below the root (0 for the root).

        Example: the chain "a b" gives ``among = [[1, 0, 0], [1, 1, 0], [1, 1, 1]]`` and
        ``offsets = [0, 1, 2]``.
        """
        b, n = self.tokens.shape
        shape = self._structure()
        if shape is not None:
            return shape.among.expand(b, n + 1, n + 1), shape.offsets.expand(b, n + 1)
        anc, depth = self.compile()
        among = torch.ones(b, n + 1, n + 1, dtype=torch.bool, device=anc.device)
        among[:, 0, 1:] = False
        among[:, 1:, 1:] = anc
        return among, torch.cat([torch.zeros(b, 1, dtype=torch.long, device=depth.device), depth], dim=1)

    def parent_positions(self) -> Tensor:
        """``[B, N]``: each node's parent's position in a verification step (``parents + 1``; 0 is
        the root), where the logits that judge the node are."""
        shape = self._structure()
        if shape is not None:
            return shape.parent_pos.expand(self.batch, self.num_nodes)
        return self.parents + 1

    def max_depth(self) -> Tensor:
        """``[B]``: the depth of each row's deepest valid node (0 when none is valid)."""
        if self.is_chain or self.num_nodes == 0:  # a chain's valid nodes are a prefix (DraftTree.chain makes them one)
            return self.valid.sum(dim=1)
        return (self.depth * self.valid).amax(dim=1)

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
        width = max(n, max_depth)
        if self.is_chain:  # the path to node i is 0 .. i
            index = self._structure().index
            path = index.masked_fill(index > node.unsqueeze(1), -1)  # [B, N]
            return path[:, :max_depth] if max_depth <= n else torch.nn.functional.pad(path, (0, max_depth - n), value=-1)
        on_path = self.ancestors.gather(1, node.clamp(min=0).view(b, 1, 1).expand(b, 1, n)).squeeze(1)
        on_path &= (node >= 0).unsqueeze(1)
        # A root path holds one node per depth: node i at depth d goes to column d - 1, the others
        # to a spare last column, dropped.
        column = torch.where(on_path, self.depth - 1, width)
        idx = torch.arange(n, device=self.tokens.device).expand(b, n)
        path = torch.full((b, width + 1), -1, dtype=torch.long, device=self.tokens.device)
        return path.scatter_(1, column, idx)[:, :max_depth]


def _version(t: Tensor) -> int | None:
    """How often ``t`` was written in place (None under ``torch.inference_mode``, which keeps no count)."""
    return None if t.is_inference() else t._version


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

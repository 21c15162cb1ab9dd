"""RestDrafter: retrieval drafting from a suffix-array datastore (REST, He et al., NAACL 2024).

At each step, for every row:

1. *retrieve*: find the longest suffix of the committed tokens, ``max_suffix`` down to
   ``min_suffix`` tokens long, that occurs in the datastore (``specdec.datastore``) at least
   ``min_count`` times (else the longest that occurs at all);
2. *continue*: read the ``max_depth`` tokens that follow its occurrences (at most
   ``max_matches`` of them, spread evenly over the matches);
3. *own text* (``context_weight`` > 0): also take the continuations of the longest suffix that
   recurs in the row's own prompt and output, as prompt lookup does. The datastore's rows weigh
   1 in total and the row's own ``context_weight``: a mixture of two next-token distributions;
4. *trie*: merge the continuations into a trie whose nodes weigh the continuations through them,
   and keep the ``num_nodes`` heaviest prefixes as the draft tree.

Step 4 is well defined because a prefix weighs at least as much as any of its extensions:
ranking nodes by (weight desc, depth asc) puts every parent before its children, so the kept
set is a trie. The drafter needs no model and gives no probabilities (point-mass drafts).
``context_weight=0`` is REST as published (datastore only).

Retrieval is host work (numpy, binary search over the suffix array): each step reads the last
``max_suffix`` committed tokens of every row to the host in one copy (whole rows when
``context_weight`` > 0), and copies the tree to the target's device in one copy.

Example::

    drafter = RestDrafter.from_index("auto:stdlib", tokenizer="zoo:smollm2-135m-instruct", num_nodes=32)
    spec = specdec.wrap(model, drafter=drafter)
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from specdec.datastore import Datastore, ensure_index, load_tokenizer, vocab_fingerprint
from specdec.verifiers.tree import DraftTree

from .base import DecodeContext, DraftSpec, Drafter, VocabularyMismatchError

# Embedding tables are often padded past the tokenizer (Qwen2.5: 151,665 tokens, 151,936 rows);
# a target with more extra rows than this (or than 1/8 of the vocabulary) has another tokenizer.
VOCAB_SLACK = 1024


@dataclass
class Trie:
    """A draft trie for one row, nodes in topological order (parents before children).

    Example: continuations ``[[7, 8], [7, 9], [7, 8]]`` give ``tokens=[7, 8, 9]``,
    ``parents=[-1, 0, 0]``, ``weights=[3, 2, 1]``.
    """

    tokens: np.ndarray  # [n] int64 token ids
    parents: np.ndarray  # [n] int64, -1 = child of the root, else an index < own index
    weights: np.ndarray  # [n] float64, total weight of the continuations through the node (by default their number)

    @classmethod
    def empty(cls) -> "Trie":
        z = np.zeros(0, dtype=np.int64)
        return cls(z, z.copy(), z.astype(np.float64))

    def __len__(self) -> int:
        return len(self.tokens)


def build_trie(conts: np.ndarray, num_nodes: int, weights: np.ndarray | None = None) -> Trie:
    """The ``num_nodes`` heaviest prefixes of the rows of ``conts`` (``[S, D]``; ``-1`` ends a row
    early), as a trie ordered by depth, then by weight (heaviest sibling first). A prefix weighs
    the sum of its rows' ``weights`` (``[S]``, positive; default 1 each, i.e. its count).

    Vectorised: after a lexicographic sort, rows sharing a depth-d prefix are contiguous, so a
    depth-d node is a run of rows and starts where the row differs from the previous one in
    columns 0..d.

    Example: ``build_trie(np.array([[7, 8], [7, 9], [7, 8], [5, -1]]), 3)`` keeps
    ``7`` (count 3), ``7 8`` (2) and ``5`` (1), the last on a tie with ``7 9`` by depth, then order.
    """
    if conts.size == 0 or num_nodes <= 0:
        return Trie.empty()
    s, d = conts.shape
    order = np.lexsort(conts.T[::-1])
    c = conts[order]  # [S, D] rows in lexicographic order
    w = np.ones(s) if weights is None else np.asarray(weights, dtype=np.float64)[order]  # [S]
    differs = np.ones((s, d), dtype=bool)
    differs[1:] = c[1:] != c[:-1]
    starts_node = np.logical_or.accumulate(differs, axis=1)  # [S, D] row i opens a depth-d node
    group = np.cumsum(starts_node, axis=0) - 1  # [S, D] index of row i's depth-d node within depth d
    tokens, parents, mass, depths, first_rows = [], [], [], [], []
    offset, prev_offset = 0, 0
    for level in range(d):
        rows = np.flatnonzero(starts_node[:, level])  # first row of each depth-level node
        tokens.append(c[rows, level])
        parents.append(prev_offset + group[rows, level - 1] if level else np.full(len(rows), -1))
        node_mass = np.add.reduceat(w, rows)
        if level:  # never heavier than the parent, even by a rounding error: keeps the kept set a trie
            node_mass = np.minimum(node_mass, mass[-1][group[rows, level - 1]])
        mass.append(node_mass)
        depths.append(np.full(len(rows), level))
        first_rows.append(rows)
        prev_offset, offset = offset, offset + len(rows)
    tokens, parents, mass = np.concatenate(tokens), np.concatenate(parents), np.concatenate(mass)
    depths, first_rows = np.concatenate(depths), np.concatenate(first_rows)
    real = np.flatnonzero(tokens >= 0)  # a -1 node is "the row ended"; its subtree is all -1 too
    # Heaviest first; a parent outranks its children (weight >= theirs, smaller depth).
    keep = real[np.lexsort((first_rows[real], depths[real], -mass[real]))[:num_nodes]]
    keep = keep[np.lexsort((first_rows[keep], -mass[keep], depths[keep]))]  # topological order
    new_index = np.full(len(tokens), -1, dtype=np.int64)
    new_index[keep] = np.arange(len(keep))
    kept_parents = np.where(parents[keep] >= 0, new_index[np.maximum(parents[keep], 0)], -1)
    return Trie(tokens[keep].astype(np.int64), kept_parents.astype(np.int64), mass[keep])


def context_continuations(context: Sequence[int], min_len: int, max_len: int, depth: int) -> np.ndarray:
    """``[S, depth]`` continuations of the longest suffix of ``context`` (``min_len`` to ``max_len``
    tokens) that occurs earlier in ``context`` itself, one row per occurrence, ``-1`` past the end.

    Example: ``context_continuations([1, 2, 3, 1, 2], 1, 4, 2)`` is ``[[3, 1]]`` ("1 2" recurs).
    """
    c = np.asarray(context, dtype=np.int64)
    n = len(c)
    k = min(max_len, n - 1)
    if k < min_len:
        return np.zeros((0, depth), dtype=np.int64)
    start = np.arange(1, n)  # [n - 1] where a continuation would begin (n itself is the suffix)
    back = start[:, None] - np.arange(1, k + 1)  # [n - 1, k] the t-th token before it
    same = (back >= 0) & (c[np.maximum(back, 0)] == c[n - np.arange(1, k + 1)])
    length = np.cumprod(same, axis=1).sum(axis=1)  # [n - 1] matched suffix length
    m = length.max()
    if m < min_len:
        return np.zeros((0, depth), dtype=np.int64)
    pos = start[length == m][:, None] + np.arange(depth)
    return np.where(pos < n, c[np.minimum(pos, n - 1)], -1)


class RestDrafter(Drafter):
    """Draft a trie of the continuations of the longest matching suffix, from the datastore and
    (``context_weight`` > 0) from the row's own text.

    Args:
        datastore: a ``specdec.datastore.Datastore`` built with the target's tokenizer.
        num_nodes: static node budget per row and step.
        max_depth: longest draft path (tokens read after each match).
        max_suffix / min_suffix: suffix lengths tried, longest first (found by binary search).
        max_matches: occurrences read per step and row (evenly spaced over all matches).
        min_count: prefer the longest suffix with at least this many datastore occurrences
            (a long suffix seen once is an anecdote; a shorter one seen often is a statistic).
        context_weight: weight of the row's own text against the datastore's (0: datastore only).

    Defaults are those measured best on SmolLM2 over the stdlib index (``scripts/rest_peer.py``).
    """

    def __init__(self, datastore: Datastore, num_nodes: int = 32, max_depth: int = 8, max_suffix: int = 16,
                 min_suffix: int = 1, max_matches: int = 512, min_count: int = 16, context_weight: float = 1.0):
        if min(num_nodes, max_depth, max_matches, min_count) < 1:
            raise ValueError(f"num_nodes, max_depth, max_matches and min_count must be >= 1; got {num_nodes}, "
                             f"{max_depth}, {max_matches}, {min_count}")
        if context_weight < 0:
            raise ValueError(f"context_weight must be >= 0, got {context_weight}")
        if not 1 <= min_suffix <= max_suffix:
            raise ValueError(f"need 1 <= min_suffix <= max_suffix, got min_suffix={min_suffix}, max_suffix={max_suffix}")
        self.datastore = datastore
        self.num_nodes = num_nodes
        # The suffix-array search runs on the host every step: one step per sync, eagerly.
        self.spec = DraftSpec(num_nodes=num_nodes, device_only=False)
        self.max_depth = max_depth
        self.max_suffix = max_suffix
        self.min_suffix = min_suffix
        self.max_matches = max_matches
        self.min_count = min_count
        self.context_weight = context_weight

    @classmethod
    def from_index(cls, index: str | os.PathLike, tokenizer: str | None = None, max_tokens: int | None = None,
                   **options) -> "RestDrafter":
        """Load a saved index, or with ``index="auto:SOURCE"`` (``stdlib``, ``humaneval``) the
        cached index of that source for ``tokenizer``, built on first use (``max_tokens`` caps it).

        With an explicit path and a ``tokenizer``, the index must have been built with the same
        vocabulary (checked by fingerprint). ``options`` go to the constructor.

        Example: ``RestDrafter.from_index("idx/stdlib.npz", tokenizer="zoo:smollm2-135m-instruct")``.
        """
        text = os.fspath(index)
        if text.startswith("auto:"):
            if tokenizer is None:
                raise ValueError(f"index={text!r} builds an index on first use and needs tokenizer=<model spec>")
            return cls(Datastore.load(ensure_index(str(tokenizer), text[len("auto:"):], max_tokens)), **options)
        datastore = Datastore.load(Path(text))
        built = datastore.meta.get("vocab_fingerprint")
        if tokenizer is not None and built is not None and built != vocab_fingerprint(load_tokenizer(str(tokenizer))):
            raise VocabularyMismatchError(
                f"datastore {text} was built with tokenizer {datastore.meta.get('tokenizer')!r}, whose vocabulary "
                f"differs from {tokenizer!r}'s; rebuild it with `specdec-datastore build --tokenizer {tokenizer} ...`")
        return cls(datastore, **options)

    def __repr__(self) -> str:
        return (f"RestDrafter({self.datastore!r}, num_nodes={self.num_nodes}, max_depth={self.max_depth}, "
                f"suffix={self.min_suffix}..{self.max_suffix}, context_weight={self.context_weight})")

    def bind(self, target) -> None:
        """Raise if the datastore's token ids do not belong to the target's vocabulary."""
        ours, theirs = self.datastore.vocab_size, target.vocab_size
        if ours > theirs or theirs - ours > min(VOCAB_SLACK, ours // 8):
            raise VocabularyMismatchError(
                f"the datastore holds token ids of a {ours}-token vocabulary (tokenizer "
                f"{self.datastore.meta.get('tokenizer')!r}) but the target has {theirs}; rebuild the index with the "
                "target's tokenizer: `specdec-datastore build --tokenizer <target model spec> ...`")

    def draft_row(self, context: Sequence[int]) -> Trie:
        """The draft trie for one row whose committed tokens end with ``context`` (root last).

        Datastore continuations together weigh 1; with ``context_weight`` > 0 the continuations
        found in ``context`` itself weigh that much together, so nodes rank by a mixture of the
        two empirical next-token distributions.
        """
        conts = self._datastore_continuations(context)
        weights = np.full(len(conts), 1.0 / max(len(conts), 1))
        if self.context_weight > 0:
            own = context_continuations(context, self.min_suffix, self.max_suffix, self.max_depth)
            own = own[own[:, 0] >= 0]
            conts = np.concatenate([conts, own])
            weights = np.concatenate([weights, np.full(len(own), self.context_weight / max(len(own), 1))])
        return build_trie(conts, self.num_nodes, weights)

    def _datastore_continuations(self, context: Sequence[int]) -> np.ndarray:
        ds = self.datastore
        top = self.max_suffix
        while top >= self.min_suffix:
            m, lo, hi = ds.longest_match(context, self.min_suffix, top, self.min_count)
            if m == 0 and self.min_count > 1:  # no suffix is that frequent: take the longest that occurs
                m, lo, hi = ds.longest_match(context, self.min_suffix, top)
            if m == 0:
                break
            conts = ds.continuations(lo, hi, m, self.max_depth, self.max_matches)
            conts = conts[conts[:, 0] >= 0]
            if len(conts):
                return conts
            top = m - 1  # every match ends a document: try a shorter suffix
        return np.zeros((0, self.max_depth), dtype=np.int64)

    def propose(self, ctx: DecodeContext) -> DraftTree:
        b, n = ctx.tokens.shape[0], self.num_nodes
        dev = ctx.tokens.device
        # The host needs the last max_suffix tokens of each row, or whole rows for context lookup.
        w = ctx.max_seq_len if self.context_weight > 0 else self.max_suffix
        cols = ctx.seq_len.unsqueeze(1) - w + torch.arange(w, device=dev)  # [B, w], root last
        window = ctx.tokens.gather(1, cols.clamp(min=0))
        host = torch.cat([window, ctx.seq_len.unsqueeze(1), ctx.start.unsqueeze(1)], dim=1).tolist()
        out = np.zeros((3, b, n), dtype=np.int64)  # tokens, parents, valid
        out[1] = -1
        for r, (*win, seq, start) in enumerate(host):
            trie = self.draft_row(win[w - min(w, seq - start):])  # the row's real tokens only
            k = len(trie)
            out[0, r, :k], out[1, r, :k], out[2, r, :k] = trie.tokens, trie.parents, 1
        tree = torch.from_numpy(out).to(dev)
        return DraftTree(tokens=tree[0], parents=tree[1], valid=tree[2].bool())

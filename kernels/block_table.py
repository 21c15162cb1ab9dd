"""Block-table tree attention: the tree-attention kernel over a per-row list of cache slots.

A sparse draft (``SparseSelfDraft``) attends to a chosen part of each row's committed cache:
attention sinks, a recent window and the best chunks. Instead of gathering those slots' K/V into
a dense buffer, the kernel reads them where they are, through ``table`` ``[B, T]``: row b's
prefix is the slots ``table[b, first[b]:last[b]]`` (a chunk list expanded to its slots, in any
order), and its Q new tokens sit at slots ``new_start[b] .. new_start[b] + Q - 1`` of the same
buffers, seen under ``tree_mask`` as in ``tree_attention``.

It is ``tree_attention``'s kernel with a ``TABLE`` switch: the prefix positions of a split
index the table instead of the cache, so tiles, prefix splits, the merge and the launch plan
(from static shapes only, CUDA-graph capturable) are the same. The pure-torch reference gathers
the slots and runs ``masked_attention_reference``; the engine uses it off CUDA.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .attention import masked_attention_reference
from .tree_attention import TreeAttentionConfig, launch


def _check(q: Tensor, k: Tensor, v: Tensor, table: Tensor, first: Tensor, last: Tensor, new_start: Tensor,
           tree_mask: Tensor) -> None:
    bsz, hq, nq, d = q.shape
    assert k.dim() == 4 and k.shape == v.shape, f"k {tuple(k.shape)} and v {tuple(v.shape)} must match"
    assert k.shape[0] == bsz and k.shape[3] == d, f"q {tuple(q.shape)} does not fit k {tuple(k.shape)}"
    assert hq % k.shape[1] == 0, f"query heads ({hq}) must be a multiple of key/value heads ({k.shape[1]})"
    assert q.dtype == k.dtype == v.dtype, f"dtypes differ: q {q.dtype}, k {k.dtype}, v {v.dtype}"
    assert d in (16, 32, 64, 128, 256), f"head_dim {d} must be a power of two in [16, 256]"
    assert table.dim() == 2 and table.shape[0] == bsz and not table.is_floating_point(), \
        f"table must be [B, T] integer slots, got {tuple(table.shape)} {table.dtype}"
    assert first.shape == last.shape == new_start.shape == (bsz,), "first, last and new_start must be [B]"
    assert tree_mask.shape == (bsz, nq, nq) and tree_mask.dtype == torch.bool, \
        f"tree_mask must be [B, Q, Q] bool, got {tuple(tree_mask.shape)} {tree_mask.dtype}"


def block_table_attention(q: Tensor, k: Tensor, v: Tensor, table: Tensor, first: Tensor, last: Tensor,
                          new_start: Tensor, tree_mask: Tensor, scale: float, *,
                          config: TreeAttentionConfig | None = None) -> Tensor:
    """Attention of Q new tokens per row over the slots their row's table lists and their tree.

    q: ``[B, Hq, Q, D]``; k, v: ``[B, Hkv, S, D]`` whole cache buffers (the new tokens' K/V already
    written at ``new_start .. new_start + Q - 1``).
    table: ``[B, T]`` int, cache slots; entries ``first[b] .. last[b] - 1`` are row b's prefix
    (each below S; the other entries are never read).
    first, last, new_start: ``[B]`` int. tree_mask: ``[B, Q, Q]`` bool, as in ``tree_attention``.
    Returns ``[B, Hq, Q, D]`` in q's dtype.

    Example::

        # row 0 reads slots 0, 1 (sinks) and 40..43 (a chunk); its 2 new tokens are at slots 60, 61
        table = torch.tensor([[0, 1, 40, 41, 42, 43]])
        causal = torch.ones(1, 2, 2, dtype=torch.bool).tril()
        out = block_table_attention(q, k, v, table, torch.tensor([0]), torch.tensor([6]), torch.tensor([60]),
                                    causal, 0.125)
    """
    _check(q, k, v, table, first, last, new_start, tree_mask)
    return launch(q, k, v, first, last, new_start, table, tree_mask, scale, table.shape[1], config)


def block_table_reference(q: Tensor, k: Tensor, v: Tensor, table: Tensor, first: Tensor, last: Tensor,
                          new_start: Tensor, tree_mask: Tensor, scale: float) -> Tensor:
    """Pure-torch ``block_table_attention``: gather the listed slots and the new ones, then a
    dense mask over them and ``masked_attention_reference``."""
    _check(q, k, v, table, first, last, new_start, tree_mask)
    b, h, _, d = k.shape
    nq, t = q.shape[2], table.shape[1]
    new = new_start[:, None] + torch.arange(nq, device=q.device)  # [B, Q]
    slots = torch.cat([table.long().clamp(0, k.shape[2] - 1), new], 1)  # [B, T + Q]
    at = slots.view(b, 1, -1, 1).expand(b, h, -1, d)
    pos = torch.arange(t, device=q.device)
    listed = (pos >= first[:, None]) & (pos < last[:, None])  # [B, T]
    mask = torch.cat([listed.unsqueeze(1).expand(b, nq, t), tree_mask], 2)  # [B, Q, T + Q]
    return masked_attention_reference(q, k.gather(2, at), v.gather(2, at), mask, scale)


@torch.library.custom_op("specdec::block_table_attention", mutates_args=())
def block_table_attention_op(q: Tensor, k: Tensor, v: Tensor, table: Tensor, first: Tensor, last: Tensor,
                             new_start: Tensor, tree_mask: Tensor, scale: float) -> Tensor:
    """``block_table_attention`` as one opaque operator for ``torch.compile`` (as ``tree_attention_op``)."""
    return block_table_attention(q, k, v, table, first, last, new_start, tree_mask, scale)


@block_table_attention_op.register_fake
def _(q, k, v, table, first, last, new_start, tree_mask, scale):
    return q.new_empty(q.shape)


__all__ = ["block_table_attention", "block_table_attention_op", "block_table_reference"]

"""KV commit: move accepted tree nodes' K/V next to the committed prefix, in every layer at once.

After verification, row b's accepted nodes sit at scattered tree slots ``src[b, :count[b]]``;
they must end up contiguous at ``dst_start[b] .. dst_start[b] + count[b] - 1``. The two ranges
may overlap (accepted nodes move towards the prefix), so each row's vectors are all read before
any is written.

One launch covers every buffer: the wrapper passes a table of the buffers' base addresses
(cached, so repeated calls with the same cache build it once), and the grid is
``(B, H, num_buffers)``. A program copies one (row, head) of one buffer: a ``[BLOCK_A, D]``
tile is loaded, the CTA synchronises, then the tile is stored.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _kv_commit_kernel(
    Table, Witness, Src, DstStart, Count,
    stride_b, stride_h, stride_s, stride_d, stride_src_b, stride_src_a, num_moves,
    HEAD_DIM: tl.constexpr, BLOCK_A: tl.constexpr,
):
    tl.static_assert((HEAD_DIM & (HEAD_DIM - 1)) == 0, "head_dim must be a power of two")
    tl.static_assert((BLOCK_A & (BLOCK_A - 1)) == 0, "BLOCK_A must be a power of two")
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    buf = tl.multiple_of(tl.load(Table + tl.program_id(2)).to(Witness.dtype), 16)  # like Witness: type, alignment
    row = buf + b * stride_b + h * stride_h

    n = tl.minimum(tl.load(Count + b), num_moves)
    a = tl.arange(0, BLOCK_A)
    moving = a < n
    src = tl.load(Src + b * stride_src_b + a * stride_src_a, mask=moving, other=0)
    dst = tl.load(DstStart + b) + a
    dims = tl.arange(0, HEAD_DIM)
    x = tl.load(row + src[:, None] * stride_s + dims[None, :] * stride_d, mask=moving[:, None])
    tl.debug_barrier()  # every thread has read its sources before anyone overwrites them
    tl.store(row + dst[:, None] * stride_s + dims[None, :] * stride_d, x, mask=moving[:, None])


_TABLES: dict[tuple, Tensor] = {}


def _pointer_table(bufs: list[Tensor]) -> Tensor:
    """``[len(bufs)]`` int64 base addresses on the buffers' device, built once per buffer set."""
    key = (bufs[0].device, tuple(t.data_ptr() for t in bufs))
    table = _TABLES.get(key)
    if table is None:
        if len(_TABLES) >= 16:
            _TABLES.clear()
        table = torch.tensor([t.data_ptr() for t in bufs], dtype=torch.int64, device=bufs[0].device)
        _TABLES[key] = table
    return table


def kv_commit(bufs: list[Tensor], src: Tensor, dst_start: Tensor, count: Tensor) -> None:
    """For every buffer, per row b: slots ``src[b, :count[b]]`` -> ``dst_start[b] + arange(count[b])``.

    bufs: K/V buffers, each ``[B, H, S, D]``, all of one shape, stride, dtype and device.
    src: ``[B, A]`` int slots; entries at and after ``count[b]`` are ignored.
    dst_start, count: ``[B]`` int. Slots outside the destination range are left alone.

    Example::

        # row 0 accepted the nodes at slots 12 and 14; they move to 11 and 12
        kv_commit(cache.k + cache.v, torch.tensor([[12, 14]]), torch.tensor([11]), torch.tensor([2]))
    """
    assert len(bufs) > 0, "no buffers to commit into"
    first = bufs[0]
    assert first.dim() == 4, f"buffers must be [B, H, S, D], got {tuple(first.shape)}"
    for t in bufs:
        assert t.shape == first.shape and t.stride() == first.stride() and t.dtype == first.dtype \
            and t.device == first.device, "all buffers must share shape, strides, dtype and device"
        assert t.data_ptr() % 16 == 0, "buffers must be 16-byte aligned"
    bsz, heads, _, d = first.shape
    assert d in (16, 32, 64, 128, 256), f"head_dim {d} must be a power of two in [16, 256]"
    assert src.dim() == 2 and src.shape[0] == bsz, f"src must be [B, A], got {tuple(src.shape)}"
    assert dst_start.shape == (bsz,) and count.shape == (bsz,), "dst_start and count must be [B]"
    moves = src.shape[1]
    if moves == 0:
        return
    block_a = triton.next_power_of_2(moves)
    _kv_commit_kernel[(bsz, heads, len(bufs))](
        _pointer_table(bufs), first, src, dst_start, count,
        *first.stride(), *src.stride(), moves,
        HEAD_DIM=d, BLOCK_A=block_a, num_warps=8 if block_a * d >= 64 * 128 else 4,
    )


def kv_commit_reference(bufs: list[Tensor], src: Tensor, dst_start: Tensor, count: Tensor) -> None:
    """Pure-torch ``kv_commit``: gather every source, then scatter. Needs ``dst_start + A <= S``."""
    bsz, moves = src.shape
    if moves == 0:
        return
    steps = torch.arange(moves, device=src.device)
    dst = dst_start[:, None] + steps  # [B, A]
    src = torch.where(steps[None, :] < count[:, None], src, dst)  # skipped entries copy onto themselves
    for buf in bufs:
        h, d = buf.shape[1], buf.shape[3]
        moved = buf.gather(2, src.view(bsz, 1, moves, 1).expand(bsz, h, moves, d))
        buf.scatter_(2, dst.view(bsz, 1, moves, 1).expand(bsz, h, moves, d), moved)


__all__ = ["kv_commit", "kv_commit_reference"]

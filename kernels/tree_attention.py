"""Tree attention: the Triton kernel for verification steps, and its pure-torch reference.

Row b of the KV cache holds committed tokens at slots ``start[b] .. lengths[b] - 1``; a
verification step has just written its Q new tokens (a draft tree's root and nodes) at slots
``lengths[b] .. lengths[b] + Q - 1``. New token i reads every committed slot of its row, and new
slot ``lengths[b] + j`` only where ``tree_mask[b, i, j]`` (ancestor-or-self).

Work split (flash-decoding over the prefix, with grouped-query packing):

- The G = Hq / Hkv query heads that share one KV head are packed with the Q queries into
  ``G * Q`` rows, so a program reads each K/V tile once and uses it for every query head of the
  group. A program owns ``BLOCK_M`` of those rows.
- The committed prefix is cut into ``splits`` chunks of ``chunk`` slots, counted from the row's
  own ``start``. The last split also attends to the Q new slots under the tree mask (at most a
  tile or two, so no extra program). With several splits each writes an unnormalised partial
  result (acc, running max, running sum) in fp32 and a second kernel merges them, loading all
  of a row's partials at once; with one split there is no partial and no second launch.
- Grid ``(cdiv(G*Q, BLOCK_M), splits, B * Hkv)``. The launch configuration is chosen from static
  shapes only (never from ``lengths``), so a step is CUDA-graph capturable; see
  ``plan_tree_attention`` for the cost model.

Softmax is computed online in base 2, with fp32 accumulators; probabilities are rounded to the
input dtype for the P @ V product, as in FlashAttention.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from .attention import masked_attention_reference

LOG2E = 1.4426950408889634


@triton.jit
def _softmax_update(acc, m_i, l_i, s, v, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Fold scores ``s`` [M, N] (log2 units, -inf where masked) and values ``v`` [N, D] into the
    running (acc [M, D], max m_i [M], sum l_i [M])."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet
    alpha = tl.math.exp2(m_i - m_safe)
    p = tl.math.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if UPCAST_DOT:
        acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision=DOT_PRECISION)
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _scores(q, k, qk_scale, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """``q`` [M, D] @ ``k`` [N, D]^T, scaled into log2 units, fp32 [M, N]."""
    if UPCAST_DOT:
        s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision=DOT_PRECISION)
    else:
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    return s * qk_scale


@triton.jit(do_not_specialize=["num_kv_heads", "group", "num_queries", "num_splits", "chunk"])
def _tree_attention_fwd(
    Q, K, V, Out, Start, Lengths, NewStart, Table, Mask, PartAcc, PartMax, PartSum,
    stride_qb, stride_qh, stride_qq, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_oh, stride_oq, stride_od,
    stride_mb, stride_mi, stride_mj, stride_tb,
    num_kv_heads, group, num_queries, num_splits, chunk, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SINGLE_PASS: tl.constexpr,
    UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, TABLE: tl.constexpr,
):
    """The prefix is positions ``Start[b] .. Lengths[b] - 1``: cache slots themselves, or with
    ``TABLE`` entries of row b of ``Table`` that hold slots (``kernels.block_table``). The Q new
    tokens sit at slots ``NewStart[b] + j``."""
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16, "tl.dot needs tiles of at least 16")
    tl.static_assert(HEAD_DIM >= 16 and HEAD_DIM <= 256, "head_dim must lie in [16, 256]")
    tl.static_assert((HEAD_DIM & (HEAD_DIM - 1)) == 0, "head_dim must be a power of two")
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b = (pid_bh // num_kv_heads).to(tl.int64)
    h = (pid_bh % num_kv_heads).to(tl.int64)

    # Packed rows: row r is query r // group of query head h * group + r % group.
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_rows = num_queries * group
    row_ok = rows < n_rows
    qi = rows // group
    head = h * group + rows % group
    dims = tl.arange(0, HEAD_DIM)
    q_ptrs = Q + b * stride_qb + head[:, None] * stride_qh + qi[:, None] * stride_qq + dims[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)

    k_row = K + b * stride_kb + h * stride_kh
    v_row = V + b * stride_vb + h * stride_vh
    start = tl.load(Start + b).to(tl.int32)
    length = tl.load(Lengths + b).to(tl.int32)
    new_start = tl.load(NewStart + b).to(tl.int32)
    table_row = Table + b * stride_tb

    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    # 1. This split's chunk of the committed prefix: whole tiles unmasked, then a ragged tail.
    lo = start + split * chunk
    hi = tl.minimum(lo + chunk, length)
    hi_full = lo + tl.maximum(hi - lo, 0) // BLOCK_N * BLOCK_N
    cols = tl.arange(0, BLOCK_N)
    for n0 in range(lo, hi_full, BLOCK_N):
        slots = n0 + cols
        if TABLE:
            slots = tl.load(table_row + slots)
        k = tl.load(k_row + slots[:, None] * stride_ks + dims[None, :] * stride_kd)
        v = tl.load(v_row + slots[:, None] * stride_vs + dims[None, :] * stride_vd)
        s = _scores(q, k, qk_scale, UPCAST_DOT, DOT_PRECISION)
        acc, m_i, l_i = _softmax_update(acc, m_i, l_i, s, v, UPCAST_DOT, DOT_PRECISION)
    if hi_full < hi:
        slots = hi_full + cols
        ok = slots < hi
        if TABLE:
            slots = tl.load(table_row + slots, mask=ok, other=0)
        k = tl.load(k_row + slots[:, None] * stride_ks + dims[None, :] * stride_kd, mask=ok[:, None], other=0.0)
        v = tl.load(v_row + slots[:, None] * stride_vs + dims[None, :] * stride_vd, mask=ok[:, None], other=0.0)
        s = _scores(q, k, qk_scale, UPCAST_DOT, DOT_PRECISION)
        s = tl.where(ok[None, :], s, float("-inf"))
        acc, m_i, l_i = _softmax_update(acc, m_i, l_i, s, v, UPCAST_DOT, DOT_PRECISION)

    # 2. The new slots under the tree mask, done by the row group's last split.
    if split == num_splits - 1:
        mask_row = Mask + b * stride_mb + qi[:, None] * stride_mi
        for j0 in range(0, num_queries, BLOCK_N):
            j = j0 + cols
            j_ok = j < num_queries
            slots = new_start + j
            k = tl.load(k_row + slots[:, None] * stride_ks + dims[None, :] * stride_kd, mask=j_ok[:, None], other=0.0)
            v = tl.load(v_row + slots[:, None] * stride_vs + dims[None, :] * stride_vd, mask=j_ok[:, None], other=0.0)
            seen = tl.load(mask_row + j[None, :] * stride_mj, mask=row_ok[:, None] & j_ok[None, :], other=0)
            s = _scores(q, k, qk_scale, UPCAST_DOT, DOT_PRECISION)
            s = tl.where(seen != 0, s, float("-inf"))
            acc, m_i, l_i = _softmax_update(acc, m_i, l_i, s, v, UPCAST_DOT, DOT_PRECISION)

    if SINGLE_PASS:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        o_ptrs = Out + b * stride_ob + head[:, None] * stride_oh + qi[:, None] * stride_oq + dims[None, :] * stride_od
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None])
    else:
        # Partials are contiguous [B * Hkv, num_splits, n_rows (, HEAD_DIM)].
        part = (pid_bh.to(tl.int64) * num_splits + split) * n_rows + rows
        tl.store(PartMax + part, m_i, mask=row_ok)
        tl.store(PartSum + part, l_i, mask=row_ok)
        tl.store(PartAcc + part[:, None] * HEAD_DIM + dims[None, :], acc, mask=row_ok[:, None])


@triton.jit(do_not_specialize=["num_kv_heads", "group", "num_queries", "splits"])
def _tree_attention_merge(
    Out, PartAcc, PartMax, PartSum,
    stride_ob, stride_oh, stride_oq, stride_od,
    num_kv_heads, group, num_queries, splits,
    HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Merge the per-split partials of ``BLOCK_R`` packed rows into normalised outputs.

    ``BLOCK_S`` splits are loaded at once as a ``[BLOCK_R, BLOCK_S, HEAD_DIM]`` tile (independent
    loads, so the memory system sees them all), and folded in with an online rescaling; a loop
    only runs when there are more than ``BLOCK_S`` splits.
    """
    tl.static_assert((HEAD_DIM & (HEAD_DIM - 1)) == 0, "head_dim must be a power of two")
    pid_r = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_kv_heads).to(tl.int64)
    h = (pid_bh % num_kv_heads).to(tl.int64)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    n_rows = num_queries * group
    row_ok = rows < n_rows
    dims = tl.arange(0, HEAD_DIM)
    sidx = tl.arange(0, BLOCK_S)
    first = pid_bh.to(tl.int64) * splits * n_rows + rows  # [R]: split 0's partial of each row

    m_all = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_all = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, HEAD_DIM], dtype=tl.float32)
    for s0 in range(0, splits, BLOCK_S):
        sp = s0 + sidx
        ok = row_ok[:, None] & (sp < splits)[None, :]  # [R, S]
        part = first[:, None] + sp[None, :].to(tl.int64) * n_rows  # [R, S]
        pm = tl.load(PartMax + part, mask=ok, other=float("-inf"))
        ps = tl.load(PartSum + part, mask=ok, other=0.0)
        pa = tl.load(PartAcc + part[:, :, None] * HEAD_DIM + dims[None, None, :], mask=ok[:, :, None], other=0.0)
        m_new = tl.maximum(m_all, tl.max(pm, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_all - m_safe)
        w = tl.math.exp2(pm - m_safe[:, None])  # [R, S]; 0 for empty or masked partials
        l_all = l_all * alpha + tl.sum(w * ps, 1)
        acc = acc * alpha[:, None] + tl.sum(w[:, :, None] * pa, 1)
        m_all = m_new

    out = acc / tl.where(l_all == 0.0, 1.0, l_all)[:, None]
    qi = rows // group
    head = h * group + rows % group
    o_ptrs = Out + b * stride_ob + head[:, None] * stride_oh + qi[:, None] * stride_oq + dims[None, :] * stride_od
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None])


@dataclass(frozen=True)
class TreeAttentionConfig:
    """Launch parameters; ``plan_tree_attention`` picks them from static shapes."""

    block_m: int  # packed (query head, query) rows per program
    block_n: int  # key slots per tile
    splits: int  # prefix chunks per row group; 1 = single pass, no merge kernel
    num_warps: int
    num_stages: int


_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a few programs, enough to exercise the split path
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


# Cost model of one call on an H100-class GPU (SXM: 132 SMs, 3.35 TB/s, 989 bf16 TFLOP/s), calibrated
# on the first H100 run (docs/gpu/kernels_run1.md). The per-SM tensor-core rate a program reaches,
# softmax included, depends on its tile: with m128 / 8 warps (wgmma, ~238 registers a thread, so one
# program per SM) 0.33 of peak with 2 stages and 0.48 with 3; m32 / 4 warps (mma.sync, two programs
# per SM) 0.17 for the SM. That makes 16-node trees (96 packed rows for GQA 6) compute- and
# latency-bound at m128 with 2 stages, not bandwidth-bound, and puts a premium on filling every SM
# with equal work: programs run in waves of SMs x occupancy, and a last partial wave costs a whole one.
_PEAK_SM_FLOPS = 989e12 / 132
_HBM_BPS = 2.8e12  # what a streaming read reaches (the run-1 copy test: 3.0 TB/s read + write)
_L2_BPS = 6.0e12  # L2 -> SM, for K/V tiles read by several row blocks
_LATENCY_S = 1.5e-6  # one tile's load under load; (stages - 1) tiles are in flight
_LAUNCH_S = 3e-6  # a second (merge) launch
_SMEM_BYTES = 227 * 1024
_REGS_PER_SM = 65536


def _efficiency(block_m: int, num_stages: int) -> float:
    """Fraction of an SM's peak tensor rate the resident programs reach together (run-1 fit)."""
    if block_m >= 128:
        return 0.48 if num_stages >= 3 else 0.33
    if block_m >= 64:
        return 0.33 if num_stages >= 3 else 0.3
    return 0.17 if block_m >= 32 else 0.09


def _occupancy(block_m: int, block_n: int, num_warps: int, num_stages: int, head_dim: int, elem: int) -> int:
    """Programs per SM: ~240 registers a thread (ptxas, sm_90) and the shared memory of Q plus the
    pipelined K/V tiles (wgmma tiles keep ``num_stages`` buffers, mma.sync ones one fewer)."""
    by_regs = max(1, _REGS_PER_SM // (240 * 32 * num_warps))
    buffers = num_stages if block_m >= 64 else max(num_stages - 1, 1)
    smem = block_m * head_dim * elem + buffers * 2 * block_n * head_dim * elem + 8192
    return max(1, min(by_regs, _SMEM_BYTES // smem))


def estimate_tree_attention_us(cfg: TreeAttentionConfig, batch: int, num_kv_heads: int, group: int,
                               num_queries: int, head_dim: int, num_slots: int, sms: int = 132,
                               elem: int = 2) -> float:
    """Modelled microseconds of one ``tree_attention`` call with ``cfg`` (see the constants above)."""
    n_rows = group * num_queries
    prefix = max(num_slots - num_queries, 1)
    chunk = triton.cdiv(triton.cdiv(prefix, cfg.splits), cfg.block_n) * cfg.block_n
    splits = triton.cdiv(prefix, chunk)
    m_blocks = triton.cdiv(n_rows, cfg.block_m)
    programs = m_blocks * batch * num_kv_heads * splits
    occ = _occupancy(cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages, head_dim, elem)
    slots = sms * occ
    last = prefix - (splits - 1) * chunk
    tiles = max(triton.cdiv(chunk, cfg.block_n), triton.cdiv(last, cfg.block_n) + triton.cdiv(num_queries, cfg.block_n))
    tile_bytes = 2 * cfg.block_n * head_dim * elem
    t_compute = occ * 4 * cfg.block_m * cfg.block_n * head_dim / (_PEAK_SM_FLOPS * _efficiency(cfg.block_m, cfg.num_stages))
    t_latency = _LATENCY_S / max(cfg.num_stages - 1, 1)
    t_program = (tiles + 2) * max(t_compute, t_latency)  # + Q load, pipeline fill, epilogue
    part_bytes = 0 if splits == 1 else min(cfg.block_m, n_rows) * (head_dim + 2) * 4
    hbm = tiles * tile_bytes / m_blocks + part_bytes
    l2 = tiles * tile_bytes

    def wave(n: int) -> float:
        return max(t_program, n * hbm / _HBM_BPS, n * l2 / _L2_BPS)

    full, rest = divmod(programs, slots)
    t = full * wave(slots) + (wave(rest) if rest else 0.0)
    if splits > 1:  # the merge reads every partial once, with one program per (row, few splits)
        t += _LAUNCH_S + batch * num_kv_heads * splits * n_rows * (head_dim + 2) * 4 / _HBM_BPS
    return t * 1e6


def _candidate_tiles(n_rows: int, head_dim: int) -> list[tuple[int, int, int, int]]:
    """(block_m, block_n, num_warps, num_stages) the planner chooses among."""
    top = min(max(16, triton.next_power_of_2(n_rows)), 128 if head_dim <= 128 else 64)
    out = []
    for block_m, warps in ((128, 8), (64, 4), (32, 4), (16, 4)):
        if block_m > top:
            continue
        for stages in (2, 3):
            out.append((block_m, 64, warps, stages))
    return out


def plan_tree_attention(batch: int, num_kv_heads: int, group: int, num_queries: int, head_dim: int,
                        num_slots: int, device: torch.device, *, min_chunk: int = 128,
                        waves: float = 8.0, elem: int = 2) -> TreeAttentionConfig:
    """Pick tiles and a prefix split count from static shapes, by the cost model
    ``estimate_tree_attention_us``: every candidate tile shape (``_candidate_tiles``) with every
    split count that leaves chunks of at least ``min_chunk`` slots and at most ``waves`` programs
    per SM slot; the cheapest wins, ties going to fewer splits.
    """
    return _plan(batch, num_kv_heads, group, num_queries, head_dim, num_slots, _sm_count(device), device.type == "cuda",
                 min_chunk, waves, elem)


@functools.lru_cache(maxsize=4096)
def _plan(batch, num_kv_heads, group, num_queries, head_dim, num_slots, sms, on_gpu, min_chunk, waves, elem):
    n_rows = group * num_queries
    prefix = max(num_slots - num_queries, 1)
    best, best_t = None, float("inf")
    tiles = _candidate_tiles(n_rows, head_dim)
    for block_m, block_n, warps, stages in tiles:
        if not on_gpu and (block_m, stages) != (tiles[0][0], 2):
            continue  # the interpreter: one tile shape, so the split path is what varies
        base = triton.cdiv(n_rows, block_m) * batch * num_kv_heads
        occ = _occupancy(block_m, block_n, warps, stages, head_dim, elem)
        most = max(1, min(prefix // max(min_chunk, block_n), int(waves * sms * occ) // base))
        seen = set()
        for splits in range(1, most + 1):
            chunk = triton.cdiv(triton.cdiv(prefix, splits), block_n) * block_n
            real = triton.cdiv(prefix, chunk)
            if real in seen:
                continue
            seen.add(real)
            cfg = TreeAttentionConfig(block_m, block_n, real, warps, stages)
            t = estimate_tree_attention_us(cfg, batch, num_kv_heads, group, num_queries, head_dim, num_slots, sms, elem)
            if t < best_t * 0.995:  # clear wins only: fewer splits and simpler tiles on near-ties
                best, best_t = cfg, t
    return best


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Every buffer the wrapper allocates (tests swap in a poisoned one)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _interpreted(fn) -> bool:
    return not isinstance(fn, triton.runtime.JITFunction)


def tree_attention(q: Tensor, k: Tensor, v: Tensor, start: Tensor, lengths: Tensor, tree_mask: Tensor,
                   scale: float, *, config: TreeAttentionConfig | None = None) -> Tensor:
    """Attention of Q new tokens per row over their row's committed prefix and tree ancestors.

    q: ``[B, Hq, Q, D]``, the new tokens' queries.
    k, v: ``[B, Hkv, S, D]``, whole cache buffers (the new tokens' K/V already written at slots
        ``lengths .. lengths + Q - 1``, so ``lengths[b] + Q <= S``). Hq must be a multiple of Hkv.
    start, lengths: ``[B]`` int, first committed slot and number of slots in use per row.
    tree_mask: ``[B, Q, Q]`` bool, ``tree_mask[b, i, j]``: query i sees new token j. Every query
        should see itself; a query that sees nothing gets zeros.
    scale: softmax scale, usually ``D ** -0.5``.
    Returns ``[B, Hq, Q, D]`` in q's dtype.

    Example::

        # one row, 3 committed tokens at slots 1..3, a root with two children at slots 4..6
        tree = torch.tensor([[[1, 0, 0], [1, 1, 0], [1, 0, 1]]], dtype=torch.bool)
        out = tree_attention(q, k, v, torch.tensor([1]), torch.tensor([4]), tree, 0.125)
    """
    bsz, hq, nq, d = q.shape
    assert k.dim() == 4 and k.shape == v.shape, f"k {tuple(k.shape)} and v {tuple(v.shape)} must match"
    assert k.shape[0] == bsz and k.shape[3] == d, f"q {tuple(q.shape)} does not fit k {tuple(k.shape)}"
    hkv, num_slots = k.shape[1], k.shape[2]
    assert hq % hkv == 0, f"query heads ({hq}) must be a multiple of key/value heads ({hkv})"
    assert q.dtype == k.dtype == v.dtype, f"dtypes differ: q {q.dtype}, k {k.dtype}, v {v.dtype}"
    assert q.dtype in (torch.float16, torch.bfloat16, torch.float32), f"unsupported dtype {q.dtype}"
    assert d in (16, 32, 64, 128, 256), f"head_dim {d} must be a power of two in [16, 256]"
    assert 1 <= nq <= num_slots, f"{nq} queries do not fit in {num_slots} slots"
    assert start.shape == (bsz,) and lengths.shape == (bsz,), "start and lengths must be [B]"
    assert tree_mask.shape == (bsz, nq, nq) and tree_mask.dtype == torch.bool, \
        f"tree_mask must be [B, Q, Q] bool, got {tuple(tree_mask.shape)} {tree_mask.dtype}"
    assert q.device == k.device == v.device == start.device == lengths.device == tree_mask.device

    return launch(q, k, v, start, lengths, lengths, None, tree_mask, scale, num_slots - nq, config)


def launch(q: Tensor, k: Tensor, v: Tensor, start: Tensor, lengths: Tensor, new_start: Tensor, table: Tensor | None,
           tree_mask: Tensor, scale: float, prefix: int, config: TreeAttentionConfig | None) -> Tensor:
    """Plan and launch the kernels over checked inputs. The prefix is positions ``start ..
    lengths - 1`` of a space of ``prefix`` positions: cache slots, or entries of ``table`` ``[B, T]``
    (slots); the new tokens sit at slots ``new_start .. new_start + Q - 1``."""
    bsz, hq, nq, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    cfg = config or plan_tree_attention(bsz, hkv, group, nq, d, prefix + nq, q.device, elem=q.element_size())
    n_rows = group * nq
    prefix = max(prefix, 1)
    chunk = triton.cdiv(triton.cdiv(prefix, max(cfg.splits, 1)), cfg.block_n) * cfg.block_n
    splits = triton.cdiv(prefix, chunk)  # rounding the chunk up may leave fewer non-empty splits
    if splits == 1:
        chunk = max(chunk, prefix + nq)

    out = _empty((bsz, hq, nq, d), q.dtype, q.device)
    if splits == 1:
        part_acc = part_max = part_sum = out  # unused
    else:
        part_acc = _empty((bsz * hkv, splits, n_rows, d), torch.float32, q.device)
        part_max = _empty((bsz * hkv, splits, n_rows), torch.float32, q.device)
        part_sum = _empty((bsz * hkv, splits, n_rows), torch.float32, q.device)
    # Triton's CPU interpreter (3.9) runs tl.dot on bf16 as raw 16-bit integers; give it fp32.
    upcast = _interpreted(_tree_attention_fwd) and q.dtype == torch.bfloat16
    mask = tree_mask.view(torch.uint8)
    grid = (triton.cdiv(n_rows, cfg.block_m), splits, bsz * hkv)
    _tree_attention_fwd[grid](
        q, k, v, out, start, lengths, new_start, start if table is None else table, mask, part_acc, part_max, part_sum,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *mask.stride(), 0 if table is None else table.stride(0),
        hkv, group, nq, splits, chunk, scale * LOG2E,
        HEAD_DIM=d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, SINGLE_PASS=splits == 1, UPCAST_DOT=upcast,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", TABLE=table is not None,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if splits > 1:
        block_s = min(triton.next_power_of_2(splits), 32)
        block_r = max(1, min(32 // block_s, triton.next_power_of_2(n_rows)))  # <= 32 x D fp32 per load
        _tree_attention_merge[(triton.cdiv(n_rows, block_r), bsz * hkv)](
            out, part_acc, part_max, part_sum, *out.stride(), hkv, group, nq, splits,
            HEAD_DIM=d, BLOCK_R=block_r, BLOCK_S=block_s, num_warps=4 if block_r * block_s * d >= 2048 else 2,
        )
    return out


def tree_visibility(start: Tensor, lengths: Tensor, tree_mask: Tensor, num_slots: int) -> Tensor:
    """The dense ``[B, Q, S]`` mask that ``tree_attention`` applies implicitly."""
    bsz, nq, _ = tree_mask.shape
    j = torch.arange(num_slots, device=tree_mask.device)
    prefix = (j >= start[:, None]) & (j < lengths[:, None])  # [B, S]
    rel = j[None, :] - lengths[:, None]  # [B, S]: index of the new token at each slot, if any
    new = (rel >= 0) & (rel < nq)
    among = tree_mask.gather(2, rel.clamp(0, nq - 1).unsqueeze(1).expand(bsz, nq, num_slots))
    return prefix.unsqueeze(1) | (new.unsqueeze(1) & among)


@torch.library.custom_op("specdec::tree_attention", mutates_args=())
def tree_attention_op(q: Tensor, k: Tensor, v: Tensor, start: Tensor, lengths: Tensor, tree_mask: Tensor,
                      scale: float) -> Tensor:
    """``tree_attention`` as a torch operator: ``torch.compile`` treats it as one opaque call (its
    launch plan depends on static shapes only), so a compiled step attends through the kernel,
    reading each row's length, instead of a dense mask over the whole cache."""
    return tree_attention(q, k, v, start, lengths, tree_mask, scale)


@tree_attention_op.register_fake
def _(q, k, v, start, lengths, tree_mask, scale):
    return q.new_empty(q.shape)  # contiguous [B, Hq, Q, D], as the kernel writes it (q may be a view)


def tree_attention_reference(q: Tensor, k: Tensor, v: Tensor, start: Tensor, lengths: Tensor, tree_mask: Tensor,
                             scale: float) -> Tensor:
    """Pure-torch ``tree_attention``: a dense mask and ``masked_attention_reference``.

    A query whose mask is empty (never made by the engine) gives NaN here and zeros in the kernel.
    """
    mask = tree_visibility(start, lengths, tree_mask, k.shape[2])
    return masked_attention_reference(q, k, v, mask, scale)


__all__ = ["TreeAttentionConfig", "estimate_tree_attention_us", "plan_tree_attention", "tree_attention",
           "tree_attention_op", "tree_attention_reference",
           "tree_visibility"]

"""Triton kernels against their pure-torch references.

Without a GPU the kernels run under Triton's interpreter, on tiny shapes (it is slow). Triton
reads ``TRITON_INTERPRET`` once, when it is first imported, so this module sets it when Triton
is not loaded yet and no GPU is present (``pytest tests/test_kernels.py``). In a wider run, where
another module imported Triton first, or on a GPU machine, the interpreter tests run instead in
one child pytest with the variable set, and the GPU tests run here on CUDA.
"""
from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
import torch

if "triton" not in sys.modules and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"

import specdec  # noqa: E402
from specdec.cache import KVCache  # noqa: E402
from specdec.drafters import DraftModel, PromptLookup, SparseSelfDraft, TriForce  # noqa: E402
from specdec.kernels import (block_table_attention, block_table_reference, kv_commit, kv_commit_reference,  # noqa: E402
                             masked_attention_reference, tree_attention_reference, tree_visibility)

from tiny import hf_greedy, make_tiny, ragged_batch  # noqa: E402

attention_module = importlib.import_module("specdec.kernels.tree_attention")  # the package exports the function



def interpreter_fault() -> str | None:
    """Why this Triton's interpreter cannot run the kernels here, or None when it can.

    The kernels loop ``for n in range(start, stop, BLOCK)`` over bounds loaded from memory. Triton
    3.6's interpreter turns such a bound into an int with ``int(array)`` on a one-element array,
    which NumPy 2.4 refuses ("only 0-dimensional arrays can be converted to Python scalars");
    later Tritons squeeze the array first. Probed with a four-line kernel, not guessed from versions.
    """
    if not INTERPRETER:
        return None
    import triton
    import triton.language as tl

    @triton.jit
    def probe(bound_ptr, out_ptr):
        total = 0
        for i in range(0, tl.load(bound_ptr), 1):
            total += i
        tl.store(out_ptr, total)

    out = torch.zeros(1, dtype=torch.int32)
    try:
        probe[(1,)](torch.tensor([3], dtype=torch.int32), out)
    except Exception as exc:   # the interpreter wraps the TypeError in its own InterpreterError
        return f"Triton {triton.__version__}'s interpreter cannot loop to a loaded bound here ({exc!r})"
    return None if int(out) == 3 else f"Triton {triton.__version__}'s interpreter loops wrongly (0+1+2 gave {int(out)})"


INTERPRETER_FAULT = interpreter_fault()
interpreted = pytest.mark.skipif(not INTERPRETER or INTERPRETER_FAULT is not None,
                                 reason=INTERPRETER_FAULT or "runs in the child pytest (test_interpreter_in_child)")
needs_cuda = pytest.mark.skipif(INTERPRETER or not torch.cuda.is_available(), reason="needs a CUDA GPU")


def random_tree(batch: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """``[B, n, n]`` ancestor-or-self mask of random trees: node i's parent is drawn from 0..i-1."""
    mask = torch.zeros(batch, n, n, dtype=torch.bool)
    for b in range(batch):
        for i in range(n):
            mask[b, i, i] = True
            if i:
                parent = int(torch.randint(0, i, (1,), generator=gen))
                mask[b, i] |= mask[b, parent]
    return mask


def make_case(batch, hq, hkv, nq, slots, d, dtype, device="cpu", seed=0):
    """Random q/k/v and ragged rows: left padding ``start``, committed ``lengths``, a random tree."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, hq, nq, d, generator=gen).to(device, dtype)
    k = torch.randn(batch, hkv, slots, d, generator=gen).to(device, dtype)
    v = torch.randn(batch, hkv, slots, d, generator=gen).to(device, dtype)
    lengths = torch.randint(1, slots - nq + 1, (batch,), generator=gen)
    lengths[0] = slots - nq  # one row uses the whole buffer
    start = (torch.rand(batch, generator=gen) * lengths * 0.5).long()
    if batch > 1:
        start[1] = lengths[1]  # an empty prefix: the tree alone
    tree = random_tree(batch, nq, gen)
    return q, k, v, start.to(device), lengths.to(device), tree.to(device)


TOLERANCE = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def check_attention(fn, case, config=None):
    q, k, v, start, lengths, tree = case
    scale = q.shape[-1] ** -0.5
    out = fn(q, k, v, start, lengths, tree, scale, config=config)
    assert out.shape == q.shape and out.dtype == q.dtype
    want = tree_attention_reference(q.float(), k.float(), v.float(), start, lengths, tree, scale)
    err = (out.float() - want).abs().max().item()
    assert err <= TOLERANCE[q.dtype], f"max abs error {err:.3g}"


def poisoned(monkeypatch):
    """Make every buffer the wrapper allocates start as NaN, so an unwritten element shows."""
    monkeypatch.setattr(attention_module, "_empty",
                        lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device))


def config(splits, block=16):
    return attention_module.TreeAttentionConfig(block_m=block, block_n=block, splits=splits, num_warps=4,
                                                num_stages=2)


# (batch, Hq, Hkv, Q, S, D, dtype, prefix splits or None for the planner's choice)
CASES = [
    (1, 2, 2, 1, 24, 16, torch.float32, 1),  # plain decode, no GQA
    (2, 4, 2, 5, 40, 32, torch.float32, 3),
    (3, 8, 1, 3, 50, 16, torch.bfloat16, 2),  # GQA 8, three rows
    (2, 6, 2, 7, 37, 16, torch.float16, 1),
    (2, 3, 3, 17, 60, 16, torch.bfloat16, 3),  # a tree wider than one key tile
    (2, 4, 1, 1, 70, 64, torch.bfloat16, None),
    (1, 2, 1, 4, 40, 128, torch.float16, None),
]


@interpreted
@pytest.mark.parametrize("batch,hq,hkv,nq,slots,d,dtype,splits", CASES)
def test_tree_attention_matches_reference(monkeypatch, batch, hq, hkv, nq, slots, d, dtype, splits):
    poisoned(monkeypatch)
    case = make_case(batch, hq, hkv, nq, slots, d, dtype)
    check_attention(attention_module.tree_attention, case, None if splits is None else config(splits))


@interpreted
def test_tree_attention_reads_cache_view_and_stops_at_mask():
    """Works on a slice of a larger buffer, and slots past the tree (garbage) never leak in."""
    q, k, v, start, lengths, tree = make_case(2, 4, 2, 3, 30, 16, torch.float32, seed=1)
    big_k = torch.full((2, 2, 48, 16), 1e4)
    big_v = torch.full((2, 2, 48, 16), float("nan"))
    big_k[:, :, :30], big_v[:, :, :30] = k, v
    out = attention_module.tree_attention(q, big_k[:, :, :30], big_v[:, :, :30], start, lengths, tree, 0.25,
                                          config=config(2))
    want = tree_attention_reference(q, k, v, start, lengths, tree, 0.25)
    torch.testing.assert_close(out, want, atol=2e-5, rtol=0)


def test_tree_visibility_matches_cache_mask():
    """The kernel's implicit mask is the one the cache builds for a verification step."""
    gen = torch.Generator().manual_seed(2)
    cache = KVCache(num_layers=1, batch=3, num_kv_heads=1, head_dim=16, max_len=32, dtype=torch.float32, device="cpu")
    cache.lengths.copy_(torch.tensor([20, 9, 14]))
    cache.start.copy_(torch.tensor([0, 5, 14]))
    tree = random_tree(3, 6, gen)
    slots = cache.lengths[:, None] + torch.arange(6)
    want = cache.visible(slots, tree, view_len=28)
    assert torch.equal(tree_visibility(cache.start, cache.lengths, tree, 28), want)


def random_commit(batch, moves, slots, seed=0):
    """Per row: ``count`` accepted nodes at increasing slots at or after ``dst_start + a``."""
    gen = torch.Generator().manual_seed(seed)
    dst = torch.randint(0, slots - 2 * moves, (batch,), generator=gen)
    src = torch.zeros(batch, moves, dtype=torch.long)
    for b in range(batch):
        nodes = torch.randperm(moves + 3, generator=gen)[:moves].sort().values  # a root-to-leaf path
        src[b] = dst[b] + nodes
    count = torch.randint(0, moves + 1, (batch,), generator=gen)
    count[0] = moves
    return src, dst, count


@interpreted
@pytest.mark.parametrize("batch,heads,d,moves", [(3, 2, 16, 5), (2, 1, 64, 1), (4, 3, 32, 9)])
def test_kv_commit_matches_reference(batch, heads, d, moves):
    gen = torch.Generator().manual_seed(3)
    bufs = [torch.randn(batch, heads, 40, d, generator=gen).to(torch.bfloat16) for _ in range(4)]
    want = [t.clone() for t in bufs]
    src, dst, count = random_commit(batch, moves, 40)
    kv_commit(bufs, src, dst, count)
    kv_commit_reference(want, src, dst, count)
    for got, ref in zip(bufs, want):
        assert torch.equal(got, ref)


@interpreted
def test_kv_commit_reads_all_before_writing():
    """Sources overwritten by earlier moves still arrive intact (slots 5, 6, 7 -> 4, 5, 6)."""
    buf = torch.arange(10, dtype=torch.float32).view(1, 1, 10, 1).expand(1, 1, 10, 16).contiguous()
    kv_commit([buf], torch.tensor([[5, 6, 7, 9]]), torch.tensor([4]), torch.tensor([3]))
    assert buf[0, 0, :, 0].tolist() == [0, 1, 2, 3, 5, 6, 7, 7, 8, 9]


def test_kv_commit_reference_moves_only_counted_nodes():
    buf = torch.arange(8, dtype=torch.float32).view(1, 1, 8, 1).repeat(2, 1, 1, 2)
    kv_commit_reference([buf], torch.tensor([[3, 5], [6, 7]]), torch.tensor([2, 4]), torch.tensor([2, 0]))
    assert buf[0, 0, :, 0].tolist() == [0, 1, 3, 5, 4, 5, 6, 7]  # nodes 3, 5 -> slots 2, 3
    assert buf[1, 0, :, 0].tolist() == list(range(8))  # nothing accepted


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("nq,hq,hkv", [(1, 12, 2), (16, 8, 8), (64, 16, 2)])
def test_tree_attention_cuda(monkeypatch, dtype, nq, hq, hkv):
    poisoned(monkeypatch)
    case = make_case(3, hq, hkv, nq, 1500, 128, dtype, device="cuda")
    check_attention(attention_module.tree_attention, case)
    check_attention(attention_module.tree_attention, case, config(1, block=64))


@needs_cuda
def test_kv_commit_cuda():
    bufs = [torch.randn(4, 2, 300, 128, device="cuda", dtype=torch.bfloat16) for _ in range(6)]
    want = [t.clone() for t in bufs]
    src, dst, count = (t.cuda() for t in random_commit(4, 64, 300))
    kv_commit(bufs, src, dst, count)
    kv_commit_reference(want, src, dst, count)
    assert all(torch.equal(a, b) for a, b in zip(bufs, want))


def make_table_case(batch, hq, hkv, nq, slots, entries, d, dtype, device="cpu", seed=0):
    """Random q/k/v, and per row a table of ``entries`` distinct committed slots in shuffled order,
    of which a ragged range ``first .. last`` is listed (entries outside it hold -1: never read);
    the new tokens sit after every listed slot, under a random tree."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, hq, nq, d, generator=gen).to(device, dtype)
    k = torch.randn(batch, hkv, slots, d, generator=gen).to(device, dtype)
    v = torch.randn(batch, hkv, slots, d, generator=gen).to(device, dtype)
    table = torch.stack([torch.randperm(slots - nq, generator=gen)[:entries] for _ in range(batch)])
    first = torch.randint(0, entries // 3 + 1, (batch,), generator=gen)
    last = torch.randint(entries // 2, entries + 1, (batch,), generator=gen)
    first[0], last[0] = 0, entries  # one row lists the whole table
    if batch > 1:
        last[1] = first[1]  # an empty prefix: the tree alone
    pos = torch.arange(entries)
    table = torch.where((pos >= first[:, None]) & (pos < last[:, None]), table, -1)
    new_start = torch.full((batch,), slots - nq)
    tree = random_tree(batch, nq, gen)
    return tuple(t.to(device) for t in (q, k, v)) + (table.to(device, torch.int32), first.to(device),
                                                     last.to(device), new_start.to(device), tree.to(device))


def test_block_table_reference_is_attention_over_the_listed_slots():
    """The reference equals plain masked attention over the whole cache with only the listed slots
    and the tree visible (so neither the table's order nor its unlisted entries matter)."""
    q, k, v, table, first, last, new_start, tree = make_table_case(3, 4, 2, 5, 70, 24, 16, torch.float32)
    got = block_table_reference(q, k, v, table, first, last, new_start, tree, 0.3)
    mask = tree_visibility(new_start, new_start, tree, 70)  # the new tokens under the tree
    for b in range(3):
        mask[b, :, table[b, first[b]:last[b]].long()] = True
    torch.testing.assert_close(got, masked_attention_reference(q, k, v, mask, 0.3), atol=1e-6, rtol=0)
    shuffled = table.clone()
    shuffled[0] = shuffled[0, torch.randperm(24)]
    torch.testing.assert_close(block_table_reference(q, k, v, shuffled, first, last, new_start, tree, 0.3)[0],
                               got[0], atol=1e-6, rtol=0)


# (batch, Hq, Hkv, Q, S, table entries, D, dtype, prefix splits or None for the planner's choice)
TABLE_CASES = [
    (1, 2, 2, 1, 40, 20, 16, torch.float32, 1),
    (3, 4, 2, 5, 90, 37, 32, torch.float32, 3),  # ragged ranges, a row with an empty prefix
    (2, 8, 1, 3, 64, 50, 16, torch.bfloat16, 2),  # GQA 8
    (2, 3, 3, 17, 80, 33, 16, torch.float16, None),  # a tree wider than one key tile
]


@interpreted
@pytest.mark.parametrize("batch,hq,hkv,nq,slots,entries,d,dtype,splits", TABLE_CASES)
def test_block_table_attention_matches_reference(monkeypatch, batch, hq, hkv, nq, slots, entries, d, dtype, splits):
    poisoned(monkeypatch)
    case = make_table_case(batch, hq, hkv, nq, slots, entries, d, dtype)
    out = block_table_attention(*case, d ** -0.5, config=None if splits is None else config(splits))
    want = block_table_reference(*(t.float() if t.is_floating_point() else t for t in case), d ** -0.5)
    assert out.shape == case[0].shape and out.dtype == dtype
    err = (out.float() - want).abs().max().item()
    assert err <= TOLERANCE[dtype], f"max abs error {err:.3g}"


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("nq,hq,hkv", [(1, 12, 2), (9, 12, 2), (16, 8, 8)])
def test_block_table_attention_cuda(monkeypatch, dtype, nq, hq, hkv):
    poisoned(monkeypatch)
    case = make_table_case(3, hq, hkv, nq, 3000, 388, 128, dtype, device="cuda")
    for cfg in (None, config(1, block=64)):
        out = block_table_attention(*case, 128 ** -0.5, config=cfg)
        want = block_table_reference(*(t.float() if t.is_floating_point() else t for t in case), 128 ** -0.5)
        assert (out.float() - want).abs().max().item() <= TOLERANCE[dtype]


@pytest.mark.skipif(INTERPRETER, reason="the interpreter tests run in this process")
def test_interpreter_in_child():
    """Triton was imported before this module could pick the interpreter: run the file again."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    child = subprocess.run([sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider"], env=env,
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stdout[-4000:] + child.stderr[-2000:]


@interpreted
@pytest.mark.parametrize("drafter", ["none", "lookup tree", "draft model tree", "sparse self-draft", "triforce"])
def test_engine_with_triton_attention_equals_hf_greedy(drafter):
    """The whole engine with the Triton tree-attention kernel (interpreted on CPU) stays exact; the
    sparse self-draft and TriForce draft through the block-table kernel, over budgets of 6 slots
    that the rows' contexts outgrow."""
    model = make_tiny("qwen3")
    ids, mask = ragged_batch([3, 7, 1], model.config.vocab_size, seed=9)
    ref = hf_greedy(model, ids, mask, max_new_tokens=12, eos_token_id=None)
    d = {"none": None, "lookup tree": PromptLookup(3, num_branches=2),
         "draft model tree": DraftModel(model, 3, tree_width=2, tree_nodes=6),
         "sparse self-draft": SparseSelfDraft(num_tokens=3, sink=1, window=3, chunk=2, top_chunks=1),
         "triforce": TriForce(num_tokens=4, sink=1, window=3, chunk=2, top_chunks=1)}[drafter]
    out = specdec.wrap(model, drafter=d, attention="triton").generate(
        ids, attention_mask=mask, max_new_tokens=12, pad_token_id=0, eos_token_id=None)
    assert torch.equal(out, ref)

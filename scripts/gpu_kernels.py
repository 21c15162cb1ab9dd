"""GPU check and benchmark of the Triton kernels (tree attention, KV commit) against torch.

One command on a CUDA machine, a few minutes:

    python scripts/gpu_kernels.py --out kernels.json > kernels.md

Sections (each one's failure is recorded and the others still run):

1. device: peak memory bandwidth measured by a large device copy, and an empty kernel's time;
2. correctness: tree attention in bf16 against the fp32 reference, on a sampled grid of
   prefix 128..32K, nodes 1..128, batch 1..8 and GQA ratios 1..8; then both kernels replayed
   from a CUDA graph after their inputs change in place;
3. benchmark: tree attention against torch SDPA given the dense mask, Qwen2.5-1.5B shapes
   (Hq=12, Hkv=2, D=128, bf16), prefixes 1K..32K, 16..128 nodes, batch 1..8; each shape runs
   with the current planner's configuration and with the run-1 planner's (``old_plan``), next to
   the cost model's prediction and the run-1 time (docs/gpu/kernels_run1.json, when present);
4. sweep: launch configurations around the planned one on memory- and compute-bound shapes, to
   tune ``plan_tree_attention`` and its cost model;
5. kv_commit: all 56 K/V buffers of Qwen2.5-1.5B in one launch, against the per-buffer reference.

Every time is GPU time per call from CUDA-graph replay with the L2 flushed before each call
(``bench``), as the engine runs a step; the benchmark's ``eager µs`` column is the old eager
``do_bench`` time, which includes whatever host overhead the GPU waited on.
Markdown goes to stdout, everything measured to the JSON file. ``--dry-run`` lists the shapes
and exits, which works without a GPU.
"""
from __future__ import annotations

import argparse
import itertools
import json
import platform
import random
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

HQ, HKV, HEAD_DIM = 12, 2, 128  # Qwen2.5-1.5B attention
QWEN_LAYERS = 28
NOMINAL_PEAK_TBS = 3.35  # H100 SXM HBM3
NOMINAL_BF16_TFLOPS = 989.0  # H100 SXM dense
GOAL_BYTES = 64 * 2**20

CORRECTNESS_AXES = {"prefix": [128, 1024, 4096, 32768], "nodes": [1, 16, 64, 128], "batch": [1, 4, 8],
                    "gqa": [1, 2, 6, 8]}
BENCH_AXES = {"prefix": [1024, 4096, 8192, 16384, 32768], "nodes": [16, 64, 128], "batch": [1, 4, 8]}
SWEEP_SHAPES = [(8, 8192, 16), (8, 32768, 16), (1, 32768, 16), (1, 1024, 16), (4, 1024, 16), (8, 8192, 64),
                (8, 8192, 128)]  # (batch, prefix, nodes)
RUN1_JSON = Path(__file__).resolve().parent.parent / "docs" / "gpu" / "kernels_run1.json"
COMMIT_SHAPES = [(1, 8), (8, 8), (8, 64)]  # (batch, accepted moves)
COMMIT_SLOTS = 8192 + 256
DEVICE = "cuda"


def correctness_grid(samples: int, seed: int = 0) -> list[tuple[int, int, int, int]]:
    """Corners of the grid plus a seeded sample of the rest: (prefix, nodes, batch, gqa)."""
    axes = CORRECTNESS_AXES
    full = list(itertools.product(axes["prefix"], axes["nodes"], axes["batch"], axes["gqa"]))
    ends = {name: (min(values), max(values)) for name, values in axes.items()}
    corners = [(p, n, b, g) for p, n, b, g in full
               if p in ends["prefix"] and n in ends["nodes"] and b in ends["batch"] and g in ends["gqa"]]
    rest = [c for c in full if c not in corners]
    random.Random(seed).shuffle(rest)
    return corners + rest[:max(0, samples - len(corners))]


def bench_grid() -> list[tuple[int, int, int]]:
    axes = BENCH_AXES
    return [(b, p, n) for b in axes["batch"] for p in axes["prefix"] for n in axes["nodes"]]


# ---------------------------------------------------------------------------------------------- helpers
@triton.jit
def _empty_kernel(x):
    pass


def random_tree(batch: int, n: int, device) -> torch.Tensor:
    """``[B, n, n]`` ancestor-or-self masks of random trees (node i's parent drawn from 0..i-1)."""
    mask = torch.eye(n, dtype=torch.bool).repeat(batch, 1, 1)
    for i in range(1, n):
        parent = torch.randint(0, i, (batch,))
        mask[:, i] |= mask[torch.arange(batch), parent]
    return mask.to(device)


def make_inputs(batch, hq, hkv, prefix, nodes, dtype=torch.bfloat16, ragged=True):
    """Cache buffers sized for ``prefix + nodes`` slots; row 0 uses all of them, others fewer."""
    slots = prefix + nodes
    q = torch.randn(batch, hq, nodes, HEAD_DIM, device=DEVICE, dtype=dtype)
    k = torch.randn(batch, hkv, slots, HEAD_DIM, device=DEVICE, dtype=dtype)
    v = torch.randn(batch, hkv, slots, HEAD_DIM, device=DEVICE, dtype=dtype)
    lengths = torch.full((batch,), prefix, dtype=torch.long)
    start = torch.zeros(batch, dtype=torch.long)
    if ragged and batch > 1:
        lengths[1:] = torch.randint(prefix // 2, prefix + 1, (batch - 1,))
        start[1:] = (torch.rand(batch - 1) * 0.1 * lengths[1:]).long()
    return q, k, v, start.to(DEVICE), lengths.to(DEVICE), random_tree(batch, nodes, DEVICE)


def kv_bytes(k: torch.Tensor, start: torch.Tensor, lengths: torch.Tensor, nodes: int) -> int:
    """K and V bytes one call must read: each row's committed prefix plus its new slots."""
    per_slot = 2 * k.shape[1] * k.shape[3] * k.element_size()
    return int(((lengths - start).sum().item() + nodes * k.shape[0]) * per_slot)


def old_plan(batch, num_kv_heads, group, num_queries, head_dim, num_slots, sms=132):
    """The run-1 planner (about 2 waves of programs, chunks >= 256 slots, m128 w8 st2), for comparison.
    Its ``splits`` meant prefix programs plus one tree program; the kernel now puts the tree in the
    last split, so this asks for one split more to keep the same program count."""
    from specdec.kernels import TreeAttentionConfig

    n_rows = group * num_queries
    block_m = min(max(16, triton.next_power_of_2(n_rows)), 128 if head_dim <= 128 else 64)
    big = block_m * head_dim >= 128 * 128
    prefix = max(num_slots - num_queries, 1)
    base = triton.cdiv(n_rows, block_m) * batch * num_kv_heads
    want = triton.cdiv(int(2.0 * sms), base)
    splits = max(1, min(want, prefix // max(256, 4 * n_rows)))
    return TreeAttentionConfig(block_m=block_m, block_n=64, splits=splits if splits == 1 else splits + 1,
                               num_warps=8 if big else 4, num_stages=2 if big or head_dim > 128 else 3)


def cfg_name(cfg) -> str:
    return f"m{cfg.block_m} n{cfg.block_n} s{cfg.splits} w{cfg.num_warps} st{cfg.num_stages}"


def real_splits(cfg, nodes, num_slots):
    """The split count the wrapper launches (a rounded-up chunk may leave fewer non-empty splits)."""
    prefix = max(num_slots - nodes, 1)
    chunk = triton.cdiv(triton.cdiv(prefix, cfg.splits), cfg.block_n) * cfg.block_n
    return triton.cdiv(prefix, chunk)


def bench_eager(fn) -> float:
    """Median milliseconds of eager calls (``triton.testing.do_bench``), L2 flushed between calls.

    Each sample runs from an event recorded after the flush to one after ``fn``, so whenever the
    host takes longer to issue ``fn`` (Python wrapper, allocations, two Triton launches) than the
    GPU takes to flush the L2, the GPU idles inside the timed window and the sample measures the
    host, not the kernel. For the small tree-attention shapes that is the usual case, and whether it
    happens flips with host jitter: run 2 timed the same configuration at 43 µs and run 1 at 123 µs,
    and configurations that launch identical code (m64 s6 vs s8) at 96 vs 37 µs. Kept only to
    report the eager (host-included) time next to the kernel time.
    """
    from triton.testing import do_bench

    return do_bench(fn, warmup=10, rep=40, return_mode="median")


_FLUSH: list[torch.Tensor] = []


def bench(fn, calls: int = 20, replays: int = 15) -> float:
    """Median GPU milliseconds of one call of ``fn``, with the L2 flushed before each call and no
    host overhead: ``calls`` x (flush, ``fn``) are captured in one CUDA graph, and so are ``calls``
    flushes alone; each sample is the difference of one replay of each, over ``calls``. This is how
    the engine runs a verification step (a captured graph), so the launch geometry is what is
    compared, not Python. Falls back to ``bench_eager`` if ``fn`` cannot be captured."""
    if not _FLUSH:
        l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20)
        _FLUSH.append(torch.empty(max(4 * l2, 128 * 2**20) // 4, dtype=torch.int32, device=DEVICE))
    flush = _FLUSH[0]
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # compile, autotune and allocate outside the capture
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        work, idle = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with torch.cuda.graph(work):
            for _ in range(calls):
                flush.zero_()
                fn()
        with torch.cuda.graph(idle):
            for _ in range(calls):
                flush.zero_()
    except Exception:  # e.g. a host sync inside fn
        torch.cuda.synchronize()
        return bench_eager(fn)
    for g in (work, idle, work, idle):
        g.replay()
    samples = []
    for _ in range(replays):
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
        ev[0].record()
        work.replay()
        ev[1].record()
        ev[2].record()
        idle.replay()
        ev[3].record()
        samples.append((ev[0], ev[1], ev[2], ev[3]))
    torch.cuda.synchronize()
    diffs = sorted((a.elapsed_time(b) - c.elapsed_time(d)) / calls for a, b, c, d in samples)
    del work, idle
    return max(diffs[len(diffs) // 2], 1e-6)


def fmt(x, digits=3):
    if x is None:
        return "—"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


def table(rows: list[dict], cols: list[tuple[str, str]]) -> str:
    head = "| " + " | ".join(title for _, title in cols) + " |"
    rule = "|" + "|".join("---" for _ in cols) + "|"
    body = ["| " + " | ".join(fmt(r.get(key)) for key, _ in cols) + " |" for r in rows]
    return "\n".join([head, rule, *body])


# ---------------------------------------------------------------------------------------------- sections
def section_device(report):
    n = 512 * 2**20  # 1 GiB of bf16
    src = torch.empty(n, dtype=torch.bfloat16, device=DEVICE).normal_()
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    peak = 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e12  # read + write
    del src, dst
    dummy = torch.empty(1, device=DEVICE)
    launch_us = bench(lambda: _empty_kernel[(1,)](dummy)) * 1e3
    report["device"] = {"name": torch.cuda.get_device_name(), "copy_tbs": peak, "nominal_tbs": NOMINAL_PEAK_TBS,
                        "empty_kernel_us": launch_us, "torch": torch.__version__, "triton": triton.__version__,
                        "python": platform.python_version(),
                        "sms": torch.cuda.get_device_properties(0).multi_processor_count}
    print("## Device\n")
    print(table([report["device"]], [("name", "GPU"), ("copy_tbs", "copy TB/s (read+write)"),
                                     ("nominal_tbs", "nominal TB/s"), ("empty_kernel_us", "empty kernel µs"),
                                     ("torch", "torch"), ("triton", "triton")]))
    print()


def section_correctness(report, samples):
    from specdec.kernels import tree_attention, tree_attention_reference

    rows = []
    for prefix, nodes, batch, gqa in correctness_grid(samples):
        hq, hkv = HKV * gqa, HKV
        torch.manual_seed(prefix + 7 * nodes + 31 * batch + gqa)
        q, k, v, start, lengths, tree = make_inputs(batch, hq, hkv, prefix, nodes)
        scale = HEAD_DIM ** -0.5
        row = {"prefix": prefix, "nodes": nodes, "batch": batch, "gqa": gqa}
        try:
            out = tree_attention(q, k, v, start, lengths, tree, scale).float()
            want = tree_attention_reference(q.float(), k.float(), v.float(), start, lengths, tree, scale)
            sdpa_bf16 = tree_attention_reference(q, k, v, start, lengths, tree, scale).float()
            row["max_abs_err"] = (out - want).abs().max().item()
            row["sdpa_bf16_err"] = (sdpa_bf16 - want).abs().max().item()
            row["finite"] = bool(torch.isfinite(out).all())
            row["pass"] = row["finite"] and row["max_abs_err"] <= max(2e-2, 2 * row["sdpa_bf16_err"])
        except Exception as exc:  # a failing shape is a result, not the end of the run
            row["pass"], row["error"] = False, repr(exc)[:300]
        rows.append(row)
        del q, k, v
    torch.cuda.empty_cache()
    report["correctness"] = rows
    passed = sum(r["pass"] for r in rows)
    print(f"## Correctness: bf16 kernel vs fp32 reference ({passed}/{len(rows)} pass; "
          "tolerance max(2e-2, 2 x SDPA-bf16 error))\n")
    print(table(rows, [("prefix", "prefix"), ("nodes", "nodes"), ("batch", "batch"), ("gqa", "Hq/Hkv"),
                       ("max_abs_err", "max abs err"), ("sdpa_bf16_err", "SDPA bf16 err"), ("pass", "pass"),
                       ("error", "error")]))
    print()


def section_graph(report):
    """Both kernels replay correctly from a CUDA graph when inputs and row lengths change in place."""
    from specdec.kernels import kv_commit, kv_commit_reference, tree_attention, tree_attention_reference

    torch.manual_seed(1)
    q, k, v, start, lengths, tree = make_inputs(4, HQ, HKV, 4096, 64)
    scale = HEAD_DIM ** -0.5
    src = lengths[:, None] + torch.arange(8, device=DEVICE) * 2
    dst, count = lengths.clone(), torch.full_like(lengths, 8)
    bufs = [k.clone(), v.clone()]
    for _ in range(2):  # compile and warm up outside the capture
        tree_attention(q, k, v, start, lengths, tree, scale)
        kv_commit(bufs, src, dst, count)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = tree_attention(q, k, v, start, lengths, tree, scale)
        kv_commit(bufs, src, dst, count)
    q.normal_()
    lengths.sub_(torch.tensor([0, 100, 1000, 7], device=DEVICE))
    tree.copy_(random_tree(4, 64, DEVICE))
    dst.copy_(lengths)
    ref_bufs = [t.clone() for t in bufs]
    kv_commit_reference(ref_bufs, src, dst, count)
    graph.replay()
    want = tree_attention_reference(q.float(), k.float(), v.float(), start, lengths, tree, scale)
    err = (out.float() - want).abs().max().item()
    exact = all(torch.equal(a, b) for a, b in zip(bufs, ref_bufs))
    report["graph"] = {"attention_max_abs_err": err, "commit_exact": exact, "pass": err <= 2e-2 and exact}
    print("## CUDA graph replay with new inputs\n")
    print(table([report["graph"]], [("attention_max_abs_err", "attention max abs err"), ("commit_exact", "commit exact"),
                                    ("pass", "pass")]))
    print()


def sdpa_with_mask(q, k, v, mask, scale, expand):
    """The baseline: torch SDPA over the cache view with the dense boolean mask."""
    if expand:  # K/V already repeated to Hq heads (not timed), so any SDPA backend may run
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)


def section_bench(report, budget_s, t0):
    from specdec.kernels import plan_tree_attention, tree_attention, tree_visibility
    from specdec.kernels.tree_attention import estimate_tree_attention_us

    peak = report.get("device", {}).get("copy_tbs")
    launch_us = report.get("device", {}).get("empty_kernel_us")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    run1 = {}
    if RUN1_JSON.exists():
        for r in json.loads(RUN1_JSON.read_text()).get("bench", []):
            if "us" in r:
                run1[(r["batch"], r["prefix"], r["nodes"])] = r["us"]
    # Warm up clocks and the compiler outside the timed rows (run 1's first row looked inflated).
    q, k, v, start, lengths, tree = make_inputs(4, HQ, HKV, 4096, 16, ragged=False)
    for _ in range(3):
        bench(lambda: tree_attention(q, k, v, start, lengths, tree, HEAD_DIM ** -0.5))
    del q, k, v
    rows = []
    for batch, prefix, nodes in bench_grid():
        row = {"batch": batch, "prefix": prefix, "nodes": nodes}
        rows.append(row)
        if time.perf_counter() - t0 > budget_s:
            row["error"] = "skipped: time budget"
            continue
        try:
            torch.manual_seed(batch + prefix + nodes)
            q, k, v, start, lengths, tree = make_inputs(batch, HQ, HKV, prefix, nodes, ragged=False)
            scale = HEAD_DIM ** -0.5
            cfg = plan_tree_attention(batch, HKV, HQ // HKV, nodes, HEAD_DIM, k.shape[2], q.device)
            row["config"] = cfg_name(cfg)
            row["model_us"] = estimate_tree_attention_us(cfg, batch, HKV, HQ // HKV, nodes, HEAD_DIM, k.shape[2], sms)
            row["run1_us"] = run1.get((batch, prefix, nodes))
            nbytes = kv_bytes(k, start, lengths, nodes)
            flops = 4 * batch * HQ * nodes * (prefix + nodes) * HEAD_DIM
            row["kv_mb"] = nbytes / 2**20
            t = bench(lambda: tree_attention(q, k, v, start, lengths, tree, scale, config=cfg))
            row["us"] = t * 1e3
            row["eager_us"] = bench_eager(lambda: tree_attention(q, k, v, start, lengths, tree, scale, config=cfg)) * 1e3
            row["tbs"] = nbytes / (t * 1e-3) / 1e12
            row["frac_nominal"] = row["tbs"] / NOMINAL_PEAK_TBS
            row["frac_copy"] = row["tbs"] / peak if peak else None
            row["tflops"] = flops / (t * 1e-3) / 1e12
            # Best possible time on this roofline: bytes at nominal bandwidth or flops at nominal peak.
            row["roofline_frac"] = max(nbytes / (NOMINAL_PEAK_TBS * 1e12), flops / (NOMINAL_BF16_TFLOPS * 1e12)) \
                / (t * 1e-3)
            row["x_launch"] = row["us"] / launch_us if launch_us else None
            row["goal_bw"] = None if nbytes < GOAL_BYTES else row["frac_nominal"] >= 0.5
            old = old_plan(batch, HKV, HQ // HKV, nodes, HEAD_DIM, k.shape[2], sms)
            row["old_config"] = cfg_name(old)
            try:
                row["old_us"] = bench(lambda: tree_attention(q, k, v, start, lengths, tree, scale, config=old)) * 1e3
                row["old_over_new"] = row["old_us"] / row["us"]
            except Exception as exc:
                row["error"] = f"old plan: {exc!r}"[:300]
            mask = tree_visibility(start, lengths, tree, k.shape[2]).unsqueeze(1)  # [B, 1, Q, S]
            for key, expand in (("sdpa_gqa_us", False), ("sdpa_rep_us", True)):
                try:
                    kk, vv = (k, v) if not expand else (k.repeat_interleave(HQ // HKV, dim=1),
                                                        v.repeat_interleave(HQ // HKV, dim=1))
                    row[key] = bench(lambda: sdpa_with_mask(q, kk, vv, mask, scale, expand)) * 1e3
                    del kk, vv
                except Exception as exc:
                    row["error"] = f"{key}: {exc!r}"[:300]
            sdpa = [row[key] for key in ("sdpa_gqa_us", "sdpa_rep_us") if key in row]
            if sdpa:
                row["sdpa_us"] = min(sdpa)
                row["speedup"] = row["sdpa_us"] / row["us"]
                row["goal_sdpa"] = row["speedup"] >= 1.0
            del q, k, v, mask
        except Exception as exc:
            row["error"] = repr(exc)[:300]
        torch.cuda.empty_cache()
    report["bench"] = rows
    done = [r for r in rows if "us" in r]
    big = [r for r in done if r["goal_bw"] is not None]
    print("## Benchmark: tree attention vs SDPA with a dense mask (Hq=12, Hkv=2, D=128, bf16)\n")
    compared = [r for r in done if "old_us" in r]
    geo = (torch.tensor([r["old_over_new"] for r in compared]).log().mean().exp().item() if compared else None)
    bw_bound = [r for r in big if r["nodes"] == 16]
    print(f"{len(done)}/{len(rows)} shapes ran. Never slower than SDPA: "
          f"{sum(bool(r.get('goal_sdpa')) for r in done)}/{len(done)}. >=50% of {NOMINAL_PEAK_TBS} TB/s where KV >= 64 MiB: "
          f"{sum(r['goal_bw'] for r in big)}/{len(big)} (16-node, bandwidth-bound ones: "
          f"{sum(r['goal_bw'] for r in bw_bound)}/{len(bw_bound)}; 64/128-node ones are compute-bound, see `roofline`). "
          f"Current plan vs run-1 plan on this kernel: geometric-mean speedup {fmt(geo)}, slower on "
          f"{sum(r['old_over_new'] < 1 for r in compared)}/{len(compared)} shapes. `roofline` = the time the shape needs at "
          f"{NOMINAL_PEAK_TBS} TB/s or {NOMINAL_BF16_TFLOPS:.0f} TFLOP/s, whichever binds, over the time taken; "
          "`x launch` = time over an empty kernel's.\n")
    print(table(rows, [("batch", "B"), ("prefix", "prefix"), ("nodes", "nodes"), ("kv_mb", "KV MiB"),
                       ("us", "kernel µs"), ("tbs", "TB/s"), ("frac_nominal", "of 3.35"), ("frac_copy", "of copy"),
                       ("tflops", "TFLOP/s"), ("roofline_frac", "roofline"), ("x_launch", "x launch"),
                       ("eager_us", "eager µs"), ("sdpa_gqa_us", "SDPA gqa µs"), ("sdpa_rep_us", "SDPA rep µs"), ("speedup", "SDPA/kernel"),
                       ("config", "config"), ("model_us", "model µs"), ("old_us", "old plan µs"),
                       ("old_over_new", "old/new"), ("old_config", "old config"), ("run1_us", "run-1 µs"),
                       ("error", "error")]))
    print()


def sweep_candidates(batch, prefix, nodes, num_slots, sms):
    """Tile shapes x stages x split counts around the cost model's best for each tile shape."""
    from specdec.kernels import TreeAttentionConfig, plan_tree_attention
    from specdec.kernels.tree_attention import estimate_tree_attention_us

    group = HQ // HKV
    dev = torch.device(DEVICE)
    planned = plan_tree_attention(batch, HKV, group, nodes, HEAD_DIM, num_slots, dev)
    out = {planned, old_plan(batch, HKV, group, nodes, HEAD_DIM, num_slots, sms)}
    tiles = [(128, 64, 8, 2), (128, 64, 8, 3), (128, 64, 8, 4), (64, 64, 4, 2), (64, 64, 4, 3), (32, 64, 4, 3)]
    n_rows = group * nodes
    for bm, bn, warps, stages in tiles:
        if bm > max(16, triton.next_power_of_2(n_rows)):
            continue
        est = {}
        for splits in range(1, min(256, max(1, prefix // bn)) + 1):
            cfg = TreeAttentionConfig(bm, bn, splits, warps, stages)
            real = real_splits(cfg, nodes, num_slots)
            est.setdefault(real, estimate_tree_attention_us(TreeAttentionConfig(bm, bn, real, warps, stages), batch,
                                                            HKV, group, nodes, HEAD_DIM, num_slots, sms))
        best = min(est, key=est.get)
        for splits in {best, max(1, best // 2), best * 2}:
            out.add(TreeAttentionConfig(bm, bn, splits, warps, stages))
    # keep the split counts the wrapper really launches, so duplicates collapse
    real = {TreeAttentionConfig(c.block_m, c.block_n, real_splits(c, nodes, num_slots), c.num_warps, c.num_stages)
            for c in out}
    return planned, sorted(real, key=lambda c: (c.block_m, c.block_n, c.num_stages, c.splits, c.num_warps))


def section_sweep(report, budget_s, t0):
    from specdec.kernels import tree_attention
    from specdec.kernels.tree_attention import estimate_tree_attention_us

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for batch, prefix, nodes in SWEEP_SHAPES:
        if time.perf_counter() - t0 > budget_s:
            rows.append({"batch": batch, "prefix": prefix, "nodes": nodes, "error": "skipped: time budget"})
            continue
        torch.manual_seed(0)
        q, k, v, start, lengths, tree = make_inputs(batch, HQ, HKV, prefix, nodes, ragged=False)
        scale = HEAD_DIM ** -0.5
        nbytes = kv_bytes(k, start, lengths, nodes)
        planned, candidates = sweep_candidates(batch, prefix, nodes, k.shape[2], sms)
        old = old_plan(batch, HKV, HQ // HKV, nodes, HEAD_DIM, k.shape[2], sms)
        want = tree_attention(q, k, v, start, lengths, tree, scale, config=planned).float()
        shape_rows = []
        for cfg in candidates:
            row = {"batch": batch, "prefix": prefix, "nodes": nodes, "planned": cfg == planned, "old": cfg == old,
                   "config": cfg_name(cfg),
                   "model_us": estimate_tree_attention_us(cfg, batch, HKV, HQ // HKV, nodes, HEAD_DIM, k.shape[2], sms)}
            if time.perf_counter() - t0 > budget_s:
                row["error"] = "skipped: time budget"
                shape_rows.append(row)
                continue
            try:
                out = tree_attention(q, k, v, start, lengths, tree, scale, config=cfg).float()
                row["agrees"] = (out - want).abs().max().item() < 2e-2
                t = bench(lambda: tree_attention(q, k, v, start, lengths, tree, scale, config=cfg))
                row["us"] = t * 1e3
                row["frac_nominal"] = nbytes / (t * 1e-3) / 1e12 / NOMINAL_PEAK_TBS
            except Exception as exc:
                row["error"] = repr(exc)[:200]
            shape_rows.append(row)
        timed = [r for r in shape_rows if "us" in r]
        if timed:
            fastest = min(r["us"] for r in timed)
            for r in timed:
                r["over_best"] = r["us"] / fastest
        rows += shape_rows
        del q, k, v
        torch.cuda.empty_cache()
    report["sweep"] = rows
    print("## Sweep: launch configurations (planned = the current planner's choice, old = run 1's planner; "
          "`/best` = time over the shape's fastest)\n")
    print(table(rows, [("batch", "B"), ("prefix", "prefix"), ("nodes", "nodes"), ("config", "config"),
                       ("planned", "planned"), ("old", "old"), ("us", "µs"), ("model_us", "model µs"),
                       ("over_best", "/best"), ("frac_nominal", "of 3.35"), ("agrees", "agrees"), ("error", "error")]))
    print()


def section_commit(report):
    from specdec.kernels import kv_commit, kv_commit_reference

    rows = []
    slots = COMMIT_SLOTS
    for batch, moves in COMMIT_SHAPES:
        row = {"batch": batch, "moves": moves, "buffers": 2 * QWEN_LAYERS}
        try:
            bufs = [torch.randn(batch, HKV, slots, HEAD_DIM, device=DEVICE, dtype=torch.bfloat16)
                    for _ in range(2 * QWEN_LAYERS)]
            room = slots - 2 * moves - 32  # dst + path stays inside the buffer
            dst = torch.randint(room // 2, room, (batch,), device=DEVICE)
            path = torch.stack([torch.randperm(moves + 32)[:moves].sort().values for _ in range(batch)]).to(DEVICE)
            src = dst[:, None] + path
            count = torch.randint(1, moves + 1, (batch,), device=DEVICE)
            count[0] = moves
            ref = [t.clone() for t in bufs]
            kv_commit(bufs, src, dst, count)
            kv_commit_reference(ref, src, dst, count)
            row["exact"] = all(torch.equal(a, b) for a, b in zip(bufs, ref))
            del ref
            row["kernel_us"] = bench(lambda: kv_commit(bufs, src, dst, count)) * 1e3
            row["reference_us"] = bench(lambda: kv_commit_reference(bufs, src, dst, count)) * 1e3
            row["speedup"] = row["reference_us"] / row["kernel_us"]
            del bufs
        except Exception as exc:
            row["error"] = repr(exc)[:300]
        torch.cuda.empty_cache()
        rows.append(row)
    report["kv_commit"] = rows
    print(f"## kv_commit: Qwen2.5-1.5B, {2 * QWEN_LAYERS} buffers [B, 2, {slots}, 128] bf16, one launch\n")
    print(table(rows, [("batch", "B"), ("moves", "accepted (A)"), ("exact", "exact"), ("kernel_us", "kernel µs"),
                       ("reference_us", "reference µs"), ("speedup", "speedup"), ("error", "error")]))
    print()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file for every measurement")
    parser.add_argument("--samples", type=int, default=40, help="correctness shapes (corners included)")
    parser.add_argument("--budget", type=float, default=200.0,
                        help="seconds after which benchmark and sweep rows are skipped")
    parser.add_argument("--skip", nargs="*", default=[], choices=["correctness", "graph", "bench", "sweep", "commit"])
    parser.add_argument("--dry-run", action="store_true", help="list the shapes and exit (no GPU needed)")
    args = parser.parse_args(argv)

    if args.dry_run:
        plan = {"correctness": correctness_grid(args.samples), "bench": bench_grid(), "sweep": SWEEP_SHAPES,
                "kv_commit": COMMIT_SHAPES}
        for name, shapes in plan.items():
            print(f"{name}: {len(shapes)} shapes, e.g. {shapes[:3]}")
        return 0
    if not torch.cuda.is_available():
        print("gpu_kernels.py needs a CUDA GPU (use --dry-run to list the shapes)", file=sys.stderr)
        return 2

    t0 = time.perf_counter()
    report: dict = {"errors": {}}
    sections = [("device", section_device, ()), ("correctness", section_correctness, (args.samples,)),
                ("graph", section_graph, ()),
                ("bench", section_bench, (args.budget, t0)), ("sweep", section_sweep, (args.budget, t0)),
                ("commit", section_commit, ())]
    print("# specdec kernels on GPU\n")
    for name, fn, extra in sections:
        if name in args.skip:
            continue
        try:
            fn(report, *extra)
        except Exception:
            report["errors"][name] = traceback.format_exc()
            print(f"## {name}: failed\n\n```\n{traceback.format_exc()[-2000:]}\n```\n")
        args.out.write_text(json.dumps(report, indent=1, default=str))  # keep what finished so far
    report["seconds"] = time.perf_counter() - t0
    args.out.write_text(json.dumps(report, indent=1, default=str))
    print(f"Total {report['seconds']:.0f} s. JSON: {args.out}")
    failed = [r for r in report.get("correctness", []) if not r["pass"]]
    failed += [] if report.get("graph", {"pass": True})["pass"] else ["graph"]
    return 1 if failed or report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())

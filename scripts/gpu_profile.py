"""Where a captured decode step's device time goes (issues 6 and 15). One process, one model,
bf16, batch 1, greedy:

- an A/B of engine variants on the same prompts: the graphed (uncompiled) and compiled baselines,
  compiled with attention through the dense mask instead of the tree kernel ("mask"), and prompt
  lookup likewise, with its match eager ("eager propose") or compiled. Per variant: pooled
  tokens/s over the prompts (best of ``--reps`` timed calls each), and the step's device time by
  phase (``engine.step_profile()``), and the drafted step's cost over the plain one;
- a kernel table (torch profiler, CUDA activity) of one generate call per named variant: the
  kernels that take the most device time, with counts per step.

    SPECDEC_GGUF_DIR=/tmp/stage python scripts/gpu_profile.py --out $OUT/profile.json
    SPECDEC_GGUF_DIR=/tmp/stage python scripts/gpu_profile.py --model zoo:qwen2.5-coder-1.5b-instruct
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch

import specdec
from specdec.bench.prompts import builtin, render, select
from specdec.drafters import PromptLookup
from specdec.perf import timed

TUNED = {"coordinate_descent_tuning": True}


class EagerProposeLookup(PromptLookup):
    """Prompt lookup whose match stays eager inside compiled steps (the A/B's control)."""

    def compile(self, options) -> None:
        pass


def variants(model) -> dict:
    """Name -> a function that wraps the model that way (only the variants a run names get built)."""
    kw = dict(cuda_graphs=True)
    return {
        "graphed": lambda: specdec.wrap(model, **kw),
        "compiled": lambda: specdec.wrap(model, compile=True, **kw),
        "compiled mask": lambda: specdec.wrap(model, compile=True, **kw),
        "compiled cdt": lambda: specdec.wrap(model, compile=TUNED, **kw),
        "lookup graphed": lambda: specdec.wrap(model, drafter=PromptLookup(8), **kw),
        "lookup eager propose": lambda: specdec.wrap(model, drafter=EagerProposeLookup(8), compile=True, **kw),
        "lookup": lambda: specdec.wrap(model, drafter=PromptLookup(8), compile=True, **kw),
        "lookup mask": lambda: specdec.wrap(model, drafter=PromptLookup(8), compile=True, **kw),
    }


def warm(name: str, spec, enc, kw) -> None:
    """The untimed first call (compiles and captures). A "mask" variant then switches its Decoder
    to dense-mask attention and captures again."""
    spec.generate(enc.input_ids, **kw)
    if name.endswith("mask") and spec.engine._decoder.contiguous:
        spec.engine._decoder.contiguous = False
        spec.engine._decoder._graphs.clear()
        spec.generate(enc.input_ids, **kw)


def kernel_table(spec, enc, new: int, top: int = 18) -> dict:
    """Device time by kernel name over one generate call, and per decode step."""
    from torch.profiler import ProfilerActivity, profile

    kw = dict(attention_mask=enc.attention_mask, max_new_tokens=new, do_sample=False, return_dict_in_generate=True)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        out = spec.generate(enc.input_ids, **kw)
        torch.cuda.synchronize()
    steps = out.spec_stats.num_steps
    total, count = defaultdict(float), defaultdict(int)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            total[ev.name] += ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
            count[ev.name] += 1
    all_us = sum(total.values())
    rows = sorted(total, key=total.get, reverse=True)[:top]
    return {"steps": steps, "device_ms": all_us / 1e3, "device_ms_per_step": all_us / 1e3 / steps,
            "kernels_per_step": sum(count.values()) / steps,
            "top": [{"name": n[:110], "ms_per_step": total[n] / 1e3 / steps, "per_step": count[n] / steps,
                     "share": total[n] / all_us} for n in rows]}


def best_of(reps: int, fn):
    """The output and the shortest time of ``reps`` timed calls."""
    runs = [timed(fn) for _ in range(reps)]
    return min(runs, key=lambda run: run[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="zoo:smollm2-135m-instruct")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--variants", nargs="+", default=None, help="run only these variants, in this order")
    ap.add_argument("--kernels", nargs="*", default=["compiled", "lookup"], help="variants to profile by kernel")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    names = variants(None)   # the names only: nothing is built until called
    unknown = sorted((set(args.variants or []) | set(args.kernels)) - set(names))
    if unknown:
        ap.error(f"unknown variant(s) {unknown}; choose from {sorted(names)}")
    model, tok = specdec.load_model(args.model, dtype="bfloat16", device="cuda")
    prompts = select(builtin(), num_prompts=2, categories=["summarization", "coding"])
    encs = [tok([render(tok, p.turns[:1], [])], return_tensors="pt", add_special_tokens=False).to("cuda")
            for p in prompts]
    result = {"model": args.model, "device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "variants": {}}
    make = variants(model)
    specs = {n: make[n]() for n in dict.fromkeys([*(args.variants or make), *args.kernels])}
    for name in args.variants or make:
        spec = specs[name]
        tokens = seconds = steps = 0
        for enc in encs:
            kw = dict(attention_mask=enc.attention_mask, max_new_tokens=args.max_new_tokens, do_sample=False,
                      return_dict_in_generate=True)
            warm(name, spec, enc, kw)
            out, s = best_of(args.reps, lambda: spec.generate(enc.input_ids, **kw))
            tokens += out.sequences.shape[1] - enc.input_ids.shape[1]
            seconds += s
            steps += out.spec_stats.num_steps
        row = {"tok_s": tokens / seconds, "tau": tokens / steps, "step_ms": spec.engine.step_profile()}
        result["variants"][name] = row
        print(name, json.dumps(row), flush=True)
    base = result["variants"].get("compiled", next(iter(result["variants"].values())))["tok_s"]
    plain = {n: sum(r["step_ms"].values()) for n, r in result["variants"].items()}
    for drafted, undrafted in (("lookup", "compiled"), ("lookup mask", "compiled mask"), ("lookup graphed", "graphed")):
        if drafted in plain and undrafted in plain:
            result[f"{drafted} step / {undrafted} step"] = plain[drafted] / plain[undrafted]
            print(f"{drafted} step / {undrafted} step: {plain[drafted] / plain[undrafted]:.3f}", flush=True)
    for name, row in result["variants"].items():
        print(f"{name:22s} {row['tok_s']:8.1f} tok/s  × compiled {row['tok_s'] / base:5.3f}  τ {row['tau']:.2f}  "
              f"step {sum(row['step_ms'].values()):.3f} ms {json.dumps({k: round(v, 3) for k, v in row['step_ms'].items()})}")
    for name in args.kernels:
        kw = dict(attention_mask=encs[0].attention_mask, max_new_tokens=64, do_sample=False)
        warm(name, specs[name], encs[0], kw)
        table = kernel_table(specs[name], encs[0], 64)
        result[f"kernels {name}"] = table
        print(f"\n{name}: {table['device_ms_per_step']:.3f} device ms per step, "
              f"{table['kernels_per_step']:.0f} kernels per step")
        for k in table["top"]:
            print(f"  {k['ms_per_step']:7.4f} ms  {k['per_step']:6.1f}/step  {100 * k['share']:5.1f}%  {k['name']}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

"""Fused against unfused projections, on any device: same tokens, and the step time of each.

Alternates the two settings ``--rounds`` times on the same prompt (the engine with no drafter
and with prompt lookup), checks every output against HF greedy, and prints tokens/s per round.

    python scripts/fuse_ab.py --threads 1          # SmolLM2, CPU, fp32
"""
from __future__ import annotations

import argparse
import time

import torch

import specdec
from specdec.drafters import PromptLookup


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="zoo:smollm2-135m-instruct")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = specdec.load_model(args.model, dtype=args.dtype, device=args.device)
    enc = tok(["def add(a, b):\n    return a + b\n# the same, with type hints:\n"], return_tensors="pt").to(args.device)
    kw = dict(max_new_tokens=args.max_new_tokens, do_sample=False)
    ref = model.generate(**enc, **kw)
    rates: dict[tuple, list[float]] = {}
    for _ in range(args.rounds):
        for fuse in (False, True):
            for name, drafter in (("no drafter", None), ("lookup", PromptLookup(8))):
                spec = specdec.wrap(model, drafter=drafter, fuse=fuse)
                spec.generate(**enc, max_new_tokens=4)   # warm-up
                if args.device != "cpu":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                out = spec.generate(**enc, **kw)
                if args.device != "cpu":
                    torch.cuda.synchronize()
                seconds = time.perf_counter() - t
                assert torch.equal(out, ref), f"fuse={fuse} {name}: output differs from HF greedy"
                rates.setdefault((name, fuse), []).append(args.max_new_tokens / seconds)
    print(f"{args.model} {args.dtype} on {args.device}, {args.max_new_tokens} greedy tokens, "
          f"{torch.get_num_threads()} threads; every output equals HF greedy")
    print("| drafter | unfused tok/s | fused tok/s | fused × unfused (median) |")
    print("|---|---|---|---|")
    for name in ("no drafter", "lookup"):
        a, b = rates[name, False], rates[name, True]
        med = sorted(y / x for x, y in zip(a, b))[len(a) // 2]
        print(f"| {name} | {' / '.join(f'{x:.1f}' for x in a)} | {' / '.join(f'{x:.1f}' for x in b)} | {med:.2f} |")


if __name__ == "__main__":
    main()

"""Draft heads on the GPU (issue 16): τ, tok/s and draft/verify ms beside the same-process
compiled no-drafter baseline and prompt lookup, per category of the built-in prompts and on
HumanEval, greedy and sampled (T 0.7). Results are rewritten to ``--out`` after every prompt.

    python scripts/gpu_heads.py --eagle runs/eagle/head --medusa runs/medusa/head --out $OUT/heads.json
"""
from __future__ import annotations

import argparse
import json

import torch

import specdec
from specdec.perf import timed
from specdec.bench.prompts import builtin, humaneval, render
from specdec.drafters import EagleHead, KangarooAdapter, MedusaHeads, PromptLookup

SAMPLE = {"do_sample": True, "temperature": 0.7, "top_p": 1.0, "top_k": 0}


def prompts(per_category: int, n_humaneval: int):
    seen, out = {}, []
    for p in builtin():
        if seen.get(p.category, 0) < per_category:
            seen[p.category] = seen.get(p.category, 0) + 1
            out.append(p)
    return out + humaneval()[:n_humaneval]


def drafters(args, model):
    """(name, drafter) in ``--methods`` order; a method whose head folder is not given is skipped."""
    def build(name):
        if name == "none":
            return [("none", None)]
        if name == "lookup":
            return [("lookup", PromptLookup(num_tokens=8))]
        if name == "lookup-gated":  # the min_tau gate switches drafting off where τ stays low
            return [(f"lookup-gated{args.min_tau}", PromptLookup(num_tokens=8))]
        if name == "eagle" and args.eagle:
            return [(f"eagle{k}", EagleHead.from_pretrained(args.eagle, num_tokens=k, target=model, device=args.device,
                                                            dtype="bf16")) for k in args.eagle_tokens]
        if name == "eagle-tree" and args.eagle and args.eagle_tree:
            k, d, n = args.eagle_tree
            return [(f"eagle-tree{k}x{d}n{n}", EagleHead.from_pretrained(
                args.eagle, num_tokens=d, tree_topk=k, tree_depth=d, tree_nodes=n, target=model, device=args.device,
                dtype="bf16"))]
        if name == "medusa" and args.medusa:
            return [("medusa", MedusaHeads.from_pretrained(args.medusa, device=args.device, dtype="bf16"))]
        if name == "kangaroo" and args.kangaroo:
            return [(f"kangaroo{args.kangaroo_tokens}", KangarooAdapter.from_pretrained(
                args.kangaroo, num_tokens=args.kangaroo_tokens, stop_threshold=args.kangaroo_stop, device=args.device,
                dtype="bf16"))]
        return []

    for method in args.methods:
        yield from build(method)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="zoo:smollm2-135m-instruct")
    ap.add_argument("--eagle", default=None)
    ap.add_argument("--eagle-tokens", type=int, nargs="+", default=[4, 6])
    ap.add_argument("--eagle-tree", type=int, nargs=3, default=None, metavar=("K", "D", "N"))
    ap.add_argument("--medusa", default=None)
    ap.add_argument("--kangaroo", default=None)
    ap.add_argument("--kangaroo-tokens", type=int, default=6)
    ap.add_argument("--kangaroo-stop", type=float, default=None)
    ap.add_argument("--methods", nargs="+", default=["none", "lookup", "lookup-gated", "eagle", "eagle-tree", "medusa", "kangaroo"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--limit", type=int, default=None, help="at most this many prompts (a smoke test)")
    ap.add_argument("--min-tau", type=float, default=1.4)
    ap.add_argument("--per-category", type=int, default=2)
    ap.add_argument("--humaneval", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--modes", nargs="+", default=["greedy", "sampled"])
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--out", default="heads.json")
    args = ap.parse_args()
    model, tok = specdec.load_model(args.model, dtype="bfloat16" if args.device == "cuda" else "float32", device=args.device)
    tok.padding_side = "left"
    items = [(p.category, tok(render(tok, p.turns[:1], []), return_tensors="pt", add_special_tokens=False).to(args.device))
             for p in prompts(args.per_category, args.humaneval)][:args.limit]
    rows, ref = [], {}
    for name, drafter in drafters(args, model):
        gated = name.startswith("lookup-gated")
        spec = specdec.wrap(model, drafter=drafter, cuda_graphs=args.device == "cuda", compile=args.compile,
                            min_tau=args.min_tau if gated else None)
        for mode in args.modes:
            kw = dict(max_new_tokens=args.max_new_tokens, return_dict_in_generate=True,
                      **(SAMPLE if mode == "sampled" else {"do_sample": False}))
            for i, (cat, enc) in enumerate(items):
                torch.manual_seed(i)
                _, first = timed(lambda: spec.generate(**enc, **kw))
                torch.manual_seed(i)
                out, warm = timed(lambda: spec.generate(**enc, **kw))
                new = out.sequences[0, enc.input_ids.shape[1]:].tolist()
                row = dict(method=name, mode=mode, category=cat, prompt=i, tokens=len(new), first_s=first,
                           warm_s=warm, tok_s=len(new) / warm, tau=out.spec_stats.tau)
                if mode == "greedy":
                    base = ref.setdefault(i, new)
                    row["diverge_at"] = next((j for j, (a, b) in enumerate(zip(new, base)) if a != b), None)
                rows.append(row)
                print(json.dumps(row), flush=True)
                with open(args.out, "w") as f:
                    json.dump(rows, f, indent=1)
            prof = spec.engine.step_profile()
            rows.append(dict(method=name, mode=mode, profile=prof))
            print(name, mode, "profile", prof, flush=True)
            with open(args.out, "w") as f:
                json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()

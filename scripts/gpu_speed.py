"""Batch-1 decode speed on the GPU: HF greedy vs specdec's engine (no drafter, prompt lookup).

The engine's loop is eager here (no CUDA-graph capture yet), so this measures where it stands
today, not the issue-6 target.

    SPECDEC_GGUF_DIR=/tmp/stage python scripts/gpu_speed.py --model zoo:smollm2-135m-instruct
"""
from __future__ import annotations

import argparse
import json
import math

import torch
from pathlib import Path

import specdec
from specdec.perf import timed
from specdec.drafters import PromptLookup




def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="zoo:smollm2-135m-instruct")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--categories", nargs="+", default=["editing", "summarization", "coding"])
    ap.add_argument("--per-category", type=int, default=2)
    args = ap.parse_args()
    model, tok = specdec.load_model(args.model, dtype="bfloat16", device="cuda")
    # The built-in prompt set, read directly (specdec.bench needs Hydra, absent on the GPU box).
    data = Path(specdec.__file__).parent / "data" / "builtin.jsonl"
    items = [json.loads(line) for line in data.read_text().splitlines() if line.strip()]
    prompts = []
    for cat in args.categories:
        prompts += [p for p in items if p["category"] == cat][: args.per_category]
    runs = {"engine, no drafter": specdec.wrap(model), "engine, lookup k=8": specdec.wrap(model, drafter=PromptLookup(8)),
            "graphed, no drafter": specdec.wrap(model, cuda_graphs=True),
            "graphed, lookup k=8": specdec.wrap(model, drafter=PromptLookup(8), cuda_graphs=True)}
    rows = []
    for p in prompts:
        text = tok.apply_chat_template([{"role": "user", "content": p["turns"][0]}], add_generation_prompt=True,
                                       tokenize=False)
        enc = tok(text, return_tensors="pt", add_special_tokens=False).to("cuda")
        kw = dict(attention_mask=enc.attention_mask, max_new_tokens=args.max_new_tokens, do_sample=False)
        model.generate(enc.input_ids, **kw)  # warm-up
        ref, hf_s = timed(lambda: model.generate(enc.input_ids, **kw))
        n_ref = ref.shape[1] - enc.input_ids.shape[1]
        row = {"category": p["category"], "hf_tok_s": n_ref / hf_s}
        for name, spec in runs.items():
            spec.generate(enc.input_ids, **kw)
            out, s = timed(lambda: spec.generate(enc.input_ids, return_dict_in_generate=True, **kw))
            new = out.sequences[0, enc.input_ids.shape[1]:]
            same = torch.equal(out.sequences, ref)
            first = margin_ulps = runner_up = None
            if not same:
                t0 = enc.input_ids.shape[1]
                m = min(len(new), n_ref)
                diff = (new[:m] != ref[0, t0:][:m]).nonzero()
                first = int(diff[0]) if len(diff) else m
                if first < m:  # HF's own top-2 logits where the two outputs part
                    with torch.no_grad():
                        logits = model(ref[:, : t0 + first]).logits[0, -1].float()
                    top = logits.topk(2)
                    ulp = 2.0 ** (math.floor(math.log2(abs(float(top.values[0])))) - 7)
                    # Gap, in HF's own logits, between HF's token and the token specdec chose.
                    margin_ulps = float(logits[ref[0, t0 + first]] - logits[new[first]]) / ulp
                    runner_up = int(new[first]) == int(top.indices[1])
            row[name] = {"tok_s": len(new) / s, "tau": out.spec_stats.tau, "same_as_hf": same, "first_divergence": first,
                         "gap_bf16_ulps": margin_ulps, "took_runner_up": runner_up}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\nfirst divergences from HF greedy (HF's logit for its token minus HF's logit for specdec's token, "
          "in bf16 ulps):")
    for r in rows:
        for name in runs:
            d = r[name]
            if d["first_divergence"] is not None:
                print(f"  {r['category']} / {name}: token {d['first_divergence']}, margin "
                      f"{d['gap_bf16_ulps']} ulp, took the runner-up: {d['took_runner_up']}")
    print(f"\n{args.model}, bf16, batch 1, {args.max_new_tokens} new tokens, {len(rows)} prompts")
    print("| category | HF greedy tok/s | engine tok/s | lookup tok/s | lookup τ | lookup × engine | lookup × HF "
          "| graphed tok/s | graphed lookup tok/s | graphed × HF | graphed lookup × graphed | graphed lookup × HF |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        e, lk = r["engine, no drafter"], r["engine, lookup k=8"]
        g, gl = r["graphed, no drafter"], r["graphed, lookup k=8"]
        hf = r["hf_tok_s"]
        print(f"| {r['category']} | {hf:.1f} | {e['tok_s']:.1f} | {lk['tok_s']:.1f} | {lk['tau']:.2f} "
              f"| {lk['tok_s'] / e['tok_s']:.2f} | {lk['tok_s'] / hf:.2f} | {g['tok_s']:.1f} | {gl['tok_s']:.1f} "
              f"| {g['tok_s'] / hf:.2f} | {gl['tok_s'] / g['tok_s']:.2f} | {gl['tok_s'] / hf:.2f} |")


if __name__ == "__main__":
    main()

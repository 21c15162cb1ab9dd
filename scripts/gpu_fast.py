"""GPU decode speed of the chunked, graph-captured path against HF, side by side in one process.

Methods, each on the same prompts (batch 1, greedy, bf16):
  HF greedy `generate`, HF prompt lookup (`prompt_lookup_num_tokens`), the engine's eager loop,
  the chunked loop captured as CUDA graphs (no drafter; prompt lookup), and the same with
  `torch.compile` of the target's forward.
Also: fp32 exactness of the chunked paths against HF, each bf16 output's first divergence from
the same-engine no-drafter output with the top-2 logit gap there (in bf16 ulps), and the step
time beside the bandwidth floor.

    SPECDEC_GGUF_DIR=/tmp/stage python scripts/gpu_fast.py --out $OUT/fast.json
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

import specdec
from gpu_speed import timed  # scripts/ is on sys.path when a script runs
from specdec.drafters import PromptLookup


def builtin(categories, per_category):
    data = Path(specdec.__file__).parent / "data" / "builtin.jsonl"
    items = [json.loads(line) for line in data.read_text().splitlines() if line.strip()]
    return [p for c in categories for p in [q for q in items if q["category"] == c][:per_category]]


def encode(tok, prompt):
    text = tok.apply_chat_template([{"role": "user", "content": prompt["turns"][0]}], add_generation_prompt=True,
                                   tokenize=False)
    return tok(text, return_tensors="pt", add_special_tokens=False).to("cuda")


def gap_ulps(model, prefix, a, b):
    """The model's own logit gap between tokens a and b after ``prefix``, in bf16 ulps of the top logit."""
    with torch.no_grad():
        logits = model(prefix).logits[0, -1].float()
    top = float(logits.max())
    ulp = 2.0 ** (math.floor(math.log2(abs(top))) - 7)
    return abs(float(logits[a] - logits[b])) / ulp


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="zoo:smollm2-135m-instruct")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--categories", nargs="+", default=["editing", "summarization", "coding", "qa"])
    ap.add_argument("--per-category", type=int, default=2)
    ap.add_argument("--chunk-steps", type=int, default=8)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--out", default="fast.json")
    args = ap.parse_args()
    report = {"model": args.model, "max_new_tokens": args.max_new_tokens, "device": torch.cuda.get_device_name(),
              "torch": torch.__version__}

    # fp32 exactness of the chunked paths (CUDA graphs), against HF greedy.
    model32, tok = specdec.load_model(args.model, dtype="float32", device="cuda")
    exact = []
    for p in builtin(["editing", "coding"], 1):
        enc = encode(tok, p)
        kw = dict(attention_mask=enc.attention_mask, max_new_tokens=96, do_sample=False)
        ref = model32.generate(enc.input_ids, **kw)
        for name, spec in {"graphed": specdec.wrap(model32, cuda_graphs=True),
                           "graphed lookup": specdec.wrap(model32, drafter=PromptLookup(8), cuda_graphs=True)}.items():
            out = spec.generate(enc.input_ids, **kw)
            exact.append({"category": p["category"], "method": name, "equal": torch.equal(out, ref)})
    report["fp32_exact"] = exact
    print("fp32 exact:", exact, flush=True)
    del model32
    torch.cuda.empty_cache()

    model, tok = specdec.load_model(args.model, dtype="bfloat16", device="cuda")
    steps = args.chunk_steps
    methods = {
        "engine eager": specdec.wrap(model),
        "graphed": specdec.wrap(model, cuda_graphs=True, chunk_steps=steps),
        "graphed lookup": specdec.wrap(model, drafter=PromptLookup(8), cuda_graphs=True, chunk_steps=steps),
    }
    if not args.no_compile:
        methods["compiled"] = specdec.wrap(model, cuda_graphs=True, chunk_steps=steps, compile=True)
        methods["compiled lookup"] = specdec.wrap(model, drafter=PromptLookup(8), cuda_graphs=True,
                                                  chunk_steps=steps, compile=True)
    rows = []
    for p in builtin(args.categories, args.per_category):
        enc = encode(tok, p)
        t0 = enc.input_ids.shape[1]
        kw = dict(attention_mask=enc.attention_mask, max_new_tokens=args.max_new_tokens, do_sample=False)
        model.generate(enc.input_ids, **kw)
        ref, hf_s = timed(lambda: model.generate(enc.input_ids, **kw))
        row = {"category": p["category"], "question_id": p["question_id"], "hf": (ref.shape[1] - t0) / hf_s}
        model.generate(enc.input_ids, prompt_lookup_num_tokens=8, **kw)
        hfl, hfl_s = timed(lambda: model.generate(enc.input_ids, prompt_lookup_num_tokens=8, **kw))
        row["hf lookup"] = (hfl.shape[1] - t0) / hfl_s
        base = None
        for name, spec in methods.items():
            spec.generate(enc.input_ids, **kw)  # warm-up: captures (and compiles) this prompt's buckets
            out, s = timed(lambda: spec.generate(enc.input_ids, return_dict_in_generate=True, **kw))
            new = out.sequences[0, t0:]
            st = out.spec_stats
            entry = {"tok_s": len(new) / s, "tau": st.tau, "steps": st.num_steps, "ms_per_step": 1e3 * s / st.num_steps}
            if name in ("graphed", "compiled"):
                base = new if name == "graphed" else base
            if base is not None and name != "graphed":
                m = min(len(new), len(base))
                diff = (new[:m] != base[:m]).nonzero()
                if len(diff):
                    i = int(diff[0])
                    entry["first_divergence"] = i
                    entry["gap_ulps"] = gap_ulps(model, out.sequences[:, : t0 + i], int(new[i]), int(base[i]))
            row[name] = entry
        rows.append(row)
        print(json.dumps(row), flush=True)
    report["rows"] = rows
    Path(args.out).write_text(json.dumps(report, indent=1))

    names = list(methods)
    print(f"\n{args.model}, bf16, batch 1, {args.max_new_tokens} new tokens, chunk {steps} steps")
    print("| category | HF tok/s | HF lookup tok/s | " + " | ".join(f"{n} tok/s" for n in names)
          + " | graphed × HF | best × HF | lookup × same-engine baseline | lookup × HF lookup |")
    print("|---" * (len(names) + 7) + "|")
    for r in rows:
        best_base = max(r[n]["tok_s"] for n in names if "lookup" not in n and n != "engine eager")
        lk = "compiled lookup" if "compiled lookup" in r else "graphed lookup"
        bs = "compiled" if "compiled" in r else "graphed"
        print(f"| {r['category']} | {r['hf']:.1f} | {r['hf lookup']:.1f} | "
              + " | ".join(f"{r[n]['tok_s']:.0f}" for n in names)
              + f" | {r['graphed']['tok_s'] / r['hf']:.1f} | {best_base / r['hf']:.1f} "
              f"| {r[lk]['tok_s'] / r[bs]['tok_s']:.2f} (τ {r[lk]['tau']:.2f}) | {r[lk]['tok_s'] / r['hf lookup']:.1f} |")
    for r in rows:
        for n in names:
            if "first_divergence" in r[n]:
                print(f"divergence {r['category']}/{r['question_id']} {n}: token {r[n]['first_divergence']}, "
                      f"top-2 gap {r[n]['gap_ulps']:.2f} bf16 ulps")
    for n in names:
        ms = sum(r[n]["ms_per_step"] for r in rows) / len(rows)
        print(f"{n}: {ms:.2f} ms per step (bandwidth floor 0.09 ms for SmolLM2 bf16)")


if __name__ == "__main__":
    main()

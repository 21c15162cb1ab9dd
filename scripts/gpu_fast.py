"""GPU decode speed of specdec's fast path against HF, side by side in one process (issues 6, 15).

Per turn of each prompt (batch 1, bf16, the same input for every method; a later turn sees HF
greedy's answers to the earlier ones): HF greedy ``generate``; HF prompt lookup; with
``--sampling``, HF and the engine sampling (T 0.7, top-p 0.9) with no drafter and with lookup;
with ``--assistant``, HF assisted generation and the engine's DraftModel chain and dynamic tree;
with ``--exit-layer``, LayerSkip and Kangaroo at that exit; always the engine's compiled
captured steps ("compiled") with no drafter and with prompt lookup ("compiled lookup"), and the
uncompiled graphs ("graphed") unless ``--no-graphed``. Each method's first call at each prompt
(which compiles and captures for a new wrapper, and must not at a new prompt length on a warm
one) is timed beside the best of ``--reps`` repeats, with the graphs captured and the frames
compiled during it.
Then: a table pooled per category; each method's step device time by phase beside the
bandwidth floor; each bf16 output's first divergence from the same-engine no-drafter output with
the top-2 logit gap there (in bf16 ulps); fp32 exactness of the graphed paths against HF; and,
with ``--batches``, a batch sweep (first turns only).

    SPECDEC_GGUF_DIR=/tmp/stage python scripts/gpu_fast.py --sampling --exit-layer 22 --out $OUT/fast.json
    SPECDEC_GGUF_DIR=/tmp/stage python scripts/gpu_fast.py --model zoo:qwen2.5-coder-1.5b-instruct \
        --assistant zoo:qwen2.5-coder-0.5b-instruct --out $OUT/qwen.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import specdec
from specdec.bench.measure import tie_measure
from specdec.bench.prompts import render
from specdec.drafters import DraftModel, LayerSkip, PromptLookup
from specdec.perf import step_floor, timed

DEVICE = "cuda"   # tests/test_gpu_fast_tables.py runs the harness on the CPU
SAMPLING = {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 0}
PROMPT_FILES: list[str] = []   # --prompts-file: more jsonl prompts (e.g. HumanEval), by category


def builtin(categories, per_category):
    files = [Path(specdec.__file__).parent / "data" / "builtin.jsonl", *map(Path, PROMPT_FILES)]
    items = [json.loads(line) for f in files for line in f.read_text().splitlines() if line.strip()]
    return [p for c in categories for p in [q for q in items if q["category"] == c][:per_category]]


def encode(tok, prompts):
    """Each prompt's first turn, chat-templated, as one left-padded batch."""
    texts = [render(tok, p["turns"][:1], []) for p in prompts]
    return tok(texts, return_tensors="pt", add_special_tokens=False, padding=True).to(DEVICE)


def tie(model, prefix, parted):
    """HF's own logits after ``prefix``, measured as a tie in bf16 (``tie_measure``)."""
    with torch.no_grad():
        logits = model(prefix).logits[0, -1]
    return tie_measure(logits, parted, torch.bfloat16)


def fp32_check(name, assistant, n_tokens=96):
    """Graphed paths in fp32 against HF greedy: must be token-identical."""
    model, tok = specdec.load_model(name, dtype="float32", device=DEVICE)
    methods = {"graphed": lambda: specdec.wrap(model, cuda_graphs=True),
               "graphed lookup": lambda: specdec.wrap(model, drafter=PromptLookup(8), cuda_graphs=True)}
    if assistant is not None:
        draft, _ = specdec.load_model(assistant, dtype="float32", device=DEVICE)
        methods["draft model"] = lambda: specdec.wrap(model, drafter=DraftModel(draft, num_tokens=4), cuda_graphs=True)
    out = []
    for p in builtin(["editing", "coding"], 1):
        enc = encode(tok, [p])
        kw = dict(attention_mask=enc.attention_mask, max_new_tokens=n_tokens, do_sample=False)
        ref = model.generate(enc.input_ids, **kw)
        for method, make in methods.items():
            got = make().generate(enc.input_ids, **kw)
            out.append({"category": p["category"], "method": method, "equal": torch.equal(got, ref)})
    print("fp32 exact:", out, flush=True)
    del model
    torch.cuda.empty_cache()
    return out


def best_of(reps: int, fn):
    """The output and the shortest time of ``reps`` timed calls (one slow call, a clock ramp or
    a host hiccup, then does not set a per-turn ratio)."""
    best = None
    for _ in range(reps):
        out, s = timed(fn)
        best = (out, s) if best is None or s < best[1] else best
    return best


def make_methods(args, model, assistant):
    """Name -> (wrapper, extra generate arguments)."""
    steps, compile_ = args.chunk_steps, not args.no_compile
    if compile_ and args.compile_options:   # Inductor options: compile= takes them as a dict
        compile_ = json.loads(args.compile_options)
    fast = dict(cuda_graphs=True, chunk_steps=steps)
    greedy = {}
    methods = {}
    if not args.no_graphed:
        methods["graphed"] = (specdec.wrap(model, **fast), greedy)
        methods["graphed lookup"] = (specdec.wrap(model, drafter=PromptLookup(8), **fast), greedy)
    fast["compile"] = compile_
    methods["compiled"] = (specdec.wrap(model, **fast), greedy)
    methods["compiled lookup"] = (specdec.wrap(model, drafter=PromptLookup(8), **fast), greedy)
    if args.sync_baseline:   # the same, reading each run back before queueing the next
        methods["compiled, no pipeline"] = (specdec.wrap(model, pipeline=False, **fast), greedy)
    if args.min_tau is not None:   # the acceptance policy: lookup pauses where it does not pay
        methods["lookup min_tau"] = (specdec.wrap(model, drafter=PromptLookup(8), min_tau=args.min_tau, **fast), greedy)
    if args.sampling:
        methods["compiled sampled"] = (specdec.wrap(model, **fast), SAMPLING)
        methods["lookup sampled"] = (specdec.wrap(model, drafter=PromptLookup(8), **fast), SAMPLING)
    if args.exit_layer is not None:
        methods["layerskip"] = (specdec.wrap(model, drafter=LayerSkip(exit_layer=args.exit_layer, num_tokens=4), **fast),
                                greedy)
        methods["kangaroo"] = (specdec.wrap(model, drafter=LayerSkip.kangaroo(args.exit_layer, num_tokens=6,
                                                                              stop_threshold=0.6), **fast), greedy)
    if assistant is not None:
        methods["draft model"] = (specdec.wrap(model, drafter=DraftModel(assistant, num_tokens=4), **fast), greedy)
        methods["draft tree"] = (specdec.wrap(model, drafter=DraftModel(assistant, num_tokens=4, tree_width=2,
                                                                        tree_nodes=8), **fast), greedy)
    return methods


def base_of(name: str) -> str | None:
    """The same-engine no-drafter method a method's output and speed are compared with."""
    if name.endswith("sampled"):
        return "compiled sampled"
    return "graphed" if name.startswith("graphed") else "compiled"


def compiles() -> int:
    """Frames Dynamo has compiled so far in this process."""
    from torch._dynamo.utils import counters

    return int(counters["frames"]["ok"])


def first_and_best(args, spec, call):
    """The first call's time (with the graphs captured and frames compiled during it), then the
    best of ``args.reps`` repeats."""
    dec = spec.engine._decoder
    graphs, frames = (dec.num_graphs if dec is not None else 0), compiles()
    _, first = timed(call)
    dec2 = spec.engine._decoder
    new_graphs = dec2.num_graphs - (graphs if dec2 is dec else 0)
    out, s = best_of(args.reps, call)
    return out, s, {"first_s": first, "new_graphs": new_graphs, "new_compiles": compiles() - frames}


def per_prompt(args, model, tok, assistant, on_row=None):
    """Every turn of every prompt; later turns see HF greedy's answers to the earlier ones (the
    same input for every method), as Spec-Bench's multi-turn prompts do. ``on_row(rows)`` is
    called after each turn (the caller saves what has been measured so far)."""
    methods = make_methods(args, model, assistant)
    base_name = "compiled"
    hf = {"hf": {}, "hf lookup": {"prompt_lookup_num_tokens": 8}}
    if args.sampling:
        hf["hf sampled"] = SAMPLING
    if assistant is not None:
        hf["hf assisted"] = {"assistant_model": assistant}
    hf = {k: v for k, v in hf.items() if k in args.hf}
    rows, warm = [], False
    for p in builtin(args.categories, args.per_category):
        answers = []
        for turn in range(len(p["turns"])):
            text = render(tok, p["turns"][: turn + 1], answers)
            enc = tok([text], return_tensors="pt", add_special_tokens=False).to(DEVICE)
            t0 = enc.input_ids.shape[1]
            kw = dict(attention_mask=enc.attention_mask, max_new_tokens=args.max_new_tokens, do_sample=False)
            row = {"category": p["category"], "question_id": p["question_id"], "turn": turn + 1,
                   "prompt_tokens": t0}
            for name, extra in hf.items():
                gen = {**kw, **extra}
                if not warm:
                    model.generate(enc.input_ids, **gen)
                out, s = best_of(args.reps, lambda: model.generate(enc.input_ids, **gen))
                row[name] = {"tok_s": (out.shape[1] - t0) / s, "new": out.shape[1] - t0}
                if name == "hf":   # its tokens let scripts/replay_lookup.py rebuild the next turn's prompt
                    answers.append(tok.decode(out[0, t0:], skip_special_tokens=True))
                    row[name]["tokens"] = out[0, t0:].tolist()
            warm = True
            outputs = {}
            for name, (spec, extra) in methods.items():
                gen = {**kw, **extra, "return_dict_in_generate": True}
                out, s, first = first_and_best(args, spec, lambda: spec.generate(enc.input_ids, **gen))
                st = out.spec_stats
                outputs[name] = out.sequences[0, t0:]
                row[name] = {"tok_s": len(outputs[name]) / s, "tau": st.tau, "steps": st.num_steps,
                             "ms_per_step": 1e3 * s / st.num_steps, "new": len(outputs[name]),
                             "undrafted": st.undrafted_steps, "best_s": s, **first,
                             "tokens": outputs[name].tolist()}   # kept so a divergence can be re-examined later
            for name, new in outputs.items():  # first divergence from the same-engine no-drafter output
                base = outputs.get(base_of(name))
                if base is None or new is base or name.endswith("sampled"):
                    continue
                m = min(len(new), len(base))
                diff = (new[:m] != base[:m]).nonzero()
                if len(diff):
                    i = int(diff[0])
                    prefix = torch.cat([enc.input_ids[0], base[:i]]).unsqueeze(0)
                    row[name]["divergence"] = {"index": i, **tie(model, prefix, sorted({int(new[i]), int(base[i])}))}
            rows.append(row)
            if on_row is not None:
                on_row(rows)
            print(json.dumps({k: ({m: v for m, v in x.items() if m != "tokens"} if isinstance(x, dict) else x)
                              for k, x in row.items()}), flush=True)
    profile = {}
    for name, (spec, _) in methods.items():
        if not name.endswith("sampled"):
            profile[name] = spec.engine.step_profile()
    ctx = max(r["prompt_tokens"] for r in rows) + args.max_new_tokens // 2
    floor = step_floor(model, batch=1, context=ctx)
    return rows, profile, floor, list(methods), list(hf), base_name


def pooled(rows, name: str) -> float:
    """tok/s over all ``rows`` together: total new tokens over total time."""
    return sum(r[name]["new"] for r in rows) / sum(r[name]["new"] / r[name]["tok_s"] for r in rows)


def eos_ids(model, tok) -> set[int]:
    eos = model.generation_config.eos_token_id
    eos = tok.eos_token_id if eos is None else eos
    return {eos} if isinstance(eos, int) else set(eos)


def hf_new_tokens(new, eos: set[int]) -> int:
    """Tokens HF generated, each row up to and including its first EOS (later ones are padding)."""
    total = 0
    for row in new.tolist():
        total += next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
    return total


def batch_sweep(args, model, tok, assistant):
    """Throughput and τ at several batch sizes (first turns): the compiled baseline, lookup, lookup
    with the batch-size policy (``max_draft_batch``) switching drafting off above it, and the draft
    model when there is one."""
    prompts = builtin(args.categories, 8)
    out = []
    fast = dict(cuda_graphs=True, chunk_steps=args.chunk_steps, compile=not args.no_compile)
    for b in args.batches:
        batch = (prompts * (b // len(prompts) + 1))[:b]
        enc = encode(tok, batch)
        kw = dict(attention_mask=enc.attention_mask, max_new_tokens=args.batch_tokens, do_sample=False)
        methods = {"baseline": specdec.wrap(model, **fast),
                   "lookup": specdec.wrap(model, drafter=PromptLookup(8), **fast),
                   f"lookup max_draft_batch={args.policy}": specdec.wrap(
                       model, drafter=PromptLookup(8), max_draft_batch=args.policy, **fast)}
        if assistant is not None:
            methods["draft model"] = specdec.wrap(model, drafter=DraftModel(assistant, num_tokens=4), **fast)
        row = {"batch": b}
        if "hf" in args.hf:
            model.generate(enc.input_ids, **kw)
            ref, s = timed(lambda: model.generate(enc.input_ids, **kw))
            row["hf"] = {"tok_s": hf_new_tokens(ref[:, enc.input_ids.shape[1]:], eos_ids(model, tok)) / s}
        for name, spec in methods.items():
            spec.generate(enc.input_ids, **kw)
            res, s = timed(lambda: spec.generate(enc.input_ids, return_dict_in_generate=True, **kw))
            st = res.spec_stats
            row[name] = {"tok_s": sum(st.new_tokens) / s, "tau": st.tau, "undrafted": st.undrafted_steps,
                         "steps": st.num_steps}
        out.append(row)
        print(json.dumps(row), flush=True)
    return out


def ratios(rows, base_name: str, names) -> dict[str, tuple[float, float | None]]:
    """Pooled speed ratios over ``rows``: name -> (ratio, τ of the numerator where it has one)."""
    def tau(n):
        steps = sum(r[n]["steps"] for r in rows)
        return sum(r[n]["tau"] * r[n]["steps"] for r in rows) / steps if steps else None
    out = {f"{base_name} × HF": (pooled(rows, base_name) / pooled(rows, "hf"), None)} if "hf" in rows[0] else {}
    for n in names:
        b = base_of(n)
        if n != b and b in names and not n.startswith("graphed"):
            out[f"{n} × {b}"] = (pooled(rows, n) / pooled(rows, b), tau(n))
    if "compiled sampled" in names:
        out["sampled × greedy"] = (pooled(rows, "compiled sampled") / pooled(rows, base_name), None)
    if base_name + " lookup" in names and "hf lookup" in rows[0]:
        out["lookup × HF lookup"] = (pooled(rows, base_name + " lookup") / pooled(rows, "hf lookup"), None)
    if "draft model" in names and "hf assisted" in names:
        out["draft model × HF assisted"] = (pooled(rows, "draft model") / pooled(rows, "hf assisted"), None)
    if f"{base_name}, no pipeline" in names:
        out["pipeline × no pipeline"] = (pooled(rows, base_name) / pooled(rows, f"{base_name}, no pipeline"), None)
    return out


def table(rows, cols, base_name: str) -> str:
    """Markdown: tok/s per turn, then pooled per category and over everything, with the ratios."""
    names = [c for c in cols if not c.startswith("hf")]
    groups = [(f"{r['category']} {r['question_id']} t{r['turn']}", [r]) for r in rows]
    cats = sorted({r["category"] for r in rows}, key=[r["category"] for r in rows].index)
    groups += [(f"**{c}**", [r for r in rows if r["category"] == c]) for c in cats]
    groups.append(("**all**", rows))
    heads = list(ratios(rows, base_name, names))
    lines = ["| prompt | " + " | ".join(cols + heads) + " |", "|---" * (1 + len(cols) + len(heads)) + "|"]
    for label, rs in groups:
        rat = ratios(rs, base_name, names)
        cells = [f"{pooled(rs, c):.1f}" for c in cols]
        cells += [f"{rat[h][0]:.2f}" + (f" (τ {rat[h][1]:.2f})" if rat[h][1] is not None else "") for h in heads]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="zoo:smollm2-135m-instruct")
    ap.add_argument("--assistant", default=None, help="draft model: HF assisted generation and specdec DraftModel")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--categories", nargs="+", default=["editing", "summarization", "coding", "qa"])
    ap.add_argument("--per-category", type=int, default=1)
    ap.add_argument("--chunk-steps", type=int, default=8)
    ap.add_argument("--reps", type=int, default=1,
                    help="time each method this many times per turn and keep the fastest (HF included)")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--compile-options", default=None,
                    help='Inductor options for the compiled methods, as JSON, e.g. \'{"coordinate_descent_tuning": true}\'')
    ap.add_argument("--sampling", action="store_true", help="also sample (T 0.7, top-p 0.9): HF, no drafter, lookup")
    ap.add_argument("--exit-layer", type=int, default=None, help="also LayerSkip and Kangaroo exiting after this layer")
    ap.add_argument("--hf", nargs="*", default=["hf", "hf lookup", "hf sampled", "hf assisted"],
                    help="the HF methods to time (hf greedy is needed for the × HF ratios)")
    ap.add_argument("--prompts-file", nargs="*", default=[],
                    help="more prompts (jsonl: category, question_id, turns), e.g. HumanEval; pick them by category")
    ap.add_argument("--no-fp32", action="store_true")
    ap.add_argument("--no-graphed", action="store_true", help="skip the uncompiled (graphed) methods")
    ap.add_argument("--sync-baseline", action="store_true",
                    help="also run the compiled baseline with pipeline=False (each chunk read back before the next)")
    ap.add_argument("--batches", type=int, nargs="*", default=[])
    ap.add_argument("--no-turns", action="store_true", help="skip the per-prompt table (e.g. a batch sweep alone)")
    ap.add_argument("--batch-tokens", type=int, default=128)
    ap.add_argument("--policy", type=int, default=4, help="max_draft_batch for the batch sweep's policy run")
    ap.add_argument("--min-tau", type=float, default=None,
                    help="also run lookup with the acceptance policy min_tau (per prompt and in the batch sweep)")
    ap.add_argument("--out", default="fast.json")
    ap.add_argument("--tables", nargs="+", metavar="FILE",
                    help="measure nothing: print one table over earlier runs' rows (their --out files or logs)")
    args = ap.parse_args()
    if args.tables:
        print(tables(args.tables))
        return
    PROMPT_FILES.extend(args.prompts_file)
    report = {"model": args.model, "assistant": args.assistant, "max_new_tokens": args.max_new_tokens,
              "compile_options": args.compile_options, "reps": args.reps,
              "device": torch.cuda.get_device_name(), "torch": torch.__version__}
    if not args.no_fp32:
        report["fp32_exact"] = fp32_check(args.model, args.assistant)

    model, tok = specdec.load_model(args.model, dtype="bfloat16", device=DEVICE)
    tok.padding_side = "left"
    assistant = specdec.load_model(args.assistant, dtype="bfloat16", device=DEVICE)[0] if args.assistant else None
    out = Path(args.out)

    def save(rows):   # after every turn, so a run cut short by a time limit keeps its rows
        out.write_text(json.dumps({**report, "rows": rows, "partial": True}, indent=1))

    if args.no_turns:
        report["batch_sweep"] = batch_sweep(args, model, tok, assistant)
        out.write_text(json.dumps(report, indent=1))
        return
    rows, profile, floor, names, hf_names, base_name = per_prompt(args, model, tok, assistant, on_row=save)
    report.update(rows=rows, step_profile=profile, floor_ms=floor.ms, floor_bytes=floor.bytes)
    out.write_text(json.dumps(report, indent=1))
    if args.batches:
        report["batch_sweep"] = batch_sweep(args, model, tok, assistant)
        out.write_text(json.dumps(report, indent=1))

    print(f"\n{args.model}, bf16, batch 1, {args.max_new_tokens} new tokens a turn, chunk {args.chunk_steps} steps")
    print(summary(rows, hf_names + names, base_name))
    for n, ph in profile.items():
        if ph:
            print(f"{n} device ms per step: " + ", ".join(f"{k} {v:.3f}" for k, v in ph.items())
                  + f" = {sum(ph.values()):.3f}; bandwidth floor {floor.ms:.3f} ms ({floor.bytes / 1e6:.0f} MB)")
    for r in report.get("batch_sweep", []):
        print(json.dumps(r))


def summary(rows, cols, base_name: str) -> str:
    """The table, each bf16 divergence with its logit gap, and each method's wall ms per step."""
    names = [c for c in cols if not c.startswith("hf")]
    lines = [table(rows, cols, base_name)]
    for r in rows:
        for n in names:
            if "divergence" in r[n]:
                d = r[n]["divergence"]
                lines.append(f"divergence {r['category']}/{r['question_id']} t{r['turn']} {n}: token {d['index']}, "
                             f"top-2 gap {d['gap_ulps']:.2f} bf16 ulps, parted tokens at most {d['parted_ulps']:.2f} "
                             f"ulps below the top, top two: {d['top2']}, near-tie: {'yes' if d['near_tie'] else 'NO (a bug)'}")
    for n in names:
        ms = sum(r[n]["ms_per_step"] for r in rows) / len(rows)
        lines.append(f"{n}: {ms:.2f} ms per step (wall)")
    return "\n".join(lines)


def load_rows(paths) -> list[dict]:
    """Rows from earlier runs: a report's ``rows`` (``--out``, partial or whole), or the per-turn
    JSON lines a run prints (its log, for a run cut short before it saved anything)."""
    rows = []
    for path in map(Path, paths):
        text = path.read_text()
        if text.lstrip().startswith("{") and not text.lstrip().startswith('{"category"'):
            rows += json.loads(text)["rows"]
        else:
            rows += [json.loads(line) for line in text.splitlines() if line.startswith('{"category"')]
    if not rows:
        raise SystemExit(f"no rows in {', '.join(map(str, paths))}")
    return rows


def tables(paths) -> str:
    """``--tables``: one table over the rows of several runs (say, one per category, each run
    inside a device call's time limit). Every run must have measured the same methods."""
    rows = load_rows(paths)
    cols = [k for k, v in rows[0].items() if isinstance(v, dict)]
    missing = [f"{r['category']} {r['question_id']} t{r['turn']}: {sorted(set(cols) - set(r))}"
               for r in rows if not set(cols) <= set(r)]
    if missing:
        raise SystemExit("these rows lack methods the first row has (runs of different methods?): " + "; ".join(missing))
    base_name = "compiled" if "compiled" in cols else "graphed"
    return summary(rows, cols, base_name)


if __name__ == "__main__":
    main()

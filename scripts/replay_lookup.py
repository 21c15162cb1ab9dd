"""Prompt lookup's (and CopySpec's) exact τ under other settings, replayed over a GPU run's
recorded outputs (CPU, no model weights needed beyond the tokenizer). See ``specdec.bench.replay``.

Reads a ``scripts/gpu_fast.py`` JSON, rebuilds every turn's prompt (a later turn sees the
earlier turns' HF greedy answers, as the run did), and replays each lookup setting over the
"compiled lookup" output of that turn. The first setting is always the run's own,
``PromptLookup(8)``: its replayed τ must equal the τ the run measured. A turn where it does not
(a run from before ``gpu_fast.py`` saved HF's answers, whose stand-in answer parted from HF's
at a bf16 near-tie, so the rebuilt prompt differs) is left out of the table.

    python scripts/replay_lookup.py docs/bench6/h100/turns/qwen.json --model zoo:qwen2.5-coder-1.5b-instruct \
        --settings 8,3,1,1 8,3,1,4 16,3,1,1 8,8,1,1 4,3,1,1
Each setting is ``num_tokens,max_ngram,min_ngram,num_branches`` (prompt lookup), ``copy:gamma,num_tokens``
(CopySpec alone) or ``copy+lookup:gamma,num_tokens`` (CopySpec, falling back to ``PromptLookup(8)``).
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from gpu_fast import builtin   # scripts/ is on sys.path when a script runs

from specdec.bench.prompts import render
from specdec.bench.replay import replay_steps
from specdec.datastore import load_tokenizer
from specdec.drafters import CopySpec, PromptLookup

RUN_SETTING = "8,3,1,1"   # gpu_fast.py's PromptLookup(8): num_tokens, max_ngram, min_ngram, num_branches


def make(setting: str):
    """A fresh drafter for one setting string (see the module's docstring)."""
    kind, _, numbers = setting.rpartition(":")
    values = [int(x) for x in numbers.split(",")]
    if kind == "":
        k, max_n, min_n, m = values
        return PromptLookup(k, max_ngram=max_n, min_ngram=min_n, num_branches=m)
    gamma, k = values
    if kind == "copy":
        return CopySpec(gamma=gamma, num_tokens=k)
    if kind == "copy+lookup":
        return CopySpec(gamma=gamma, num_tokens=k, fallback=PromptLookup(8))
    raise ValueError(f"unknown setting {setting!r}: use N,N,N,N, copy:G,K or copy+lookup:G,K")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="a scripts/gpu_fast.py JSON")
    ap.add_argument("--model", default=None, help="the model spec whose tokenizer the run used (default: the run's)")
    ap.add_argument("--method", default="compiled lookup", help="whose recorded output to replay")
    ap.add_argument("--settings", nargs="+", default=["8,3,1,1", "8,3,1,2", "8,3,1,4", "16,3,1,1", "4,3,1,1",
                                                      "8,8,1,1", "8,3,2,1", "copy:3,16", "copy+lookup:3,16"])
    args = ap.parse_args()
    run = json.loads(Path(args.run).read_text())
    tok = load_tokenizer(args.model or run["model"])
    rows = {(r["question_id"], r["turn"]): r for r in run["rows"]}
    settings = [RUN_SETTING] + [s for s in args.settings if s != RUN_SETTING]
    for s in settings:
        make(s)   # a bad setting fails before any work
    tokens, steps = defaultdict(int), defaultdict(int)
    categories = list(dict.fromkeys(r["category"] for r in run["rows"]))
    for p in builtin(categories, 10**6):
        answers = []
        for turn in range(len(p["turns"])):
            row = rows.get((p["question_id"], turn + 1))
            if row is None:
                break
            ids = tok([render(tok, p["turns"][: turn + 1], answers)], add_special_tokens=False).input_ids[0]
            # A run from before HF's tokens were saved: the lookup's own answer stands in for HF's.
            answer = row["hf"].get("tokens", row[args.method]["tokens"])
            answers.append(tok.decode(answer, skip_special_tokens=True))
            if len(ids) != row["prompt_tokens"]:
                print(f"skip {p['category']} {p['question_id']} t{turn + 1}: rebuilt prompt has {len(ids)} tokens, "
                      f"the run's had {row['prompt_tokens']}")
                continue
            out = row[args.method]["tokens"]
            replayed = {s: replay_steps(make(s), ids, out) for s in settings}
            measured = row[args.method]["tau"]
            name = f"{p['category']} {p['question_id']} t{turn + 1}"
            if abs(len(out) / replayed[RUN_SETTING] - measured) > 1e-9:
                print(f"skip {name}: the run's own setting replays τ {len(out) / replayed[RUN_SETTING]:.3f}, the run "
                      f"measured {measured:.3f} (the rebuilt prompt differs from the run's)")
                continue
            for s, n in replayed.items():
                for key in ((p["category"], s), ("all", s)):
                    tokens[key] += len(out)
                    steps[key] += n
            print(f"{name}: measured τ {measured:.3f}, replayed "
                  + "  ".join(f"{s}: {len(out) / n:.2f}" for s, n in replayed.items()), flush=True)
    print("\n| category | " + " | ".join(settings) + " |")
    print("|---" * (len(settings) + 1) + "|")
    for c in categories + ["all"]:
        print(f"| {c} | " + " | ".join(f"{tokens[c, s] / steps[c, s]:.2f}" if steps[c, s] else "—"
                                        for s in settings) + " |")


if __name__ == "__main__":
    main()

"""Prompt lookup's (and CopySpec's) exact τ under other settings, replayed over a benchmark run's
recorded greedy outputs (CPU, no model weights needed beyond the tokenizer). See ``specdec.bench.replay``.

Reads the ``rows.jsonl`` of a ``python -m specdec.bench`` run, rebuilds every turn's prompt as the
run did (a later turn sees the drafter's own earlier answers, which the row records), and replays
each setting over that turn's output. The first setting is the run's own drafter: its replayed τ
must equal the τ the run measured; a turn where it does not is reported and left out.

    python scripts/replay_lookup.py OUT/rows.jsonl --prompts builtin --settings 8,3,1,4 16,3,1,1 copy:3,16
Each setting is ``num_tokens,max_ngram,min_ngram,num_branches`` (prompt lookup), ``copy:gamma,num_tokens``
(CopySpec alone) or ``copy+lookup:gamma,num_tokens`` (CopySpec, falling back to ``PromptLookup(8)``).
"""
import argparse
import json
from collections import defaultdict
from pathlib import Path

from specdec.bench.command import load_prompts
from specdec.bench.prompts import render
from specdec.bench.replay import replay_steps
from specdec.datastore import load_tokenizer
from specdec.drafters import CopySpec, PromptLookup


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
    ap.add_argument("rows", help="a benchmark run's rows.jsonl")
    ap.add_argument("--prompts", nargs="+", default=["builtin"], help="the run's prompt sources")
    ap.add_argument("--settings", nargs="+", default=["8,3,1,2", "8,3,1,4", "16,3,1,1", "4,3,1,1", "8,8,1,1",
                                                      "8,3,2,1", "copy:3,16", "copy+lookup:3,16"])
    args = ap.parse_args()
    for s in args.settings:
        make(s)   # a bad setting fails before any work
    rows = [r for r in map(json.loads, Path(args.rows).read_text().splitlines())
            if r["mode"] == "greedy" and r["drafter"] in ("lookup", "prompt_lookup")]
    if not rows:
        raise SystemExit(f"{args.rows}: no greedy prompt-lookup rows to replay")
    prompts = {(p.category, p.question_id): p for p in load_prompts(args.prompts)}
    tok = load_tokenizer(rows[0]["model"])
    tokens, steps = defaultdict(int), defaultdict(int)
    for row in rows:
        p = prompts[row["category"], row["question_id"]]
        for turn, out in enumerate(row["output_ids"]):
            answers = [tok.decode(ids, skip_special_tokens=True) for ids in row["output_ids"][:turn]]
            ids = tok([render(tok, p.turns[: turn + 1], answers)], add_special_tokens=False).input_ids[0]
            name = f"{p.category} {p.question_id} t{turn + 1}"
            mine = replay_steps(PromptLookup(**row["params"]), ids, out)
            if mine != row["turn_steps"][turn]:
                print(f"skip {name}: the run's own drafter replays {mine} steps, the run took {row['turn_steps'][turn]}")
                continue
            replayed = {"run": mine} | {s: replay_steps(make(s), ids, out) for s in args.settings}
            for s, n in replayed.items():
                for key in ((p.category, s), ("all", s)):
                    tokens[key] += len(out)
                    steps[key] += n
            print(f"{name}: " + "  ".join(f"{s}: τ {len(out) / n:.2f}" for s, n in replayed.items()), flush=True)
    settings = ["run", *args.settings]
    print("\n| category | " + " | ".join(settings) + " |")
    print("|---" * (len(settings) + 1) + "|")
    for c in [*dict.fromkeys(r["category"] for r in rows), "all"]:
        print(f"| {c} | " + " | ".join(f"{tokens[c, s] / steps[c, s]:.2f}" if steps[c, s] else "—"
                                        for s in settings) + " |")


if __name__ == "__main__":
    main()

"""Checks over a long-context benchmark's rows: outputs unchanged, needles found, budgets kept.

``python -m specdec.bench.long_check DIR [DIR ...] [--tokenizer SPEC] [--seed N]`` reads every
``rows.jsonl`` under the folders and prints, per drafter configuration and prompt category:

- greedy rows that equal the no-drafter baseline, and the divergences that are not near-ties
  (``measure.divergence_gap``; a bf16 near-tie is rounding, anything else is a bug);
- on needle prompts (``long_prompts(needle=True)``), how many answers, the drafter's and the
  baseline's, contain the hidden passphrase (decoded with ``--tokenizer``);
- the largest peak extra memory over the baseline beside the run's ``memory_budget``.

It exits with status 1 when a divergence is not a near-tie or a peak passes its budget, so a
recipe can stop on it. It reads rows only and never runs a model.
"""
from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from specdec.bench.long_prompts import needle_answer, prompt_seed
from specdec.bench.report import read_rows, run_label

_NEEDLE_ID = re.compile(r"needle_(\d+)_(\d+)$")


def needle_found(row: dict, text_of, seed: int) -> tuple[bool, bool] | None:
    """(drafter's answer holds the passphrase, baseline's does), or None for a non-needle row."""
    match = _NEEDLE_ID.match(str(row["question_id"]))
    if match is None:
        return None
    answer = needle_answer(prompt_seed(seed, int(match[1]), int(match[2])))
    return answer in text_of(row["output_ids"][-1]), answer in text_of(row["baseline"]["output_ids"][-1])


def check(rows: Sequence[dict], text_of=None, seed: int = 0) -> tuple[list[str], list[str]]:
    """(markdown lines, failures) for ``rows``; ``text_of`` decodes token ids (None: needles unchecked)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((run_label(r), r["mode"], r["category"]), []).append(r)
    lines = ["| run | mode | category | = baseline | not near-tie | needle found (baseline) "
             "| peak extra MiB | budget MiB |", "|---|---|---|---|---|---|---|---|"]
    failures = []
    for (label, mode, category), group in groups.items():
        greedy = [r for r in group if r["matches_baseline"] is not None]
        same = sum(r["matches_baseline"] for r in greedy)
        odd = [r for r in greedy if not r["matches_baseline"] and not (r.get("divergence") or {}).get("near_tie")]
        found = [f for r in group if text_of is not None and (f := needle_found(r, text_of, seed)) is not None]
        peaks = [r["peak_extra_bytes"] for r in group if r.get("peak_extra_bytes") is not None]
        peak = max(peaks) if peaks else None
        budget = group[0].get("memory_budget")
        lines.append(f"| {label} | {mode} | {category} | {f'{same}/{len(greedy)}' if greedy else '—'} | {len(odd)} "
                     f"| {f'{sum(a for a, _ in found)} ({sum(b for _, b in found)}) of {len(found)}' if found else '—'} "
                     f"| {'—' if peak is None else f'{peak / 2**20:.1f}'} "
                     f"| {'—' if budget is None else f'{budget / 2**20:.1f}'} |")
        failures += [f"{label} {category} {r['question_id']}: greedy output parts from the baseline at "
                     f"{r['first_divergence']}, not at a near-tie" for r in odd]
        if budget is not None and peak is not None and peak > budget:
            failures.append(f"{label} {category}: peak extra memory {peak} bytes is over memory_budget={budget}")
    return lines, failures


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m specdec.bench.long_check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dirs", nargs="+", help="benchmark output folders (rows.jsonl anywhere under them)")
    ap.add_argument("--tokenizer", default=None, help="model spec whose tokenizer decodes answers (needles)")
    ap.add_argument("--seed", type=int, default=0, help="the seed the long prompts were built with")
    args = ap.parse_args(argv)
    paths = [p for d in args.dirs for p in sorted(Path(d).rglob("rows.jsonl"))]
    if not paths:
        ap.error(f"no rows.jsonl under {' '.join(args.dirs)}")
    rows = [r for p in paths for r in read_rows(p)]
    text_of = None
    if args.tokenizer:
        from specdec.bench.long_prompts import load_tokenizer

        tok = load_tokenizer(args.tokenizer)
        text_of = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
    lines, failures = check(rows, text_of, args.seed)
    print("\n".join(lines))
    for f in failures:
        print("FAIL:", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark rows to tables and plots, for one run or for a whole multirun sweep.

A *row* is one prompt under one decoding mode in one run (the JSONL schema is documented on
``specdec.bench.run.make_row``). Rates are pooled, never averaged: τ is all emitted tokens over
all steps, tokens/s is all new tokens over all wall time, and a speedup is a ratio of pooled
tokens/s from the same run. This module reads rows only; it never runs a model.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from specdec.bench.measure import NEAR_TIE_ULPS, PHASES

HF_METHODS = ("hf", "hf_lookup", "hf_assisted")   # row keys of HF's own methods
HF_LABELS = {"hf": "HF greedy", "hf_lookup": "HF lookup", "hf_assisted": "HF assisted"}
# Sweep-axis candidates for the speedup plot, in order of preference: γ, then tree sizes.
AXIS_KEYS = ("num_tokens", "num_nodes", "tree_size", "depth")
# Row keys that identify a run within a sweep; _SETTINGS are those not shown as their own column.
RUN_FIELDS = ("model", "dtype", "device", "drafter", "params", "batch_size", "max_new_tokens", "max_draft_batch",
              "min_tau", "memory_budget", "mode", "temperature", "top_p", "top_k")
_SETTINGS = ("model", "dtype", "device", "batch_size", "max_draft_batch", "min_tau", "memory_budget", "max_new_tokens")
# Run settings a sweep may vary, as plot axes (after the drafter's own parameters).
SWEEP_SETTINGS = ("batch_size", "max_draft_batch", "min_tau", "temperature", "top_p", "top_k", "max_new_tokens")
# What identifies one run (a drafter configuration at a batch size) across its modes.
RUN_IDENTITY = ("model", "dtype", "device", "drafter", "params", "batch_size", "max_new_tokens", "max_draft_batch",
                "min_tau", "memory_budget")
POLICIES = ("max_draft_batch", "min_tau")   # settings that make some steps run without a draft
LABELLED = (*POLICIES, "memory_budget")   # wrap settings a run label names in brackets


def read_rows(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_rows(rows: Iterable[dict], path: str | Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


def aggregate(rows: Sequence[dict]) -> dict:
    """Pooled metrics over ``rows`` (all from one run and one mode).

    Example:
        aggregate([{"new_tokens": 8, "wall_time": 1.0, "accept_hist": [0, 2, 0, 2], ...,
                    "baseline": {"new_tokens": 8, "wall_time": 2.0, ...}, ...}])
        # tau = (1·2 + 3·2) / 4 = 2.0, tokens_per_s = 8.0, speedup = 8.0 / 4.0 = 2.0
    """
    hist = merge_histograms(r["accept_hist"] for r in rows)
    steps = sum(hist)
    emitted = sum(k * n for k, n in enumerate(hist))   # accepted draft tokens + one bonus per step
    drafts = sum(r["draft_tokens"] for r in rows)
    tps = _rate(rows)
    base_tps = _rate([r["baseline"] for r in rows])
    hf_tps = {name: _rate(got) if len(got := [r[name] for r in rows if r.get(name)]) == len(rows) else None
              for name in HF_METHODS}   # pooled only when every row has it
    checked = [r["matches_baseline"] for r in rows if r.get("matches_baseline") is not None]
    return {
        "prompts": len(rows),
        "new_tokens": sum(r["new_tokens"] for r in rows),
        "steps": steps,
        "tau": emitted / steps if steps else None,
        "alpha": (emitted - steps) / drafts if drafts else None,
        "tokens_per_s": tps,
        "baseline_tokens_per_s": base_tps,
        "speedup": tps / base_tps if base_tps else None,
        **{f"{name}_tokens_per_s": hf_tps[name] for name in HF_METHODS},
        **{f"speedup_{name}": tps / hf_tps[name] if hf_tps[name] and tps else None for name in HF_METHODS},
        "undrafted_steps": sum(r.get("undrafted_steps", 0) for r in rows),
        "idle_steps": sum(r.get("idle_steps", 0) for r in rows),
        "baseline_idle_steps": sum(r["baseline"].get("idle_steps", 0) for r in rows),
        "matches_baseline": f"{sum(checked)}/{len(checked)}" if checked else None,
        "step_ms": step_breakdown(rows),
        "baseline_step_ms": step_breakdown([r["baseline"] for r in rows]),
        "peak_bytes": _most(r.get("peak_bytes") for r in rows),
        "baseline_peak_bytes": _most(r["baseline"].get("peak_bytes") for r in rows),
        "peak_extra_bytes": _most(r.get("peak_extra_bytes") for r in rows),
    }


def _most(values: Iterable[int | None]) -> int | None:
    """The largest of the values that were measured (None when none was)."""
    got = [v for v in values if v is not None]
    return max(got) if got else None


def memory_line(agg: dict, budget: int | None) -> str | None:
    """Peak device memory of one call over the baseline's, in MiB, beside the budget if one was set."""
    if agg["peak_bytes"] is None:
        return None
    mib = 1 << 20
    line = (f"Peak memory above the call's start (CUDA, largest call): {agg['peak_bytes'] / mib:.1f} MiB, baseline "
            f"{agg['baseline_peak_bytes'] / mib:.1f} MiB, extra {agg['peak_extra_bytes'] / mib:.1f} MiB")
    if budget is not None:
        held = "within" if agg["peak_extra_bytes"] <= budget else "**over**"
        line += f" ({held} the memory_budget of {budget / mib:.1f} MiB)"
    return line + "."


def by_category(rows: Sequence[dict]) -> dict[str, dict]:
    """``aggregate`` per category, in first-seen order, then ``"all"``."""
    categories = list(dict.fromkeys(r["category"] for r in rows))
    out = {c: aggregate([r for r in rows if r["category"] == c]) for c in categories}
    out["all"] = aggregate(rows)
    return out


def by_turn(rows: Sequence[dict]) -> list[dict]:
    """Pooled metrics per turn (turn 1, 2, ...) over the rows that have that turn.

    Example: two rows with ``turn_new_tokens`` [8, 8] and [4], ``turn_steps`` [8, 2] and [4]
    give turn 1: τ = 12 / 12 = 1.0 over 2 prompts, and turn 2: τ = 8 / 2 = 4.0 over 1 prompt.
    """
    out = []
    for t in range(max((len(r["turn_new_tokens"]) for r in rows), default=0)):
        have = [r for r in rows if t < len(r["turn_new_tokens"])]
        new = sum(r["turn_new_tokens"][t] for r in have)
        steps = sum(r["turn_steps"][t] for r in have if r.get("turn_steps"))
        tps = _turn_rate(have, t)
        base_tps = _turn_rate([r["baseline"] for r in have], t)
        out.append({"turn": t + 1, "prompts": len(have), "new_tokens": new, "steps": steps,
                    "tau": new / steps if steps else None, "tokens_per_s": tps, "baseline_tokens_per_s": base_tps,
                    "speedup": tps / base_tps if tps and base_tps else None})
    return out


def merge_histograms(hists: Iterable[Sequence[int]]) -> list[int]:
    merged: list[int] = []
    for h in hists:
        merged += [0] * (len(h) - len(merged))
        for k, n in enumerate(h):
            merged[k] += n
    return merged


def step_breakdown(rows: Sequence[dict]) -> dict[str, float] | None:
    """Mean milliseconds per engine step in each phase, plus ``"wall"`` (wall time per step)."""
    steps = sum(r["steps"] or 0 for r in rows)
    if not steps:
        return None
    out = {p: 1e3 * sum(r["times"].get(p, 0.0) for r in rows) / steps for p in PHASES}
    out["wall"] = 1e3 * sum(r["wall_time"] for r in rows) / steps
    return out


def run_markdown(rows: Sequence[dict], title: str, header: Sequence[str] = ()) -> str:
    """One run's summary: per mode, a table by category and the step-time breakdown."""
    lines = [f"# {title}", "", *header, ""]
    for mode in dict.fromkeys(r["mode"] for r in rows):
        mode_rows = [r for r in rows if r["mode"] == mode]
        first = mode_rows[0]
        sampling = "" if mode == "greedy" else (
            f" (temperature {first['temperature']}, top_p {first['top_p']}, top_k {first['top_k']})")
        cats = by_category(mode_rows)
        others = [n for n in HF_METHODS[1:] if cats["all"][f"{n}_tokens_per_s"] is not None]
        lines += [f"## {mode}{sampling}", "",
                  "| category | prompts | τ | α | tok/s | baseline tok/s | HF greedy tok/s | × baseline "
                  "| × HF greedy | " + "".join(f"× {HF_LABELS[n]} | " for n in others) + "= baseline |",
                  "|---|---|---|---|---|---|---|---|---|" + "---|" * len(others) + "---|"]
        for category, agg in cats.items():
            name = f"**{category}**" if category == "all" else category
            lines.append(f"| {name} | {agg['prompts']} | {fmt(agg['tau'])} | {fmt(agg['alpha'])} "
                         f"| {fmt(agg['tokens_per_s'], 1)} | {fmt(agg['baseline_tokens_per_s'], 1)} "
                         f"| {fmt(agg['hf_tokens_per_s'], 1)} | {fmt(agg['speedup'])} "
                         f"| {fmt(agg['speedup_hf'])} | " + "".join(f"{fmt(agg[f'speedup_{n}'])} | " for n in others)
                         + f"{agg['matches_baseline'] or '—'} |")
        if others:
            lines += ["", "HF reference speeds, tok/s (all prompts): "
                      + ", ".join(f"{HF_LABELS[n]} {fmt(cats['all'][f'{n}_tokens_per_s'], 1)}" for n in others)]
        set_policies = [f"`{k}={first[k]}`" for k in POLICIES if first.get(k) is not None]
        if set_policies:
            agg = cats["all"]
            lines += ["", (f"Draft policy {' and '.join(set_policies)}: {agg['undrafted_steps']} "
                           f"of {agg['steps']} row-steps ran without a draft.")]
        if below_baseline(first, cats["all"]["speedup"]):
            lines += ["", below_baseline_line(cats["all"]["speedup"], first["batch_size"], first.get("max_draft_batch"))]
        if any(r["num_turns"] > 1 for r in mode_rows):
            lines += ["", "By turn (later turns see the earlier answers):", "",
                      "| turn | prompts | τ | tok/s | baseline tok/s | × baseline |", "|---|---|---|---|---|---|"]
            lines += [f"| {t['turn']} | {t['prompts']} | {fmt(t['tau'])} | {fmt(t['tokens_per_s'], 1)} "
                      f"| {fmt(t['baseline_tokens_per_s'], 1)} | {fmt(t['speedup'])} |" for t in by_turn(mode_rows)]
        overall = aggregate(mode_rows)
        lines += ["", "Step time, ms per step: " + _phases(overall["step_ms"]) + "; baseline: "
                  + _phases(overall["baseline_step_ms"]), ""]
        if overall["idle_steps"] or overall["baseline_idle_steps"]:
            lines += [f"Idle steps (run after every row of their call had stopped, rows' shares summed): "
                      f"{fmt(overall['idle_steps'], 1)}, beside {overall['steps']} row-steps used; "
                      f"baseline {fmt(overall['baseline_idle_steps'], 1)}.", ""]
        if (memory := memory_line(overall, first.get("memory_budget"))) is not None:
            lines += [memory, ""]
        lines += first_call_lines(mode_rows)
        if mode == "greedy":
            lines += divergence_lines(mode_rows) + hf_equality_lines(mode_rows)
    return "\n".join(lines)


def below_baseline(run: dict, speedup: float | None) -> bool:
    """Is this drafter run slower than its no-drafter baseline? (A run with no drafter never is.)"""
    return speedup is not None and speedup < 1.0 and run["drafter"] != "none"


def below_baseline_line(speedup: float, batch_size: int, max_draft_batch: int | None) -> str:
    """The summary's warning for a run whose drafter loses to the baseline, with what to try.

    Example:
        below_baseline_line(0.83, 16, None)
        # "**Drafting is slower than the baseline here (×0.83)**; consider max_draft_batch=8 ..."
    """
    cap = batch_size if max_draft_batch is None else min(max_draft_batch, batch_size)
    if cap > 1:   # drafting still runs while more than one row is active: halve that limit
        halvings = [cap >> k for k in range(1, cap.bit_length())]   # 16 -> [8, 4, 2, 1]
        advice = (f"consider max_draft_batch={halvings[0]} (steps with more active rows run without a "
                  f"draft; sweep it with `-m max_draft_batch={','.join(map(str, halvings))}`) or fewer draft tokens.")
    else:
        advice = "consider fewer draft tokens, or none."
    return f"**Drafting is slower than the baseline here (×{speedup:.2f})**; {advice}"


def hf_equality_lines(rows: Sequence[dict]) -> list[str]:
    """How many greedy outputs of each HF method equal the engine baseline's, token for token."""
    counts: dict[str, list[bool]] = {}
    for r in rows:
        for name, same in (r.get("hf_matches_baseline") or {}).items():
            counts.setdefault(name, []).append(same)
    if not counts:
        return []
    return ["HF greedy outputs equal to the baseline's: "
            + ", ".join(f"{HF_LABELS[n]} {sum(c)}/{len(c)}" for n, c in counts.items())
            + " (in bf16 or fp16, other kernels may part at near-ties).", ""]


def divergence_lines(rows: Sequence[dict]) -> list[str]:
    """The summary's "Divergences" section: every greedy output that parts from the baseline,
    with the target's top-2 logit gap there. Anything but a near-tie is flagged as a bug."""
    diverged = [r for r in rows if r.get("first_divergence")]
    if not diverged:
        return ["Divergences: none; every greedy output equals the same-engine baseline token for token.", ""]
    lines = ["### Divergences from the baseline", "",
             "| question | category | turn | token | top-2 gap | ulp | gap (ulps) | tokens are the top two "
             "| parted token below the top (ulps) | near-tie |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    bad = []
    for r in diverged:
        d = r.get("divergence")
        where = r["first_divergence"]
        if d is None:
            lines.append(f"| {r['question_id']} | {r['category']} | {where['turn'] + 1} | {where['index']} "
                         "| — | — | — | — | — | not checked |")
            continue
        parted = f"{d['parted_ulps']:.2f}" if "parted_ulps" in d else "—"   # rows written before it was measured
        lines.append(f"| {r['question_id']} | {r['category']} | {d['turn'] + 1} | {d['index']} | {d['gap']:.4g} "
                     f"| {d['ulp']:.3g} | {d['gap_ulps']:.2f} | {'yes' if d['top2'] else 'no'} "
                     f"| {parted} | {'yes' if d['near_tie'] else '**NO**'} |")
        if not d["near_tie"]:
            bad.append(str(r["question_id"]))
    lines.append("")
    if bad:
        lines += [f"**NOT a near-tie: investigate (a bug), questions {', '.join(bad)}.**", ""]
    else:
        lines += [(f"Every divergence starts at a near-tie (both tokens that parted are at most {NEAR_TIE_ULPS:g} ulps "
                   "of the model dtype below the target's top logit there): rounding, not a bug."), ""]
    return lines


def run_key(row: dict) -> tuple:
    """What identifies a run's configuration within a sweep: its ``RUN_FIELDS``."""
    return tuple(json.dumps(row.get(k), sort_keys=True) for k in RUN_FIELDS)


def summarise_runs(rows: Sequence[dict]) -> list[dict]:
    """One record per run configuration and mode: the ``RUN_FIELDS``, ``aggregate`` over all
    prompts, and ``categories`` (``aggregate`` per category)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(run_key(r), []).append(r)
    runs = []
    for group in groups.values():
        cats = by_category(group)
        runs.append({k: group[0].get(k) for k in RUN_FIELDS} | cats.pop("all") | {"categories": cats})
    return runs


def collect(multirun_dir: str | Path) -> list[dict]:
    """Gather every ``rows.jsonl`` under ``multirun_dir`` into ``summary.md`` and ``sweep.png`` there.

    Returns ``summarise_runs`` of all the rows (written to ``summary.jsonl`` too).
    """
    root = Path(multirun_dir)
    rows = [r for path in sorted(root.rglob("rows.jsonl")) for r in read_rows(path)]
    if not rows:
        raise FileNotFoundError(f"no rows.jsonl under {root}")
    runs = summarise_runs(rows)
    text = sweep_markdown(runs)
    write_rows(runs, root / "summary.jsonl")
    try:
        from specdec.bench.plots import plot_sweep

        plot_sweep(runs, root / "sweep.png")
    except ImportError:
        text += "\nPlots skipped: matplotlib is not installed.\n"
    (root / "summary.md").write_text(text, encoding="utf-8")
    return runs


def write_reports(rows: Sequence[dict], out_dir: str | Path, header: Sequence[str] = (),
                  profiles: Mapping[str, dict] | None = None) -> Path:
    """A harness run's ``summary.md`` (and ``step_profile.json``, the plots); returns its path.

    One run (a drafter configuration at one batch size): its table by category, per mode. Several:
    the sweep table first (``sweep.png`` beside it), then each run's own section. ``profiles``
    maps a ``run_label`` to that run's step profile (``step_profile_line``).
    """
    out_dir = Path(out_dir)
    profiles = dict(profiles or {})
    if profiles:
        (out_dir / "step_profile.json").write_text(json.dumps(profiles, indent=1), encoding="utf-8")
    from specdec.bench.plots import plot_accepted_lengths, plot_sweep

    labels = list(dict.fromkeys(run_label(r) for r in rows))
    header = list(header)
    plots = [lambda: plot_accepted_lengths(rows, out_dir / "accepted_lengths.png", title)]
    if len(labels) == 1:
        title = f"specdec-bench: {labels[0]}"
        if labels[0] in profiles:
            header.append(step_profile_line(profiles[labels[0]]))
        text = run_markdown(rows, title, header)
    else:
        title = f"specdec-bench: {len(labels)} runs"
        runs = summarise_runs(rows)
        write_rows(runs, out_dir / "summary.jsonl")
        plots.append(lambda: plot_sweep(runs, out_dir / "sweep.png"))
        sweep = sweep_markdown(runs).split("\n", 1)[1]   # without its own title
        sections = []
        for label in labels:
            mine = [r for r in rows if run_label(r) == label]
            lines = [step_profile_line(profiles[label])] if label in profiles else []
            sections.append(_demote(run_markdown(mine, label, lines)))
        text = "\n".join([f"# {title}", "", *header, "", "## Sweep", sweep, *sections])
    try:
        for plot in plots:
            plot()
    except ImportError:
        text += "\nPlots skipped: matplotlib is not installed.\n"
    path = out_dir / "summary.md"
    path.write_text(text, encoding="utf-8")
    return path


def run_label(row: Mapping) -> str:
    """A run's name in tables and plots: drafter, its parameters, a policy in brackets, the batch size.

    Example:
        run_label({"drafter": "lookup", "params": {"num_tokens": 8}, "max_draft_batch": 4, "batch_size": 16})
        # "lookup num_tokens=8 [max_draft_batch=4] batch 16"
    """
    policy = ", ".join(f"{k}={row[k]}" for k in LABELLED if row.get(k) is not None)
    parts = (row["drafter"], format_params(row.get("params") or {}), policy and f"[{policy}]",
             f"batch {row['batch_size']}" if "batch_size" in row else "")
    return " ".join(filter(None, parts))


def step_profile_line(profiles: Mapping) -> str:
    """The summary's line on where a captured step's device time goes, beside the bandwidth floor."""
    parts = []
    for name in ("baseline", "drafter"):
        if profiles.get(name):
            ms = profiles[name]
            parts.append(f"{name} " + ", ".join(f"{k} {v:.3f}" for k, v in ms.items())
                         + f" (= {sum(ms.values()):.3f})")
    floor = profiles.get("floor_ms")
    return ("Device ms per step, by phase (each phase captured and replayed alone): " + "; ".join(parts)
            + (f"; memory-bandwidth floor {floor:.3f} ms." if floor else "."))


def first_call_lines(rows: Sequence[dict]) -> list[str]:
    """Each method's first call (compiling and capturing) beside the same batch timed warm, and any
    capture or compile during timed calls (there should be none once a batch size is warm)."""
    if not rows or "first_call" not in rows[0]:
        return []   # rows written before the harness measured first calls
    first_batch = [r for r in rows if r.get("batch_index") == 0]
    sides = {"drafter": (rows[0]["first_call"], sum(r["wall_time"] for r in first_batch))}
    sides["baseline"] = (rows[0]["baseline"].get("first_call"), sum(r["baseline"]["wall_time"] for r in first_batch))
    for name in HF_METHODS:
        if rows[0].get(name) and "first_call" in rows[0][name]:
            sides[HF_LABELS[name]] = (rows[0][name]["first_call"], sum(r[name]["wall_time"] for r in first_batch))
    if rows[0]["drafter"] == "none":
        del sides["drafter"]
    cells = []
    for name, (first, warm) in sides.items():
        if first is None:
            cells.append(f"{name} not measured (no warm-up: the first timed batch includes it)")
            continue
        cells.append(f"{name} {first['seconds']:.3f} s ({first['graphs']} graphs, {first['compiles']} compiles) "
                     f"against {warm:.3f} s warm")
    lines = ["First call (compiling and capturing), then the same first batch timed warm: " + "; ".join(cells) + "."]
    graphs = sum(r["captures"]["graphs"] for r in rows) + sum(r["baseline"]["captures"]["graphs"] for r in rows)
    compiles = max([r["captures"]["compiles"] for r in rows] + [r["baseline"]["captures"]["compiles"] for r in rows])
    if graphs or compiles:
        late = sorted({str(r["question_id"]) for r in rows if r["captures"]["graphs"] or r["captures"]["compiles"]
                       or r["baseline"]["captures"]["graphs"] or r["baseline"]["captures"]["compiles"]})
        lines.append(f"**Timed calls captured or compiled after the warm-up** ({graphs} graphs; up to {compiles} "
                     f"compiles in a batch; questions {', '.join(late)}): their times include it.")
    else:
        lines.append("No timed call captured a graph or compiled a frame.")
    return lines + [""]


def _demote(markdown: str) -> str:
    """Every heading one level deeper, so a run's summary nests under the sweep's."""
    return "\n".join("#" + line if line.startswith("#") else line for line in markdown.split("\n"))


def sweep_markdown(runs: Sequence[dict]) -> str:
    """One table for the whole sweep: a line per run and mode, per-category speedups at the right.

    Settings that are the same for every run go in the line above the table; settings that vary
    (say ``batch_size`` and ``max_draft_batch`` in a batch sweep) get a column each. "× HF lookup"
    and "× HF assisted" appear when some run measured them, "undrafted" (the share of row-steps
    the draft policies ran without a draft) when some run set ``max_draft_batch`` or ``min_tau``. A run slower
    than its own baseline is marked **below** and listed under the table.
    """
    varying = [k for k in _SETTINGS if len({json.dumps(r.get(k)) for r in runs}) > 1]
    fixed = ", ".join(f"{k} {runs[0].get(k)}" for k in _SETTINGS if k not in varying)
    others = [n for n in HF_METHODS[1:] if any(r.get(f"speedup_{n}") is not None for r in runs)]
    policy = any(r.get(k) is not None for r in runs for k in POLICIES)
    peaks = any(r.get("peak_bytes") is not None for r in runs)
    categories = list(dict.fromkeys(c for run in runs for c in run["categories"]))
    columns = ["drafter", "params", "mode", *varying, "τ", "α", "tok/s", "baseline tok/s", "× baseline", "× HF",
               *(f"× {HF_LABELS[n]}" for n in others), *(["undrafted"] if policy else []),
               *(["peak MiB (extra)"] if peaks else []), "= baseline", *categories]
    intro = (f"{fixed}. Speedups are tokens/s ratios against the no-drafter engine baseline measured in the "
             "same run (× HF: against HF greedy `generate`); category columns give × baseline (τ). "
             "**below** marks runs slower than their baseline.")
    lines = ["# specdec-bench sweep", "", intro, "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    below = []
    for run in sorted(runs, key=lambda r: (r["drafter"].lower(), _numbers(r), r["mode"], str(r["temperature"]))):
        slow = below_baseline(run, run["speedup"])
        name = [run["drafter"], format_params(run["params"]) or "—", _mode(run)]
        cells = [*name, *(str(run.get(k)) for k in varying), fmt(run["tau"]), fmt(run["alpha"]),
                 fmt(run["tokens_per_s"], 1), fmt(run["baseline_tokens_per_s"], 1),
                 fmt(run["speedup"]) + (" **below**" if slow else ""), fmt(run["speedup_hf"]),
                 *(fmt(run.get(f"speedup_{n}")) for n in others)]
        if policy:
            cells.append(f"{run.get('undrafted_steps', 0) / run['steps']:.0%}" if run["steps"] else "—")
        if peaks:
            cells.append(f"{run['peak_bytes'] / 2**20:.0f} ({run['peak_extra_bytes'] / 2**20:+.0f})"
                         if run.get("peak_bytes") is not None else "—")
        cells.append(run["matches_baseline"] or "—")
        cells += [f"{fmt(c['speedup'])} ({fmt(c['tau'])})" if (c := run["categories"].get(cat)) else "—"
                  for cat in categories]
        lines.append("| " + " | ".join(cells) + " |")
        if slow:
            below.append(" ".join([*name, *(f"{k}={run.get(k)}" for k in varying)]) + f" (×{run['speedup']:.2f})")
    if below:
        lines += ["", f"**{len(below)} run(s) slower than their no-drafter baseline:** " + "; ".join(below) + "."]
    return "\n".join(lines) + "\n"


def _setting(run: dict, key: str):
    """A drafter parameter of the run, or else a run-level setting such as ``batch_size``."""
    return run["params"][key] if key in run["params"] else run.get(key)


def _mode(run: dict) -> str:
    return run["mode"] if run["mode"] == "greedy" else f"{run['mode']} T={run['temperature']}"


def _numbers(run: dict) -> tuple:
    return tuple(v for _, v in sorted(run["params"].items()) if isinstance(v, (int, float))) + (run["batch_size"],)


def _rate(rows: Sequence[dict]) -> float | None:
    seconds = sum(r["wall_time"] for r in rows)
    return sum(r["new_tokens"] for r in rows) / seconds if seconds > 0 else None


def _turn_rate(rows: Sequence[dict], turn: int) -> float | None:
    seconds = sum(r["turn_wall_time"][turn] for r in rows)
    return sum(r["turn_new_tokens"][turn] for r in rows) / seconds if seconds > 0 else None


def format_params(params: dict) -> str:
    """``{"num_tokens": 4}`` -> ``"num_tokens=4"``; an empty dict gives an empty string. A nested
    drafter config shows as its class and settings: ``fallback=PromptLookup(num_tokens=4)``."""
    return ", ".join(f"{k}={_short(v)}" for k, v in params.items())


def _short(value) -> str:
    if isinstance(value, dict):
        target = str(value.get("_target_", ""))
        inner = format_params({k: v for k, v in value.items() if k != "_target_"})
        return f"{target.rsplit('.', 1)[-1]}({inner})"
    return str(value)


def _phases(ms: dict[str, float] | None) -> str:
    if not ms:
        return "—"
    return ", ".join(f"{p} {ms[p]:.2f}" for p in (*PHASES, "wall"))


def fmt(x: float | None, digits: int = 2) -> str:
    """A number for a table cell; None (not measured) prints as a dash."""
    return "—" if x is None else f"{x:.{digits}f}"

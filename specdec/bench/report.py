"""Benchmark rows to tables and plots, for one run or for a whole multirun sweep.

A *row* is one prompt under one decoding mode in one run (the JSONL schema is documented on
``specdec.bench.run.make_row``). Rates are pooled, never averaged: τ is all emitted tokens over
all steps, tokens/s is all new tokens over all wall time, and a speedup is a ratio of pooled
tokens/s from the same run. This module reads rows only; it never runs a model.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from specdec.bench.measure import PHASES  # noqa: E402

# Sweep-axis candidates for the speedup plot, in order of preference: γ, then tree sizes.
AXIS_KEYS = ("num_tokens", "num_nodes", "tree_size", "depth", "top_k")


def read_rows(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_rows(rows: Iterable[dict], path: str | Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def aggregate(rows: Sequence[dict]) -> dict:
    """Pooled metrics over ``rows`` (all from one run and one mode).

    Example:
        aggregate([{"new_tokens": 8, "wall_time": 1.0, "accept_hist": [0, 2, 0, 2], ...,
                    "baseline": {"new_tokens": 8, "wall_time": 2.0, ...}, ...}])
        # tau = (1·2 + 3·2) / 4 = 2.0, tokens_per_s = 8.0, speedup = 8.0 / 4.0 = 2.0
    """
    hist = merge_histograms(r["accept_hist"] for r in rows)
    steps = sum(hist)
    tps = _rate(rows)
    base_tps = _rate([r["baseline"] for r in rows])
    hf_rows = [r["hf"] for r in rows if r.get("hf")]
    hf_tps = _rate(hf_rows) if len(hf_rows) == len(rows) else None
    checked = [r["matches_baseline"] for r in rows if r.get("matches_baseline") is not None]
    return {
        "prompts": len(rows),
        "new_tokens": sum(r["new_tokens"] for r in rows),
        "steps": steps,
        "tau": sum(k * n for k, n in enumerate(hist)) / steps if steps else None,
        "alpha": (sum(r["acceptance_rate"] * r["steps"] for r in rows if r["acceptance_rate"] is not None)
                  / steps if steps else None),
        "tokens_per_s": tps,
        "baseline_tokens_per_s": base_tps,
        "hf_tokens_per_s": hf_tps,
        "speedup": tps / base_tps if base_tps else None,
        "speedup_hf": tps / hf_tps if hf_tps else None,
        "matches_baseline": f"{sum(checked)}/{len(checked)}" if checked else None,
        "step_ms": step_breakdown(rows),
        "baseline_step_ms": step_breakdown([r["baseline"] for r in rows]),
    }


def by_category(rows: Sequence[dict]) -> dict[str, dict]:
    """``aggregate`` per category, in first-seen order, then ``"all"``."""
    categories = list(dict.fromkeys(r["category"] for r in rows))
    out = {c: aggregate([r for r in rows if r["category"] == c]) for c in categories}
    out["all"] = aggregate(rows)
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
        lines += [f"## {mode}{sampling}", "",
                  "| category | prompts | τ | α | tok/s | baseline tok/s | HF tok/s | × baseline | × HF "
                  "| = baseline |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for category, agg in by_category(mode_rows).items():
            name = f"**{category}**" if category == "all" else category
            lines.append(f"| {name} | {agg['prompts']} | {_f(agg['tau'])} | {_f(agg['alpha'])} "
                         f"| {_f(agg['tokens_per_s'], 1)} | {_f(agg['baseline_tokens_per_s'], 1)} "
                         f"| {_f(agg['hf_tokens_per_s'], 1)} | {_f(agg['speedup'])} "
                         f"| {_f(agg['speedup_hf'])} | {agg['matches_baseline'] or '—'} |")
        overall = aggregate(mode_rows)
        lines += ["", "Step time, ms per step: " + _phases(overall["step_ms"]) + "; baseline: "
                  + _phases(overall["baseline_step_ms"]), ""]
        diverged = [r for r in mode_rows if r.get("first_divergence")]
        if diverged:
            lines += ["First divergence from the baseline (question: turn, token): "
                      + ", ".join(f"{r['question_id']}: {r['first_divergence']['turn']}, "
                                  f"{r['first_divergence']['index']}" for r in diverged), ""]
    return "\n".join(lines)


def plot_accepted_lengths(rows: Sequence[dict], path: str | Path, title: str) -> None:
    """Bar chart of the share of steps that emitted k tokens, one bar group per mode."""
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.8 / len(modes)
    for i, mode in enumerate(modes):
        hist = merge_histograms(r["accept_hist"] for r in rows if r["mode"] == mode)
        total = sum(hist) or 1
        ks = list(range(1, len(hist)))
        ax.bar([k + (i - (len(modes) - 1) / 2) * width for k in ks], [hist[k] / total for k in ks],
               width=width, label=mode)
    ax.set_xlabel("tokens emitted per step (accepted + 1)")
    ax.set_ylabel("share of steps")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_key(row: dict) -> tuple:
    """What identifies a run's configuration within a sweep."""
    return (row["model"], row["drafter"], json.dumps(row["params"], sort_keys=True), row["mode"],
            row["temperature"], row["top_p"], row["top_k"], row["batch_size"], row["max_new_tokens"])


def collect(multirun_dir: str | Path) -> list[dict]:
    """Gather every ``rows.jsonl`` under ``multirun_dir`` into ``summary.md`` and ``sweep.png`` there.

    Returns one record per run configuration and mode: the ``run_key`` fields and ``aggregate``
    over all prompts, plus ``categories`` (``aggregate`` per category).
    """
    root = Path(multirun_dir)
    rows = [r for path in sorted(root.rglob("rows.jsonl")) for r in read_rows(path)]
    if not rows:
        raise FileNotFoundError(f"no rows.jsonl under {root}")
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(run_key(r), []).append(r)
    runs = []
    for key, group in groups.items():
        first = group[0]
        cats = by_category(group)
        runs.append({k: first[k] for k in ("model", "drafter", "params", "mode", "temperature", "top_p",
                                            "top_k", "batch_size", "max_new_tokens")}
                    | cats.pop("all") | {"categories": cats})
    (root / "summary.md").write_text(sweep_markdown(runs), encoding="utf-8")
    write_rows(runs, root / "summary.jsonl")
    plot_sweep(runs, root / "sweep.png")
    return runs


def sweep_markdown(runs: Sequence[dict]) -> str:
    categories = list(dict.fromkeys(c for run in runs for c in run["categories"]))
    models = sorted({run["model"] for run in runs})
    lines = ["# specdec-bench sweep", "",
             f"Models: {', '.join(models)}. Speedups are against the no-drafter engine baseline "
             "measured in the same run; per-category columns give × baseline (τ).", "",
             "| drafter | params | mode | τ | α | tok/s | × baseline | × HF | = baseline | "
             + " | ".join(categories) + " |",
             "|---|---|---|---|---|---|---|---|---|" + "---|" * len(categories)]
    for run in sorted(runs, key=lambda r: (r["drafter"], _axis_sort(r), r["mode"], str(r["temperature"]))):
        mode = run["mode"] if run["mode"] == "greedy" else f"{run['mode']} T={run['temperature']}"
        cells = [f"{_f(c['speedup'])} ({_f(c['tau'])})" if (c := run["categories"].get(cat)) else "—"
                 for cat in categories]
        lines.append(f"| {run['drafter']} | {format_params(run['params']) or '—'} | {mode} | {_f(run['tau'])} "
                     f"| {_f(run['alpha'])} | {_f(run['tokens_per_s'], 1)} | {_f(run['speedup'])} "
                     f"| {_f(run['speedup_hf'])} | {run['matches_baseline'] or '—'} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def sweep_axis(runs: Sequence[dict]) -> str | None:
    """The drafter parameter to put on the x axis: a numeric one that varies across runs."""
    varying = [k for k in dict.fromkeys(k for r in runs for k in r["params"])
               if len({r["params"].get(k) for r in runs if isinstance(r["params"].get(k), (int, float))}) > 1]
    preferred = [k for k in AXIS_KEYS if k in varying]
    return (preferred or varying or [None])[0]


def plot_sweep(runs: Sequence[dict], path: str | Path) -> None:
    """Speedup over the same-engine baseline, and τ, against γ (or tree size); bars if nothing varies."""
    axis = sweep_axis(runs)
    fig, (ax_speed, ax_tau) = plt.subplots(1, 2, figsize=(10, 4))
    if axis is None:
        labels = [f"{r['drafter']} {format_params(r['params'])} {r['mode']}" for r in runs]
        ax_speed.barh(labels, [r["speedup"] or 0 for r in runs])
        ax_tau.barh(labels, [r["tau"] or 0 for r in runs])
    else:
        lines: dict[str, list[dict]] = {}
        for r in runs:
            if isinstance(r["params"].get(axis), (int, float)):
                rest = {k: v for k, v in r["params"].items() if k != axis}
                mode = r["mode"] if r["mode"] == "greedy" else f"{r['mode']} T={r['temperature']}"
                lines.setdefault(" ".join(filter(None, (r["drafter"], format_params(rest), mode))), []).append(r)
        for label, group in lines.items():
            group.sort(key=lambda r: r["params"][axis])
            xs = [r["params"][axis] for r in group]
            ax_speed.plot(xs, [r["speedup"] for r in group], marker="o", label=label)
            ax_tau.plot(xs, [r["tau"] for r in group], marker="o", label=label)
        for ax in (ax_speed, ax_tau):
            ax.set_xlabel(axis)
        ax_speed.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
        ax_speed.legend(fontsize=7)
    ax_speed.set_title("speedup over the same-engine baseline", fontsize=9)
    ax_tau.set_title("τ (tokens per step)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _rate(rows: Sequence[dict]) -> float | None:
    seconds = sum(r["wall_time"] for r in rows)
    return sum(r["new_tokens"] for r in rows) / seconds if seconds > 0 else None


def _axis_sort(run: dict) -> tuple:
    return tuple(v for _, v in sorted(run["params"].items()) if isinstance(v, (int, float)))


def format_params(params: dict) -> str:
    """``{"num_tokens": 4}`` -> ``"num_tokens=4"``; an empty dict gives an empty string."""
    return ", ".join(f"{k}={v}" for k, v in params.items())


def _phases(ms: dict[str, float] | None) -> str:
    if not ms:
        return "—"
    return ", ".join(f"{p} {ms[p]:.2f}" for p in (*PHASES, "wall"))


def _f(x: float | None, digits: int = 2) -> str:
    return "—" if x is None else f"{x:.{digits}f}"

"""Benchmark plots: accepted lengths per step, and a sweep's speedup and τ along what it varies.

Reads rows and run records only (``specdec.bench.report``); matplotlib loads on first use, so
the harness runs without it (the GPU machine) and says the plots were skipped.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from specdec.bench.report import (AXIS_KEYS, SWEEP_SETTINGS, _mode, _setting, format_params, merge_histograms,
                                  run_label)


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend; ImportError where matplotlib is missing
    (the GPU machine): the harness then writes its tables and skips the plots, saying so."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accepted_lengths(rows: Sequence[dict], path: str | Path, title: str) -> None:
    """Bar chart of the share of steps that emitted k tokens, one bar group per mode (per run
    and mode when ``rows`` hold several runs)."""
    plt = pyplot()
    several = len({run_label(r) for r in rows}) > 1
    keys = [f"{run_label(r)} {r['mode']}" if several else r["mode"] for r in rows]
    hists = {key: merge_histograms(r["accept_hist"] for r, k in zip(rows, keys) if k == key)
             for key in dict.fromkeys(keys)}
    ks = range(1, max(2, *(len(h) for h in hists.values())))
    width = 0.8 / len(hists)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for i, (mode, hist) in enumerate(hists.items()):
        hist = hist + [0] * (len(ks) + 1 - len(hist))
        offset = (i - (len(hists) - 1) / 2) * width
        ax.bar([k + offset for k in ks], [hist[k] / (sum(hist) or 1) for k in ks], width=width, label=mode)
    ax.set_xticks(list(ks))
    ax.set_xlabel("tokens emitted per step (accepted + 1)")
    ax.set_ylabel("share of steps")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def sweep_axis(runs: Sequence[dict]) -> str | None:
    """The x axis of the sweep plot: the parameter that varies. A key varies when one drafter's
    runs take more than one number for it (two drafters that merely differ, say lookup with 8
    tokens and a draft model with 4, do not make ``num_tokens`` an axis). Preference: γ or a tree
    size, then the drafters' other parameters, then ``SWEEP_SETTINGS`` (batch size, policies,
    sampling). None if nothing numeric varies."""
    keys = dict.fromkeys([*AXIS_KEYS, *(k for r in runs for k in r["params"]), *SWEEP_SETTINGS])
    for key in keys:
        for drafter in dict.fromkeys(r["drafter"] for r in runs):
            values = {v for r in runs if r["drafter"] == drafter and _is_number(v := _setting(r, key))}
            if len(values) > 1:
                return key
    return None


def sweep_lines(runs: Sequence[dict], axis: str) -> dict[str, list[dict]]:
    """The plot's lines along ``axis``: runs that agree on everything else, sorted by the axis.
    A line's label names the drafter, its other parameters, its mode and the other settings that
    vary; runs without a number for ``axis`` are left out."""
    others = [k for k in SWEEP_SETTINGS if k != axis and len({json.dumps(r.get(k)) for r in runs}) > 1
              and k not in ("temperature", "top_p", "top_k")]
    lines: dict[str, list[dict]] = {}
    for r in runs:
        if not _is_number(_setting(r, axis)):
            continue
        rest = {k: v for k, v in r["params"].items() if k != axis}
        mode = r["mode"] if axis == "temperature" else _mode(r)
        label = " ".join(filter(None, (r["drafter"], format_params(rest), mode,
                                       *(f"{k}={r.get(k)}" for k in others))))
        lines.setdefault(label, []).append(r)
    for group in lines.values():
        group.sort(key=lambda r: _setting(r, axis))
    return lines


def sweep_figure(runs: Sequence[dict]):
    """Speedup over the same-engine baseline, and τ, against the ``sweep_axis`` (legend inside the
    axes); horizontal bars, one a run, when nothing numeric varies."""
    plt = pyplot()
    axis = sweep_axis(runs)
    if axis is None:   # one bar a run, labelled on the left axis only
        fig, (ax_speed, ax_tau) = plt.subplots(1, 2, figsize=(12, 1.5 + 0.3 * len(runs)), sharey=True,
                                               layout="constrained")
        labels = [" ".join(filter(None, (r["drafter"], format_params(r["params"]), _mode(r),
                                         f"batch {r['batch_size']}"))) for r in runs]
        ax_speed.barh(labels, [r["speedup"] or 0 for r in runs])
        ax_tau.barh(labels, [r["tau"] or 0 for r in runs])
        ax_speed.tick_params(axis="y", labelsize=7)
        ax_speed.axvline(1.0, color="grey", linewidth=0.8, linestyle="--")
    else:
        fig, (ax_speed, ax_tau) = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
        lines = sweep_lines(runs, axis)
        for label, group in lines.items():
            xs = [_setting(r, axis) for r in group]
            ax_speed.plot(xs, [r["speedup"] for r in group], marker="o", label=label)
            ax_tau.plot(xs, [r["tau"] for r in group], marker="o", label=label)
        ticks = sorted({_setting(r, axis) for group in lines.values() for r in group})
        for ax in (ax_speed, ax_tau):
            ax.set_xlabel(axis)
            if min(ticks) > 0 and max(ticks) / min(ticks) >= 8:   # batch sizes 1, 4, 16, ...: evenly spaced
                ax.set_xscale("log", base=2)
            ax.set_xticks(ticks, [str(t) for t in ticks])
            ax.minorticks_off()
        ax_speed.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
        ax_speed.legend(fontsize=7, loc="best", framealpha=0.8)
    ax_speed.set_title("speedup over the same-engine baseline", fontsize=9)
    ax_tau.set_title("τ (tokens per step)", fontsize=9)
    return fig


def plot_sweep(runs: Sequence[dict], path: str | Path) -> None:
    """``sweep_figure`` saved to ``path``."""
    fig = sweep_figure(runs)
    fig.savefig(path, dpi=120)
    pyplot().close(fig)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)

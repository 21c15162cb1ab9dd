"""Benchmark rows: one prompt's result under one mode, its baseline and HF beside it (plain dicts).

This module names drafter configurations and builds rows from ``measure.Decoded`` results; it
knows no configs framework, files or models.
"""
from __future__ import annotations

from collections.abc import Mapping

from specdec.bench.measure import Decoded, first_divergence
from specdec.bench.prompts import Prompt
from specdec.bench.report import HF_METHODS

_LABEL_SKIP = ("_target_", "name", "dtype", "device")   # drafter keys that don't name a configuration


def make_row(identity: dict, prompt: Prompt, drafted: Decoded, base: Decoded, hf: dict[str, Decoded]) -> dict:
    """One JSONL row: a prompt's result under one mode, with its baseline (and HF) beside it.

    Keys: the run identity (``model dtype device drafter params batch_size max_new_tokens
    max_draft_batch min_tau mode temperature top_p top_k``); ``question_id category num_turns
    prompt_tokens``; the drafter's ``new_tokens steps tau draft_tokens acceptance_rate accept_hist
    wall_time tokens_per_s times lossless undrafted_steps idle_steps``, where ``accept_hist[k]``
    counts steps that emitted k tokens, ``undrafted_steps`` this row's own steps that the draft
    policies (``max_draft_batch``, ``min_tau``) ran without a draft and ``idle_steps`` its equal
    share of the steps its calls ran after every row had stopped (``SpecStats.idle_steps``); per turn (lists, one entry a turn) ``turn_new_tokens turn_steps
    turn_tau turn_wall_time turn_tokens_per_s turn_speedup``; ``baseline``, and ``hf``,
    ``hf_lookup``, ``hf_assisted`` (HF greedy, prompt lookup and assisted generation, each null
    when not run), with ``new_tokens steps idle_steps wall_time tokens_per_s times turn_new_tokens
    turn_wall_time turn_tokens_per_s``; ``speedup``, ``speedup_hf``, ``speedup_hf_lookup`` and
    ``speedup_hf_assisted`` (tokens/s ratios); and, for greedy rows, ``matches_baseline``,
    ``first_divergence`` (``{"turn", "index"}`` or null), ``divergence`` (null, or the target's
    top-2 logit gap there: see ``measure.divergence_gap``) and ``hf_matches_baseline`` (``{HF
    method: its output equals the baseline's}`` over the HF methods that ran, or null);
    ``output_ids`` (the drafter's tokens, per turn; the baseline's in ``baseline``); ``peak_bytes``
    (CUDA: the most device memory rose above its level before the call, over the row's calls, each
    call being the whole batch's; null off CUDA; also in ``baseline`` and the HF entries),
    ``peak_extra_bytes`` (the drafter's ``peak_bytes`` less the baseline's) and ``memory`` (the
    engine's ``spec_stats.memory`` less its peak: ``budget``, the ``config`` chosen under it and its
    analytic ``extra_bytes``). The harness
    (``specdec.bench.core``) adds ``batch_index``, ``first_call`` (the method's first, compiling call:
    ``{seconds, prompts, graphs, compiles}``, or null without a warm-up) and ``captures`` (graphs
    captured and frames compiled during this row's timed calls), for the drafter and in
    ``baseline``. Times are in seconds.
    """
    greedy = identity["mode"] == "greedy"
    divergence = first_divergence(drafted.output_ids, base.output_ids) if greedy else None
    row = identity | {
        "question_id": prompt.question_id, "category": prompt.category, "num_turns": len(prompt.turns),
        "prompt_tokens": drafted.prompt_tokens,
        "new_tokens": drafted.new_tokens, "steps": drafted.steps, "tau": drafted.tau,
        "draft_tokens": drafted.draft_tokens, "acceptance_rate": drafted.acceptance_rate,
        "accept_hist": drafted.histogram(),
        "wall_time": drafted.wall_time, "tokens_per_s": drafted.tokens_per_s,
        "times": drafted.times, "lossless": drafted.lossless, "undrafted_steps": drafted.undrafted_steps,
        "idle_steps": drafted.idle_steps,
        "turn_new_tokens": drafted.turn_new_tokens, "turn_steps": drafted.turn_steps, "turn_tau": drafted.turn_tau,
        "turn_wall_time": drafted.turn_wall_time, "turn_tokens_per_s": drafted.turn_tokens_per_s,
        "turn_speedup": [_ratio(a, b) for a, b in zip(drafted.turn_tokens_per_s, base.turn_tokens_per_s)],
        "peak_bytes": drafted.peak_bytes, "memory": drafted.memory,
        "peak_extra_bytes": (drafted.peak_bytes - base.peak_bytes
                             if drafted.peak_bytes is not None and base.peak_bytes is not None else None),
        "baseline": row_timing(base),
        "speedup": _ratio(drafted.tokens_per_s, base.tokens_per_s),
        "matches_baseline": divergence is None if greedy else None,
        "first_divergence": divergence,
        "divergence": None,
        "output_ids": drafted.output_ids,
        "hf_matches_baseline": {name: first_divergence(other.output_ids, base.output_ids) is None
                                for name, other in hf.items()} if greedy and hf else None,
    }
    for name in HF_METHODS:
        other = hf.get(name)
        row[name] = row_timing(other) if other else None
        row["speedup_" + name] = _ratio(drafted.tokens_per_s, other.tokens_per_s) if other else None
    return row


def drafter_name(spec: Mapping | None) -> str:
    """A short name for a drafter mapping: its ``name`` key, else the class its ``_target_`` names.

    Example:
        drafter_name({"_target_": "specdec.drafters.DraftModel.from_pretrained"})  # "DraftModel"
        drafter_name({"name": "lookup", "num_tokens": 8})                           # "lookup"
    """
    if not spec:
        return "none"
    if spec.get("name"):
        return str(spec["name"])
    target = spec.get("_target_")
    if not target:
        return "none"
    parts = str(target).split(".")
    return next((p for p in reversed(parts) if p[:1].isupper()), parts[-1])


def drafter_params(spec: Mapping | None) -> dict:
    """The drafter settings that distinguish sweep points (without dtype and device)."""
    return {k: v for k, v in (spec or {}).items() if k not in _LABEL_SKIP}


def row_timing(d: Decoded) -> dict:
    """A reference method's (baseline or HF) side of a row."""
    return {"new_tokens": d.new_tokens, "steps": d.steps, "idle_steps": d.idle_steps, "wall_time": d.wall_time,
            "tokens_per_s": d.tokens_per_s, "times": d.times, "turn_new_tokens": d.turn_new_tokens,
            "turn_wall_time": d.turn_wall_time, "turn_tokens_per_s": d.turn_tokens_per_s,
            "peak_bytes": d.peak_bytes, "output_ids": d.output_ids}


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None

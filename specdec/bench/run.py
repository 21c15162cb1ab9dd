"""One benchmark run: baseline, drafter and HF's own methods on the same prompts, then rows and reports.

``run_bench(cfg, out_dir)`` is the plain function (tests call it); ``hydra_main`` is the thin
``specdec-bench`` entry point around it, and ``CollectCallback`` builds the sweep table when a
Hydra multirun ends.
"""
from __future__ import annotations

import json
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

import specdec
from specdec.bench.measure import Decoded, decode, divergence_gap, engine_method, first_divergence, hf_method
from specdec.bench.prompts import Prompt, render, select
from specdec.bench.report import (HF_LABELS, HF_METHODS, aggregate, by_category, collect, fmt, format_params,
                                  plot_accepted_lengths, run_markdown, write_rows)
from specdec.cli import resolve_model_cfg
from specdec.drafters import build_drafter
from specdec.perf import step_floor

MODES = ("greedy", "sample")
_LABEL_SKIP = ("_target_", "name", "dtype", "device")   # drafter keys that don't name a config
_MODELS: dict[tuple, tuple] = {}   # (spec, dtype, device) -> (model, tokenizer), reused across a multirun


def run_bench(cfg: DictConfig, out_dir: str | Path) -> dict[str, dict[str, dict]]:
    """Run one benchmark configuration and write its outputs into ``out_dir``.

    Writes ``rows.jsonl`` (one row per prompt and mode), ``summary.md`` and
    ``accepted_lengths.png``, and logs to wandb when ``cfg.logger.name == "wandb"``.
    Returns ``{mode: {category: aggregate}}``, with an ``"all"`` category.
    """
    bad_modes = set(cfg.modes) - set(MODES)
    if bad_modes or not cfg.modes:
        raise ValueError(f"modes: {sorted(bad_modes) or '[]'} not allowed; choose from {MODES}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads or threads)
    try:
        return _run(cfg, out_dir)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: DictConfig, out_dir: Path) -> dict[str, dict[str, dict]]:
    prompts = select(instantiate(cfg.prompts), cfg.num_prompts, cfg.categories)
    resolve_model_cfg(cfg)   # "auto" dtype and device become real values before interpolation
    model, tok = load_cached(cfg.model.spec, cfg.model.dtype, cfg.model.device)
    device = next(model.parameters()).device
    drafter = build_drafter(OmegaConf.to_container(cfg.drafter, resolve=True), target=model)
    compile_ = cfg.get("compile", False)   # a bool, or a mapping of Inductor options
    compile_ = OmegaConf.to_container(compile_) if OmegaConf.is_dict(compile_) else bool(compile_)
    fast = {"cuda_graphs": bool(cfg.get("cuda_graphs", False)), "compile": compile_,
            "pipeline": cfg.get("pipeline"), "cache_len": cfg.get("cache_len")}
    baseline = specdec.wrap(model, drafter=None, **fast)
    spec = (specdec.wrap(model, drafter=drafter, max_draft_batch=cfg.get("max_draft_batch"),
                         min_tau=cfg.get("min_tau"), **fast)
            if drafter is not None else None)

    identity = {"model": cfg.model.spec, "dtype": str(model.dtype).removeprefix("torch."), "device": str(device),
                "drafter": drafter_name(cfg.drafter), "params": drafter_params(cfg.drafter),
                "batch_size": cfg.batch_size, "max_new_tokens": cfg.max_new_tokens,
                "max_draft_batch": cfg.get("max_draft_batch"), "min_tau": cfg.get("min_tau")}
    label = " ".join(filter(None, (identity["drafter"], format_params(identity["params"]))))
    batches = [prompts[i: i + cfg.batch_size] for i in range(0, len(prompts), cfg.batch_size)]
    eos = model.generation_config.eos_token_id
    eos = tok.eos_token_id if eos is None else eos
    common = {"max_new_tokens": cfg.max_new_tokens, "eos_token_id": eos, "pad_token_id": tok.pad_token_id}
    notes = []
    if fast["cuda_graphs"]:  # every cache bucket captured (and compiled) before anything is timed
        longest = max_length(prompts, tok, cfg.max_new_tokens)
        for wrapped in filter(None, (baseline, spec)):
            wrapped.engine.reserve(cfg.batch_size, longest)
    # HF's other decoding methods, as more reference points (greedy only; HF runs them at batch 1).
    hf_others = {}
    if cfg.get("hf_lookup"):
        hf_others["hf_lookup"] = {"prompt_lookup_num_tokens": int(cfg.hf_lookup)}
    if cfg.get("hf_assistant"):
        hf_others["hf_assisted"] = {"assistant_model": load_cached(cfg.hf_assistant, cfg.model.dtype,
                                                                   cfg.model.device)[0]}
    if hf_others and cfg.batch_size > 1:
        notes.append(f"{' and '.join(HF_LABELS[k] for k in hf_others)} skipped (batch {cfg.batch_size}): "
                     "HF runs them at batch size 1 only.")
        hf_others = {}

    rows: list[dict] = []
    hf: dict[str, dict[int, list[Decoded]]] = {}   # method -> batch index -> HF results, measured once
    profiles: dict[str, dict] = {}
    bar = tqdm(total=len(batches) * len(cfg.modes), desc=label, disable=not cfg.progress)
    for mode in cfg.modes:
        sampling = {} if mode == "greedy" else dict(OmegaConf.to_container(cfg.sampling))
        kwargs = common | {"do_sample": mode == "sample", **sampling}
        base_method = engine_method(baseline, **kwargs)
        spec_method = engine_method(spec, **kwargs) if spec else None
        hf_methods = {}
        if "hf" not in hf and cfg.hf_baseline:
            hf_methods["hf"] = hf_method(model, **common, do_sample=False)
        if mode == "greedy" and not any(k in hf for k in hf_others):
            hf_methods |= {k: hf_method(model, **common, do_sample=False, **extra) for k, extra in hf_others.items()}
        settings = {"mode": mode, "temperature": sampling.get("temperature"),
                    "top_p": sampling.get("top_p"), "top_k": sampling.get("top_k")}
        for method in (base_method, spec_method, *hf_methods.values()):
            for batch in batches[: cfg.warmup] if method else ():
                decode(method, batch, tok, device, seed=cfg.seed)
        # Per batch: baseline, then drafter, then HF, so load on a shared machine hits all alike.
        for b, batch in enumerate(batches):
            seed = cfg.seed + 1000 * b
            base = decode(base_method, batch, tok, device, seed)
            if hasattr(drafter, "task"):  # drafters that keep per-task state (Swift's skip sets)
                drafter.task = batch[0].category
            drafted = decode(spec_method, batch, tok, device, seed) if spec_method else base
            for name, method in hf_methods.items():
                hf.setdefault(name, {})[b] = decode(method, batch, tok, device, seed)
            for i, prompt in enumerate(batch):
                row = make_row(identity | settings, prompt, drafted[i], base[i],
                               {name: res[b][i] for name, res in hf.items() if name == "hf" or mode == "greedy"})
                if row["first_divergence"] is not None and cfg.get("check_divergences", True):
                    row["divergence"] = divergence_gap(model, tok, prompt, base[i], drafted[i],
                                                       row["first_divergence"], device)
                rows.append(row)
            so_far = aggregate([r for r in rows if r["mode"] == mode])
            bar.set_postfix_str(f"{mode} τ {fmt(so_far['tau'])} × baseline {fmt(so_far['speedup'])}")
            bar.update()
        if mode == "greedy" and fast["cuda_graphs"]:  # where a captured step's device time goes
            for name, wrapped in (("baseline", baseline), ("drafter", spec)):
                if wrapped is not None and (ms := wrapped.engine.step_profile()):
                    profiles[name] = ms
    bar.close()
    if profiles:
        context = max(sum(r["prompt_tokens"]) // len(r["prompt_tokens"]) for r in rows) + cfg.max_new_tokens // 2
        floor = step_floor(model, batch=cfg.batch_size, context=context)
        profiles["floor_ms"] = floor.ms
        (out_dir / "step_profile.json").write_text(json.dumps(profiles, indent=1), encoding="utf-8")

    write_rows(rows, out_dir / "rows.jsonl")
    gpu = f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    header = [(f"Model `{identity['model']}` ({identity['dtype']}, {identity['device']}{gpu}), "
               f"{len(prompts)} prompts, batch {cfg.batch_size}, max_new_tokens {cfg.max_new_tokens}; "
               f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads."), *notes]
    if profiles:
        header.append(step_profile_line(profiles))
    if cfg.batch_size > 1:
        header.append("At batch > 1 each prompt is charged an equal share of its batch's time: the "
                      "**all** rows are exact throughput, per-category speeds are approximate.")
    title = f"specdec-bench: {label}"
    (out_dir / "summary.md").write_text(run_markdown(rows, title, header), encoding="utf-8")
    plot_accepted_lengths(rows, out_dir / "accepted_lengths.png", title)
    summary = {mode: by_category([r for r in rows if r["mode"] == mode]) for mode in cfg.modes}
    if cfg.logger.name == "wandb":
        log_wandb(cfg, out_dir, rows, summary, label)
    return summary


def make_row(identity: dict, prompt: Prompt, drafted: Decoded, base: Decoded, hf: dict[str, Decoded]) -> dict:
    """One JSONL row: a prompt's result under one mode, with its baseline (and HF) beside it.

    Keys: the run identity (``model dtype device drafter params batch_size max_new_tokens
    max_draft_batch min_tau mode temperature top_p top_k``); ``question_id category num_turns
    prompt_tokens``; the drafter's ``new_tokens steps tau draft_tokens acceptance_rate accept_hist
    wall_time tokens_per_s times lossless undrafted_steps``, where ``accept_hist[k]`` counts steps
    that emitted k tokens and ``undrafted_steps`` this row's own steps that the draft policies
    (``max_draft_batch``, ``min_tau``) ran without a draft; per turn (lists, one entry a turn) ``turn_new_tokens turn_steps
    turn_tau turn_wall_time turn_tokens_per_s turn_speedup``; ``baseline``, and ``hf``,
    ``hf_lookup``, ``hf_assisted`` (HF greedy, prompt lookup and assisted generation, each null
    when not run), with ``new_tokens steps wall_time tokens_per_s times turn_new_tokens
    turn_wall_time turn_tokens_per_s``; ``speedup``, ``speedup_hf``, ``speedup_hf_lookup`` and
    ``speedup_hf_assisted`` (tokens/s ratios); and, for greedy rows, ``matches_baseline``,
    ``first_divergence`` (``{"turn", "index"}`` or null), ``divergence`` (null, or the target's
    top-2 logit gap there: see ``measure.divergence_gap``) and ``hf_matches_baseline`` (``{HF
    method: its output equals the baseline's}`` over the HF methods that ran, or null). Times are
    in seconds.
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
        "turn_new_tokens": drafted.turn_new_tokens, "turn_steps": drafted.turn_steps, "turn_tau": drafted.turn_tau,
        "turn_wall_time": drafted.turn_wall_time, "turn_tokens_per_s": drafted.turn_tokens_per_s,
        "turn_speedup": [_ratio(a, b) for a, b in zip(drafted.turn_tokens_per_s, base.turn_tokens_per_s)],
        "baseline": _timing(base),
        "speedup": _ratio(drafted.tokens_per_s, base.tokens_per_s),
        "matches_baseline": divergence is None if greedy else None,
        "first_divergence": divergence,
        "divergence": None,
        "hf_matches_baseline": {name: first_divergence(other.output_ids, base.output_ids) is None
                                for name, other in hf.items()} if greedy and hf else None,
    }
    for name in HF_METHODS:
        other = hf.get(name)
        row[name] = _timing(other) if other else None
        row["speedup_" + name] = _ratio(drafted.tokens_per_s, other.tokens_per_s) if other else None
    return row


def max_length(prompts: list[Prompt], tokenizer, max_new_tokens: int) -> int:
    """An upper bound on any call's prompt plus new tokens: every turn rendered with answers of
    ``max_new_tokens`` tokens (placeholder text a little longer than that)."""
    filler = " x" * (max_new_tokens + 8)
    longest = 0
    for p in prompts:
        text = render(tokenizer, p.turns, [filler] * (len(p.turns) - 1))
        longest = max(longest, len(tokenizer(text, add_special_tokens=False)["input_ids"]))
    return longest + max_new_tokens + 16


def step_profile_line(profiles: dict) -> str:
    """The summary's line on where a captured step's device time goes, beside the bandwidth floor."""
    parts = []
    for name in ("baseline", "drafter"):
        if name in profiles:
            ms = profiles[name]
            parts.append(f"{name} " + ", ".join(f"{k} {v:.3f}" for k, v in ms.items())
                         + f" (= {sum(ms.values()):.3f})")
    floor = profiles.get("floor_ms")
    return ("Device ms per step, by phase (each phase captured and replayed alone): " + "; ".join(parts)
            + (f"; memory-bandwidth floor {floor:.3f} ms." if floor else "."))


def load_cached(spec: str, dtype, device):
    """``specdec.load_model``, loaded once per process so a multirun does not reload weights."""
    key = (spec, str(dtype), str(device))
    if key not in _MODELS:
        model, tok = specdec.load_model(spec, dtype=dtype, device=device)
        tok.padding_side = "left"
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        _MODELS[key] = (model.eval(), tok)
    return _MODELS[key]


def drafter_name(cfg_drafter: DictConfig | None) -> str:
    """A short name for a drafter config: its ``name`` key, else the class its ``_target_`` names.

    Example:
        drafter_name({"_target_": "specdec.drafters.DraftModel.from_pretrained"})  # "DraftModel"
    """
    if not cfg_drafter:
        return "none"
    if cfg_drafter.get("name"):
        return str(cfg_drafter.name)
    target = cfg_drafter.get("_target_")
    if not target:
        return "none"
    parts = str(target).split(".")
    return next((p for p in reversed(parts) if p[:1].isupper()), parts[-1])


def drafter_params(cfg_drafter: DictConfig | None) -> dict:
    """The drafter settings that distinguish sweep points (resolved, without dtype and device)."""
    if not cfg_drafter:
        return {}
    params = OmegaConf.to_container(cfg_drafter, resolve=True)
    return {k: v for k, v in params.items() if k not in _LABEL_SKIP}


def log_wandb(cfg: DictConfig, out_dir: Path, rows: list[dict], summary: dict, name: str) -> None:
    """Log the run's config, per-category metrics, rows table and histogram to wandb."""
    import wandb

    log = cfg.logger
    run = wandb.init(project=log.project, entity=log.entity, mode=log.mode, tags=list(log.tags),
                     name=log.run_name or name, job_type="bench", dir=str(out_dir),
                     config=OmegaConf.to_container(cfg, resolve=True))
    for mode, cats in summary.items():
        for category, agg in cats.items():
            for metric in ("tau", "alpha", "tokens_per_s", "baseline_tokens_per_s", "speedup", "undrafted_steps",
                           *(f"speedup_{name}" for name in HF_METHODS)):
                if agg[metric] is not None:
                    run.summary[f"{mode}/{category}/{metric}"] = agg[metric]
    columns = ["mode", "question_id", "category", "new_tokens", "steps", "tau", "acceptance_rate",
               "tokens_per_s", "speedup", "speedup_hf", "matches_baseline"]
    table = wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in rows])
    run.log({"rows": table, "accepted_lengths": wandb.Image(str(out_dir / "accepted_lengths.png"))})
    run.finish()


class CollectCallback(Callback):
    """At the end of a Hydra multirun, write the sweep's ``summary.md`` and ``sweep.png``."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        collect(config.hydra.sweep.dir)


@hydra.main(config_path="pkg://specdec.conf", config_name="bench", version_base=None)
def hydra_main(cfg: DictConfig) -> None:
    run_bench(cfg, HydraConfig.get().runtime.output_dir)


def _timing(d: Decoded) -> dict:
    return {"new_tokens": d.new_tokens, "steps": d.steps, "wall_time": d.wall_time,
            "tokens_per_s": d.tokens_per_s, "times": d.times, "turn_new_tokens": d.turn_new_tokens,
            "turn_wall_time": d.turn_wall_time, "turn_tokens_per_s": d.turn_tokens_per_s}


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None

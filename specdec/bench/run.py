"""``specdec-bench``: the Hydra layer over the harness (``specdec.bench.core``).

``run_bench(cfg, out_dir)`` turns a composed ``conf/bench.yaml`` into ``BenchSettings`` and one
prompt list, runs the core, and logs to wandb when ``cfg.logger.name == "wandb"``; ``hydra_main``
is the entry point around it, and ``CollectCallback`` builds the sweep table when a Hydra
multirun ends. Everything measured is measured by the core.
"""
from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from specdec.bench import core
from specdec.bench.prompts import select
from specdec.bench.report import HF_METHODS, collect
from specdec.cli import resolve_model_cfg

# Keys of conf/bench.yaml that BenchSettings takes as they are.
_PLAIN = ("max_new_tokens", "warmup", "seed", "threads", "cache_len", "max_draft_batch", "min_tau", "hf_baseline",
          "hf_lookup", "hf_assistant", "check_divergences", "progress")


def bench_settings(cfg: DictConfig) -> core.BenchSettings:
    """The core's settings for one composed config: its one drafter at its one batch size."""
    resolve_model_cfg(cfg)   # "auto" dtype and device become real values before interpolation
    compile_ = cfg.get("compile", False)   # a bool, or a mapping of Inductor options
    compile_ = OmegaConf.to_container(compile_) if OmegaConf.is_dict(compile_) else bool(compile_)
    drafter = OmegaConf.to_container(cfg.drafter, resolve=True) if cfg.drafter else {"name": "none"}
    return core.BenchSettings(
        model=cfg.model.spec, dtype=cfg.model.dtype, device=cfg.model.device, drafters=(drafter,),
        batch_sizes=(cfg.batch_size,), modes=tuple(cfg.modes), sampling=OmegaConf.to_container(cfg.sampling),
        cuda_graphs=bool(cfg.get("cuda_graphs", False)), compile=compile_, pipeline=cfg.get("pipeline"),
        chunk_steps=cfg.get("chunk_steps"), **{k: cfg.get(k) for k in _PLAIN if k in cfg})


PROMPT_LOADERS = ("specdec.bench.prompts.builtin", "specdec.bench.prompts.humaneval",
                  "specdec.bench.prompts.specbench", "specdec.bench.long_prompts.long_prompts")


def load_prompts(prompts_cfg):
    """The prompts a ``prompts`` config names. Its ``_target_`` must be one of `PROMPT_LOADERS`
    (checked before anything is imported), so a config cannot run arbitrary code."""
    target = prompts_cfg.get("_target_") if hasattr(prompts_cfg, "get") else None
    if target not in PROMPT_LOADERS:
        raise ValueError(f"prompts._target_ {target!r} is not a prompt loader, so it was not imported or called; "
                         f"use one of {', '.join(PROMPT_LOADERS)} (config group prompts=builtin|humaneval|"
                         f"specbench|long), or a jsonl file through prompts=specbench prompts.path=FILE")
    return instantiate(prompts_cfg)


def run_bench(cfg: DictConfig, out_dir: str | Path) -> dict[str, dict[str, dict]]:
    """Run one benchmark configuration and write its outputs into ``out_dir``.

    Writes ``rows.jsonl`` (one row per prompt and mode), ``summary.md`` and
    ``accepted_lengths.png``, and logs to wandb when ``cfg.logger.name == "wandb"``.
    Returns ``{mode: {category: aggregate}}``, with an ``"all"`` category.
    """
    settings = bench_settings(cfg)
    prompts = select(load_prompts(cfg.prompts), cfg.num_prompts, cfg.categories)
    result = core.run(settings, prompts, out_dir)
    (label, summary), = result.summary.items()
    if cfg.logger.name == "wandb":
        log_wandb(cfg, Path(out_dir), result.rows, summary, label)
    return summary


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
    logged = {"rows": table}
    if (out_dir / "accepted_lengths.png").exists():
        logged["accepted_lengths"] = wandb.Image(str(out_dir / "accepted_lengths.png"))
    run.log(logged)
    run.finish()


class CollectCallback(Callback):
    """At the end of a Hydra multirun, write the sweep's ``summary.md`` and ``sweep.png``."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        collect(config.hydra.sweep.dir)
        print(f"specdec-bench: sweep summary in {Path(config.hydra.sweep.dir) / 'summary.md'}", flush=True)


@hydra.main(config_path="pkg://specdec.conf", config_name="bench", version_base=None)
def hydra_main(cfg: DictConfig) -> None:
    run_bench(cfg, HydraConfig.get().runtime.output_dir)


__all__ = ["CollectCallback", "bench_settings", "hydra_main", "log_wandb", "run_bench"]

"""Where training metrics go: ``metrics.jsonl`` in the output folder always, and wandb if asked.

wandb runs offline by default and keeps its run files under ``<output_dir>/wandb``; a resumed
training run continues the same wandb run. ``logger.name: none`` turns wandb off. On resume,
``rewind`` cuts ``metrics.jsonl`` back to the resumed step, so no step appears twice.
"""
import json
import os
import uuid
import warnings
from pathlib import Path


class Tracker:
    """Append-only metrics sink for the main process."""

    def __init__(self, logger_cfg, config: dict, output_dir: Path):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.run = None
        if logger_cfg.name == "wandb":
            self.run = _start_wandb(logger_cfg, config, Path(output_dir))
        elif logger_cfg.name != "none":
            raise ValueError(f"unknown logger {logger_cfg.name!r}; use wandb or none")

    def rewind(self, step: int) -> None:
        """Drop the rows a resumed run will log again: those after ``step``, or all of them when
        training starts from scratch (step 0, whose evaluation is logged again). A row cut short
        by a kill is dropped with a warning."""
        if not self.path.exists():
            return
        kept, torn = [], 0
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                torn += 1
                continue
            if step and row.get("step", 0) <= step:
                kept.append(line + "\n")
        if torn:
            warnings.warn(f"{self.path}: dropped {torn} unreadable row(s), cut short by a kill", stacklevel=2)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, self.path)

    def log(self, metrics: dict, step: int) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.run is not None:
            self.run.log({k: v for k, v in metrics.items() if v is not None}, step=step)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()


def _start_wandb(logger_cfg, config: dict, output_dir: Path):
    import wandb

    id_file = output_dir / "wandb_run_id"
    run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
    id_file.write_text(run_id)
    return wandb.init(project=logger_cfg.project, entity=logger_cfg.get("entity"), name=logger_cfg.get("run_name"),
                      tags=list(logger_cfg.get("tags") or []), mode=logger_cfg.mode, dir=str(output_dir),
                      id=run_id, resume="allow", config=config)

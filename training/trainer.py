"""The training loop every method shares: accelerate, data, optimizer, evaluation, checkpoints.

One optimizer step, on every process:

    for each of grad_accum micro-batches:
        batch <- this process's share of global micro-batch i  (the method's `micro_batch`)
        loss  <- the method's `loss(batch)`
        backward  (accelerate averages gradients across processes on the last micro-batch)
    clip, optimizer step, learning-rate schedule

The main process evaluates before training, every ``eval.every`` steps and after the last step
(the method's `evaluate`). Every ``save_every`` steps all processes write a checkpoint (model,
optimizer, scheduler, RNG states; safetensors and JSON, never pickle: see `checkpoint`) that
``resume`` picks up, passing over any a kill left incomplete; at the end the method saves its
output folder. A method is a subclass that fills in the hooks below; the trainer takes a plain
config object and never imports Hydra.
"""
import json
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed
from tqdm.auto import tqdm
from transformers import get_scheduler

from . import checkpoint
from .data import Batch, load_examples, split_examples
from .evaluate import generate_responses
from .models import load_model, resolve_dtype
from .trackers import Tracker


@dataclass
class TrainResult:
    output_dir: Path
    draft_dir: Path   # what the method saved: an HF/PEFT draft folder, or a speculators head folder
    steps: int        # optimizer steps done
    world_size: int   # processes that trained
    before: dict      # first evaluation (the method's eval/* metrics)
    after: dict       # last evaluation, same keys


class Trainer:
    """Holds the target, data, trained module and optimizer of one run; `run` trains.

    Hooks for a method: `check_method` (fail on a bad choice before any model loads),
    `prepare_data` (after the prompts are split), `build_model` (the module to train),
    `micro_batch`, `loss`, `evaluate` and `save_output`.
    """
    label = "train"            # tqdm's description
    output_name = "draft"      # the folder under output_dir that `save_output` writes
    progress_key = None        # an eval metric shown beside the loss in the progress bar

    def __init__(self, cfg):
        self.cfg, self.method = cfg, cfg.method
        self.check_method()
        use_gpu = torch.cuda.is_available() and str(cfg.model.get("device") or "") != "cpu"
        self.acc = Accelerator(gradient_accumulation_steps=cfg.grad_accum, cpu=not use_gpu,
                               mixed_precision="bf16" if use_gpu and cfg.bf16 else "no",
                               step_scheduler_with_optimizer=False)
        set_seed(cfg.seed)
        if cfg.output_dir is None:
            raise ValueError("output_dir is not set")
        self.output_dir = Path(broadcast_object_list([str(cfg.output_dir)])[0])  # one folder for all ranks
        device = self.acc.device
        self.target, self.tokenizer = load_model(str(cfg.model.spec), device=device,
                                                 dtype=resolve_dtype(cfg.model.get("dtype"), device))
        self.target.eval().requires_grad_(False)
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.eos_token_id
        self.eos_ids = _eos_ids(self.target, self.tokenizer)
        with self.acc.main_process_first():
            examples = load_examples(cfg.data, self.tokenizer)
        self.train_set, self.eval_set = split_examples(examples, cfg.data.eval_size, cfg.seed)
        self.prepare_data()
        self._setup_optimizer(self.build_model())
        self.eval_batches = self._eval_batches() if self.acc.is_main_process else []
        self.before: dict = {}  # the first evaluation
        self.after: dict = {}   # the latest evaluation

    def _setup_optimizer(self, model: torch.nn.Module) -> None:
        optim = self.cfg.optim
        if optim.name != "adamw":
            raise ValueError(f"unknown optimizer {optim.name!r}; use adamw")
        self.params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(self.params, lr=optim.lr, betas=tuple(optim.betas),
                                      weight_decay=optim.weight_decay)
        self.scheduler = get_scheduler(optim.schedule, optimizer, num_warmup_steps=optim.warmup_steps,
                                       num_training_steps=self.cfg.steps)
        self.model, self.optimizer = self.acc.prepare(model, optimizer)  # the scheduler is ours to save

    def _eval_batches(self) -> list[Batch]:
        """Held-out prompts with the target's greedy responses, generated once."""
        size, ev = self.cfg.eval.batch_size, self.cfg.eval
        prompts = [e.prompt for e in self.eval_set]
        with self.acc.autocast():
            return [generate_responses(self.target, prompts[i:i + size], self.pad_id, self.eos_ids,
                                       ev.max_new_tokens).to("cpu") for i in range(0, len(prompts), size)]

    # ---- hooks ------------------------------------------------------------------------------
    def check_method(self) -> None:
        """Raise on a misspelt method choice, before any model loads."""

    def prepare_data(self) -> None:
        """Runs once the prompts are split and before `build_model` (e.g. to generate responses)."""

    def build_model(self) -> torch.nn.Module:
        raise NotImplementedError

    def micro_batch(self, index: int) -> Batch:
        """Global micro-batch ``index`` for this process."""
        raise NotImplementedError

    def loss(self, batch: Batch) -> torch.Tensor:
        raise NotImplementedError

    def evaluate(self) -> dict:
        """Metrics on the held-out batches (main process; others return {})."""
        raise NotImplementedError

    def save_output(self, path: Path) -> None:
        """Save the trained result to ``path`` (main process only)."""
        raise NotImplementedError

    # ---- checkpoints ------------------------------------------------------------------------
    def checkpoint_dir(self, step: int) -> Path:
        return self.output_dir / "checkpoints" / f"step-{step:07d}"

    def save_checkpoint(self, step: int) -> None:
        """Write the step's checkpoint (see `checkpoint`): in a temporary folder, renamed when complete."""
        acc, final = self.acc, self.checkpoint_dir(step)
        tmp = checkpoint.temp_dir(final)
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a kill mid-write
            tmp.mkdir(parents=True)
            checkpoint.save_shared(tmp, acc.unwrap_model(self.model), self.optimizer, self.scheduler)
        acc.wait_for_everyone()
        checkpoint.save_rng(tmp, acc.process_index)
        acc.wait_for_everyone()
        if acc.is_main_process:
            state = {"step": step, "accelerator_step": acc.step, "world_size": acc.num_processes,
                     "before": self.before, "after": self.after}
            checkpoint.seal(tmp, final, state)
            older = [p for p in _checkpoints(self.output_dir) if _step_of(p) <= step]
            for old in older[:-max(1, self.cfg.keep_checkpoints)]:
                shutil.rmtree(old)
        acc.wait_for_everyone()

    def resume(self) -> int:
        """Load the checkpoint named by ``cfg.resume``; the step to go on from.

        ``auto`` takes the latest complete checkpoint in ``output_dir``, warning about (and passing
        over) any newer one a kill left incomplete; a named folder must be complete.
        """
        choice = self.cfg.resume
        if not choice:
            return 0
        if choice == "auto":
            path = _latest_complete(self.output_dir)
            if path is None:
                return 0
        else:
            path = Path(choice)
            if bad := checkpoint.problem(path):
                raise ValueError(f"resume={choice}: not a complete checkpoint: {bad}")
        saved_world = checkpoint.world_size(path)
        if saved_world != self.acc.num_processes:
            raise ValueError(f"checkpoint {path} was written by {saved_world} process(es) and this run has "
                             f"{self.acc.num_processes}; resume with the same number, or set resume=null")
        state = checkpoint.load(path, self.acc.unwrap_model(self.model), self.optimizer, self.scheduler,
                                self.acc.process_index)
        self.acc.step = state["accelerator_step"]
        self.before, self.after = state["before"], state["after"]
        return state["step"]

    # ---- the loop ---------------------------------------------------------------------------
    def train_step(self, step: int) -> float:
        """One optimizer step (``grad_accum`` micro-batches); the loss averaged over processes."""
        cfg, acc = self.cfg, self.acc
        losses = []
        for micro in range(cfg.grad_accum):
            batch = self.micro_batch(step * cfg.grad_accum + micro).to(acc.device)
            with acc.accumulate(self.model):
                loss = self.loss(batch)
                acc.backward(loss)
                if acc.sync_gradients and cfg.optim.max_grad_norm:
                    acc.clip_grad_norm_(self.params, cfg.optim.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad()
            losses.append(loss.detach())
        self.scheduler.step()
        return acc.reduce(torch.stack(losses).mean(), reduction="mean").item()

    def run(self) -> TrainResult:
        cfg, acc = self.cfg, self.acc
        tracker = Tracker(cfg.logger, _plain(cfg), self.output_dir) if acc.is_main_process else None
        step = self.resume()
        if tracker:
            tracker.rewind(step)  # rows a killed run logged after its last checkpoint come again
        if step == 0:
            self.before = self.after = self.evaluate()
            if tracker:
                tracker.log(self.before, step=0)
        bar = tqdm(total=cfg.steps, initial=step, desc=self.label, disable=not acc.is_main_process)
        while step < cfg.steps:
            mean_loss = self.train_step(step)
            step += 1
            metrics = {"train/loss": mean_loss, "train/lr": self.scheduler.get_last_lr()[0]}
            if step == cfg.steps or (cfg.eval.every and step % cfg.eval.every == 0):
                self.after = self.evaluate()
                metrics.update(self.after)
            if tracker:
                tracker.log(metrics, step=step)
            bar.update(1)
            shown = self.after.get(self.progress_key) if self.progress_key else None
            bar.set_postfix({"loss": f"{mean_loss:.4f}", **({self.progress_key: f"{shown:.3f}"} if shown else {})})
            if cfg.save_every and step % cfg.save_every == 0:
                self.save_checkpoint(step)
        bar.close()
        return self._finish(step, tracker)

    def _finish(self, step: int, tracker) -> TrainResult:
        acc, out = self.acc, self.output_dir / self.output_name
        if acc.is_main_process:
            self.save_output(out)
            (self.output_dir / "result.json").write_text(json.dumps(
                {"steps": step, "world_size": acc.num_processes, "before": self.before, "after": self.after}, indent=2))
            tracker.finish()
        before, after = broadcast_object_list([self.before, self.after])  # every rank returns the same
        return TrainResult(self.output_dir, out, step, acc.num_processes, before, after)


def _eos_ids(model, tokenizer) -> list[int]:
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(ids))


def _checkpoints(output_dir: Path) -> list[Path]:
    """Checkpoint folders (complete or not), oldest first; temporary ones are hidden and left out."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted((p for p in root.glob("step-*") if p.is_dir() and p.name[5:].isdigit()), key=_step_of)


def _step_of(path: Path) -> int:
    return int(path.name.removeprefix("step-"))


def _latest_complete(output_dir: Path) -> Path | None:
    """The newest complete checkpoint; each newer incomplete one gets a warning naming its fault."""
    found = _checkpoints(output_dir)
    for path in reversed(found):
        bad = checkpoint.problem(path)
        if bad is None:
            return path
        older = [p for p in found if _step_of(p) < _step_of(path)]
        then = f"falling back to {older[-1].name}" if older else "no earlier checkpoint; starting from step 0"
        warnings.warn(f"checkpoint {path} is incomplete ({bad}); {then}", CheckpointWarning, stacklevel=3)
    return None


class CheckpointWarning(UserWarning):
    """A checkpoint was passed over on resume because it is incomplete."""


def _plain(cfg) -> dict:
    """The config as plain containers, for logging."""
    try:
        from omegaconf import OmegaConf
    except ImportError:
        return dict(cfg)
    return OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)

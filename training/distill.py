"""DistillSpec (Zhou et al. 2023): train a draft model to match its target token by token.

One optimizer step, on every process:

    for each of grad_accum micro-batches:
        prompts   <- this process's share of the next batch of training prompts
        responses <- sampled by the draft with probability λ (on-policy), else by the target,
                     else the data's fixed responses
        loss      <- mean D(p_target, q_draft) over the response tokens only
        backward  (accelerate averages gradients across processes on the last micro-batch)
    clip, optimizer step, learning-rate schedule

The main process measures α and τ on held-out prompts before training, every ``eval.every``
steps and after the last step. Every ``save_every`` steps all processes write a checkpoint that
``resume`` picks up. The trainer takes a plain config object; it never imports Hydra.
"""
import copy
import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed
from tqdm.auto import tqdm
from transformers import get_scheduler

from .data import Batch, batch_indices, fixed_batch, load_examples, split_examples
from .evaluate import generate_responses, measure_alignment, measure_tau, response_logits
from .losses import DIVERGENCES, divergence
from .models import add_lora, build_draft, is_peft, load_model, resolve_dtype, save_draft
from .trackers import Tracker


@dataclass
class TrainResult:
    output_dir: Path
    draft_dir: Path   # HF folder, or PEFT adapter folder; `load_draft` loads either
    steps: int        # optimizer steps done
    world_size: int   # processes that trained
    before: dict      # first evaluation: eval/alpha, greedy_match, divergence, tau, acceptance_rate
    after: dict       # last evaluation, same keys


class DistillTrainer:
    """Holds the models, data and optimizer of one run; `run` trains and returns a `TrainResult`."""

    def __init__(self, cfg):
        self.cfg, self.method = cfg, cfg.method
        _check_method(self.method)
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

        draft = build_draft(self.method.draft, self.target, device)
        if self.method.finetune == "lora":
            draft = add_lora(draft, self.method.lora)
        with self.acc.main_process_first():
            examples = load_examples(cfg.data, self.tokenizer)
        self.train_set, self.eval_set = split_examples(examples, cfg.data.eval_size, cfg.seed)

        optim = cfg.optim
        if optim.name != "adamw":
            raise ValueError(f"unknown optimizer {optim.name!r}; use adamw")
        self.params = [p for p in draft.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(self.params, lr=optim.lr, betas=tuple(optim.betas),
                                      weight_decay=optim.weight_decay)
        self.scheduler = get_scheduler(optim.schedule, optimizer, num_warmup_steps=optim.warmup_steps,
                                       num_training_steps=cfg.steps)
        self.draft, self.optimizer = self.acc.prepare(draft, optimizer)
        self.acc.register_for_checkpointing(self.scheduler)
        self.eval_batches = self._eval_batches() if self.acc.is_main_process else []
        self.before: dict = {}  # the first evaluation
        self.after: dict = {}   # the latest evaluation

    # ---- data -----------------------------------------------------------------------------
    def micro_batch(self, index: int) -> Batch:
        """Global micro-batch ``index`` for this process, with its responses (see module doc)."""
        cfg, resp = self.cfg, self.method.responses
        rank, world = self.acc.process_index, self.acc.num_processes
        picks = batch_indices(len(self.train_set), cfg.batch_size, index * world + rank, cfg.seed)
        examples = [self.train_set[i] for i in picks]
        on_policy = random.Random(cfg.seed * 1_000_003 + index).random() < resp.on_policy
        if not on_policy and resp.off_policy == "fixed":
            return fixed_batch(examples, self.pad_id, resp.max_new_tokens)
        model = self.acc.unwrap_model(self.draft) if on_policy else self.target
        torch.manual_seed(cfg.seed * 1_000_003 + index * world + rank)  # same samples after a resume
        with self.acc.autocast():
            return generate_responses(model, [e.prompt for e in examples], self.pad_id, self.eos_ids,
                                      resp.max_new_tokens, resp.do_sample, resp.temperature)

    def _eval_batches(self) -> list[Batch]:
        """Held-out prompts with the target's greedy responses, generated once."""
        size, ev = self.cfg.eval.batch_size, self.cfg.eval
        prompts = [e.prompt for e in self.eval_set]
        with self.acc.autocast():
            return [generate_responses(self.target, prompts[i:i + size], self.pad_id, self.eos_ids,
                                       ev.max_new_tokens).to("cpu") for i in range(0, len(prompts), size)]

    # ---- loss, evaluation, checkpoints ----------------------------------------------------
    def loss(self, batch: Batch) -> torch.Tensor:
        """Mean divergence between target and draft over the response tokens of ``batch``."""
        m = self.method
        keep = batch.response_mask.bool()                     # [B, R]
        with torch.no_grad():
            p_logits = response_logits(self.target, batch)[keep]  # [N, V]
        q_logits = response_logits(self.draft, batch)[keep]       # [N, V]
        return divergence(p_logits, q_logits, m.divergence, m.beta, m.temperature).mean()

    def evaluate(self) -> dict:
        """α, greedy agreement, divergence and τ of the current draft (main process; others get {})."""
        metrics = {}
        if self.acc.is_main_process and self.eval_batches:
            ev, m = self.cfg.eval, self.method
            draft = self.acc.unwrap_model(self.draft)
            with self.acc.autocast():
                a = measure_alignment(self.target, draft, self.eval_batches, m.divergence, m.beta, ev.temperature)
            metrics = {"eval/alpha": a.alpha, "eval/greedy_match": a.greedy_match, "eval/divergence": a.divergence}
            if ev.tau_prompts:
                plain = copy.deepcopy(draft).merge_and_unload() if is_peft(draft) else draft
                if plain.dtype != self.target.dtype:  # decode in the target's dtype (bf16 on a GPU)
                    plain = copy.deepcopy(plain).to(self.target.dtype)
                prompts = [e.prompt for e in self.eval_set[:ev.tau_prompts]]
                run = measure_tau(self.target, plain, prompts, ev.num_tokens, ev.tau_max_new_tokens)
                metrics.update({"eval/tau": run.tau, "eval/acceptance_rate": run.acceptance_rate})
            else:  # eval.tau_prompts=0 switches τ off
                metrics.update({"eval/tau": None, "eval/acceptance_rate": None})
        self.acc.wait_for_everyone()
        return metrics

    def checkpoint_dir(self, step: int) -> Path:
        return self.output_dir / "checkpoints" / f"step-{step:07d}"

    def save_checkpoint(self, step: int) -> None:
        path = self.checkpoint_dir(step)
        self.acc.save_state(str(path))  # model, optimizer, scheduler and each process's RNG
        if self.acc.is_main_process:
            state = {"step": step, "before": self.before, "after": self.after}
            (path / "trainer_state.json").write_text(json.dumps(state))
            for old in _checkpoints(self.output_dir)[:-max(1, self.cfg.keep_checkpoints)]:
                shutil.rmtree(old)
        self.acc.wait_for_everyone()

    def resume(self) -> int:
        """Load the checkpoint named by ``cfg.resume`` (``auto``: the latest one); the step to go on from."""
        choice = self.cfg.resume
        if not choice:
            return 0
        if choice == "auto":
            found = _checkpoints(self.output_dir)
            if not found:
                return 0
            path = found[-1]
        else:
            path = Path(choice)
        self.acc.load_state(str(path))
        state = json.loads((path / "trainer_state.json").read_text())
        self.before, self.after = state["before"], state["after"]
        return state["step"]

    # ---- the loop ---------------------------------------------------------------------------
    def run(self) -> TrainResult:
        cfg, acc = self.cfg, self.acc
        tracker = Tracker(cfg.logger, _plain(cfg), self.output_dir) if acc.is_main_process else None
        step = self.resume()
        if step == 0:
            self.before = self.after = self.evaluate()
            if tracker:
                tracker.log(self.before, step=0)
        bar = tqdm(total=cfg.steps, initial=step, desc="distill", disable=not acc.is_main_process)
        while step < cfg.steps:
            losses = []
            for micro in range(cfg.grad_accum):
                batch = self.micro_batch(step * cfg.grad_accum + micro).to(acc.device)
                with acc.accumulate(self.draft):
                    loss = self.loss(batch)
                    acc.backward(loss)
                    if acc.sync_gradients and cfg.optim.max_grad_norm:
                        acc.clip_grad_norm_(self.params, cfg.optim.max_grad_norm)
                    self.optimizer.step()
                    self.optimizer.zero_grad()
                losses.append(loss.detach())
            self.scheduler.step()
            step += 1
            mean_loss = acc.reduce(torch.stack(losses).mean(), reduction="mean").item()
            metrics = {"train/loss": mean_loss, "train/lr": self.scheduler.get_last_lr()[0]}
            if step == cfg.steps or (cfg.eval.every and step % cfg.eval.every == 0):
                self.after = self.evaluate()
                metrics.update(self.after)
            if tracker:
                tracker.log(metrics, step=step)
            bar.update(1)
            bar.set_postfix({"loss": f"{mean_loss:.4f}",
                             **({"alpha": f"{self.after['eval/alpha']:.3f}"} if self.after else {})})
            if cfg.save_every and step % cfg.save_every == 0:
                self.save_checkpoint(step)
        bar.close()

        draft_dir = self.output_dir / "draft"
        if acc.is_main_process:
            save_draft(acc.unwrap_model(self.draft), self.tokenizer, draft_dir, merge=self.method.lora.merge,
                       base_spec=self.method.draft.get("spec"))
            (self.output_dir / "result.json").write_text(json.dumps(
                {"steps": step, "world_size": acc.num_processes, "before": self.before, "after": self.after}, indent=2))
            tracker.finish()
        before, after = broadcast_object_list([self.before, self.after])  # every rank returns the same
        return TrainResult(self.output_dir, draft_dir, step, acc.num_processes, before, after)


def train_distill(cfg) -> TrainResult:
    """Run DistillSpec training as configured by ``cfg`` (the composed ``train.yaml``)."""
    return DistillTrainer(cfg).run()


def _check_method(method) -> None:
    """Fail before any model loads on a misspelt choice."""
    choices = {"finetune": (method.finetune, ("full", "lora")),
               "responses.off_policy": (method.responses.off_policy, ("target", "fixed")),
               "divergence": (method.divergence, DIVERGENCES)}
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ValueError(f"method.{key} must be one of {allowed}, got {value!r}")


def _eos_ids(model, tokenizer) -> list[int]:
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(ids))


def _checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints (their trainer_state.json written last), oldest first."""
    root = Path(output_dir) / "checkpoints"
    return sorted(p.parent for p in root.glob("step-*/trainer_state.json")) if root.is_dir() else []


def _plain(cfg) -> dict:
    """The config as plain containers, for logging."""
    try:
        from omegaconf import OmegaConf
    except ImportError:
        return dict(cfg)
    return OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)

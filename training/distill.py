"""DistillSpec (Zhou et al. 2023): train a draft model to match its target token by token.

Each micro-batch (the loop itself is `specdec.training.trainer.Trainer`'s):

    prompts   <- this process's share of the next batch of training prompts
    responses <- sampled by the draft with probability λ (on-policy), else by the target,
                 else the data's fixed responses
    loss      <- mean D(p_target, q_draft) over the response tokens only

The main process measures α and τ on held-out prompts before training, every ``eval.every``
steps and after the last step.
"""
import copy
import random
from pathlib import Path

import torch

from .data import Batch, batch_indices, fixed_batch
from .evaluate import generate_responses, measure_alignment, measure_tau, response_logits
from .losses import DIVERGENCES, divergence
from .models import add_lora, build_draft, is_peft, save_draft
from .trainer import TrainResult, Trainer


class DistillTrainer(Trainer):
    """DistillSpec on the shared `Trainer` loop; ``draft`` is the (accelerate-wrapped) draft model."""
    label = "distill"
    progress_key = "eval/alpha"

    def check_method(self) -> None:
        _check_method(self.method)

    def build_model(self) -> torch.nn.Module:
        draft = build_draft(self.method.draft, self.target, self.acc.device)
        return add_lora(draft, self.method.lora) if self.method.finetune == "lora" else draft

    @property
    def draft(self) -> torch.nn.Module:
        return self.model

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

    def save_output(self, path: Path) -> None:
        save_draft(self.acc.unwrap_model(self.draft), self.tokenizer, path, merge=self.method.lora.merge,
                   base_spec=self.method.draft.get("spec"))


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

"""Draft heads trained on the frozen target's own responses: `method=eagle` and `method=medusa`.

Data: the target answers every training prompt once (`responses.cached_responses`, token ids
only); each batch's hidden states and logits come from a fresh forward of the frozen target with
``output_hidden_states=True``.

Slots and depths. For a batch of columns 0..T-1, slot i (0 <= i < N = T-1) is a draft that
starts after the target has read column i; its depth-d prediction is the token at column i+d+2
(column i+1 is the target's own next token, the bonus token of a verification step). Its
teacher is p_d(i) = softmax(target logits at column i+d+1), restricted to the draft vocabulary
and renormalised when that is reduced; only response columns count.

- EAGLE (training-time test, EAGLE-3): depth 0 reads (fc(aux states at column i), token i+1);
  depth d reads (the head's own depth d-1 output state, token i+d+1), attending to the depth-0
  slots <= i and to its own chain (the same keys it would hold in its KV cache when drafting).
  Loss: Σ_d 0.8^d [CE(p_d, q_d) + feature_weight · smoothL1(norm(state_d), target's final
  normed hidden state at column i+d+1)] / Σ_d 0.8^d, with ``ttt_steps`` depths. The feature
  target is the state the target's LM head reads to predict the same token.
- Medusa: head d reads the target's final hidden state at column i; loss Σ_d decay^d CE(p_d, q_d)
  / Σ_d decay^d.

Evaluation (teacher-forced, greedy, on the held-out prompts' greedy responses): accept_d is the
share of slots whose depth-d argmax equals the target's argmax, among slots whose depths < d all
did; ``mean_accepted`` is the mean run of correct depths per slot (a chain's expected accepted
drafts per step, before the bonus token). With ``eval.tau_prompts`` > 0 the engine's real τ is
measured too: greedy decoding of that many held-out prompts with the head drafter
(`specdec.drafters.EagleHead` with ``eval.num_tokens``, or `specdec.drafters.MedusaHeads`).
"""
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from specdec.drafters.head_drafters import EagleHead, MedusaHeads
from specdec.drafters.heads import EagleHeadModel, HeadCache, MedusaHeadsModel, draft_vocab_from_counts

from .data import Batch, batch_indices, fixed_batch
from .evaluate import engine_tau
from .responses import cached_responses
from .trainer import TrainResult, Trainer


@dataclass
class TargetView:
    logits: Tensor   # [B, T, V] the target's logits, float32
    last: Tensor     # [B, T, H] its final hidden state (after the final norm: what its LM head reads)
    aux: Tensor | None  # [B, T, nA·H] its hidden states at the head's aux layers, concatenated (EAGLE)


@dataclass
class Unrolled:
    logits: list[Tensor]          # per depth d: [B, N, Vd] the head's logits for column i+d+2
    features: list[Tensor] | None  # per depth d: [B, N, H] normed output state (EAGLE), else None


def shifted(x: Tensor, shift: int, n: int) -> Tensor:
    """x[:, shift : shift + n] for x [B, T, ...], zero-padded past T: [B, n, ...]."""
    part = x[:, shift:shift + n]
    missing = n - part.shape[1]
    if missing <= 0:
        return part
    return torch.cat([part, part.new_zeros((part.shape[0], missing, *part.shape[2:]))], dim=1)


def ttt_mask(key_valid: Tensor, depth: int) -> Tensor:
    """Training-time-test attention at ``depth``: [B, 1, N, (depth + 1)·N] bool.

    Keys are the depth-0 slots (a query at slot i sees slots j <= i whose inputs are real, and
    always itself) followed by each later depth's slots (a query sees only its own slot: its chain).

    Example: N = 2, depth 1 -> row 0 = [1 0 | 1 0], row 1 = [1 1 | 0 1].
    """
    n = key_valid.shape[1]
    eye = torch.eye(n, dtype=torch.bool, device=key_valid.device)
    causal = torch.ones(n, n, dtype=torch.bool, device=key_valid.device).tril()
    first = (causal & key_valid[:, None, :]) | eye                   # [B, N, N]
    blocks = [first] + [eye.expand_as(first)] * depth
    return torch.cat(blocks, dim=-1)[:, None]


class EagleUnroll(nn.Module):
    """An `EagleHeadModel` unrolled over depths in ONE call, so DDP sees one forward per loss."""

    def __init__(self, head: EagleHeadModel):
        super().__init__()
        self.head = head

    def forward(self, input_ids: Tensor, aux: Tensor, positions: Tensor, key_valid: Tensor, depth: int) -> Unrolled:
        """input_ids, positions [B, T]; aux [B, T, nA·H]; key_valid [B, N] -> ``depth`` steps of N slots."""
        n = input_ids.shape[1] - 1
        cache, hidden = HeadCache(), self.head.fuse(aux[:, :n])              # [B, N, H]
        logits, features = [], []
        for d in range(depth):
            out = self.head(shifted(input_ids, 1 + d, n), hidden, positions[:, 1:] + d, cache=cache,
                            mask=ttt_mask(key_valid, d))
            logits.append(out.logits)
            features.append(self.head.norm(out.hidden))
            hidden = out.hidden
        return Unrolled(logits, features)


class HeadTrainer(Trainer):
    """What both head methods share: cached target responses, target views, losses, acceptance."""
    output_name = "head"
    progress_key = "eval/accept_d0"
    train_depth: int      # depths the loss covers
    eval_depth: int       # depths the acceptance covers
    aux_layers: tuple = ()  # target layers whose hidden states the head reads (EAGLE)

    def check_method(self) -> None:
        if not 0.0 < self.method.decay <= 1.0:
            raise ValueError(f"method.decay must be in (0, 1], got {self.method.decay}")
        _save_dtype(self.method)

    def prepare_data(self) -> None:
        resp = self.method.responses
        path = Path(resp.cache) if resp.get("cache") else self.output_dir / "responses.safetensors"
        self.train_set = cached_responses(self.acc, self.target, self.train_set, self.pad_id, self.eos_ids,
                                          resp, path, self.cfg.seed)

    def micro_batch(self, index: int) -> Batch:
        world, rank = self.acc.num_processes, self.acc.process_index
        picks = batch_indices(len(self.train_set), self.cfg.batch_size, index * world + rank, self.cfg.seed)
        return fixed_batch([self.train_set[i] for i in picks], self.pad_id)

    @property
    def head(self) -> nn.Module:
        """The bare head model (unwrapped from accelerate, and from `EagleUnroll`)."""
        module = self.acc.unwrap_model(self.model)
        return module.head if isinstance(module, EagleUnroll) else module

    @torch.no_grad()
    def view(self, batch: Batch) -> TargetView:
        out = self.target(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                          position_ids=batch.position_ids, output_hidden_states=True, use_cache=False)
        states = out.hidden_states
        aux = torch.cat([states[a] for a in self.aux_layers], dim=-1) if self.aux_layers else None
        return TargetView(out.logits.float(), states[-1], aux)

    def unroll(self, batch: Batch, view: TargetView, depth: int) -> Unrolled:
        raise NotImplementedError

    def teacher(self, view: TargetView, depth: int, n: int) -> Tensor:
        """[B, N, Vd] the target's logits that the depth-``depth`` predictions learn, in the draft vocab."""
        logits = shifted(view.logits, depth + 1, n)
        t2d = getattr(self.head, "t2d", None)
        return logits if t2d is None or bool(t2d.all()) else logits[..., t2d]

    def loss(self, batch: Batch) -> Tensor:
        with self.acc.autocast():
            view = self.view(batch)
            unrolled = self.unroll(batch, view, self.train_depth)
        return self.objective(batch, view, unrolled)[0]

    def objective(self, batch: Batch, view: TargetView, unrolled: Unrolled) -> tuple[Tensor, int]:
        """(decay-weighted loss over depths, response tokens at depth 0)."""
        total, weights, tokens = 0.0, 0.0, 0
        n = batch.input_ids.shape[1] - 1
        columns = _response_columns(batch)                                     # [B, T]
        for d, q_logits in enumerate(unrolled.logits):
            valid = shifted(columns, d + 2, n)                                 # [B, N]
            if not valid.any():
                continue
            p = F.softmax(self.teacher(view, d, n)[valid], dim=-1)             # [M, Vd]
            term = -(p * F.log_softmax(q_logits[valid].float(), dim=-1)).sum(-1).mean()
            if unrolled.features is not None and self.method.feature_weight:
                goal = shifted(view.last, d + 1, n)[valid].float()             # [M, H]
                term = term + self.method.feature_weight * F.smooth_l1_loss(unrolled.features[d][valid].float(), goal)
            weight = self.method.decay ** d
            total, weights = total + weight * term, weights + weight
            tokens += int(valid.sum()) if d == 0 else 0
        if not weights:  # no response column in reach: a zero that still has a graph
            return sum(x.sum() for x in unrolled.logits) * 0.0, 0
        return total / weights, tokens

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Per-depth teacher-forced acceptance and the held-out loss (main process; others get {})."""
        metrics = {}
        if self.acc.is_main_process and self.eval_batches:
            module = self.acc.unwrap_model(self.model)
            was_training = module.training
            module.eval()
            counts = torch.zeros(3, self.eval_depth, dtype=torch.long)  # accepted, attempted, slots
            loss_sum, loss_tokens = 0.0, 0
            for batch in self.eval_batches:
                batch = batch.to(self.acc.device)
                with self.acc.autocast():
                    view = self.view(batch)
                    unrolled = self.unroll(batch, view, self.eval_depth)
                counts += self.acceptance_counts(batch, view, unrolled)
                loss, tokens = self.objective(batch, view, unrolled)
                loss_sum, loss_tokens = loss_sum + float(loss) * tokens, loss_tokens + tokens
            metrics = _acceptance_metrics(counts)
            metrics["eval/loss"] = loss_sum / max(loss_tokens, 1)
            metrics.update(self.engine_tau())
            module.train(was_training)
        self.acc.wait_for_everyone()
        return metrics

    def engine_tau(self) -> dict:
        """eval/tau and eval/acceptance_rate through the engine with the head drafter (None when
        ``eval.tau_prompts`` is 0)."""
        ev = self.cfg.eval
        if not ev.tau_prompts:
            return {"eval/tau": None, "eval/acceptance_rate": None}
        prompts = [e.prompt for e in self.eval_set[:ev.tau_prompts]]
        run = engine_tau(self.target, self.drafter(), prompts, ev.tau_max_new_tokens)
        return {"eval/tau": run.tau, "eval/acceptance_rate": run.acceptance_rate}

    def drafter(self):
        """The engine drafter over the current head (shares its weights)."""
        raise NotImplementedError

    def acceptance_counts(self, batch: Batch, view: TargetView, unrolled: Unrolled) -> Tensor:
        """[3, depth] (accepted, attempted, slots in reach) per depth; see the module docstring."""
        n = batch.input_ids.shape[1] - 1
        columns = _response_columns(batch)
        counts = torch.zeros(3, len(unrolled.logits), dtype=torch.long)
        alive = torch.ones_like(columns[:, :n])                                # [B, N] depths < d right
        for d, q_logits in enumerate(unrolled.logits):
            valid = shifted(columns, d + 2, n)
            guess = self.to_target(q_logits.argmax(-1))                        # [B, N] target ids
            right = guess == shifted(view.logits, d + 1, n).argmax(-1)
            counts[:, d] = torch.stack([(alive & right & valid).sum(), (alive & valid).sum(), valid.sum()]).cpu()
            alive = alive & right
        return counts

    def to_target(self, draft_ids: Tensor) -> Tensor:
        return draft_ids


class EagleTrainer(HeadTrainer):
    """EAGLE-3 style head with training-time test (``method.ttt_steps`` depths)."""
    label = "eagle"

    def check_method(self) -> None:
        super().check_method()
        if self.method.ttt_steps < 1:
            raise ValueError(f"method.ttt_steps must be >= 1, got {self.method.ttt_steps}")

    def build_model(self) -> nn.Module:
        m = self.method
        vocab = None
        if m.draft_vocab_size:
            counts = torch.bincount(torch.tensor([t for e in self.train_set for t in e.response]),
                                    minlength=self.target.config.vocab_size)
            vocab = draft_vocab_from_counts(counts, m.draft_vocab_size)
        aux = list(m.aux_layers) if m.aux_layers is not None else None
        head = EagleHeadModel.from_target(self.target, aux, vocab)
        self.aux_layers = head.aux_layers
        self.train_depth, self.eval_depth = m.ttt_steps, self.cfg.eval.num_tokens
        return EagleUnroll(head)

    def unroll(self, batch: Batch, view: TargetView, depth: int) -> Unrolled:
        mask = batch.attention_mask.bool()
        key_valid = mask[:, :-1] & mask[:, 1:]                                  # [B, N] real (state, token)
        return self.model(batch.input_ids, view.aux, batch.position_ids, key_valid, depth)

    def to_target(self, draft_ids: Tensor) -> Tensor:
        return self.head.to_target(draft_ids)

    def drafter(self) -> EagleHead:
        return EagleHead(self.head, num_tokens=self.cfg.eval.num_tokens)

    def save_output(self, path: Path) -> None:
        self.head.save_pretrained(path, speculative_tokens=self.cfg.eval.num_tokens,
                                  include_embedding=self.method.get("include_embedding", True),
                                  dtype=_save_dtype(self.method))


class MedusaTrainer(HeadTrainer):
    """Medusa heads: ``method.num_heads`` heads of ``method.num_layers`` residual blocks."""
    label = "medusa"

    def build_model(self) -> nn.Module:
        m = self.method
        self.train_depth = self.eval_depth = m.num_heads
        return MedusaHeadsModel.from_target(self.target, m.num_heads, m.num_layers,
                                            shared_lm_head=bool(m.get("shared_lm_head", False)))

    def unroll(self, batch: Batch, view: TargetView, depth: int) -> Unrolled:
        logits = self.model(view.last[:, :-1])                                  # [K, B, N, V]
        return Unrolled(list(logits[:depth]), None)

    def drafter(self) -> MedusaHeads:
        return MedusaHeads(self.head)

    def save_output(self, path: Path) -> None:
        self.head.save_pretrained(path, dtype=_save_dtype(self.method))


def _save_dtype(method) -> torch.dtype | None:
    """``method.save_dtype``: null keeps float32; bf16/fp16 halve the folder."""
    name = method.get("save_dtype")
    dtypes = {None: None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"method.save_dtype must be one of null, fp32, bf16, fp16; got {name!r}")
    return dtypes[name]


def train_eagle(cfg) -> TrainResult:
    """Train an EAGLE-3 style head as ``cfg`` (the composed ``train.yaml``, ``method=eagle``) says."""
    return EagleTrainer(cfg).run()


def train_medusa(cfg) -> TrainResult:
    """Train Medusa heads as ``cfg`` (``method=medusa``) says."""
    return MedusaTrainer(cfg).run()


def _response_columns(batch: Batch) -> Tensor:
    """[B, T] bool: columns holding response tokens (what the losses and acceptance cover)."""
    prompt = torch.zeros_like(batch.input_ids[:, :batch.prompt_len], dtype=torch.bool)
    return torch.cat([prompt, batch.response_mask.bool()], dim=1)


def _acceptance_metrics(counts: Tensor) -> dict:
    """eval/accept_d{d} and eval/mean_accepted from `HeadTrainer.acceptance_counts` sums."""
    accepted, attempted, _ = counts.double()
    metrics = {f"eval/accept_d{d}": float(accepted[d] / attempted[d]) if attempted[d] else 0.0
               for d in range(counts.shape[1])}
    metrics["eval/mean_accepted"] = float(accepted.sum() / counts[2, 0]) if counts[2, 0] else 0.0
    metrics["eval/tokens"] = int(counts[2, 0])
    return metrics

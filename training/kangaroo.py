"""Kangaroo adapters trained on the frozen target's own responses: `method=kangaroo`.

Same data, slots and evaluation as the other head methods (`specdec.training.heads`): the target
answers every training prompt once (token ids cached), and each batch's exit states and logits
come from a fresh forward of the frozen target.

Slots. Slot i (0 <= i < N = T-1) is a draft that starts after the target has read column i: its
root is column i+1, which the draft runs through the first ℓ layers and the adapter; the adapter
at column i+1 attends to its own entries at columns <= i+1 (as its cache holds them when
drafting) and predicts column i+2. Its teacher is p(i) = softmax(target logits at column i+1).

- Loss: soft cross-entropy at the exit, CE(p(i), softmax(lm_head(adapter(exit states))[i+1])),
  over response columns. The target's LM head is shared and frozen; only the adapter trains.
- Depth d > 0 of a chain reads the exit state of drafted token d-1. Teacher-forced on the
  target's greedy responses, a chain whose earlier depths were right has drafted exactly the
  response, so depth d at slot i is depth 0 at slot i+d: the per-depth acceptance needs one
  adapter pass, shifted.
"""
from pathlib import Path

import torch
from torch import Tensor, nn

from specdec.drafters.kangaroo_adapter import KangarooAdapter, KangarooAdapterModel

from .data import Batch
from .heads import HeadTrainer, TargetView, Unrolled, _save_dtype, shifted
from .trainer import TrainResult


def adapter_mask(key_valid: Tensor) -> Tensor:
    """[B, T] real columns -> [B, 1, T, T] bool: column i sees real columns j <= i, and always itself.

    Example: key_valid = [[0, 1, 1]] -> rows [1 0 0], [0 1 0], [0 1 1].
    """
    t = key_valid.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=key_valid.device).tril()
    eye = torch.eye(t, dtype=torch.bool, device=key_valid.device)
    return ((causal & key_valid[:, None, :]) | eye)[:, None]


class KangarooTrainer(HeadTrainer):
    """A Kangaroo adapter after ``method.exit_layer`` target layers (null: a quarter of them)."""
    label = "kangaroo"

    def check_method(self) -> None:
        super().check_method()
        m = self.method
        if m.exit_layer is not None and m.exit_layer < 1:
            raise ValueError(f"method.exit_layer must be >= 1 (or null), got {m.exit_layer}")
        if m.stop_threshold is not None and not 0.0 <= m.stop_threshold < 1.0:
            raise ValueError(f"method.stop_threshold must be in [0, 1) (or null), got {m.stop_threshold}")

    def build_model(self) -> nn.Module:
        num_layers = self.target.config.num_hidden_layers
        exit_layer = self.method.exit_layer or max(1, num_layers // 4)
        adapter = KangarooAdapterModel.from_target(self.target, exit_layer)
        self.aux_layers = (exit_layer,)  # HF's hidden_states[ℓ]: the output of the first ℓ layers
        self.train_depth, self.eval_depth = 1, self.cfg.eval.num_tokens
        return adapter

    def unroll(self, batch: Batch, view: TargetView, depth: int) -> Unrolled:
        """One adapter pass over every column; depth d's logits are depth 0's shifted by d."""
        mask = adapter_mask(batch.attention_mask.bool())
        normed = self.model(view.aux, batch.position_ids, mask=mask)                     # [B, T, H]
        logits = self.target.get_output_embeddings()(normed[:, 1:].to(self.target.dtype))  # [B, N, V]
        n = logits.shape[1]
        return Unrolled([logits if d == 0 else shifted(logits, d, n) for d in range(depth)], None)

    def drafter(self) -> KangarooAdapter:
        return KangarooAdapter(self.head, num_tokens=self.cfg.eval.num_tokens,
                               stop_threshold=self.method.stop_threshold)

    def save_output(self, path: Path) -> None:
        self.head.save_pretrained(path, speculative_tokens=self.cfg.eval.num_tokens, dtype=_save_dtype(self.method))


def train_kangaroo(cfg) -> TrainResult:
    """Train a Kangaroo adapter as ``cfg`` (the composed ``train.yaml``, ``method=kangaroo``) says."""
    return KangarooTrainer(cfg).run()

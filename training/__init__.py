"""Training for drafters: DistillSpec distillation of draft models (`method=distill`), and draft
heads on the target's hidden states (`method=eagle`, `method=medusa`, `method=kangaroo`).

`train(cfg)` runs the method that ``cfg.method.name`` names on a composed config; the
`specdec-train` command composes that config with Hydra (see `specdec.training.entry`).
`load_draft(path)` loads a trained draft, merging a LoRA adapter into its base.
"""
from .distill import DistillTrainer, train_distill
from .heads import EagleTrainer, MedusaTrainer, train_eagle, train_medusa
from .kangaroo import KangarooTrainer, train_kangaroo
from .losses import DIVERGENCES, acceptance, divergence
from .models import draft_from_layers, load_draft
from .trainer import TrainResult, Trainer

METHODS = {"distill": train_distill, "eagle": train_eagle, "medusa": train_medusa, "kangaroo": train_kangaroo}


def train(cfg) -> TrainResult:
    """Train as ``cfg`` says; ``cfg`` is the composed ``train.yaml`` (a DictConfig or alike)."""
    name = cfg.method.name
    if name not in METHODS:
        raise ValueError(f"unknown training method {name!r}; choose one of {sorted(METHODS)}")
    return METHODS[name](cfg)


__all__ = ["DIVERGENCES", "DistillTrainer", "EagleTrainer", "KangarooTrainer", "METHODS", "MedusaTrainer", "TrainResult", "Trainer",
           "acceptance", "divergence", "draft_from_layers", "load_draft", "train", "train_distill", "train_eagle",
           "train_kangaroo", "train_medusa"]

"""The `specdec-train` command: Hydra composes ``conf/train.yaml`` and calls `specdec.training.train`.

This is the only training module that imports Hydra.

Example:
    specdec-train method.divergence=tvd steps=100 logger=none
"""
import os

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from . import train


@hydra.main(config_path="pkg://specdec.conf", config_name="train", version_base=None)
def _main(cfg: DictConfig) -> None:
    if cfg.output_dir is None:
        cfg.output_dir = HydraConfig.get().runtime.output_dir
    result = train(cfg)
    if os.environ.get("RANK", "0") == "0":  # torchrun sets RANK; print once
        print(f"saved to {result.draft_dir}")
        print(f"before: {result.before}\nafter:  {result.after}")


def hydra_main() -> None:
    """Console entry point (``specdec.cli:train_main`` calls this)."""
    _main()


if __name__ == "__main__":
    hydra_main()

"""Test-wide settings: offline hub, offline wandb, deterministic CPU threads."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # tiny models: threads only add contention


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def smollm2():
    """The real zoo SmolLM2-135M in fp32 on CPU, as ``(model, tokenizer)``; loaded once per session."""
    import specdec

    return specdec.load_model("zoo:smollm2-135m-instruct", dtype=torch.float32)

"""Hydra configuration of specdec-train: every group composes, command-line overrides reach the
trainer, unknown keys fail naming the key, and two gloo processes train like one."""
import importlib.resources
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import yaml
from hydra import compose, initialize_config_module
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from test_training_helpers import save_tiny, tiny_overrides, write_prompts

import specdec
from specdec.training import draft_from_layers, load_draft, train

CONF = importlib.resources.files("specdec.conf")


def train_groups() -> dict[str, list[str]]:
    """Every group named in train.yaml's defaults list, with every option it has in conf/."""
    groups = {}
    for entry in yaml.safe_load(CONF.joinpath("train.yaml").read_text())["defaults"]:
        if isinstance(entry, dict):
            group = next(iter(entry)).removeprefix("optional ")
            folder = CONF.joinpath(group)
            groups[group] = sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml")) \
                if folder.is_dir() else []
    return groups


def test_train_yaml_names_the_issue_groups():
    assert set(train_groups()) == {"model", "method", "data", "optim", "logger"}


@pytest.mark.parametrize("group,option", [(g, o) for g, opts in train_groups().items() for o in opts])
def test_every_option_composes(group, option):
    with initialize_config_module("specdec.conf", version_base=None):
        cfg = compose("train", overrides=[f"{group}={option}"])
    plain = OmegaConf.to_container(cfg, resolve=True)
    assert plain[group] and {"model", "method", "data", "optim", "logger", "eval"} <= set(plain)
    assert cfg.method.name == (option.removesuffix("_lora") if group == "method" else "distill") and cfg.model.spec


@pytest.mark.parametrize("method", ["eagle", "medusa", "kangaroo"])
def test_head_methods_compose_with_every_other_group(method):
    """method=eagle|medusa|kangaroo brings its own keys, turns the engine's τ off, and composes with each data/logger option."""
    for group, options in train_groups().items():
        for option in options if group not in ("method", "model") else []:
            with initialize_config_module("specdec.conf", version_base=None):
                cfg = compose("train", overrides=[f"method={method}", f"{group}={option}"])
            assert cfg.method.name == method and cfg.eval.tau_prompts == 0 and cfg.method.responses.max_new_tokens
    with initialize_config_module("specdec.conf", version_base=None):
        with pytest.raises(ConfigCompositionException):
            compose("train", overrides=[f"method={method}", "method.draft.layers=3"])  # a distill key


@pytest.mark.parametrize("override,key", [("optim.lrr=0.1", "lrr"), ("method.draft.layer=3", "layer"),
                                          ("stepz=3", "stepz")])
def test_unknown_key_fails_naming_it(override, key):
    with initialize_config_module("specdec.conf", version_base=None):
        with pytest.raises(ConfigCompositionException) as err:
            compose("train", overrides=[override])
    assert key in str(err.value) + str(err.value.__cause__)


def _env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}


@pytest.fixture
def tiny(tmp_path):
    return tmp_path, save_tiny(tmp_path / "target"), write_prompts(tmp_path / "prompts.jsonl")


def test_command_line_overrides(tiny):
    """`python -m specdec.training.entry` with overrides: they reach the run, Hydra's folder is the output."""
    tmp, target, prompts = tiny
    args = tiny_overrides(tmp, target, prompts, output_dir="null", steps=3, **{"method.divergence": "tvd"})
    run = subprocess.run([sys.executable, "-m", "specdec.training.entry", *args, f"hydra.run.dir={tmp}/hydra"],
                         capture_output=True, text=True, env=_env(), cwd=tmp, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((tmp / "hydra" / "result.json").read_text())
    assert result["steps"] == 3
    saved = OmegaConf.load(tmp / "hydra" / ".hydra" / "config.yaml")
    assert saved.method.divergence == "tvd" and saved.model.spec == str(target)
    assert (tmp / "hydra" / "draft" / "config.json").exists()

    bad = subprocess.run([sys.executable, "-m", "specdec.training.entry", *args, "optim.lrr=1"],
                         capture_output=True, text=True, env=_env(), cwd=tmp, timeout=300)
    assert bad.returncode != 0 and "lrr" in bad.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_match_one(tmp_path):
    """torchrun, 2 CPU processes (gloo) × batch 2 == 1 process × batch 4: the two shards make up
    the same global batch and DDP averages their gradients. Every prompt and response has the
    same length, so the per-process token means average to the global one."""
    target = save_tiny(tmp_path / "target")
    prompts = write_prompts(tmp_path / "prompts.jsonl", [f"prompt{i:02d}" for i in range(12)])
    common = {"method.responses.on_policy": 0.0, "method.responses.off_policy": "fixed", "steps": 3,
              "save_every": 3, "optim.lr": 1e-2}
    one = tiny_overrides(tmp_path, target, prompts, output_dir=tmp_path / "one", batch_size=4, **common)
    two = tiny_overrides(tmp_path, target, prompts, output_dir=tmp_path / "two", batch_size=2, **common)
    with initialize_config_module("specdec.conf", version_base=None):
        train(compose("train", overrides=one))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "specdec.training.entry", *two, f"hydra.run.dir={tmp_path}/hydra"]
    run = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "result.json").read_text())["world_size"] == 2
    assert len(list((tmp_path / "two" / "checkpoints" / "step-0000003").glob("rng-*.safetensors"))) == 2
    a, _ = load_draft(tmp_path / "one" / "draft")
    b, _ = load_draft(tmp_path / "two" / "draft")
    start = draft_from_layers(specdec.load_model(str(target))[0], 1)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(x, y, atol=1e-5), name
    assert not torch.allclose(a.lm_head.weight, start.lm_head.weight, atol=1e-3)  # it did train


def test_bad_choice_fails_before_loading(tmp_path):
    with initialize_config_module("specdec.conf", version_base=None):
        cfg = compose("train", overrides=["method.divergence=kl", f"output_dir={tmp_path}"])
    with pytest.raises(ValueError, match="method.divergence must be one of"):
        train(cfg)

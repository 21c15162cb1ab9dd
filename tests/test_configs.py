"""Every option of every config group in conf/ composes with the config that uses it."""
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

import specdec.conf

CONF = Path(specdec.conf.__file__).parent
PRIMARY = {"model": "generate", "drafter": "generate", "prompts": "bench", "method": "train", "data": "train",
           "optim": "train", "logger": "train"}


def options():
    for group in sorted(p.name for p in CONF.iterdir() if p.is_dir() and not p.name.startswith("_")):
        for yaml in sorted((CONF / group).glob("*.yaml")):
            yield group, yaml.stem


def test_every_group_is_known():
    assert {g for g, _ in options()} == set(PRIMARY) | {"experiment"}


@pytest.mark.parametrize("group, option", list(options()))
def test_option_composes(group, option):
    with initialize_config_module("specdec.conf", version_base=None):
        if group == "experiment":
            cfg = compose("train", overrides=[f"+experiment={option}"])
            assert cfg.steps > 0
        else:
            cfg = compose(PRIMARY[group], overrides=[f"{group}={option}"])
            assert group in cfg


def test_experiment_sets_the_real_run():
    with initialize_config_module("specdec.conf", version_base=None):
        cfg = compose("train", overrides=["+experiment=distill_smollm2_cpu"])
    assert cfg.method.draft.layers == 4 and cfg.steps == 60 and cfg.model.spec == "zoo:smollm2-135m-instruct"


@pytest.mark.parametrize("experiment, method", [("eagle_smollm2_cpu", "eagle"), ("medusa_smollm2_cpu", "medusa"),
                                                        ("kangaroo_smollm2_cpu", "kangaroo")])
def test_head_experiments_hold_deltas_over_their_method(experiment, method):
    """A head experiment switches the method group and changes only a few keys of it."""
    with initialize_config_module("specdec.conf", version_base=None):
        cfg = compose("train", overrides=[f"+experiment={experiment}"])
        plain = compose("train", overrides=[f"method={method}"])
    assert cfg.method.name == method and cfg.model.spec == "zoo:smollm2-135m-instruct"
    assert cfg.method.responses.do_sample == plain.method.responses.do_sample  # inherited, not repeated
    assert cfg.steps != plain.steps and cfg.eval.tau_prompts == 0


@pytest.mark.parametrize("option", ["eagle", "medusa", "kangaroo_adapter"])
def test_head_drafter_configs_build_their_drafter(option, tmp_path):
    """drafter=eagle|medusa|kangaroo_adapter with drafter.folder=<a speculators folder> builds the head drafter."""
    from omegaconf import OmegaConf
    from tiny import make_tiny

    from specdec.drafters import EagleHead, KangarooAdapter, MedusaHeads, build_drafter
    from specdec.drafters.heads import EagleHeadModel, MedusaHeadsModel
    from specdec.drafters.kangaroo_adapter import KangarooAdapterModel

    target = make_tiny("llama")
    head = {"eagle": lambda: EagleHeadModel.from_target(target, (1, 1, 1)),
            "medusa": lambda: MedusaHeadsModel.from_target(target),
            "kangaroo_adapter": lambda: KangarooAdapterModel.from_target(target, 1)}[option]()
    head.save_pretrained(tmp_path / "head")
    with initialize_config_module("specdec.conf", version_base=None):
        cfg = compose("generate", overrides=[f"drafter={option}", f"drafter.folder={tmp_path / 'head'}",
                                             "model.device=cpu"])
    drafter = build_drafter(OmegaConf.to_container(cfg.drafter, resolve=True), target=target)
    assert isinstance(drafter, {"eagle": EagleHead, "medusa": MedusaHeads, "kangaroo_adapter": KangarooAdapter}[option])


def test_kangaroo_gpu_experiment_saves_bf16_and_halts_like_the_drafter_config():
    """The shipped-adapter run writes bf16 like the EAGLE and Medusa runs, drafts as many tokens
    as drafter=kangaroo_adapter does, and measures its τ with that config's halting threshold."""
    with initialize_config_module("specdec.conf", version_base=None):
        cfg = compose("train", overrides=["+experiment=kangaroo_smollm2_gpu"])
        drafter = compose("generate", overrides=["drafter=kangaroo_adapter"]).drafter
        heads = [compose("train", overrides=[f"+experiment={m}_smollm2_gpu"]).method for m in ("eagle", "medusa")]
    assert cfg.method.name == "kangaroo" and cfg.method.save_dtype == "bf16" == heads[0].save_dtype == heads[1].save_dtype
    assert cfg.eval.num_tokens == drafter.num_tokens and cfg.method.stop_threshold == drafter.stop_threshold
    assert drafter.folder == "zoo:smollm2-135m-instruct-kangaroo"

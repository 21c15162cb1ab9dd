"""A drafter config's `_target_` resolves only to registered drafters: a config never runs other code.

The configs go through the real Hydra compose and the same functions `specdec generate` and
`specdec-bench` call. The hostile target is `os.system` with a command that would write a marker
file; the invariant is that the marker never appears and the error names the target and the fix.
"""
import pytest
from hydra import compose, initialize_config_module
from test_training_helpers import save_tiny

import specdec.drafters
from specdec.bench import run_bench
from specdec.cli import run_generate
from specdec.drafters import (DRAFTERS, PromptLookup, UnregisteredDrafterTarget, build_drafter, register_drafter,
                              resolve_target)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return str(save_tiny(tmp_path_factory.mktemp("tiny") / "model"))


def hostile(marker) -> list[str]:
    return ["drafter=none", "+drafter._target_=os.system", f"+drafter.command='touch {marker}'"]


def compose_config(name, overrides):
    with initialize_config_module("specdec.conf", version_base=None):
        return compose(name, overrides=overrides)


def test_generate_refuses_os_system_without_running_it(tiny_folder, tmp_path):
    marker = tmp_path / "ran"
    cfg = compose_config("generate", [f"model.spec={tiny_folder}", "model.device=cpu", "model.dtype=float32",
                                      "max_new_tokens=4", *hostile(marker)])
    assert cfg.drafter._target_ == "os.system"  # Hydra composed it; only our resolution stands in the way
    with pytest.raises(UnregisteredDrafterTarget) as err:
        run_generate(cfg)
    assert not marker.exists()
    message = str(err.value)
    assert "'os.system'" in message and "specdec.drafters.PromptLookup" in message and "register_drafter" in message


def test_bench_refuses_os_system_without_running_it(tiny_folder, tmp_path):
    marker = tmp_path / "ran"
    cfg = compose_config("bench", [f"model.spec={tiny_folder}", "num_prompts=1", "max_new_tokens=4",
                                   "modes=[greedy]", "logger=none", "warmup=0", "threads=1", "progress=false",
                                   *hostile(marker)])
    with pytest.raises(UnregisteredDrafterTarget, match="os.system"):
        run_bench(cfg, tmp_path / "out")
    assert not marker.exists()


def test_bench_prompts_refuse_os_system_without_running_it(tiny_folder, tmp_path):
    marker = tmp_path / "ran"
    cfg = compose_config("bench", [f"model.spec={tiny_folder}", "num_prompts=1", "max_new_tokens=4",
                                   "modes=[greedy]", "logger=none", "warmup=0", "threads=1", "progress=false",
                                   "prompts._target_=os.system", f"+prompts.command='touch {marker}'"])
    with pytest.raises(ValueError, match="not a prompt loader"):
        run_bench(cfg, tmp_path / "out")
    assert not marker.exists()


@pytest.mark.parametrize("path", ["os.system", "subprocess.run", "builtins.eval", "specdec.drafters.lookup",
                                  "specdec.drafters._target_paths", "antigravity.fly", "specdec.drafters.Drafter"])
def test_nothing_unregistered_resolves(path):
    with pytest.raises(UnregisteredDrafterTarget, match="not a registered drafter"):
        resolve_target(path)


def test_nested_drafter_configs_are_checked_too(tmp_path):
    """CopySpec's fallback and TriForce's top drafter are configs built the same way."""
    marker = tmp_path / "ran"
    with pytest.raises(UnregisteredDrafterTarget):
        build_drafter({"_target_": "specdec.drafters.CopySpec",
                       "fallback": {"_target_": "os.system", "command": f"touch {marker}"}})
    assert not marker.exists()


def test_every_shipped_drafter_config_resolves():
    """Each conf/drafter/*.yaml target is on the allow-list and resolves to the object it names."""
    from importlib import resources

    import yaml

    for path in resources.files("specdec.conf").joinpath("drafter").iterdir():
        target = yaml.safe_load(path.read_text()).get("_target_")
        if target is None:
            continue
        obj = specdec.drafters
        for part in target.removeprefix("specdec.drafters.").split("."):
            obj = getattr(obj, part)
        assert resolve_target(target) == obj, path.name


def test_registering_a_drafter_of_your_own_allows_it():
    class Mine(PromptLookup):
        pass

    path = f"{Mine.__module__}.{Mine.__qualname__}"
    with pytest.raises(UnregisteredDrafterTarget):
        build_drafter({"_target_": path, "num_tokens": 3})
    register_drafter("mine", Mine)
    try:
        assert isinstance(build_drafter({"_target_": path, "num_tokens": 3}), Mine)
        assert isinstance(build_drafter({"name": "mine", "num_tokens": 3}), Mine)
    finally:
        DRAFTERS.pop("mine")

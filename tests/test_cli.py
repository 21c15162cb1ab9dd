"""`specdec generate` composes its Hydra config, runs the engine, and rejects unknown keys."""
import json
import os
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_module
from tiny import char_tokenizer, make_tiny

from specdec.cli import main, run_generate


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    tok = char_tokenizer()
    make_tiny("llama", vocab_size=len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def compose_generate(overrides):
    with initialize_config_module("specdec.conf", version_base=None):
        return compose("generate", overrides=overrides)


def test_default_config_is_smollm2_with_lookup():
    cfg = compose_generate([])
    assert cfg.model.spec == "zoo:smollm2-135m-instruct"
    assert cfg.drafter._target_ == "specdec.drafters.PromptLookup"


@pytest.mark.parametrize("drafter", ["lookup", "none"])
def test_generate_runs_on_a_local_folder(tiny_folder, drafter, capsys):
    cfg = compose_generate([f"model.spec={tiny_folder}", "model.device=cpu", "model.dtype=float32",
                            f"drafter={drafter}", "max_new_tokens=8", "prompt=the cat sat"])
    result = run_generate(cfg)
    assert result["stats"]["new_tokens"] == [8]
    assert result["stats"]["drafter"] == ("PromptLookup" if drafter == "lookup" else "none")
    printed = capsys.readouterr().out
    assert result["completion"] in printed and "tau=" in printed


def test_unknown_key_and_unknown_group_fail_loudly(tiny_folder):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    cli = [sys.executable, "-c", "from specdec.cli import main; main()", "generate"]
    bad_key = subprocess.run(cli + ["not_a_key=1"], capture_output=True, text=True, env=env)
    assert bad_key.returncode != 0 and "not_a_key" in bad_key.stderr
    bad_group = subprocess.run(cli + ["drafter=bogus"], capture_output=True, text=True, env=env)
    assert bad_group.returncode != 0 and "bogus" in bad_group.stderr


def test_unknown_command(capsys):
    with pytest.raises(SystemExit, match="unknown command 'frobnicate'"):
        main(["frobnicate"])
    main(["--help"])
    assert "generate" in capsys.readouterr().out


def test_generate_leaves_no_hydra_folders_unless_asked(tiny_folder, tmp_path):
    """`specdec generate` writes nothing into the working directory (no outputs/, .hydra/,
    multirun/, no log file); with output_dir=DIR, Hydra's record and the result go there."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    cli = [sys.executable, "-c", "from specdec.cli import main; main()", "generate", f"model.spec={tiny_folder}",
           "model.device=cpu", "model.dtype=float32", "max_new_tokens=4", "prompt=the cat"]
    cwd = tmp_path / "work"
    cwd.mkdir()
    done = subprocess.run(cli, capture_output=True, text=True, env=env, cwd=cwd)
    assert done.returncode == 0, done.stderr
    assert "tau=" in done.stdout
    assert sorted(p.name for p in cwd.iterdir()) == []
    done = subprocess.run(cli + ["output_dir=runs/one"], capture_output=True, text=True, env=env, cwd=cwd)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in cwd.iterdir()) == ["runs"]
    record = cwd / "runs" / "one"
    assert (record / ".hydra" / "config.yaml").is_file()
    result = json.loads((record / "result.json").read_text())
    assert result["stats"]["new_tokens"] == [4] and result["completion"] in done.stdout

"""`specdec-train method=eagle|medusa` on tiny targets (CPU, seconds): acceptance rises, the head
folder reloads, resume is exact, and the response cache holds token ids only.

The learning tests use a *context-free* tiny target: its attention outputs are zeroed, so its
next token is a function of the current token alone. A head can learn that in a few seconds and
it generalises to held-out prompts; a random target's context-dependent choices cannot be learnt
that fast. The step API's attention is tested on full random targets in test_heads_model.py.
"""
import json

import pytest
import torch
from hydra import compose, initialize_config_module
from safetensors import safe_open
from test_training_helpers import PROMPTS, save_tiny, write_prompts

import specdec
from specdec.drafters.heads import EagleHeadModel, MedusaHeadsModel
from specdec.training import EagleTrainer, train


def context_free_target(folder):
    """A 2-layer tiny Llama (byte tokenizer) whose attention writes nothing: a token-to-token map."""
    save_tiny(folder, num_layers=2, init_range=1.0)
    model, _ = specdec.load_model(str(folder))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(tmp folder, target folder, 60-prompt jsonl)."""
    tmp = tmp_path_factory.mktemp("heads")
    prompts = write_prompts(tmp / "prompts.jsonl", [f"{p} {i}" for i in range(3) for p in PROMPTS])
    return tmp, context_free_target(tmp / "target"), prompts


def config(setup, method, out, **extra):
    tmp, target, prompts = setup
    values = {"model.spec": target, "model.dtype": "float32", "model.device": "cpu", "output_dir": tmp / out,
              "data": "files", "data.sources.0.path": prompts, "data.sources.0.prompt_field": "prompt",
              "data.eval_size": 8, "method": method, "method.responses.max_new_tokens": 24,
              "steps": 150, "batch_size": 8, "save_every": 0, "optim.warmup_steps": 0, "optim.lr": 1e-2,
              "eval.every": 75, "eval.batch_size": 8, "eval.max_new_tokens": 24, "logger": "none"}
    if method == "eagle":
        values["method.aux_layers"] = "[0,1,1]"
    values.update(extra)
    with initialize_config_module("specdec.conf", version_base=None):
        return compose("train", overrides=[f"{k}={v}" for k, v in values.items()])


def losses(result) -> list[float]:
    rows = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in rows if "train/loss" in r]


def test_eagle_training_raises_acceptance(setup):
    """Loss falls and held-out acceptance rises at every trained depth (ttt_steps = 3); depth 3,
    never unrolled in training, stays low: training-time test is what teaches the deeper depths."""
    result = train(config(setup, "eagle", "eagle"))
    before, after = result.before, result.after
    train_loss = losses(result)
    assert sum(train_loss[-10:]) < 0.5 * sum(train_loss[:10]), train_loss
    assert after["eval/loss"] < 0.5 * before["eval/loss"], (before, after)
    for d in range(3):
        assert after[f"eval/accept_d{d}"] > before[f"eval/accept_d{d}"] + 0.4, (d, before, after)
    assert after["eval/accept_d3"] < 0.3, after
    assert after["eval/mean_accepted"] > before["eval/mean_accepted"] + 1.5, (before, after)

    head = EagleHeadModel.from_pretrained(result.draft_dir)  # a speculators folder
    config_json = json.loads((result.draft_dir / "config.json").read_text())
    assert config_json["speculators_model_type"] == "eagle3" and head.aux_layers == (0, 1, 1)


def test_medusa_training_raises_acceptance(setup):
    result = train(config(setup, "medusa", "medusa", **{"method.num_heads": 3}))
    before, after = result.before, result.after
    assert sum(losses(result)[-10:]) < 0.5 * sum(losses(result)[:10])
    for d in range(3):
        assert after[f"eval/accept_d{d}"] > before[f"eval/accept_d{d}"] + 0.4, (d, before, after)
    assert after["eval/mean_accepted"] > 1.5 > before["eval/mean_accepted"]
    heads = MedusaHeadsModel.from_pretrained(result.draft_dir)
    assert heads.num_heads == 3


def test_resume_matches_uninterrupted(setup, monkeypatch):
    """A run killed after its step-2 checkpoint and resumed ends with the same head, bit for bit,
    and reuses the cached responses instead of generating them again."""
    common = {"steps": 4, "save_every": 2, "eval.every": 0, "method.draft_vocab_size": 64}
    straight = train(config(setup, "eagle", "straight", **common))
    save = EagleTrainer.save_checkpoint

    def save_then_die(self, step):
        save(self, step)
        raise KeyboardInterrupt

    monkeypatch.setattr(EagleTrainer, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(config(setup, "eagle", "resumed", **common))
    monkeypatch.undo()
    cache = setup[0] / "resumed" / "responses.safetensors"
    stamp = cache.stat().st_mtime_ns
    resumed = train(config(setup, "eagle", "resumed", **common))
    assert resumed.steps == 4 and cache.stat().st_mtime_ns == stamp
    a = EagleHeadModel.from_pretrained(straight.draft_dir).state_dict()
    b = EagleHeadModel.from_pretrained(resumed.draft_dir).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert int(b["t2d"].sum()) == 64 and b["lm_head.weight"].shape == (64, 64)
    logged = [json.loads(line)["step"] for line in (resumed.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert logged == [0, 1, 2, 3, 4]


def test_response_cache_is_token_ids_shared_and_checked(setup):
    """The cache is int64 token ids in safetensors; a run pointed at it reuses it; other prompts are refused."""
    first = train(config(setup, "medusa", "cache-a", steps=1, **{"method.num_heads": 2}))
    cache = first.output_dir / "responses.safetensors"
    with safe_open(str(cache), framework="pt") as f:
        assert all(f.get_tensor(k).dtype == torch.int64 for k in f.keys())
        assert int(f.get_tensor("prompt_offsets").shape[0]) == 60 - 8 + 1  # every training prompt
    stamp = cache.stat().st_mtime_ns
    train(config(setup, "eagle", "cache-b", steps=1, **{"method.responses.cache": cache}))
    assert cache.stat().st_mtime_ns == stamp and not (setup[0] / "cache-b" / "responses.safetensors").exists()
    with pytest.raises(ValueError, match="responses to other prompts"):
        train(config(setup, "eagle", "cache-c", steps=1, seed=1, **{"method.responses.cache": cache}))


def test_engine_tau_is_measured_with_the_head_drafter(setup):
    """eval.tau_prompts > 0 decodes held-out prompts through the engine with EagleHead: τ >= 1."""
    result = train(config(setup, "eagle", "tau", steps=1, **{"eval.tau_prompts": 2, "eval.tau_max_new_tokens": 8}))
    assert result.before["eval/tau"] >= 1.0 and result.after["eval/tau"] >= 1.0

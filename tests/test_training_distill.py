"""DistillSpec trainer on tiny models (CPU, seconds): α rises, LoRA, resume, wandb files."""
import json

import pytest
import torch
from hydra import compose, initialize_config_module
from test_training_helpers import save_tiny, tiny_overrides, write_prompts

import specdec
from specdec.drafters import DraftModel
from specdec.training import DistillTrainer, load_draft, train


@pytest.fixture
def tiny(tmp_path):
    """(tmp folder, tiny 2-layer target folder, 20-prompt jsonl)."""
    return tmp_path, save_tiny(tmp_path / "target"), write_prompts(tmp_path / "prompts.jsonl")


def config(tiny, **overrides):
    tmp, target, prompts = tiny
    with initialize_config_module("specdec.conf", version_base=None):
        return compose("train", overrides=tiny_overrides(tmp, target, prompts, **overrides))


def test_alpha_rises(tiny):
    """A 1-layer draft cut from a 2-layer target learns to match it on held-out prompts."""
    cfg = config(tiny, steps=40, batch_size=16, **{
        "optim.lr": 3e-3, "method.responses.max_new_tokens": 16, "data.eval_size": 6,
        "eval.max_new_tokens": 16, "eval.every": 20, "eval.tau_prompts": 2, "eval.tau_max_new_tokens": 16})
    result = train(cfg)
    before, after = result.before, result.after
    assert after["eval/alpha"] > before["eval/alpha"] + 0.04, (before, after)
    assert after["eval/divergence"] < 0.8 * before["eval/divergence"], (before, after)
    assert after["eval/tau"] >= 1.0 and before["eval/tau"] >= 1.0  # measured by the engine
    evals = [r for r in map(json.loads, (result.output_dir / "metrics.jsonl").read_text().splitlines())
             if "eval/alpha" in r]
    assert [r["step"] for r in evals] == [0, 20, 40]
    assert not (result.output_dir / "wandb").exists()  # logger=none

    # The output is an HF folder that DraftModel loads by path, and speculative output stays lossless.
    target, tok = specdec.load_model(str(tiny[1]))
    drafter = DraftModel.from_pretrained(str(result.draft_dir), num_tokens=3)
    ids = torch.tensor([tok.apply_chat_template([{"role": "user", "content": "sort a list"}],
                                                add_generation_prompt=True, tokenize=True, return_dict=False)])
    spec = specdec.wrap(target, drafter=drafter).generate(input_ids=ids, max_new_tokens=12, do_sample=False)
    plain = target.generate(input_ids=ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(spec, plain)


def test_lora_adapter_output(tiny):
    cfg = config(tiny, method="distill_lora", steps=3, **{"optim.lr": 1e-2, "method.lora.r": 4})
    trainer = DistillTrainer(cfg)
    result = trainer.run()
    trained = trainer.acc.unwrap_model(trainer.draft)
    assert all("lora_" in n for n, p in trained.named_parameters() if p.requires_grad)
    assert (result.draft_dir / "adapter_config.json").exists() and (result.draft_dir / "base").is_dir()
    merged, tok = load_draft(result.draft_dir)
    assert not hasattr(merged, "peft_config") and tok.chat_template
    ids = torch.tensor([[4, 50, 60, 70, 80]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, trained(ids).logits, atol=1e-4)
        base, _ = specdec.load_model(str(result.draft_dir / "base"))
        assert not torch.allclose(base(ids).logits, trained(ids).logits, atol=1e-3)  # the adapter learned


def test_lora_merge_saves_plain_folder(tiny):
    result = train(config(tiny, method="distill_lora", steps=1, **{"method.lora.merge": True}))
    assert (result.draft_dir / "model.safetensors").exists()
    assert not (result.draft_dir / "adapter_config.json").exists()


def test_resume_matches_uninterrupted(tiny, monkeypatch):
    """A run killed after its step-2 checkpoint and resumed ends with the same weights as one that ran through."""
    common = dict(steps=4, save_every=2, **{"method.responses.on_policy": 0.5, "method.responses.off_policy": "fixed"})
    straight = train(config(tiny, **common, output_dir=tiny[0] / "straight"))

    save = DistillTrainer.save_checkpoint

    def save_then_die(self, step):
        save(self, step)
        raise KeyboardInterrupt

    monkeypatch.setattr(DistillTrainer, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(config(tiny, **common, output_dir=tiny[0] / "resumed"))
    monkeypatch.undo()
    resumed = train(config(tiny, **common, output_dir=tiny[0] / "resumed"))
    assert resumed.steps == 4 and resumed.before == straight.before
    a, _ = load_draft(straight.draft_dir)
    b, _ = load_draft(resumed.draft_dir)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(x, y, atol=1e-6), name
    logged = [json.loads(line)["step"] for line in (resumed.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert logged == [0, 1, 2, 3, 4]  # the resumed process logged steps 3 and 4 only
    kept = sorted(p.name for p in (resumed.output_dir / "checkpoints").iterdir())
    assert kept == ["step-0000002", "step-0000004"]
    again = train(config(tiny, **common, output_dir=tiny[0] / "resumed"))  # finished: nothing left to do
    assert again.steps == 4 and again.after == resumed.after == straight.after


@pytest.mark.parametrize("kind", ["rkl", "jsd", "tvd"])
def test_other_divergences_and_accumulation(tiny, kind):
    result = train(config(tiny, steps=2, grad_accum=2, **{"method.divergence": kind, "method.beta": 0.3}))
    rows = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert result.steps == 2 and len(losses) == 2 and all(0 <= loss < 10 for loss in losses)


def test_wandb_offline_run_files(tiny):
    result = train(config(tiny, steps=1, logger="wandb", **{"logger.project": "specdec-test"}))
    runs = list((result.output_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))

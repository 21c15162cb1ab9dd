"""`specdec-train method=kangaroo` on a tiny context-free target (CPU, seconds): loss falls,
acceptance and the engine's τ rise, the adapter folder reloads and drafts exactly, resume is exact.

The target is test_heads_training's context-free tiny Llama (attention zeroed: its next token is a
function of the current token), exit after layer 1 of 2: the plain early exit is poor, and a
trained adapter can learn what the second layer adds.
"""
import json

import pytest
import torch
from test_heads_training import config, context_free_target, losses
from test_training_helpers import PROMPTS, write_prompts
from tiny import hf_greedy

import specdec
from specdec.drafters import KangarooAdapter
from specdec.drafters.kangaroo_adapter import KangarooAdapterModel
from specdec.training import KangarooTrainer, train


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(tmp folder, target folder, 60-prompt jsonl)."""
    tmp = tmp_path_factory.mktemp("kangaroo")
    prompts = write_prompts(tmp / "prompts.jsonl", [f"{p} {i}" for i in range(3) for p in PROMPTS])
    return tmp, context_free_target(tmp / "target"), prompts


def chat_batch(tokenizer, prompts):
    """Left-padded chat prompts (ragged lengths) as (input_ids, attention_mask)."""
    rows = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
            for p in prompts]
    rows = [list(r["input_ids"]) if hasattr(r, "keys") else list(r) for r in rows]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    return ids, (torch.arange(width) >= torch.tensor([width - len(r) for r in rows])[:, None]).long()


def kangaroo_config(setup, out, **extra):
    return config(setup, "kangaroo", out, **{"method.exit_layer": 1, **extra})


def test_training_lowers_loss_and_raises_acceptance(setup):
    """Loss falls, held-out acceptance at depth 0 and the chain's mean run rise, and the engine's τ
    (eval/tau, KangarooAdapter through the engine) rises; the saved folder reloads, drafts
    exactly at batch 4 with three steps per sync, and beats the untrained adapter there."""
    result = train(kangaroo_config(setup, "learn", **{"eval.tau_prompts": 3}))
    before, after = result.before, result.after
    train_loss = losses(result)
    assert sum(train_loss[-10:]) < 0.6 * sum(train_loss[:10]), train_loss
    assert after["eval/loss"] < 0.5 * before["eval/loss"], (before, after)
    assert after["eval/accept_d0"] > before["eval/accept_d0"] + 0.15, (before, after)
    assert after["eval/mean_accepted"] > before["eval/mean_accepted"] + 0.5, (before, after)
    assert after["eval/tau"] > before["eval/tau"] + 0.8, (before, after)

    config_json = json.loads((result.draft_dir / "config.json").read_text())
    assert config_json["speculators_model_type"] == "kangaroo" and config_json["exit_layer"] == 1
    target, tokenizer = specdec.load_model(str(setup[1]))
    ids, mask = chat_batch(tokenizer, ["spell dog", "say no", "sort a word", "count to nine"])
    ref = hf_greedy(target, ids, mask, max_new_tokens=32, eos_token_id=None)
    taus = []
    for drafter in (KangarooAdapter(KangarooAdapterModel.from_target(target, 1), num_tokens=4),
                    KangarooAdapter.from_pretrained(result.draft_dir, num_tokens=4)):
        out = specdec.wrap(target, drafter=drafter, chunk_steps=3).generate(
            ids, attention_mask=mask, max_new_tokens=32, do_sample=False, pad_token_id=0, eos_token_id=None,
            return_dict_in_generate=True)
        assert torch.equal(out.sequences, ref)
        taus.append(out.spec_stats.tau)
    assert taus[1] > taus[0] + 0.5, taus


def test_resume_matches_uninterrupted(setup, monkeypatch):
    """A run killed after its step-2 checkpoint and resumed ends with the same adapter, bit for
    bit, and reuses the cached responses."""
    common = {"steps": 4, "save_every": 2, "eval.every": 0}
    straight = train(kangaroo_config(setup, "straight", **common))
    save = KangarooTrainer.save_checkpoint

    def save_then_die(self, step):
        save(self, step)
        raise KeyboardInterrupt

    monkeypatch.setattr(KangarooTrainer, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(kangaroo_config(setup, "resumed", **common))
    monkeypatch.undo()
    cache = setup[0] / "resumed" / "responses.safetensors"
    stamp = cache.stat().st_mtime_ns
    resumed = train(kangaroo_config(setup, "resumed", **common))
    assert resumed.steps == 4 and cache.stat().st_mtime_ns == stamp
    a = KangarooAdapterModel.from_pretrained(straight.draft_dir).state_dict()
    b = KangarooAdapterModel.from_pretrained(resumed.draft_dir).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    start = KangarooAdapterModel.from_target(specdec.load_model(str(setup[1]))[0], 1).state_dict()
    assert not torch.equal(a["layers.0.self_attn.o_proj.weight"], start["layers.0.self_attn.o_proj.weight"])


@pytest.mark.parametrize("override, message", [("method.exit_layer=0", "method.exit_layer must be >= 1"),
                                               ("method.exit_layer=2", "exit_layer must be in 1..1"),
                                               ("method.stop_threshold=1.0", "method.stop_threshold must be in")])
def test_bad_method_choices_are_refused_by_name(setup, override, message):
    key, value = override.split("=")
    with pytest.raises(ValueError, match=message):
        train(config(setup, "kangaroo", "bad", steps=1, **{key: value}))


def test_adapter_mask_in_a_literal_case():
    """Column i sees real columns j <= i and itself; left padding is never seen by real columns."""
    from specdec.training.kangaroo import adapter_mask

    mask = adapter_mask(torch.tensor([[False, True, True]]))
    assert mask.shape == (1, 1, 3, 3)
    assert mask[0, 0].int().tolist() == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]


def test_save_dtype_writes_a_bf16_folder_that_loads(setup):
    """method.save_dtype=bf16 stores every float tensor in bf16 (as for eagle and medusa); the folder
    records eval.num_tokens as its draft length and loads back, in fp32, to the bf16 values."""
    from safetensors.torch import load_file

    result = train(kangaroo_config(setup, "bf16", **{"steps": 2, "eval.every": 0, "eval.num_tokens": 5,
                                                     "method.save_dtype": "bf16"}))
    stored = load_file(str(result.draft_dir / "model.safetensors"))
    assert {t.dtype for t in stored.values()} == {torch.bfloat16}
    proposal = json.loads((result.draft_dir / "config.json").read_text())["speculators_config"]["proposal_methods"]
    assert proposal[0]["speculative_tokens"] == 5
    loaded = KangarooAdapterModel.from_pretrained(result.draft_dir).state_dict()
    assert all(loaded[k].dtype == torch.float32 and torch.equal(loaded[k].bfloat16(), v) for k, v in stored.items())

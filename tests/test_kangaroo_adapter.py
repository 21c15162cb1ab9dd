"""KangarooAdapter through the one drafter contract: lossless, aligned with training, checkpoints.

- Greedy output equals HF greedy on every tiny architecture, batch 1 and ragged batch 4, one
  step per sync and three, with and without confidence halting.
- An untrained adapter (o_proj zero) drafts exactly what the plain early exit drafts.
- Every draft equals what the training forward predicts from HF's layer-ℓ hidden states for the
  same tokens: after the prompt (``begin``), after verified steps (``observe``, which feeds the
  verification's exit states) and after pauses (``resync``).
- Speculative sampling keeps the target's distribution (chi-square), halting or not.
- save -> from_pretrained (directly and through the Hydra drafter config) gives the same drafts;
  the loader checks names, shapes and kind, and never unpickles.
"""
import json
import pickle

import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file
from heads_util import generate, kangaroo, noisy, recording
from test_sampling import PARAMS, V, chi2_pvalue, exact_joint, sampled_joint
from tiny import ARCHS, hf_greedy, make_tiny, ragged_batch

import specdec
from specdec.drafters import KangarooAdapter, LayerSkip, build_drafter
from specdec.drafters.heads import HeadCache, HeadCheckpointError
from specdec.drafters.kangaroo_adapter import KangarooAdapterModel
from specdec.training.kangaroo import adapter_mask


def recording_valid(drafter):
    """Record (drafted tokens [B, K], valid [B, K]) at every propose."""
    seen, propose = [], drafter.propose

    def record(state):
        tree = propose(state)
        seen.append((tree.tokens.clone(), tree.valid.clone()))
        return tree
    drafter.propose = record
    return seen


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("lengths", [[7], [3, 9, 1, 6]], ids=["batch1", "batch4_ragged"])
@pytest.mark.parametrize("steps", [1, 3], ids=["per_step", "3_per_sync"])
def test_greedy_equals_hf(arch, lengths, steps):
    """Random-init adapters, a chain of 3 and a halting chain of 5 (some chains do halt)."""
    model = make_tiny(arch, num_layers=3)
    ids, mask = ragged_batch(lengths, model.config.vocab_size, seed=len(lengths))
    ref = hf_greedy(model, ids, mask, max_new_tokens=24, eos_token_id=None)
    for name, drafter in {"chain": kangaroo(model), "halting": kangaroo(model, 5, 0.1, exit_layer=2)}.items():
        seen = recording_valid(drafter)
        out = generate(model, drafter, ids, mask, chunk_steps=steps)
        assert torch.equal(out.sequences, ref), f"{arch}/{name} differs from HF greedy"
        assert out.spec_stats.new_tokens == [24] * len(lengths)
        valid = torch.cat([v for _, v in seen])
        if name == "halting":
            assert valid.any() and not valid.all(), "the threshold should end some chains early and not others"


def test_untrained_adapter_drafts_what_the_early_exit_drafts():
    """o_proj starts at zero and the output norm is the target's: the drafts (and their halting)
    are LayerSkip.kangaroo's, bit for bit, at batch 4 with three steps per sync."""
    model = make_tiny("qwen2", num_layers=3)
    ids, mask = ragged_batch([5, 11, 2, 7], model.config.vocab_size, seed=2)
    drafts = []
    for drafter in (KangarooAdapter(KangarooAdapterModel.from_target(model, 2), num_tokens=4, stop_threshold=0.15),
                    LayerSkip.kangaroo(exit_layer=2, num_tokens=4, stop_threshold=0.15)):
        seen = recording_valid(drafter)
        generate(model, drafter, ids, mask, n=30, chunk_steps=3)
        drafts.append([torch.where(v, t, -1) for t, v in seen])
    assert len(drafts[0]) == len(drafts[1]) and all(torch.equal(a, b) for a, b in zip(*drafts))
    kept = torch.stack([(d >= 0).float().mean() for d in drafts[0]]).mean()
    assert 0.05 < kept < 0.95, kept  # the threshold halts some chains, not all


def expected_chain(adapter, model, committed, k):
    """The training forward's greedy chain after ``committed`` [n]: the adapter over HF's
    hidden_states[ℓ] of committed + chain so far, read at the last column."""
    chain = []
    for _ in range(k):
        ids = torch.cat([committed, torch.tensor(chain, dtype=torch.long)]).unsqueeze(0)        # [1, T]
        exits = model(ids, output_hidden_states=True).hidden_states[adapter.exit_layer]         # [1, T, H]
        t = ids.shape[1]
        normed = adapter(exits, torch.arange(t).unsqueeze(0), mask=adapter_mask(torch.ones(1, t, dtype=torch.bool)))
        chain.append(int(model.lm_head(normed[0, -1]).argmax()))
    return chain


@torch.no_grad()
def test_drafts_are_the_training_forward():
    """After the prompt, after verified steps and after min_tau pauses (then resync)."""
    model = make_tiny("qwen3", num_layers=3)
    drafter = kangaroo(model, 3, exit_layer=2, scale=0.2)
    seen, resyncs, resync = recording(drafter), [], drafter.resync
    drafter.resync = lambda state, since: (resyncs.append(since), resync(state, since))
    ids = torch.tensor([[0] + list(range(10, 19))])  # left padded
    out = generate(model, drafter, ids, (ids > 0).long(), n=60, min_tau=4.0)
    assert torch.equal(out.sequences, hf_greedy(model, ids, (ids > 0).long(), max_new_tokens=60, eos_token_id=None))
    assert resyncs and out.spec_stats.draft_pauses >= 1
    for committed, drafted in seen:
        assert drafted.tolist() == expected_chain(drafter.adapter, model, committed, 3)


def adapter_as_last_layer(arch):
    """(target, its adapter): a 3-layer target whose last layer is the noisy adapter exit-2 adapter
    (its attention, input norm and final norm; its MLP zeroed), so the draft is the target itself."""
    model = make_tiny(arch, num_layers=3)
    adapter = noisy(KangarooAdapterModel.from_target(model, 2), 0.3)
    last = model.model.layers[2]
    with torch.no_grad():
        last.self_attn.load_state_dict(adapter.layers[0].self_attn.state_dict())
        last.input_layernorm.load_state_dict(adapter.layers[0].input_layernorm.state_dict())
        last.mlp.down_proj.weight.zero_()
        model.model.norm.weight.copy_(adapter.norm.weight)
    return model, adapter


@pytest.mark.parametrize("arch", ARCHS)
def test_a_target_made_of_the_draft_accepts_every_chain(arch):
    """When the target's last layer is the adapter, every chain is accepted in full (τ = K + 1):
    the adapter's cache holds, slot for slot, the K/V the target's last layer holds, including
    the last node of a fully accepted chain, which only verification's exit states (``observe``)
    provide."""
    model, adapter = adapter_as_last_layer(arch)
    ids, mask = ragged_batch([4, 10, 2, 7], model.config.vocab_size, seed=3)
    ref = hf_greedy(model, ids, mask, max_new_tokens=33, eos_token_id=None)
    for steps in (1, 3):
        out = generate(model, KangarooAdapter(adapter, num_tokens=3), ids, mask, n=33, chunk_steps=steps)
        assert torch.equal(out.sequences, ref)
        assert all(a == [4] * 8 + [1] for a in out.spec_stats.accepted_lengths), out.spec_stats.accepted_lengths


@pytest.mark.parametrize("arch", ARCHS)
def test_adapter_steps_through_its_cache_like_one_causal_forward(arch):
    """Feeding exit states one at a time through a HeadCache gives the states of one causal forward;
    only the attention block and norms are stored (no MLP, no LM head)."""
    target = make_tiny(arch, num_layers=3)
    adapter = noisy(KangarooAdapterModel.from_target(target, 2)).eval()
    exits = target(torch.randint(4, 256, (2, 7)), output_hidden_states=True).hidden_states[2].detach()
    pos = torch.arange(7).expand(2, 7)
    with torch.no_grad():
        full = adapter(exits, pos)
        cache = HeadCache()
        steps = torch.cat([adapter(exits[:, i:i + 1], pos[:, i:i + 1], cache=cache) for i in range(7)], 1)
    assert full.shape == (2, 7, 64) and torch.allclose(steps, full, atol=1e-5)
    names = set(adapter.state_dict())
    assert "norm.weight" in names and "layers.0.input_layernorm.weight" in names
    assert not any("mlp" in n or "lm_head" in n or "post_attention" in n for n in names)


def test_speculators_folder_round_trip(tmp_path):
    model = make_tiny("mistral", num_layers=3)
    first = kangaroo(model, 4, 0.3, exit_layer=2)
    first.adapter.save_pretrained(tmp_path / "head", speculative_tokens=4)
    config = json.loads((tmp_path / "head" / "config.json").read_text())
    assert config["speculators_model_type"] == "kangaroo" and config["exit_layer"] == 2
    assert config["transformer_layer_config"]["num_hidden_layers"] == 1
    assert config["speculators_config"]["algorithm"] == "kangaroo"
    assert config["speculators_config"]["proposal_methods"][0]["speculative_tokens"] == 4
    second = build_drafter({"_target_": "specdec.drafters.KangarooAdapter.from_pretrained",
                            "folder": str(tmp_path / "head"), "num_tokens": 4, "stop_threshold": 0.3})
    with initialize_config_module("specdec.conf", version_base=None):
        cfg = compose("generate", overrides=["drafter=kangaroo_adapter", f"drafter.folder={tmp_path / 'head'}",
                                             "drafter.num_tokens=4", "drafter.stop_threshold=0.3", "model.device=cpu"])
    third = build_drafter(OmegaConf.to_container(cfg.drafter, resolve=True), target=model)
    ids, mask = ragged_batch([6, 2, 9], model.config.vocab_size, seed=5)
    drafts = []
    for d in (first, second, third):
        seen = recording_valid(d)
        generate(model, d, ids, mask, n=20, chunk_steps=2)
        drafts.append(torch.stack([torch.where(v, t, -1) for t, v in seen]))
    assert torch.equal(drafts[0], drafts[1]) and torch.equal(drafts[0], drafts[2])


def _rewrite(folder, change):
    tensors = load_file(str(folder / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(folder / "model.safetensors"))


def test_loader_checks_and_never_unpickles(tmp_path, monkeypatch):
    model = make_tiny("llama", num_layers=3)
    adapter = KangarooAdapterModel.from_target(model, 1)
    for name in ("missing", "misshaped", "kind"):
        adapter.save_pretrained(tmp_path / name)
    _rewrite(tmp_path / "missing", lambda t: t.pop("layers.0.self_attn.o_proj.weight"))
    with pytest.raises(HeadCheckpointError, match="missing layers.0.self_attn.o_proj.weight"):
        KangarooAdapterModel.from_pretrained(tmp_path / "missing")
    _rewrite(tmp_path / "misshaped", lambda t: t.update({"norm.weight": torch.zeros(32)}))
    with pytest.raises(HeadCheckpointError, match=r"norm.weight has shape \(32,\), expected \(64,\)"):
        KangarooAdapterModel.from_pretrained(tmp_path / "misshaped")
    config = json.loads((tmp_path / "kind" / "config.json").read_text())
    (tmp_path / "kind" / "config.json").write_text(json.dumps(config | {"speculators_model_type": "eagle3"}))
    with pytest.raises(HeadCheckpointError, match="speculators_model_type is 'eagle3', expected 'kangaroo'"):
        KangarooAdapterModel.from_pretrained(tmp_path / "kind")

    def refuse(*args, **kwargs):
        raise AssertionError("the adapter loader unpickled something")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    adapter.save_pretrained(tmp_path / "good")
    KangarooAdapterModel.from_pretrained(tmp_path / "good")
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "config.json").write_text(json.dumps(config))
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"not opened")
    with pytest.raises(HeadCheckpointError, match="no model.safetensors"):
        KangarooAdapterModel.from_pretrained(tmp_path / "pickled")


def test_bad_choices_are_refused_by_name():
    model = make_tiny("llama", num_layers=3)
    with pytest.raises(ValueError, match=r"exit_layer must be in 1..2"):
        KangarooAdapterModel.from_target(model, 3)
    with pytest.raises(ValueError, match="stop_threshold must be in"):
        KangarooAdapter(KangarooAdapterModel.from_target(model, 1), stop_threshold=1.5)
    with pytest.raises(ValueError, match="exit layer 2 is outside this 2-layer target"):
        specdec.wrap(make_tiny("llama", num_layers=2),
                     drafter=KangarooAdapter(KangarooAdapterModel.from_target(model, 2)))
    with pytest.raises(ValueError, match="hidden size 64 does not match the target's 32"):
        specdec.wrap(make_tiny("llama", num_layers=3, hidden=32),
                     drafter=KangarooAdapter(KangarooAdapterModel.from_target(model, 1)))


def test_max_draft_batch_pauses_then_resyncs_exactly():
    """Batch 4 with max_draft_batch=3: no drafting until a row stops at its EOS, then resync."""
    model = make_tiny("llama", num_layers=3)
    ids, mask = ragged_batch([3, 9, 1, 6], model.config.vocab_size, seed=4)
    free = hf_greedy(model, ids, mask, max_new_tokens=30, eos_token_id=None)[:, ids.shape[1]:]
    eos = next(int(t) for p, t in enumerate(free[0, 4:].tolist(), 4) if t not in free[0, :p].tolist())
    ref = hf_greedy(model, ids, mask, max_new_tokens=30, eos_token_id=eos)
    drafter = kangaroo(model)
    calls, resync = [], drafter.resync
    drafter.resync = lambda state, since: (calls.append(since), resync(state, since))
    for steps in (1, 3):
        out = generate(model, drafter, ids, mask, n=30, eos=eos, max_draft_batch=3, chunk_steps=steps)
        assert torch.equal(out.sequences, ref)
    assert calls


@pytest.fixture(scope="module")
def small_target():
    return make_tiny("llama", vocab_size=V, init_range=0.15, seed=11, num_layers=3)


@pytest.mark.parametrize("params", PARAMS, ids=["t1", "t0.7_k5_p0.9"])
@pytest.mark.parametrize("stop", [None, 0.4], ids=["chain", "halting"])
def test_speculative_sampling_preserves_target(small_target, params, stop):
    """The first two sampled tokens follow the target, through the chunked driver (2 steps per sync)."""
    torch.manual_seed(1234)
    drafter = kangaroo(small_target, 2, stop, exit_layer=1, scale=0.1)
    counts = sampled_joint(specdec.wrap(small_target, drafter=drafter, chunk_steps=2), params)
    assert chi2_pvalue(counts, exact_joint(small_target, params)) > 1e-3

"""Draft-head models on tiny targets of every architecture: shapes, the step API, checkpoints."""
import json
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import ARCHS, make_tiny

from specdec.drafters.heads import (EagleHeadModel, HeadCache, HeadCheckpointError, MedusaHeadsModel,
                                    VerifierMismatchError, causal_mask, draft_vocab_from_counts, eagle3_aux_layers)
from specdec.training.heads import ttt_mask

AUX = (1, 2, 3)


def target_states(target, ids):
    """(aux states at AUX [B, T, 3H], final states [B, T, H], logits [B, T, V]) of ``target``."""
    out = target(ids, output_hidden_states=True)
    return torch.cat([out.hidden_states[a] for a in AUX], -1), out.hidden_states[-1], out.logits


def target_states_final(target, ids):
    """(None, final states [B, T, H], logits [B, T, V]): what Medusa reads and predicts from."""
    out = target(ids, output_hidden_states=True)
    return None, out.hidden_states[-1], out.logits


def positions(b, t):
    return torch.arange(t).expand(b, t)


@pytest.mark.parametrize("arch", ARCHS)
def test_eagle_steps_through_its_cache_like_one_causal_forward(arch):
    """Feeding tokens one at a time through a HeadCache gives the logits and states of one causal forward."""
    target = make_tiny(arch, num_layers=4)
    head = EagleHeadModel.from_target(target, AUX).eval()
    ids = torch.randint(4, 256, (2, 7))
    aux, _, _ = target_states(target, ids)
    with torch.no_grad():
        full = head(ids, head.fuse(aux), positions(2, 7))
        cache, steps = HeadCache(), []
        for i in range(7):
            steps.append(head(ids[:, i:i + 1], head.fuse(aux[:, i:i + 1]), positions(2, 7)[:, i:i + 1], cache=cache))
    assert full.logits.shape == (2, 7, 256) and full.hidden.shape == (2, 7, 64) and cache.length == 7
    assert torch.allclose(torch.cat([s.logits for s in steps], 1), full.logits, atol=1e-5)
    assert torch.allclose(torch.cat([s.hidden for s in steps], 1), full.hidden, atol=1e-5)
    assert head.layers[0].self_attn.q_proj.in_features == 2 * 64  # attention reads [embedding, state]
    assert type(head.layers[0]).__name__.lower().startswith(arch)  # the target architecture's own layer


def test_eagle_starts_from_the_target():
    """Embedding (frozen), final norm and LM head rows are the target's; d2t/t2d map the reduced vocab."""
    target = make_tiny("llama", num_layers=4)
    vocab = torch.tensor([3, 7, 8, 20, 255])
    head = EagleHeadModel.from_target(target, draft_vocab=vocab)
    assert head.aux_layers == eagle3_aux_layers(4) == (2, 2, 1)
    assert torch.equal(head.embed_tokens.weight, target.model.embed_tokens.weight)
    assert not head.embed_tokens.weight.requires_grad and head.lm_head.weight.requires_grad
    assert torch.equal(head.lm_head.weight, target.lm_head.weight[vocab])
    assert torch.equal(head.to_target(torch.arange(5)), vocab) and int(head.t2d.sum()) == 5
    assert torch.equal(head.t2d.nonzero().flatten(), vocab)
    with pytest.raises(ValueError, match="aux_layers"):
        EagleHeadModel.from_target(target, aux_layers=(1, 4))


def test_draft_vocab_keeps_the_most_frequent_ids():
    counts = torch.tensor([5, 0, 9, 9, 1, 7])
    assert draft_vocab_from_counts(counts, 3).tolist() == [2, 3, 5]   # 9, 9, 7; ascending ids
    assert draft_vocab_from_counts(counts, 4).tolist() == [0, 2, 3, 5]


@pytest.mark.parametrize("arch", ARCHS)
def test_untrained_medusa_heads_say_what_the_target_says_next(arch):
    """Zero-initialised residual blocks are the identity, so every head starts as the target's own LM head."""
    target = make_tiny(arch, num_layers=2)
    heads = MedusaHeadsModel.from_target(target, num_heads=3, num_layers=2)
    ids = torch.randint(4, 256, (2, 5))
    with torch.no_grad():
        _, last, logits = target_states_final(target, ids)
        out = heads(last)
    assert out.shape == (3, 2, 5, 256)
    for k in range(3):
        assert torch.allclose(out[k], logits, atol=1e-5)


def test_masks_in_literal_cases():
    assert causal_mask(1, 2, 1, "cpu")[0, 0].tolist() == [[True, True, False], [True, True, True]]
    real = torch.tensor([[False, True, True]])  # slot 0 reads left padding
    mask = ttt_mask(real, 1)[0, 0].int().tolist()
    assert mask == [[1, 0, 0, 1, 0, 0],   # a padded slot sees only itself
                    [0, 1, 0, 0, 1, 0],   # slot 1: real slots <= 1, then its own chain
                    [0, 1, 1, 0, 0, 1]]


def _eagle_and_inputs(arch, vocab=None):
    target = make_tiny(arch, num_layers=4)
    head = EagleHeadModel.from_target(target, AUX, draft_vocab=vocab)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.01 * torch.randn_like(p))  # not just the target's copies
    ids = torch.randint(4, 256, (2, 6))
    return target, head, ids, target_states(target, ids)[0]


@pytest.mark.parametrize("arch", ARCHS)
def test_eagle_round_trip_is_exact(arch, tmp_path):
    """save_pretrained -> from_pretrained reproduces the logits bit for bit, reduced vocabulary included."""
    target, head, ids, aux = _eagle_and_inputs(arch, vocab=torch.arange(10, 138))
    head.save_pretrained(tmp_path / "head", speculative_tokens=5)
    loaded = EagleHeadModel.from_pretrained(tmp_path / "head")
    with torch.no_grad():
        a = head(ids, head.fuse(aux), positions(2, 6))
        b = loaded(ids, loaded.fuse(aux), positions(2, 6))
    assert torch.equal(a.logits, b.logits) and torch.equal(a.hidden, b.hidden)
    assert torch.equal(loaded.d2t, head.d2t) and torch.equal(loaded.t2d, head.t2d)
    config = json.loads((tmp_path / "head" / "config.json").read_text())
    assert config["speculators_model_type"] == "eagle3" and config["draft_vocab_size"] == 128
    assert config["eagle_aux_hidden_state_layer_ids"] == list(AUX)
    assert config["transformer_layer_config"]["num_hidden_layers"] == 1
    assert config["transformer_layer_config"]["model_type"] == arch
    spec = config["speculators_config"]
    assert spec["algorithm"] == "eagle3" and spec["proposal_methods"][0]["speculative_tokens"] == 5
    assert spec["verifier"]["architectures"] == [type(target).__name__]  # from_config models carry none
    names = set(load_file(str(tmp_path / "head" / "model.safetensors")))
    assert {"fc.weight", "layers.0.self_attn.q_proj.weight", "layers.0.hidden_norm.weight", "norm.weight",
            "lm_head.weight", "d2t", "t2d", "embed_tokens.weight"} <= names


def test_eagle_without_its_embedding_takes_the_targets(tmp_path):
    target, head, ids, aux = _eagle_and_inputs("qwen3")
    head.save_pretrained(tmp_path / "head", include_embedding=False)
    assert "embed_tokens.weight" not in load_file(str(tmp_path / "head" / "model.safetensors"))
    loaded = EagleHeadModel.from_pretrained(tmp_path / "head", target=target)
    assert torch.equal(loaded.embed_tokens.weight, target.model.embed_tokens.weight)
    pos = positions(2, 6)
    expected = loaded(ids, loaded.fuse(aux), pos).logits
    borrowing = EagleHeadModel.from_pretrained(tmp_path / "head")  # no target: it borrows one later
    assert borrowing.borrows_embedding
    with pytest.raises(RuntimeError, match="take_embedding"):
        borrowing(ids, borrowing.fuse(aux), pos)
    borrowing.take_embedding(target)
    assert torch.equal(borrowing(ids, borrowing.fuse(aux), pos).logits, expected)
    with pytest.raises(VerifierMismatchError, match="embedding"):
        borrowing.take_embedding(make_tiny("llama", vocab_size=128, num_layers=4))


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_medusa_round_trip_is_exact(arch, tmp_path):
    target = make_tiny(arch, num_layers=2)
    heads = MedusaHeadsModel.from_target(target, num_heads=3, num_layers=2)
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(0.01 * torch.randn_like(p))
    heads.save_pretrained(tmp_path / "medusa")
    loaded = MedusaHeadsModel.from_pretrained(tmp_path / "medusa")
    hidden = torch.randn(2, 4, 64)
    with torch.no_grad():
        assert torch.equal(heads(hidden), loaded(hidden))
    config = json.loads((tmp_path / "medusa" / "config.json").read_text())
    assert config["speculators_model_type"] == "medusa" and config["medusa_num_heads"] == 3
    assert config["speculators_config"]["proposal_methods"][0]["speculative_tokens"] == 3
    assert set(load_file(str(tmp_path / "medusa" / "model.safetensors"))) == {
        f"blocks.{k}.layers.{j}.{w}" for k in range(3) for j in range(2) for w in ("weight", "bias")
    } | {f"lm_heads.{k}.weight" for k in range(3)}


def _rewrite(folder, change):
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path))


def test_loader_names_a_missing_or_misshaped_tensor(tmp_path):
    _, head, _, _ = _eagle_and_inputs("llama")
    head.save_pretrained(tmp_path / "missing")
    _rewrite(tmp_path / "missing", lambda t: t.pop("layers.0.hidden_norm.weight"))
    with pytest.raises(HeadCheckpointError, match="missing layers.0.hidden_norm.weight"):
        EagleHeadModel.from_pretrained(tmp_path / "missing")
    head.save_pretrained(tmp_path / "misshaped")
    _rewrite(tmp_path / "misshaped", lambda t: t.update({"fc.weight": torch.zeros(64, 128)}))
    with pytest.raises(HeadCheckpointError, match=r"fc.weight has shape \(64, 128\), expected \(64, 192\)"):
        EagleHeadModel.from_pretrained(tmp_path / "misshaped")
    medusa = MedusaHeadsModel.from_target(make_tiny("llama"), num_heads=2)
    medusa.save_pretrained(tmp_path / "medusa")
    _rewrite(tmp_path / "medusa", lambda t: t.update({"extra.weight": torch.zeros(1)}))
    with pytest.raises(HeadCheckpointError, match="unexpected extra.weight"):
        MedusaHeadsModel.from_pretrained(tmp_path / "medusa")
    with pytest.raises(HeadCheckpointError, match="speculators_model_type is 'medusa', expected 'eagle3'"):
        EagleHeadModel.from_pretrained(tmp_path / "medusa")


def test_loader_never_unpickles(tmp_path, monkeypatch):
    """Loading reads safetensors and JSON only; a pickled weights file is refused, not opened."""
    _, head, _, _ = _eagle_and_inputs("qwen2")
    head.save_pretrained(tmp_path / "head")

    def refuse(*args, **kwargs):
        raise AssertionError("a head loader unpickled something")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    EagleHeadModel.from_pretrained(tmp_path / "head")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((tmp_path / "head" / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"not opened")
    with pytest.raises(HeadCheckpointError, match="no model.safetensors"):
        EagleHeadModel.from_pretrained(pickled)


@pytest.mark.parametrize("arch", ARCHS)
def test_shared_lm_head_medusa_saves_only_its_blocks_and_drafts_exactly(arch, tmp_path):
    """shared_lm_head: the heads use the target's LM head, the folder holds the blocks only, and
    loading with the target gives the same logits; without the target it says what is missing."""
    import specdec
    from specdec.drafters import MedusaHeads
    from tiny import hf_greedy

    target = make_tiny(arch, num_layers=2)
    heads = MedusaHeadsModel.from_target(target, num_heads=3, num_layers=1, shared_lm_head=True)
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ids = torch.randint(4, 256, (2, 5))
    with torch.no_grad():
        _, last, logits = target_states_final(target, ids)
        out = heads(last)
    assert out.shape == (3, 2, 5, 256)
    heads.save_pretrained(tmp_path / "m", dtype=torch.bfloat16)
    stored = load_file(str(tmp_path / "m" / "model.safetensors"))
    assert set(stored) == {f"blocks.{k}.layers.0.{w}" for k in range(3) for w in ("weight", "bias")}
    assert all(t.dtype == torch.bfloat16 for t in stored.values())
    loaded = MedusaHeadsModel.from_pretrained(tmp_path / "m", target=target)
    with torch.no_grad():
        again = loaded(last)
    assert (again - out).abs().max() < 0.05 * out.abs().max()  # bf16 storage, fp32 compute
    with pytest.raises(RuntimeError, match="share_lm_head"):
        MedusaHeadsModel.from_pretrained(tmp_path / "m")(last)
    prompt = torch.randint(4, 256, (1, 6))
    want = hf_greedy(target, prompt, max_new_tokens=16)
    got = specdec.wrap(target, drafter=MedusaHeads(MedusaHeadsModel.from_pretrained(tmp_path / "m"))).generate(
        prompt, max_new_tokens=16, do_sample=False, pad_token_id=0)
    assert torch.equal(got, want)


def test_eagle_saves_in_bf16_without_its_embedding(tmp_path):
    target = make_tiny("llama", num_layers=4)
    head = EagleHeadModel.from_target(target)
    head.save_pretrained(tmp_path / "e", include_embedding=False, dtype=torch.bfloat16)
    stored = load_file(str(tmp_path / "e" / "model.safetensors"))
    assert "embed_tokens.weight" not in stored
    assert {t.dtype for t in stored.values() if t.is_floating_point()} == {torch.bfloat16}
    loaded = EagleHeadModel.from_pretrained(tmp_path / "e", target=target)
    for k, v in stored.items():
        assert torch.equal(loaded.state_dict()[k].to(v.dtype), v)

"""EagleHead and MedusaHeads through the one drafter contract: exact, aligned with training, lossless.

- Greedy output equals HF greedy on every tiny architecture, batch 1 and ragged batch 4, one
  step per sync and three.
- Every draft equals what the training code's own forward predicts at that point (the EAGLE
  training-time-test unroll; the Medusa heads on HF's final hidden state): the engine's slots
  and offsets are the trainer's, after the prompt (``begin``) and after a pause (``resync``).
- A head trained for a few seconds accepts far more than an untrained one, through the engine.
- Speculative sampling with either drafter keeps the target's distribution (chi-square).
- save -> from_pretrained gives the same drafts.
"""
import pytest
import torch
from test_heads_training import config, context_free_target
from test_sampling import PARAMS, V, chi2_pvalue, exact_joint, sampled_joint
from test_training_helpers import PROMPTS, write_prompts
from heads_util import eagle, generate, medusa, recording
from tiny import ARCHS, hf_greedy, make_tiny, ragged_batch

import specdec
from specdec.drafters import EagleHead, MedusaHeads, build_drafter
from specdec.drafters.head_drafters import default_choices
from specdec.drafters.heads import EagleHeadModel, MedusaHeadsModel
from specdec.training import train
from specdec.training.heads import EagleUnroll

@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("lengths", [[7], [3, 9, 1, 6]], ids=["batch1", "batch4_ragged"])
@pytest.mark.parametrize("steps", [1, 3], ids=["per_step", "3_per_sync"])
def test_greedy_equals_hf(arch, lengths, steps):
    """Random-init heads (full and reduced EAGLE vocabulary, Medusa's default and a wide tree)."""
    model = make_tiny(arch)
    ids, mask = ragged_batch(lengths, model.config.vocab_size, seed=len(lengths))
    ref = hf_greedy(model, ids, mask, max_new_tokens=24, eos_token_id=None)
    drafters = {"eagle": eagle(model), "eagle_vocab64": eagle(model, 4, torch.arange(4, 256, 4)),
                "medusa": medusa(model), "medusa_wide": medusa(model, 2, [[i] for i in range(4)] + [[0, 0], [1, 0]])}
    for name, drafter in drafters.items():
        out = generate(model, drafter, ids, mask, chunk_steps=steps)
        assert torch.equal(out.sequences, ref), f"{arch}/{name} differs from HF greedy"
        assert out.spec_stats.new_tokens == [24] * len(lengths)


def eagle_expected(drafter, model, committed, k):
    """The training unroll's chain after ``committed`` (slot n - 2 reads the root at depth 0, and
    drafted token d - 1 at depth d), grown greedily one depth per pass as drafting does."""
    head, n_c, chain = drafter.head, len(committed), []
    for depth in range(1, k + 1):
        ids = torch.cat([committed, torch.tensor(chain, dtype=torch.long)]).unsqueeze(0)    # [1, T]
        states = model(ids, output_hidden_states=True).hidden_states
        aux = torch.cat([states[a] for a in head.aux_layers], dim=-1)                      # [1, T, 3H]
        t = ids.shape[1]
        out = EagleUnroll(head)(ids, aux, torch.arange(t).unsqueeze(0), torch.ones(1, t - 1, dtype=torch.bool), depth)
        chain.append(int(head.to_target(out.logits[-1][0, n_c - 2].argmax())))
    return chain


def medusa_expected(drafter, model, committed):
    last = model(committed.unsqueeze(0), output_hidden_states=True).hidden_states[-1][:, -2]  # [1, H]
    top = drafter.heads(last.unsqueeze(1))[:, 0, 0].topk(drafter.ranks, dim=-1).indices      # [K, R]
    return [int(top[len(c) - 1, c[-1]]) for c in drafter.choices]


@pytest.mark.parametrize("kind", ["eagle", "eagle_vocab", "medusa"])
@torch.no_grad()
def test_drafts_are_the_training_forward(kind):
    """Every draft, after the prompt and after gate pauses (min_tau forces them, then resync),
    equals what the trainer's forward predicts from HF's hidden states for the same tokens."""
    model = make_tiny("qwen3")
    drafter = {"eagle": lambda: eagle(model), "eagle_vocab": lambda: eagle(model, 3, torch.arange(4, 200)),
               "medusa": lambda: medusa(model)}[kind]()
    seen, resyncs, resync = recording(drafter), [], drafter.resync
    drafter.resync = lambda state, since: (resyncs.append(since), resync(state, since))
    ids = torch.tensor([[0] + list(range(10, 19))])  # left padded
    out = generate(model, drafter, ids, (ids > 0).long(), n=60, min_tau=4.0)
    assert torch.equal(out.sequences, hf_greedy(model, ids, (ids > 0).long(), max_new_tokens=60, eos_token_id=None))
    assert resyncs and out.spec_stats.draft_pauses >= 1
    for committed, drafted in seen[::3]:
        if kind == "medusa":
            assert drafted.tolist() == medusa_expected(drafter, model, committed)
        else:
            assert drafted.tolist() == eagle_expected(drafter, model, committed, 3)


def test_default_medusa_tree_and_bad_choices():
    assert default_choices(2) == [[0], [1], [0, 0], [0, 1]]
    heads = MedusaHeadsModel.from_target(make_tiny("llama"), 2)
    with pytest.raises(ValueError, match=r"no parent path \[1\]"):
        MedusaHeads(heads, tree=[[0], [1, 0]])
    with pytest.raises(ValueError, match="1..2"):
        MedusaHeads(heads, tree=[[0], [0, 0], [0, 0, 0]])
    with pytest.raises(ValueError, match="aux layers"):
        specdec.wrap(make_tiny("llama", num_layers=1), drafter=eagle(make_tiny("llama")))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(target, {method: trained speculators folder}, {method: train result}) on the context-free target."""
    tmp = tmp_path_factory.mktemp("trained")
    setup = (tmp, context_free_target(tmp / "target"),
             write_prompts(tmp / "prompts.jsonl", [f"{p} {i}" for i in range(3) for p in PROMPTS]))
    results = {"eagle": train(config(setup, "eagle", "eagle", steps=100, **{"eval.every": 0, "eval.tau_prompts": 3,
                                                                           "method.aux_layers": "[1,1,1]"})),
               "medusa": train(config(setup, "medusa", "medusa", steps=100, **{"eval.every": 0, "eval.tau_prompts": 3,
                                                                             "method.num_heads": 3}))}
    target, _ = specdec.load_model(str(setup[1]))
    return target, results


@pytest.mark.parametrize("method", ["eagle", "medusa"])
def test_trained_head_accepts_more_and_stays_exact(trained, method):
    """The trainer's eval/tau is the engine's τ with the head drafter: it rises with training; the
    saved head, reloaded, drafts exactly at batch 4 with three steps per sync."""
    target, results = trained
    before, after = results[method].before, results[method].after
    assert after["eval/tau"] > before["eval/tau"] + 0.8, (before, after)
    folder = results[method].draft_dir
    drafter = EagleHead.from_pretrained(folder, num_tokens=4) if method == "eagle" else MedusaHeads.from_pretrained(folder)
    untrained = (EagleHead(EagleHeadModel.from_target(target, (1, 1, 1)), num_tokens=4) if method == "eagle"
                 else MedusaHeads(MedusaHeadsModel.from_target(target, 3)))
    ids, mask = ragged_batch([5, 12, 3, 8], target.config.vocab_size, seed=4)
    ref = hf_greedy(target, ids, mask, max_new_tokens=32, eos_token_id=None)
    taus = []
    for d in (untrained, drafter):
        out = generate(target, d, ids, mask, n=32, chunk_steps=3)
        assert torch.equal(out.sequences, ref)
        taus.append(out.spec_stats.tau)
    assert taus[1] > taus[0] + 0.8, taus


@pytest.mark.parametrize("method", ["eagle", "medusa"])
def test_save_load_gives_the_same_drafts(method, tmp_path):
    model = make_tiny("mistral")
    first = eagle(model, 3, torch.arange(4, 200)) if method == "eagle" else medusa(model)
    module = first.head if method == "eagle" else first.heads
    module.save_pretrained(tmp_path / "head")
    cfg = {"_target_": f"specdec.drafters.{type(first).__name__}.from_pretrained", "folder": str(tmp_path / "head")}
    second = build_drafter(cfg | ({"num_tokens": 3} if method == "eagle" else {}))
    ids, mask = ragged_batch([6, 2, 9], model.config.vocab_size, seed=5)
    drafts = []
    for d in (first, second):
        seen = recording(d)
        generate(model, d, ids, mask, n=20)
        drafts.append(torch.stack([t for _, t in seen]))
    assert torch.equal(drafts[0], drafts[1])


def test_max_draft_batch_pauses_then_resyncs_exactly():
    """Batch 4 with max_draft_batch=3: no drafting until a row stops at its EOS, then resync."""
    model = make_tiny("llama")
    ids, mask = ragged_batch([3, 9, 1, 6], model.config.vocab_size, seed=4)
    free = hf_greedy(model, ids, mask, max_new_tokens=30, eos_token_id=None)[:, ids.shape[1]:]
    eos = next(int(t) for p, t in enumerate(free[0, 4:].tolist(), 4) if t not in free[0, :p].tolist())
    ref = hf_greedy(model, ids, mask, max_new_tokens=30, eos_token_id=eos)
    for drafter in (eagle(model), medusa(model)):
        calls, resync = [], drafter.resync
        drafter.resync = lambda state, since: (calls.append(since), resync(state, since))
        for steps in (1, 3):
            out = generate(model, drafter, ids, mask, n=30, eos=eos, max_draft_batch=3, chunk_steps=steps)
            assert torch.equal(out.sequences, ref)
        assert calls


@pytest.fixture(scope="module")
def small_target():
    return make_tiny("llama", vocab_size=V, init_range=0.15, seed=11)


@pytest.mark.parametrize("params", PARAMS, ids=["t1", "t0.7_k5_p0.9"])
@pytest.mark.parametrize("kind", ["eagle", "eagle_vocab", "medusa"])
def test_speculative_sampling_preserves_target(small_target, params, kind):
    """The first two sampled tokens follow the target (q over the target vocabulary for EAGLE,
    also with a reduced draft vocabulary; point masses for Medusa)."""
    torch.manual_seed(1234)
    drafter = {"eagle": lambda: eagle(small_target, 2), "eagle_vocab": lambda: eagle(small_target, 2, torch.tensor([1, 3, 5, 6])),
               "medusa": lambda: medusa(small_target, 2)}[kind]()
    counts = sampled_joint(specdec.wrap(small_target, drafter=drafter, chunk_steps=2), params)
    assert chi2_pvalue(counts, exact_joint(small_target, params)) > 1e-3

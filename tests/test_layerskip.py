"""Layer-skip self-drafting (LayerSkip, Kangaroo halting, Swift, DynamicExit): lossless, and each
mechanism does what it claims on a model built so that the right answer is known."""
import pytest
import torch
from tiny import ARCHS, hf_greedy, make_tiny, ragged_batch

import specdec
from specdec.drafters import DynamicExit, LayerSkip, Swift, build_drafter, make_drafter


def with_identity_layers(model, layers):
    """Zero the output projections of ``layers``: each then adds nothing to the residual stream,
    so skipping it (or exiting before it, when it is a tail) changes no logit."""
    with torch.no_grad():
        for i in layers:
            layer = model.model.layers[i]
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    return model


def generate(model, drafter, ids, mask, n=24):
    out = specdec.wrap(model, drafter=drafter).generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                                                       pad_token_id=0, return_dict_in_generate=True)
    return out.sequences, out.spec_stats


def drafters():
    return {
        "early_exit": LayerSkip(exit_layer=2, num_tokens=3),
        "skip_set": LayerSkip(skip_layers=[1, 2], num_tokens=4),
        "kangaroo": LayerSkip.kangaroo(exit_layer=3, num_tokens=5, stop_threshold=0.5),
        "swift": Swift(skip_ratio=0.34, window=8, max_evals=6, stop_threshold=None),
        "del": DynamicExit(num_tokens=4, exit_layers=[2, 3, 4, 5], prior_weight=8.0),
    }


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("lengths", [[7], [3, 9, 1, 6]], ids=["batch1", "batch4"])
def test_greedy_equals_hf(arch, lengths):
    model = make_tiny(arch, num_layers=6)
    ids, mask = ragged_batch(lengths, 256, seed=len(lengths))
    ref = hf_greedy(model, ids, mask, max_new_tokens=24)
    for name, drafter in drafters().items():
        seq, stats = generate(model, drafter, ids, mask)
        assert torch.equal(seq, ref), f"{name} differs from HF greedy ({arch}, lengths {lengths})"
        assert stats.drafter == type(drafter).__name__


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_early_exit_is_exact_when_the_tail_is_identity(arch):
    # Layers 3..5 add nothing, so an exit after 3 layers predicts exactly what the target does:
    # every draft token is accepted, which also shows the shared prefix K/V are the target's own.
    model = with_identity_layers(make_tiny(arch, num_layers=6), [3, 4, 5])
    ids, mask = ragged_batch([5, 8], 256, seed=3)
    ref = hf_greedy(model, ids, mask, max_new_tokens=40)
    seq, stats = generate(model, LayerSkip(exit_layer=3, num_tokens=4), ids, mask, n=40)
    assert torch.equal(seq, ref)
    assert stats.acceptance_rate == 1.0
    assert stats.tau > 4.5  # 5 tokens per step but for the last, clipped by max_new_tokens


def test_kangaroo_halting_shortens_drafts_and_stays_exact():
    model = make_tiny("llama", num_layers=6)
    ids, mask = ragged_batch([6], 256, seed=5)
    ref = hf_greedy(model, ids, mask, max_new_tokens=24)
    free = LayerSkip(exit_layer=3, num_tokens=5)
    halting = LayerSkip(exit_layer=3, num_tokens=5, stop_threshold=0.9)
    seq_free, stats_free = generate(model, free, ids, mask)
    seq_halt, stats_halt = generate(model, halting, ids, mask)
    assert torch.equal(seq_free, ref) and torch.equal(seq_halt, ref)
    offered_free = sum(map(sum, stats_free.proposed)) / stats_free.num_steps
    offered_halt = sum(map(sum, stats_halt.proposed)) / stats_halt.num_steps
    assert offered_free == 5
    assert offered_halt < offered_free
    # Halting masks the rest of a draft on the device: the same forwards, a static (capturable) step.
    assert stats_halt.draft_forwards == 5 * stats_halt.num_steps


def test_swift_finds_the_identity_layers_and_caches_them(tmp_path):
    # Layers 2 and 3 of 6 are identities: skipping exactly them gives a perfect draft, so the
    # search must reach the target score, stop, and store that set for the task.
    model = with_identity_layers(make_tiny("llama", num_layers=6), [2, 3])
    ids, mask = ragged_batch([12], 256, seed=7)
    ref = hf_greedy(model, ids, mask, max_new_tokens=60)
    cache = tmp_path / "swift.json"
    drafter = Swift(skip_ratio=0.34, window=16, target_score=0.99, max_evals=40, bo_every=3, stop_threshold=None,
                    task="tiny", cache_path=str(cache), seed=1)
    seq, stats = generate(model, drafter, ids, mask, n=60)
    assert torch.equal(seq, ref)
    assert drafter.skip_sets == {"tiny": [2, 3]}
    assert drafter.searches["tiny"]["evals"] < 40  # stopped because the score hit its target
    assert cache.is_file()
    # A new drafter on the same task reads the cached set and never searches.
    again = Swift(skip_ratio=0.34, window=16, task="tiny", cache_path=str(cache), stop_threshold=None)
    seq2, stats2 = generate(model, again, ids, mask, n=60)
    assert torch.equal(seq2, ref)
    assert again.evals == 0 and again.skip_layers == [2, 3]
    assert stats2.acceptance_rate == 1.0 and stats2.tau > stats.tau


def test_swift_bayesian_step_proposes_an_unseen_set():
    model = make_tiny("llama", num_layers=8)
    drafter = Swift(skip_ratio=0.25, seed=0)
    specdec.wrap(model, drafter=drafter)  # binds the target
    scores = {(1, 2): 0.2, (3, 4): 0.6, (5, 6): 0.1, (2, 5): 0.3}
    proposal = drafter._bayes_proposal(scores)
    assert proposal not in scores and len(proposal) == drafter.n_skip
    assert all(i in drafter.candidates for i in proposal)


def test_dynamic_exit_learns_the_exact_exit():
    # With layers 3..5 identities, shadow tokens after 3 layers always match: DEL must learn
    # α = 1 there and then draft full-length chains from the shallowest exact exit.
    model = with_identity_layers(make_tiny("llama", num_layers=6), [3, 4, 5])
    ids, mask = ragged_batch([5, 9], 256, seed=2)
    ref = hf_greedy(model, ids, mask, max_new_tokens=48)
    drafter = DynamicExit(num_tokens=4, exit_layers=[1, 2, 3, 4, 5], shadow_every=1)
    seq, stats = generate(model, drafter, ids, mask, n=48)
    assert torch.equal(seq, ref)
    alpha = drafter.alpha()
    assert alpha[3] > 0.9 and alpha[4] > 0.9 and alpha[5] > 0.9
    assert drafter.choices[-1] == (3, 4)
    assert stats.tau > 2.5


def test_dynamic_exit_stops_drafting_when_no_exit_pays():
    model = make_tiny("llama", num_layers=6)  # random layers: shallow exits rarely agree
    drafter = DynamicExit(num_tokens=4, exit_layers=[1, 2], prior_weight=0.5)
    ids, mask = ragged_batch([6], 256, seed=4)
    seq, _ = generate(model, drafter, ids, mask, n=32)
    assert torch.equal(seq, hf_greedy(model, ids, mask, max_new_tokens=32))
    assert drafter.choices[-1][1] == 0  # γ = 0: plain decoding
    assert max(drafter.alpha().values()) < 0.5


def test_registry_and_configs_build_layerskip_drafters():
    assert isinstance(make_drafter("layerskip", exit_layer=2), LayerSkip)
    assert make_drafter("kangaroo", exit_layer=2).stop_threshold == 0.6
    assert isinstance(make_drafter("swift"), Swift) and isinstance(make_drafter("del"), DynamicExit)
    d = build_drafter({"_target_": "specdec.drafters.LayerSkip.kangaroo", "exit_layer": 3, "num_tokens": 7})
    assert (d.exit_layer, d.num_tokens) == (3, 7)


@pytest.mark.parametrize("kwargs, message", [
    (dict(exit_layer=6), "exit_layer must be in 1..5"),
    (dict(skip_layers=[0, 1, 2, 3, 4, 5]), "skip_layers must name some"),
    (dict(skip_layers=[7]), "skip_layers must name some"),
])
def test_bad_layer_choices_fail_at_wrap(kwargs, message):
    model = make_tiny("llama", num_layers=6)
    with pytest.raises(ValueError, match=message):
        specdec.wrap(model, drafter=LayerSkip(**kwargs))


def test_bad_arguments_fail_at_construction():
    with pytest.raises(ValueError, match="exactly one of exit_layer"):
        LayerSkip()
    with pytest.raises(ValueError, match="exactly one of exit_layer"):
        LayerSkip(exit_layer=2, skip_layers=[1])
    with pytest.raises(ValueError, match="stop_threshold"):
        LayerSkip(exit_layer=2, stop_threshold=1.5)
    with pytest.raises(ValueError, match="exit_layers must lie"):
        specdec.wrap(make_tiny("llama", num_layers=4), drafter=DynamicExit(exit_layers=[4]))

"""min_tau="auto": the gate drafts only while drafted tokens per second beat undrafted ones.

The unit tests feed DraftGate literal costs (seconds per run) and token counts; the engine tests
check that the driver hands it every run's measured cost, that output stays HF's (greedy) and
the target's law (sampling) whatever the gate decides.
"""
import pytest
import torch
from test_sampling import V, chi2_pvalue, exact_joint, sampled_joint
from tiny import hf_greedy, make_tiny, ragged_batch

import specdec
from specdec.drafters import DraftModel, PromptLookup
from specdec.gate import DraftGate, RunCosts
from specdec.verifiers.acceptance import SamplingParams


def measured_gate(**kw) -> DraftGate:
    """An auto gate past its first undrafted run: a plain step costs 1.0 s."""
    gate = DraftGate(min_tau="auto", window=8, backoff=16, max_backoff=64, **kw)
    assert not gate.want(1)  # nothing measured yet: the first run goes undrafted, for its cost
    gate.record(False, 8, kept=8, row_steps=8, cost=8.0)
    assert gate.want(1) and gate.costs.plain == 1.0
    return gate


def drafted_window(gate: DraftGate, tau: float, cost_ratio: float = 1.3) -> None:
    """One window of 8 drafted steps over 10 row-steps keeping ``tau`` tokens each."""
    gate.record(True, 8, kept=round(10 * tau), row_steps=10, cost=8 * cost_ratio)


def test_auto_pauses_when_drafting_is_slower_than_plain():
    gate = measured_gate()
    drafted_window(gate, tau=1.1)  # 1.1 tokens for 1.3 steps' time: below plain's 1 per 1
    assert gate.costs.ratio == pytest.approx(1.3)
    assert not gate.want(1) and gate.paused == 1 and gate.skip == 16


def test_auto_keeps_drafting_when_it_pays():
    gate = measured_gate()
    for _ in range(5):
        drafted_window(gate, tau=2.0)
        assert gate.want(1)
    assert gate.paused == 0 and gate.backoff == 16


def test_auto_probes_again_after_its_backoff_with_hysteresis():
    gate = measured_gate()
    drafted_window(gate, tau=1.1)
    for _ in range(15):  # the pause: 16 undrafted steps, which also refresh the plain cost
        gate.record(False, 1, kept=1, row_steps=1, cost=1.0)
        assert not gate.want(1)
    gate.record(False, 1, kept=1, row_steps=1, cost=1.0)
    assert gate.want(1)  # the backoff is over: probe
    # A probe just above break-even (1.32 > 1.3) does not resume: it must beat it by 5%.
    drafted_window(gate, tau=1.32)
    assert not gate.want(1) and gate.paused == 2 and gate.skip == 32  # the backoff doubled
    gate.record(False, 32, kept=32, row_steps=32, cost=32.0)
    drafted_window(gate, tau=1.4)  # 1.4 >= 1.3 * 1.05: drafting resumes, the backoff resets
    assert gate.want(1) and gate.backoff == 16
    drafted_window(gate, tau=1.32)  # while drafting, only a window below 1.3 pauses
    assert gate.want(1) and gate.paused == 2
    drafted_window(gate, tau=1.2)
    assert not gate.want(1) and gate.paused == 3


def test_auto_reuses_shared_costs_and_follows_them():
    costs = RunCosts()
    first = measured_gate(costs=costs)
    drafted_window(first, tau=1.1)
    again = DraftGate(min_tau="auto", costs=costs)  # the next call at this batch size
    assert again.want(1)  # the plain cost is known: no measuring run
    # Drafted runs get as cheap as plain ones (a moving average, weighted by steps): then the
    # ratio follows, and τ 1.1 pays.
    for _ in range(6):
        costs.add(drafted=True, seconds=8.0, steps=8)
    assert 1.0 < costs.ratio < 1.01
    drafted_window(again, tau=1.1, cost_ratio=1.0)
    assert again.want(1) and again.paused == 0
    # Without costs an auto gate never judges a window.
    blind = DraftGate(min_tau="auto")
    blind.record(False, 1, kept=1, row_steps=1)
    blind.record(True, 8, kept=8, row_steps=8)
    assert blind.want(1) and blind.costs.ratio is None


@pytest.mark.parametrize("bad", ["fast", "Auto", True, [1.5], 0.5])
def test_min_tau_takes_a_number_auto_or_none(bad):
    with pytest.raises(ValueError, match="min_tau must be .*'auto'"):
        specdec.wrap(make_tiny("llama"), drafter=PromptLookup(3), min_tau=bad)


def inject_costs(monkeypatch, plain: float = 1.0, drafted: float = 1.3) -> list:
    """Replace each run's measured cost by a fixed one per step (after checking one was measured)."""
    seen = []
    real = DraftGate.record

    def record(self, was_drafted, steps, kept, row_steps, cost=None):
        assert cost is not None and cost > 0  # the driver measured this run
        seen.append(was_drafted)
        return real(self, was_drafted, steps, kept, row_steps, cost=steps * (drafted if was_drafted else plain))
    monkeypatch.setattr(DraftGate, "record", record)
    return seen


@pytest.mark.parametrize("lengths", [[7], [3, 9, 1, 6]], ids=["batch1", "batch4_ragged"])
@pytest.mark.parametrize("chunk_steps,pipeline", [(None, False), (4, True)])
def test_auto_stays_exact_and_pauses_a_drafter_that_does_not_pay(lengths, chunk_steps, pipeline, monkeypatch):
    # Prompt lookup on a random model's text rarely gets a copy accepted (τ near 1): at a
    # drafted step costing 1.3 plain ones, drafting pauses. The target drafting for itself keeps
    # every draft token (τ 4): drafting never pauses. Tokens stay HF's either way.
    model = make_tiny("llama", vocab_size=32, init_range=1.0, num_layers=1)
    ids, mask = ragged_batch(lengths, 32, seed=3)
    ref = hf_greedy(model, ids, mask, max_new_tokens=60, eos_token_id=None)
    seen = inject_costs(monkeypatch)
    run = chunk_steps or 1
    for drafter, pays in ((PromptLookup(num_tokens=4, max_ngram=2), False), (DraftModel(model, num_tokens=3), True)):
        spec = specdec.wrap(model, drafter=drafter, chunk_steps=chunk_steps, pipeline=pipeline, min_tau="auto")
        for call in range(2):
            seen.clear()
            out = spec.generate(ids, attention_mask=mask, max_new_tokens=60, pad_token_id=0, eos_token_id=None,
                                return_dict_in_generate=True)
            assert torch.equal(out.sequences, ref)
            stats = out.spec_stats
            assert seen[0] is (call == 1)  # the first call measures a plain run first; the second knows
            if pays:
                assert stats.draft_pauses == 0 and stats.undrafted_steps == (run if call == 0 else 0)
                assert stats.tau > 3
            else:
                assert stats.draft_pauses >= 1 and stats.undrafted_steps > stats.num_steps // 2


def test_auto_with_the_real_clock_stays_exact_and_pauses_a_drafter_that_cannot_pay():
    # No injected costs. A 4-layer draft model of its own drafting 3 tokens for a 1-layer target
    # costs several plain steps per step, more than the 4 tokens a step can keep at best: the
    # host clock must pause it. Whatever the clock says, the output is HF's.
    model = make_tiny("qwen2", num_layers=1)
    ids, mask = ragged_batch([3, 9, 1, 6], model.config.vocab_size, seed=5)
    ref = hf_greedy(model, ids, mask, max_new_tokens=40, eos_token_id=None)
    for drafter in (PromptLookup(num_tokens=4, max_ngram=2), DraftModel(make_tiny("qwen2", num_layers=4, seed=1),
                                                                        num_tokens=3)):
        spec = specdec.wrap(model, drafter=drafter, min_tau="auto")
        out = spec.generate(ids, attention_mask=mask, max_new_tokens=40, pad_token_id=0, eos_token_id=None,
                            return_dict_in_generate=True)
        assert torch.equal(out.sequences, ref)
        (costs,) = spec.engine._costs.values()
        assert costs.plain > 0 and costs.drafted > 0
    assert costs.ratio > 2 and out.spec_stats.draft_pauses >= 1
    assert out.spec_stats.undrafted_steps > out.spec_stats.num_steps // 2


def test_auto_keeps_the_target_distribution():
    # Token 1 comes from the undrafted step that measures the plain cost, token 2 from a drafted
    # step after the draft model caught up (resync): the pair must follow the target's law.
    torch.manual_seed(1234)
    target = make_tiny("llama", vocab_size=V, init_range=0.15, seed=11)
    draft = DraftModel(make_tiny("llama", vocab_size=V, init_range=0.15, seed=12), num_tokens=3)
    spec = specdec.wrap(target, drafter=draft, min_tau="auto")
    params = SamplingParams(True, 0.7, top_k=5, top_p=0.9)
    counts = sampled_joint(spec, params)
    assert chi2_pvalue(counts, exact_joint(target, params)) > 1e-3

"""wrap(..., memory_budget=...): the chosen drafting configuration's analytic extra memory stays
under the budget, shrinks as the budget does and as the batch grows, output stays lossless, and
a budget below the minimum fails naming both numbers. The measured extra (tests/alloc_meter.py on
CPU, the CUDA allocator's peak on CUDA) stays under it."""
import gc
import weakref

import pytest
import torch
from alloc_meter import AllocMeter
from tiny import hf_greedy, make_tiny, ragged_batch

import specdec
from specdec import memory
from specdec.drafters import DraftModel, PromptLookup, Rapid


@pytest.fixture(scope="module")
def target():
    return make_tiny("llama", vocab_size=64, num_layers=2, seed=3)


def rapid():
    return Rapid(make_tiny("llama", vocab_size=64, num_layers=1, seed=4), num_tokens=6, context_tokens=64, chunk=8)


def test_slot_bytes_match_a_real_cache(target):
    spec = specdec.wrap(target)
    cache = spec.engine.runner.new_cache(3, 10)
    assert memory.kv_slot_bytes(spec.engine.runner) * 3 * 10 == cache.memory_bytes()


@pytest.mark.parametrize("make", [rapid, lambda: DraftModel(make_tiny("llama", vocab_size=64, num_layers=1), num_tokens=6)],
                         ids=["rapid", "draft_model"])
def test_chosen_config_fits_and_shrinks_with_budget(target, make):
    ids, mask = ragged_batch([90, 40], 64, seed=5)
    ref = hf_greedy(target, ids, mask, max_new_tokens=10, eos_token_id=None)
    chosen = []
    top = specdec.wrap(target, drafter=make(), memory_budget=10**12).generate(
        ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None,
        return_dict_in_generate=True).spec_stats.memory["extra_bytes"]
    for budget in [int(top * f) for f in (1.0, 0.96, 0.92, 0.88, 0.84, 0.8, 0.6, 0.4, 0.01)]:
        drafter = make()
        spec = specdec.wrap(target, drafter=drafter, memory_budget=budget)
        try:
            out = spec.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0,
                                eos_token_id=None, return_dict_in_generate=True)
        except MemoryError as e:
            assert str(budget) in str(e) and "smallest" in str(e)
            break
        m = out.spec_stats.memory
        assert m["extra_bytes"] <= budget and m["budget"] == budget and m["peak_bytes"] == m["extra_bytes"]
        assert torch.equal(out.sequences, ref)
        chosen.append(m["extra_bytes"])
    assert len(chosen) >= 3
    assert chosen == sorted(chosen, reverse=True) and chosen[0] > chosen[-1]


def test_larger_batch_gets_a_smaller_per_row_config(target):
    budget = 60_000
    small, large = ragged_batch([60], 64, seed=1), ragged_batch([60, 50, 40, 30], 64, seed=1)
    plans = []
    for ids, mask in (small, large):
        drafter = rapid()
        out = specdec.wrap(target, drafter=drafter, memory_budget=budget).generate(
            ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None,
            return_dict_in_generate=True)
        plans.append(out.spec_stats.memory)
        assert torch.equal(out.sequences, hf_greedy(target, ids, mask, max_new_tokens=6, eos_token_id=None))
    assert plans[1]["per_row_bytes"] < plans[0]["per_row_bytes"]
    assert plans[1]["config"] != plans[0]["config"]


def test_budget_below_minimum_raises_with_numbers(target):
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    spec = specdec.wrap(target, drafter=PromptLookup(num_tokens=4), memory_budget=10)
    with pytest.raises(MemoryError, match=r"memory_budget=10 bytes is below the \d+ bytes"):
        spec.generate(ids, max_new_tokens=4, pad_token_id=0)
    with pytest.raises(ValueError, match="memory_budget"):
        specdec.wrap(target, memory_budget=0)


def test_without_budget_stats_report_the_analytic_extra(target):
    ids = torch.tensor([[5, 6, 7, 5, 6, 7, 5, 6]])
    out = specdec.wrap(target, drafter=PromptLookup(num_tokens=4)).generate(
        ids, max_new_tokens=4, pad_token_id=0, return_dict_in_generate=True)
    assert out.spec_stats.memory["budget"] is None and out.spec_stats.memory["extra_bytes"] > 0
    plain = specdec.wrap(target).generate(ids, max_new_tokens=4, pad_token_id=0, return_dict_in_generate=True)
    assert plain.spec_stats.memory["extra_bytes"] == 0


def test_analytic_extra_covers_the_buffers_drafting_allocates(target):
    """The plan's extra bytes are at least what the drafted call holds beyond a plain one: the
    target cache's extra slots and the drafter's own cache, both read off the real buffers."""
    ids, mask = ragged_batch([70, 45], 64, seed=6)
    kw = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None,
              return_dict_in_generate=True)
    plain = specdec.wrap(target)
    plain.generate(ids, **kw)
    for budget in (10**12, 200_000, 120_000):
        drafter = rapid()
        spec = specdec.wrap(target, drafter=drafter, memory_budget=budget)
        plan = spec.generate(ids, **kw).spec_stats.memory
        extra_slots = spec.engine._decoder.state.capacity - plain.engine._decoder.state.capacity
        held = extra_slots * memory.kv_slot_bytes(spec.engine.runner) + drafter.cache.memory_bytes()
        assert extra_slots > 0 and held <= plan["extra_bytes"] <= budget, (budget, held, plan)


def _metered_first_call(model, drafter, ids, kw, budget=None):
    """A fresh wrapper's first call under the CPU meter: the peak bytes above what was live when
    it began (frees of older tensors count, as in ``torch.cuda.memory_allocated``), and the output."""
    gc.collect()  # garbage of earlier tests must not be freed (and counted) inside the call
    with AllocMeter(existing=True) as meter:
        out = specdec.wrap(model, drafter=drafter, memory_budget=budget).generate(ids, **kw)
    return meter.peak, out


@pytest.fixture
def no_cyclic_gc():
    gc.collect()
    gc.disable()
    yield
    gc.enable()


def test_old_state_is_freed_before_the_new_one_is_allocated(target, no_cyclic_gc):
    """Decode state holds no reference cycle: a wrapper that changes batch size (or, under a
    budget, configuration) frees its old buffers before allocating new ones, and a dropped
    wrapper frees them at once, without waiting for the cyclic GC. Otherwise a call's peak holds
    the old state too, and when the GC runs decides what a measurement sees."""
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    one, two = ragged_batch([60], 64, seed=1), ragged_batch([60, 50], 64, seed=1)
    spec = specdec.wrap(target, drafter=rapid())
    spec.generate(one[0], attention_mask=one[1], **kw)
    old = spec.engine._decoder
    old_bytes = old.state.cache.memory_bytes() + spec.drafter.cache.memory_bytes()
    old_ref = weakref.ref(old)
    del old
    with AllocMeter(existing=True) as reused:
        spec.generate(two[0], attention_mask=two[1], **kw)
    assert old_ref() is None
    with AllocMeter(existing=True) as fresh:
        specdec.wrap(target, drafter=rapid()).generate(two[0], attention_mask=two[1], **kw)
    assert reused.peak <= fresh.peak - old_bytes, (reused.peak, fresh.peak, old_bytes)

    budgeted = specdec.wrap(target, drafter=rapid(), memory_budget=70_000)
    kw["return_dict_in_generate"] = True
    top = budgeted.generate(two[0], attention_mask=two[1], **kw).spec_stats.memory["config"]
    first = weakref.ref(budgeted.engine._decoder)
    smaller = budgeted.generate(two[0], attention_mask=two[1], **dict(kw, max_new_tokens=40)).spec_stats.memory["config"]
    assert smaller != top and first() is None and budgeted.engine._decoder is not None
    cache = weakref.ref(budgeted.engine._decoder.state.cache)
    del budgeted, spec
    assert cache() is None


def _draft(seed=4):
    return make_tiny("llama", vocab_size=64, num_layers=1, seed=seed)


@pytest.mark.parametrize("make, fractions", [
    (lambda: Rapid(num_tokens=6, context_tokens=128, chunk=16), (1.0, 0.6, 0.35)),
    (lambda: Rapid(_draft(), num_tokens=6, context_tokens=128, chunk=16), (1.0, 0.6, 0.35)),
    (lambda: DraftModel(_draft(), num_tokens=6), (1.0, 0.97, 0.94)),
    (lambda: PromptLookup(num_tokens=8), (4.0, 1.0)),
], ids=["rapid_self", "rapid_draft_model", "draft_model", "lookup"])
def test_measured_extra_stays_under_several_budgets(target, make, fractions):
    """Measured on CPU by the allocation meter: a drafted call's peak over a plain call's stays
    at or under the budget, for budgets from above the full configuration's need down toward the
    minimum, and falls with the budget where the drafter has memory knobs. The drafter's own
    prefill runs after the target's, so it must not find the target's prefill buffers still live."""
    ids, mask = ragged_batch([200, 120], 64, seed=7)
    kw = dict(attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0, eos_token_id=None,
              return_dict_in_generate=True)
    plain_peak, plain = _metered_first_call(target, None, ids, kw)
    full = specdec.wrap(target, drafter=make(), memory_budget=10**12).generate(ids, **kw).spec_stats.memory
    measured = []
    for fraction in fractions:
        budget = int(full["extra_bytes"] * fraction)
        peak, out = _metered_first_call(target, make(), ids, kw, budget)
        assert 0 < peak - plain_peak <= budget, f"peak extra {peak - plain_peak} bytes over memory_budget={budget}"
        assert torch.equal(out.sequences, plain.sequences)
        measured.append(peak - plain_peak)
    if len(make().budget_configs()) > 1:
        assert measured == sorted(measured, reverse=True) and measured[0] > measured[-1], measured


def _first_call_peak(model, drafter, ids, kw, budget=None) -> tuple[int, torch.Tensor]:
    """A fresh wrapper's first call (so its caches are allocated inside it): the peak bytes above
    what was allocated before it, and the sequences. Earlier garbage is collected first, so no
    cycle freed in the middle of the call shifts the measurement."""
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = specdec.wrap(model, drafter=drafter, memory_budget=budget).generate(ids, **kw)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base, out.sequences


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("make", [
    lambda: Rapid(make_tiny("llama", vocab_size=64, num_layers=1, seed=4).cuda(), num_tokens=6, context_tokens=512,
                  chunk=16),
    lambda: Rapid(num_tokens=6, context_tokens=512, chunk=16)], ids=["rapid_draft_model", "rapid_self"])
def test_cuda_measured_extra_stays_under_several_budgets(make):
    """For budgets from the full configuration's need down to near the minimum, the measured peak
    extra memory of a drafted call over a plain one stays at or under the budget, and it falls with
    the budget."""
    tgt = make_tiny("llama", vocab_size=64, num_layers=2, seed=3, max_position_embeddings=4096).cuda()
    ids, mask = ragged_batch([1500, 1100], 64, seed=2)
    kw = dict(attention_mask=mask.cuda(), max_new_tokens=16, do_sample=False, pad_token_id=0, eos_token_id=None,
              return_dict_in_generate=True)
    ids = ids.cuda()
    plain_peak, plain = _first_call_peak(tgt, None, ids, kw)
    full = specdec.wrap(tgt, drafter=make(), memory_budget=10**12).generate(ids, **kw).spec_stats.memory
    measured = []
    for fraction in (1.0, 0.6, 0.35, 0.2):
        budget = int(full["extra_bytes"] * fraction)
        peak, seq = _first_call_peak(tgt, make(), ids, kw, budget)
        assert peak - plain_peak <= budget, f"peak extra {peak - plain_peak} bytes over memory_budget={budget}"
        assert torch.equal(seq, plain)
        measured.append(peak - plain_peak)
    assert measured[0] > measured[-1], measured

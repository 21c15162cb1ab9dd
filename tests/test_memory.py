"""wrap(..., memory_budget=...): the chosen drafting configuration's analytic extra memory stays
under the budget, shrinks as the budget does and as the batch grows, output stays lossless, and
a budget below the minimum fails naming both numbers. On CUDA the measured extra stays under it."""
import pytest
import torch
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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_measured_extra_stays_under_budget():
    tgt = make_tiny("llama", vocab_size=64, num_layers=2, seed=3).cuda()
    ids, mask = ragged_batch([300, 200], 64, seed=2)
    ids, mask = ids.cuda(), mask.cuda()
    kw = dict(attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0, eos_token_id=None,
              return_dict_in_generate=True)
    budget = 2_000_000
    plain = specdec.wrap(tgt).generate(ids, **kw)
    drafter = Rapid(make_tiny("llama", vocab_size=64, num_layers=1, seed=4).cuda(), num_tokens=6,
                    context_tokens=128, chunk=16)
    out = specdec.wrap(tgt, drafter=drafter, memory_budget=budget).generate(ids, **kw)
    assert out.spec_stats.memory["measured"]
    assert out.spec_stats.memory["peak_bytes"] - plain.spec_stats.memory["peak_bytes"] <= budget
    assert torch.equal(out.sequences, plain.sequences)

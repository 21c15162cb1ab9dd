"""Bad input and concurrent use: threads share a wrapper safely, and every tree budget works.

Two threads calling ``generate`` on one wrapper and a third calling plain HF ``model.generate``
on the same model must all get HF greedy's tokens, and HF's own configuration must be untouched
afterwards. Every ``DraftModel`` tree budget either works (and is exact) or is refused at
construction; none fails inside attention.
"""
import itertools
import threading

import pytest
import torch
from tiny import hf_greedy, make_tiny, ragged_batch

import specdec
from specdec.drafters import DraftModel, PromptLookup


def _prompts(vocab: int, n: int = 6):
    return [ragged_batch([3 + i % 4, 7 - i % 3], vocab, seed=20 + i) for i in range(n)]


@pytest.mark.parametrize("kind", ["lookup", "draft_model"])
def test_threads_share_a_wrapper_and_leave_hf_alone(kind):
    model = make_tiny("qwen2", num_layers=2)
    before = model.config._attn_implementation
    drafter = (PromptLookup(num_tokens=3) if kind == "lookup"
               else DraftModel(make_tiny("qwen2", num_layers=1, seed=3), num_tokens=3))
    spec = specdec.wrap(model, drafter=drafter)
    prompts = _prompts(model.config.vocab_size)
    refs = [hf_greedy(model, ids, mask, max_new_tokens=12, eos_token_id=None) for ids, mask in prompts]
    errors, results = [], {}

    def ours(tid):
        try:
            for call in range(10):
                i = (call + tid) % len(prompts)
                ids, mask = prompts[i]
                out = spec.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
                                    eos_token_id=None)
                results[tid, call] = torch.equal(out, refs[i])
        except Exception as e:  # noqa: BLE001 - the test reports every failure below
            errors.append(repr(e))

    def theirs():
        try:
            for call in range(10):
                ids, mask = prompts[call % len(prompts)]
                results["hf", call] = torch.equal(hf_greedy(model, ids, mask, max_new_tokens=12, eos_token_id=None),
                                                  refs[call % len(prompts)])
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))

    threads = [threading.Thread(target=ours, args=(0,)), threading.Thread(target=ours, args=(1,)),
               threading.Thread(target=theirs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(results) == 30 and all(results.values()), [k for k, v in results.items() if not v]
    assert model.config._attn_implementation == before   # HF's forward sees what it saw before
    ids, mask = prompts[0]
    assert torch.equal(hf_greedy(model, ids, mask, max_new_tokens=12, eos_token_id=None), refs[0])


def test_every_tree_budget_works_and_stays_exact():
    """Including budgets below (num_tokens - 1) * tree_width, which once overflowed the cache view;
    a budget above what the tree can hold is clamped to its candidates."""
    model = make_tiny("llama", num_layers=2)
    draft = make_tiny("llama", num_layers=1, seed=4)
    ids, mask = ragged_batch([5, 9], model.config.vocab_size, seed=2)
    ref = hf_greedy(model, ids, mask, max_new_tokens=10, eos_token_id=None)
    for depth, width, nodes in itertools.chain([(5, 2, 2)], itertools.product((2, 3, 5), (2, 3), (1, 2, 3, 5, 8, 13))):
        d = DraftModel(draft, num_tokens=depth, tree_width=width, tree_nodes=nodes)
        assert 1 <= d.spec.num_nodes <= nodes and d.spec.scratch_slots == (depth - 1) * width
        for steps in (1, 2):
            out = specdec.wrap(model, drafter=d, chunk_steps=steps).generate(
                ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None)
            assert torch.equal(out, ref), (depth, width, nodes, steps)


def test_every_budget_combination_is_built_or_refused_by_the_rule():
    """num_tokens 1..6 × tree_width 1..4 × tree_nodes 1..24: a chain (width 1) refuses tree_nodes,
    naming tree_width; a tree keeps min(tree_nodes, its candidates width + (depth - 1) · width²)
    nodes, explores (depth - 1) · width scratch slots and re-reads depth + 1 tokens. A spread
    sample of the built ones (and the edges) generates exactly HF greedy's tokens."""
    import random

    model = make_tiny("llama", num_layers=2)
    draft = make_tiny("llama", num_layers=1, seed=4)
    built, refused = [], 0
    for depth, width, nodes in itertools.product(range(1, 7), range(1, 5), range(1, 25)):
        if width == 1:
            with pytest.raises(ValueError, match="tree_width >= 2"):
                DraftModel(draft, num_tokens=depth, tree_width=width, tree_nodes=nodes)
            refused += 1
            continue
        d = DraftModel(draft, num_tokens=depth, tree_width=width, tree_nodes=nodes)
        candidates = width + (depth - 1) * width * width
        assert d.spec.num_nodes == min(nodes, candidates), (depth, width, nodes)
        assert d.spec.scratch_slots == (depth - 1) * width and d.spec.lookback == depth + 1
        assert d.spec.forwards_per_step == depth
        built.append((depth, width, nodes))
    assert refused == 6 * 24 and len(built) == 6 * 3 * 24
    edges = [(5, 2, 2), (1, 2, 1), (1, 4, 24), (6, 4, 24), (6, 2, 1), (3, 3, 24)]
    ids, mask = ragged_batch([5, 9], model.config.vocab_size, seed=2)
    ref = hf_greedy(model, ids, mask, max_new_tokens=8, eos_token_id=None)
    for depth, width, nodes in edges + random.Random(0).sample(built, 8):
        d = DraftModel(draft, num_tokens=depth, tree_width=width, tree_nodes=nodes)
        out = specdec.wrap(model, drafter=d).generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                                                     pad_token_id=0, eos_token_id=None)
        assert torch.equal(out, ref), (depth, width, nodes)


@pytest.mark.parametrize("kwargs,match", [({"tree_width": 0}, "tree_width"), ({"tree_nodes": 0}, "tree_nodes"),
                                          ({"tree_nodes": 5}, "tree_width >= 2"),
                                          ({"tree_depth": 3}, "tree_width >= 2"),
                                          ({"tree_width": 2, "tree_depth": 0}, "tree_depth"),
                                          ({"num_tokens": 0}, "num_tokens")])
def test_bad_tree_budgets_are_refused_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DraftModel(make_tiny("llama", num_layers=1), **kwargs)

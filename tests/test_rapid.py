"""Rapid (retrieval-augmented drafting over a shortened context) is lossless and really shortens.

Invariants: greedy output equals HF greedy token for token (batch 1 and ragged batch 4, with a
context budget far below the prompt length, for the self-draft and for a separate draft model);
the draft's context is never longer than ``context_tokens`` and shorter than the prompt; a low
acceptance window triggers a refresh and a high threshold of zero never does; sampling keeps the
target's distribution (chi-square, as in tests/test_sampling.py).
"""
import pytest
import torch
from test_sampling import PARAMS, PROMPT, V, chi2_pvalue, exact_joint, sampled_joint
from tiny import hf_greedy, make_tiny, ragged_batch

import specdec
from specdec.drafters import Rapid, VocabularyMismatchError
from specdec.drafters.rapid import retrieve


@pytest.fixture(scope="module")
def target():
    return make_tiny("llama", vocab_size=64, num_layers=2, seed=3)


def run(spec, ids, mask, n=12):
    return spec.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0,
                         eos_token_id=None, return_dict_in_generate=True)


def test_retrieve_keeps_matching_chunks_in_order():
    # 40 tokens: chunks of 4; the query (last 4 tokens) repeats chunk 2's bigrams.
    toks = list(range(100, 136)) + [108, 109, 110, 111]
    short = retrieve(toks, context_tokens=12, chunk=4, recent=4, query=4, ngram=2)
    assert len(short) <= 12
    assert short[-4:] == toks[-4:]
    assert short[:4] == [108, 109, 110, 111]  # the matching chunk comes first: it is the earliest kept
    assert retrieve(toks[:10], 12, 4, 4, 4, 2) == toks[:10]  # short rows are kept whole


@pytest.mark.parametrize("draft", ["self", "model"])
@pytest.mark.parametrize("lengths", [[90], [90, 40, 130, 17]], ids=["b1", "ragged_b4"])
def test_greedy_equals_hf_with_short_context(target, draft, lengths):
    ids, mask = ragged_batch(lengths, 64, seed=5)
    model = None if draft == "self" else make_tiny("llama", vocab_size=64, num_layers=1, seed=4)
    rapid = Rapid(model, num_tokens=3, context_tokens=24, chunk=8, recent_tokens=8, query_tokens=8)
    out = run(specdec.wrap(target, drafter=rapid), ids, mask)
    assert torch.equal(out.sequences, hf_greedy(target, ids, mask, max_new_tokens=12, eos_token_id=None))
    # The draft read a context far shorter than every row longer than the budget.
    for n, c in zip(lengths, rapid.context_lengths):
        assert c <= 24 and (c < n or n <= 24)
    assert max(lengths) > 24


def test_self_draft_accepts_something(target):
    ids, mask = ragged_batch([120], 64, seed=6)
    rapid = Rapid(num_tokens=3, context_tokens=32, chunk=8, recent_tokens=16)
    out = run(specdec.wrap(target, drafter=rapid), ids, mask, n=24)
    assert out.spec_stats.tau > 1.0  # the target drafting for itself over a short context accepts tokens


def test_refresh_happens_when_acceptance_drops(target):
    ids, mask = ragged_batch([100, 60], 64, seed=7)
    bad = make_tiny("llama", vocab_size=64, num_layers=1, seed=99)  # a draft that rarely agrees
    never = Rapid(bad, num_tokens=3, context_tokens=24, chunk=8, refresh_below=0.0, window=2)
    low = Rapid(bad, num_tokens=3, context_tokens=24, chunk=8, refresh_below=0.9, window=2)
    ref = hf_greedy(target, ids, mask, max_new_tokens=16, eos_token_id=None)
    for rapid in (never, low):
        out = run(specdec.wrap(target, drafter=rapid), ids, mask, n=16)
        assert torch.equal(out.sequences, ref)
        assert out.spec_stats.acceptance_rate < 0.9
    assert never.refreshes == 0
    assert low.refreshes >= 2


def test_bad_options_and_vocabulary_raise(target):
    with pytest.raises(ValueError, match="chunk"):
        Rapid(context_tokens=8, chunk=16)
    with pytest.raises(ValueError, match="recent_tokens"):
        Rapid(context_tokens=16, chunk=8, recent_tokens=32)
    with pytest.raises(VocabularyMismatchError, match="vocabulary"):
        specdec.wrap(target, drafter=Rapid(make_tiny("llama", vocab_size=32), context_tokens=16, chunk=8))
    with pytest.raises(ValueError, match="cuda_graphs|device_only|host"):
        specdec.wrap(target, drafter=Rapid(context_tokens=16, chunk=8), chunk_steps=4)


@pytest.mark.parametrize("params", PARAMS, ids=["t1", "t0.7_k5_p0.9"])
def test_sampling_preserves_target(params):
    """A 4-token context over the 7-token prompt: the first two tokens still follow the target."""
    torch.manual_seed(1234)
    tgt = make_tiny("llama", vocab_size=V, init_range=0.15, seed=11)
    draft = make_tiny("llama", vocab_size=V, init_range=0.15, seed=12)
    rapid = Rapid(draft, num_tokens=3, context_tokens=4, chunk=2, recent_tokens=2, query_tokens=2)
    counts = sampled_joint(specdec.wrap(tgt, drafter=rapid), params)
    assert max(rapid.context_lengths) < len(PROMPT)
    assert chi2_pvalue(counts, exact_joint(tgt, params)) > 1e-3


@pytest.mark.slow
def test_smollm2_long_prompt_greedy_equality(smollm2):
    """SmolLM2 on a ~4K-token stdlib prompt: Rapid self-drafting over 512 tokens equals plain greedy."""
    from specdec.bench.long_prompts import long_prompts

    model, tok = smollm2
    text = long_prompts([4096], per_length=1, tokenizer=tok)[0].turns[0]
    ids = tok(text, return_tensors="pt")["input_ids"]
    assert 3900 <= ids.shape[1] <= 4200
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    rapid = Rapid(num_tokens=3, context_tokens=512, chunk=64)
    out = specdec.wrap(model, drafter=rapid).generate(ids, return_dict_in_generate=True, **kw)
    assert torch.equal(out.sequences, model.generate(ids, **kw))
    assert max(rapid.context_lengths) <= 512


def test_paused_drafting_resyncs_losslessly(target):
    """min_tau pauses drafting (undrafted steps never feed the draft cache); resync rebuilds it."""
    ids, mask = ragged_batch([80, 50], 64, seed=8)
    rapid = Rapid(make_tiny("llama", vocab_size=64, num_layers=1, seed=99), num_tokens=3, context_tokens=24, chunk=8)
    out = run(specdec.wrap(target, drafter=rapid, min_tau=2.5), ids, mask, n=40)
    assert out.spec_stats.undrafted_steps > 0
    assert torch.equal(out.sequences, hf_greedy(target, ids, mask, max_new_tokens=40, eos_token_id=None))

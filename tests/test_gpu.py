"""The fast GPU path (CUDA graphs, fused projections, torch.compile), on tiny fp32 models.

Skipped without a CUDA device; run on the GPU machine with
``python -m pytest tests/test_gpu.py``. Exact equality with HF greedy holds in fp32: these
random tiny models have peaked next-token distributions, so no near-ties.
"""
import pytest
import torch
from tiny import ARCHS, hf_greedy, make_tiny, ragged_batch

import specdec
from specdec.drafters import PromptLookup

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def cuda_tiny(arch, **kw):
    return make_tiny(arch, vocab_size=64, init_range=1.0, **kw).cuda()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("compile", [False, True, {"coordinate_descent_tuning": True}],
                         ids=["graphed", "compiled", "compiled-cdt"])
def test_chunked_cuda_paths_equal_hf(arch, compile):
    model = cuda_tiny(arch)
    ids, mask = (t.cuda() for t in ragged_batch([5, 12, 3], 64, seed=1))
    ref = hf_greedy(model, ids, mask, max_new_tokens=40, eos_token_id=None)
    for drafter in (None, PromptLookup(num_tokens=4, max_ngram=2)):
        spec = specdec.wrap(model, drafter=drafter, cuda_graphs=True, compile=compile)
        assert spec.engine.runner.fused is not None  # fused projections are on with cuda_graphs
        out = spec.generate(ids, attention_mask=mask, max_new_tokens=40, pad_token_id=0, eos_token_id=None)
        assert torch.equal(out, ref), (arch, compile, drafter)
        if drafter is not None:   # with compile, the chunks ran the lookup's compiled proposal
            assert (drafter._compiled_match is not None) == bool(compile)
    assert torch.equal(hf_greedy(model, ids, mask, max_new_tokens=40, eos_token_id=None), ref)  # HF still sees the same weights


def test_model_drafters_inside_captured_chunks_equal_hf():
    from specdec.drafters import DraftModel, LayerSkip

    model = cuda_tiny("qwen2", num_layers=3)
    ids, mask = (t.cuda() for t in ragged_batch([6, 2, 11], 64, seed=5))
    ref = hf_greedy(model, ids, mask, max_new_tokens=30, eos_token_id=None)
    for drafter in (DraftModel(cuda_tiny("qwen2", seed=3), num_tokens=3), DraftModel(model, num_tokens=3),
                    LayerSkip(exit_layer=2, num_tokens=3)):
        out = specdec.wrap(model, drafter=drafter, cuda_graphs=True).generate(
            ids, attention_mask=mask, max_new_tokens=30, pad_token_id=0, eos_token_id=None,
            return_dict_in_generate=True)
        assert torch.equal(out.sequences, ref), type(drafter).__name__
        assert out.spec_stats.num_steps % 8 == 0   # whole captured chunks
    drafter = DraftModel(cuda_tiny("qwen2", seed=3), num_tokens=3)
    out = specdec.wrap(model, drafter=drafter, cuda_graphs=True, compile=True).generate(
        ids, attention_mask=mask, max_new_tokens=30, pad_token_id=0, eos_token_id=None)
    assert drafter.compiled and torch.equal(out, ref)   # the draft's steps compiled along with the target


def test_per_step_graphs_pad_queries_to_buckets():
    """Drafters outside the chunked loop (a draft tree, the adaptive schedule) replay padded
    per-step graphs; with the batch policy, the undrafted steps replay the 1-query graph."""
    from specdec.drafters import DraftModel

    model = cuda_tiny("llama", num_layers=2)
    ids, mask = (t.cuda() for t in ragged_batch([6, 9, 4], 64, seed=4))
    ref = hf_greedy(model, ids, mask, max_new_tokens=24, eos_token_id=None)
    tree = DraftModel(cuda_tiny("llama", seed=7), num_tokens=3, tree_width=2, tree_nodes=9)   # 10 queries -> 16
    adaptive = DraftModel(model, num_tokens=4, schedule="adaptive")
    for drafter, policy in ((tree, None), (adaptive, None), (adaptive, 2)):
        spec = specdec.wrap(model, drafter=drafter, cuda_graphs=True, max_draft_batch=policy)
        out = spec.generate(ids, attention_mask=mask, max_new_tokens=24, pad_token_id=0, eos_token_id=None)
        assert torch.equal(out, ref)
        buckets = {key[1] for key in spec.engine._verifier.graphs if key[2]}   # (view, queries, logits, ...)
        assert buckets == ({16} if drafter is tree else {8} if policy is None else {1})


def test_policy_reserve_and_step_profile_on_cuda():
    model = cuda_tiny("llama")
    ids, mask = (t.cuda() for t in ragged_batch([5, 12, 3, 8], 64, seed=2))
    ref = hf_greedy(model, ids, mask, max_new_tokens=30, eos_token_id=None)
    spec = specdec.wrap(model, drafter=PromptLookup(num_tokens=4), cuda_graphs=True, max_draft_batch=2)
    spec.engine.reserve(batch=4, max_length=600)
    out = spec.generate(ids, attention_mask=mask, max_new_tokens=30, pad_token_id=0, eos_token_id=None,
                        return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref)
    assert out.spec_stats.undrafted_steps == out.spec_stats.num_steps  # four rows > max_draft_batch
    loop = spec.engine._loop
    captured = dict(loop._graphs)
    assert {v for v, _ in captured} == set(range(256, loop.tokens.shape[1] + 1, 256))  # every bucket, up front
    assert {d for _, d in captured} == {True, False}
    spec.generate(ids, attention_mask=mask, max_new_tokens=200, pad_token_id=0, eos_token_id=None)
    assert loop._graphs == captured and spec.engine._loop is loop  # a longer call captured nothing new
    before = loop.seq_len.clone()
    phases = spec.engine.step_profile(reps=5)
    assert set(phases) == {"draft", "verify", "accept", "commit"}
    assert all(ms >= 0 for ms in phases.values()) and phases["verify"] > 0
    assert torch.equal(loop.seq_len, before)  # profiling put the state back


def test_min_tau_switches_captured_chunks_and_stays_exact():
    """The acceptance policy inside the captured loop: chunks alternate between the drafted and the
    undrafted graph, a draft model catches up (resync) when drafting resumes, tokens stay HF's."""
    from specdec.drafters import DraftModel

    model = cuda_tiny("llama", num_layers=2)
    ids, mask = (t.cuda() for t in ragged_batch([6, 9, 4], 64, seed=4))
    ref = hf_greedy(model, ids, mask, max_new_tokens=64, eos_token_id=None)
    for drafter in (PromptLookup(num_tokens=4, max_ngram=2), DraftModel(cuda_tiny("llama", seed=3), num_tokens=3)):
        out = specdec.wrap(model, drafter=drafter, cuda_graphs=True, min_tau=3.5).generate(
            ids, attention_mask=mask, max_new_tokens=64, pad_token_id=0, eos_token_id=None,
            return_dict_in_generate=True)
        st = out.spec_stats
        assert torch.equal(out.sequences, ref), type(drafter).__name__
        assert st.draft_pauses >= 1 and 0 < st.undrafted_steps < st.num_steps and st.undrafted_steps % 8 == 0


@pytest.mark.parametrize("pipeline", [False, True])
def test_pipelined_chunks_stop_at_eos_and_equal_hf(pipeline):
    # The queued chunk reads back over pinned memory and an event: rows that stop at EOS inside a
    # chunk (and run on through the queued one) are cut exactly where HF stops them.
    model = cuda_tiny("llama", num_layers=2)
    ids, mask = (t.cuda() for t in ragged_batch([5, 12, 3, 8], 64, seed=2))
    free = hf_greedy(model, ids, mask, max_new_tokens=48, eos_token_id=None)[:, ids.shape[1]:].tolist()
    eos = next(t for t in range(64) if sum(t in row[4:40] for row in free) >= 2)
    ref = hf_greedy(model, ids, mask, max_new_tokens=48, eos_token_id=eos)
    for drafter in (None, PromptLookup(num_tokens=4, max_ngram=2)):
        spec = specdec.wrap(model, drafter=drafter, cuda_graphs=True, chunk_steps=4, pipeline=pipeline)
        assert spec.engine.pipeline is pipeline
        for _ in range(2):   # the second call reuses the cache and its graphs
            out = spec.generate(ids, attention_mask=mask, max_new_tokens=48, pad_token_id=0, eos_token_id=eos)
            assert torch.equal(out, ref), (pipeline, drafter)


@pytest.mark.parametrize("compile", [False, True], ids=["graphed", "compiled"])
def test_bucketed_prefill_replays_a_captured_graph_and_equals_hf(compile):
    model = cuda_tiny("qwen2", num_layers=2)
    ids, mask = (t.cuda() for t in ragged_batch([7, 19, 3], 64, seed=6))
    ref = hf_greedy(model, ids, mask, max_new_tokens=40, eos_token_id=None)
    spec = specdec.wrap(model, drafter=PromptLookup(num_tokens=4, max_ngram=2), cuda_graphs=True, compile=compile,
                        bucket_prefill=True)
    for _ in range(2):   # the second call replays the prefill graph the first one captured
        out = spec.generate(ids, attention_mask=mask, max_new_tokens=40, pad_token_id=0, eos_token_id=None)
        assert torch.equal(out, ref)
    prefill_graphs = [k for k in spec.engine._verifier.graphs if k[2] is False]   # (view, q, logits, contiguous)
    assert prefill_graphs and all(q == 32 for _, q, _, _ in prefill_graphs)

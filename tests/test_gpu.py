"""The fast GPU path (captured steps, fused projections, torch.compile), on tiny fp32 models.

Skipped without a CUDA device; run on the GPU machine with
``python -m pytest tests/test_gpu.py``. Exact equality with HF greedy holds in fp32: these
random tiny models have peaked next-token distributions, so no near-ties.
"""
import pytest
import torch
from tiny import ARCHS, hf_greedy, make_tiny, ragged_batch

import specdec
from specdec.drafters import CopySpec, DraftModel, KangarooAdapter, LayerSkip, PromptLookup
from specdec.drafters.kangaroo_adapter import KangarooAdapterModel

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def cuda_tiny(arch, **kw):
    return make_tiny(arch, vocab_size=64, init_range=1.0, **kw).cuda()


def cuda_adapter(model, exit_layer=1, seed=5):
    """A random-init Kangaroo adapter (every weight perturbed, so its attention matters) on the GPU."""
    adapter = KangarooAdapterModel.from_target(model, exit_layer)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g).to(p.device))
    return adapter


def device_drafters(model, arch):
    """Every device-only drafter family: chains, trees, adaptive γ, self-drafts, halting."""
    return {"none": None, "lookup": PromptLookup(num_tokens=4, max_ngram=2),
            "lookup_branches": PromptLookup(num_tokens=3, max_ngram=2, num_branches=2),
            "draft_model": DraftModel(cuda_tiny(arch, seed=3), num_tokens=3),
            "draft_adaptive": DraftModel(model, num_tokens=4, schedule="adaptive"),
            "draft_tree": DraftModel(cuda_tiny(arch, seed=7), num_tokens=3, tree_width=2, tree_nodes=5),
            "layerskip": LayerSkip(exit_layer=1, num_tokens=3),
            "kangaroo": LayerSkip.kangaroo(exit_layer=1, num_tokens=4, stop_threshold=0.3),
            "kangaroo_adapter": KangarooAdapter(cuda_adapter(model), num_tokens=4, stop_threshold=0.3),
            "copyspec": CopySpec(gamma=2, num_tokens=5, fallback=PromptLookup(num_tokens=3))}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("compile", [False, True], ids=["graphed", "compiled"])
def test_captured_steps_equal_hf_for_every_device_drafter(arch, compile):
    model = cuda_tiny(arch, num_layers=2)
    ids, mask = (t.cuda() for t in ragged_batch([5, 12, 3], 64, seed=1))
    ref = hf_greedy(model, ids, mask, max_new_tokens=40, eos_token_id=None)
    for name, drafter in device_drafters(model, arch).items():
        spec = specdec.wrap(model, drafter=drafter, cuda_graphs=True, compile=compile)
        assert spec.engine.runner.fused is not None  # fused projections are on with cuda_graphs
        out = spec.generate(ids, attention_mask=mask, max_new_tokens=40, pad_token_id=0, eos_token_id=None,
                            return_dict_in_generate=True)
        assert torch.equal(out.sequences, ref), (arch, compile, name)
        assert out.spec_stats.num_steps % 8 == 0   # whole captured runs
    assert torch.equal(hf_greedy(model, ids, mask, max_new_tokens=40, eos_token_id=None), ref)  # HF still sees the same weights


def test_new_prompt_lengths_capture_and_compile_nothing():
    """After the first call at a batch size, prompts of other lengths replay the same graphs."""
    model = cuda_tiny("qwen2", num_layers=2)
    for compile in (False, True):
        spec = specdec.wrap(model, drafter=PromptLookup(num_tokens=4, max_ngram=2), cuda_graphs=True, compile=compile)
        graphs = None
        for lengths in ([5, 12, 3], [40, 7, 90], [200, 1, 33]):
            ids, mask = (t.cuda() for t in ragged_batch(lengths, 64, seed=len(lengths) + lengths[0]))
            ref = hf_greedy(model, ids, mask, max_new_tokens=30, eos_token_id=None)
            out = spec.generate(ids, attention_mask=mask, max_new_tokens=30, pad_token_id=0, eos_token_id=None)
            assert torch.equal(out, ref), (compile, lengths)
            dec = spec.engine._decoder
            if graphs is None:
                graphs, first = dec.num_graphs, dec
            assert dec is first and dec.num_graphs == graphs, (compile, lengths)   # nothing new captured


@pytest.mark.parametrize("kind", ["none", "lookup", "draft_model", "draft_tree", "layerskip", "kangaroo_adapter"])
def test_sampling_inside_captured_steps_keeps_the_target_distribution(kind):
    """Chi-square of the first two sampled tokens over 4000 rows, every step inside captured runs."""
    from scipy.stats import chisquare

    from specdec.verifiers.acceptance import SamplingParams, warp_probs

    v, rows, prompt = 8, 4000, [3, 5, 3, 5, 3, 6, 3]
    target = make_tiny("llama", vocab_size=v, init_range=0.15, seed=11).cuda()
    draft = make_tiny("llama", vocab_size=v, init_range=0.15, seed=12).cuda()
    drafter = {"none": None, "lookup": PromptLookup(num_tokens=3, max_ngram=2),
               "draft_model": DraftModel(draft, num_tokens=3),
               "draft_tree": DraftModel(draft, num_tokens=2, tree_width=3, tree_nodes=7),
               "layerskip": LayerSkip(exit_layer=1, num_tokens=3),
               "kangaroo_adapter": KangarooAdapter(cuda_adapter(target), num_tokens=3)}[kind]
    params = SamplingParams(True, 0.7, top_k=5, top_p=0.9)
    with torch.no_grad():
        ids = torch.tensor([prompt]).cuda()
        p1 = warp_probs(target(ids).logits[0, -1], params)
        seqs = torch.cat([ids.repeat(v, 1), torch.arange(v).cuda().unsqueeze(1)], dim=1)
        exact = (p1.unsqueeze(1) * warp_probs(target(seqs).logits[:, -1], params)).flatten().double().cpu()
    torch.manual_seed(7)
    spec = specdec.wrap(target, drafter=drafter, cuda_graphs=True, cache_len=64)   # 4000 rows: a small cache
    out = spec.generate(ids.repeat(rows, 1), max_new_tokens=2, do_sample=True, temperature=0.7, top_k=5, top_p=0.9,
                        pad_token_id=0, eos_token_id=None)
    counts = torch.bincount((out[:, len(prompt)] * v + out[:, len(prompt) + 1]).cpu(), minlength=v * v).double()
    expected = exact * rows
    assert counts[expected == 0].sum() == 0
    keep, rare = expected >= 5, (expected > 0) & (expected < 5)   # merge the rare cells; drop impossible ones
    obs = torch.cat([counts[keep], counts[rare].sum().view(1)])
    exp = torch.cat([expected[keep], expected[rare].sum().view(1)])
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    assert chisquare(obs.numpy(), exp.numpy() * obs.sum().item() / exp.sum().item()).pvalue > 1e-3


def test_policy_reserve_and_step_profile_on_cuda():
    model = cuda_tiny("llama")
    ids, mask = (t.cuda() for t in ragged_batch([5, 12, 3, 8], 64, seed=2))
    ref = hf_greedy(model, ids, mask, max_new_tokens=30, eos_token_id=None)
    spec = specdec.wrap(model, drafter=PromptLookup(num_tokens=4), cuda_graphs=True, max_draft_batch=2)
    spec.engine.reserve(batch=4, max_length=3000)
    out = spec.generate(ids, attention_mask=mask, max_new_tokens=30, pad_token_id=0, eos_token_id=None,
                        return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref)
    assert out.spec_stats.undrafted_steps == out.spec_stats.num_steps  # four rows > max_draft_batch
    dec = spec.engine._decoder
    assert dec.state.capacity >= 3000
    captured = dict(dec._graphs)
    assert {k[2] for k in captured if k[0] == "steps"} == {True, False}   # both variants, up front
    spec.generate(ids, attention_mask=mask, max_new_tokens=1000, pad_token_id=0, eos_token_id=None)
    assert dec._graphs == captured and spec.engine._decoder is dec  # a longer call captured nothing new
    before = dec.state.seq_len.clone()
    phases = spec.engine.step_profile(reps=5)
    assert set(phases) == {"draft", "verify", "accept", "commit"}
    assert all(ms >= 0 for ms in phases.values()) and phases["verify"] > 0
    assert torch.equal(dec.state.seq_len, before)  # profiling put the state back


def test_min_tau_switches_captured_runs_and_stays_exact():
    """The acceptance policy inside captured runs: they alternate between the drafted and the
    undrafted graph, a draft model catches up (resync) when drafting resumes, tokens stay HF's."""
    model = cuda_tiny("llama", num_layers=2)
    ids, mask = (t.cuda() for t in ragged_batch([6, 9, 4], 64, seed=4))
    ref = hf_greedy(model, ids, mask, max_new_tokens=64, eos_token_id=None)
    for drafter in (PromptLookup(num_tokens=4, max_ngram=2), DraftModel(cuda_tiny("llama", seed=3), num_tokens=3),
                    KangarooAdapter(cuda_adapter(model), num_tokens=3)):
        out = specdec.wrap(model, drafter=drafter, cuda_graphs=True, min_tau=3.5).generate(
            ids, attention_mask=mask, max_new_tokens=64, pad_token_id=0, eos_token_id=None,
            return_dict_in_generate=True)
        st = out.spec_stats
        assert torch.equal(out.sequences, ref), type(drafter).__name__
        assert st.draft_pauses >= 1 and 0 < st.undrafted_steps < st.num_steps and st.undrafted_steps % 8 == 0


def test_min_tau_auto_times_captured_runs_and_wastes_no_run():
    """min_tau="auto" under graphs: each run's cost comes from CUDA events read with its results,
    both kinds of run get timed, tokens stay HF's, and pipelining queues no run past the end."""
    model = cuda_tiny("llama", num_layers=2)
    ids, mask = (t.cuda() for t in ragged_batch([6, 9, 4], 64, seed=4))
    ref = hf_greedy(model, ids, mask, max_new_tokens=96, eos_token_id=None)
    for drafter in (PromptLookup(num_tokens=4, max_ngram=2), DraftModel(model, num_tokens=3)):
        spec = specdec.wrap(model, drafter=drafter, cuda_graphs=True, min_tau="auto")
        for _ in range(2):   # the second call starts from the first one's costs
            out = spec.generate(ids, attention_mask=mask, max_new_tokens=96, pad_token_id=0, eos_token_id=None,
                                return_dict_in_generate=True)
            st = out.spec_stats
            assert torch.equal(out.sequences, ref), type(drafter).__name__
            assert st.idle_steps == st.num_steps - max(map(len, st.accepted_lengths))
            if isinstance(drafter, DraftModel):   # the target drafting for itself: τ is 4 at every step
                assert st.idle_steps < 8
        (costs,) = spec.engine._costs.values()
        assert costs.plain > 0 and costs.drafted > 0


@pytest.mark.parametrize("pipeline", [False, True])
def test_pipelined_runs_stop_at_eos_and_equal_hf(pipeline):
    # The queued run reads back over pinned memory and an event: rows that stop at EOS inside a
    # run (and go on through the queued one) are cut exactly where HF stops them.
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

"""Sparse-KV self-drafting (TriForce's middle level) and the Hierarchical / TriForce drafters:
lossless against HF greedy with sparsity actually exercised, and the target's law kept under
sampling."""
import copy

import pytest
import torch
from test_sampling import PARAMS, chi2_pvalue, exact_joint, sampled_joint
from tiny import ARCHS, hf_greedy, make_tiny, ragged_batch

import specdec
from specdec.drafters import DraftModel, EagleHead, Hierarchical, PromptLookup, SparseSelfDraft, TriForce, make_drafter


class Recording(SparseSelfDraft):
    """Records, at every step, how many committed slots were selected and how many existed."""

    def select(self, ctx):
        super().select(ctx)
        self.seen.append((self.selected.clone(), self.context.clone()))


def small_sparse(**kw):
    d = Recording(**{"num_tokens": 3, "sink": 2, "window": 4, "chunk": 3, "top_chunks": 2, **kw})
    d.seen = []
    return d


def generate(model, drafter, ids, mask, n=20):
    out = specdec.wrap(model, drafter=drafter).generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                                                       pad_token_id=0, return_dict_in_generate=True)
    return out.sequences, out.spec_stats


def assert_sparse(drafter, budget):
    """Some step saw a context larger than the budget, and there the selection was strictly smaller."""
    selected = torch.stack([s for s, _ in drafter.seen])
    context = torch.stack([c for _, c in drafter.seen])
    assert (selected <= budget).all() and (selected <= context).all()
    assert ((context > budget) & (selected < context)).any(), "the test never exercised a sparse selection"


def assert_all_accepted(stats):
    """Every step but a row's last (cut by max_new_tokens or EOS) kept its whole proposal and a bonus."""
    for accepted, proposed in zip(stats.accepted_lengths, stats.proposed):
        assert accepted[:-1] == [p + 1 for p in proposed[:-1]]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("lengths", [[23], [13, 30, 2, 19]], ids=["batch1", "batch4"])
def test_greedy_equals_hf(arch, lengths):
    model = make_tiny(arch, num_layers=3)
    ids, mask = ragged_batch(lengths, 256, seed=len(lengths))
    ref = hf_greedy(model, ids, mask, max_new_tokens=20)
    sparse = small_sparse()
    seq, stats = generate(model, sparse, ids, mask)
    assert torch.equal(seq, ref), f"SparseSelfDraft differs from HF greedy ({arch}, {lengths})"
    assert stats.drafter == "Recording"
    assert_sparse(sparse, sparse.budget)
    middle = small_sparse(num_tokens=6)
    seq, _ = generate(model, Hierarchical(PromptLookup(num_tokens=3, max_ngram=2), middle, rounds=2), ids, mask)
    assert torch.equal(seq, ref), f"Hierarchical(lookup, sparse) differs from HF greedy ({arch}, {lengths})"
    assert_sparse(middle, middle.budget)
    tri = TriForce(num_tokens=5, rounds=3, sink=1, window=5, chunk=4, top_chunks=1)
    seq, _ = generate(model, tri, ids, mask)
    assert torch.equal(seq, ref), f"TriForce differs from HF greedy ({arch}, {lengths})"


class CheckingMeans(SparseSelfDraft):
    """At every step, after selection: the kept chunk means equal the mean keys read straight from
    the target's cache, every wholly committed chunk has one, and nothing was rebuilt from scratch."""

    def _rebuild_means(self, ctx):
        self.rebuilds += 1
        super()._rebuild_means(ctx)

    def select(self, ctx):
        super().select(ctx)
        committed = (ctx.seq_len - 1 - ctx.start).tolist()
        for b, n in enumerate(committed):
            complete = max(0, n - self.sink) // self.chunk
            assert int(self.filled[b]) == complete, f"row {b}: {int(self.filled[b])} chunk means, {complete} chunks"
            for c in range(complete):
                lo = int(ctx.start[b]) + self.sink + c * self.chunk
                expect = torch.stack([k[b, :, lo: lo + self.chunk].float().mean(1) for k in ctx.cache.k])
                torch.testing.assert_close(self.means[:, b, :, c], expect, rtol=1e-6, atol=1e-6)
        self.chunks_seen.append(self.filled.clone())


def test_incremental_chunk_means_match_a_recomputation():
    # Batch 2, ragged prompts, a small window: drafts get rejected (rows grow by different
    # amounts each step) and chunks complete at different steps in each row.
    model = make_tiny("llama", num_layers=3)
    ids, mask = ragged_batch([9, 26], 256, seed=7)
    ref = hf_greedy(model, ids, mask, max_new_tokens=30)
    drafter = CheckingMeans(num_tokens=4, sink=2, window=3, chunk=3, top_chunks=2)
    drafter.rebuilds, drafter.chunks_seen = 0, []
    spec = specdec.wrap(model, drafter=drafter)
    out = spec.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False, pad_token_id=0,
                        return_dict_in_generate=True)
    seq, stats = out.sequences, out.spec_stats
    assert torch.equal(seq, ref)
    capacity = spec.engine._decoder.state.capacity  # memory_bytes counts exactly the buffers it holds
    assert drafter.memory_bytes(2, capacity, 30) == drafter.table.numel() * 4 + drafter.means.numel() * 4
    assert drafter.rebuilds == 1, "chunk means were rebuilt from scratch after begin"
    seen = torch.stack(drafter.chunks_seen)  # [steps, 2]
    assert (seen[-1] - seen[0] >= 5).all(), "too few chunks completed during decoding to test the update"
    rejected = [a < p + 1 for row_a, row_p in zip(stats.accepted_lengths, stats.proposed)
                for a, p in zip(row_a[:-1], row_p[:-1])]
    assert any(rejected) and not all(rejected), "the test needs steps with rejections and steps without"


def test_full_budget_self_draft_is_exact():
    # When the budget covers the whole context the sparse draft is the target itself: every token
    # is accepted (the gathered cache and its per-row padding reproduce full attention).
    model = make_tiny("llama", num_layers=3)
    ids, mask = ragged_batch([5, 11], 256, seed=4)
    ref = hf_greedy(model, ids, mask, max_new_tokens=25)
    seq, stats = generate(model, SparseSelfDraft(num_tokens=4, sink=2, window=64, chunk=4, top_chunks=0), ids, mask,
                          n=25)
    assert torch.equal(seq, ref)
    assert_all_accepted(stats)


def test_hierarchical_with_an_exact_middle_keeps_its_tokens():
    # With a full-budget middle the middle is the target, so every proposed token is accepted and
    # τ counts the tokens the hierarchy produced: more than one round's worth of one token each.
    model = make_tiny("llama", num_layers=3)
    ids, mask = ragged_batch([4, 4], 256, seed=5)
    ids = torch.cat([ids, ids, ids], 1)  # repeats: lookup proposes real drafts
    mask = torch.ones_like(ids)
    ref = hf_greedy(model, ids, mask, max_new_tokens=25)
    middle = SparseSelfDraft(num_tokens=6, sink=2, window=64, chunk=4, top_chunks=0)
    seq, stats = generate(model, Hierarchical(PromptLookup(num_tokens=3, max_ngram=2), middle, rounds=2), ids, mask,
                          n=25)
    assert torch.equal(seq, ref)
    assert_all_accepted(stats)
    # Two rounds give at least 2 drafted tokens, plus the target's bonus token.
    assert all(min(row[:-1]) >= 3 for row in stats.accepted_lengths)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("lengths", [[23], [13, 30, 2, 19]], ids=["batch1", "batch4"])
def test_draft_model_top_greedy_equals_hf(arch, lengths):
    # A draft model close to the target (its weights perturbed) on top: its chains get cut by the
    # middle level and the middle's drafts by the target, at different points in each row.
    from heads_util import noisy

    model = make_tiny(arch, num_layers=3)
    ids, mask = ragged_batch(lengths, 256, seed=len(lengths) + 1)
    ref = hf_greedy(model, ids, mask, max_new_tokens=20)
    middle = small_sparse(num_tokens=7, window=12)  # budget 20: every row outgrows it
    top = DraftModel(noisy(copy.deepcopy(model), scale=0.02), num_tokens=3)
    seq, stats = generate(model, Hierarchical(top, middle, rounds=2), ids, mask)
    assert torch.equal(seq, ref), f"Hierarchical(DraftModel, sparse) differs from HF greedy ({arch}, {lengths})"
    assert_sparse(middle, middle.budget)
    proposed = [p for row in stats.proposed for p in row]
    assert max(proposed) > 2, "no round kept a top token (2 rounds of the middle's own token alone)"
    assert any(a < p + 1 for row_a, row_p in zip(stats.accepted_lengths, stats.proposed)
               for a, p in zip(row_a, row_p)), "the target never rejected a draft"


def test_draft_model_top_cache_follows_the_shadow():
    # With the target itself on top and a full-budget middle every level is exact: each round
    # keeps the top's whole chain plus the middle's token, and the target accepts all of it. A
    # draft cache that missed a shadow token (a round's own token, a step's bonus) would draft
    # wrong tokens somewhere, and a round would keep fewer.
    model = make_tiny("llama", num_layers=3)
    ids, mask = ragged_batch([6, 17], 256, seed=8)
    ref = hf_greedy(model, ids, mask, max_new_tokens=30)
    middle = SparseSelfDraft(num_tokens=8, sink=2, window=64, chunk=4, top_chunks=0)
    tri = Hierarchical(DraftModel(model, num_tokens=3), middle, rounds=2)
    assert tri.num_nodes == 8 and tri.top.spec.lookback == 3
    seq, stats = generate(model, tri, ids, mask, n=30)
    assert torch.equal(seq, ref)
    assert_all_accepted(stats)
    assert all(set(row[:-1]) == {9} for row in stats.accepted_lengths), stats.accepted_lengths


@pytest.mark.parametrize("lengths", [[23], [13, 30, 2, 19]], ids=["batch1", "batch4"])
def test_eagle_top_greedy_equals_hf(lengths):
    from heads_util import eagle

    model = make_tiny("qwen2", num_layers=3)
    ids, mask = ragged_batch(lengths, 256, seed=len(lengths) + 2)
    ref = hf_greedy(model, ids, mask, max_new_tokens=20)
    middle = small_sparse(num_tokens=7, window=12)
    tri = Hierarchical(eagle(model, num_tokens=3), middle, rounds=2)
    assert tri.spec.hidden_layers == tri.top.spec.hidden_layers == (1,)  # verification exports the head's
    seq, stats = generate(model, tri, ids, mask)
    assert torch.equal(seq, ref), f"Hierarchical(EagleHead, sparse) differs from HF greedy ({lengths})"
    assert_sparse(middle, middle.budget)


def test_eagle_top_reads_the_middle_states_of_the_steps_tokens():
    # With a full-budget middle, the states its forward gives the head for the step's own tokens are
    # the target's: each one a round stores equals HF's hidden state after layer 1 at that position
    # (wherever the round's tokens are the ones decoding went on to produce), including tokens the
    # target had not verified yet (past the step's root).
    from heads_util import eagle

    model = make_tiny("llama", num_layers=3)
    ids, mask = ragged_batch([11], 256, seed=9)
    ref = hf_greedy(model, ids, mask, max_new_tokens=24)
    head = eagle(model, num_tokens=2)
    middle = SparseSelfDraft(num_tokens=6, sink=2, window=64, chunk=4, top_chunks=0)
    tri = Hierarchical(head, middle, rounds=3)
    stored, store = [], tri.store_head_features

    def record(state, slots, layer_hidden, tokens):
        root = state.seq_len - 1 - state.start
        stored.append((slots - state.start[:, None], root, layer_hidden.clone(), tokens.clone()))
        store(state, slots, layer_hidden, tokens)
    tri.store_head_features = record
    seq, _ = generate(model, tri, ids, mask, n=24)
    assert torch.equal(seq, ref)
    truth = model(ref, output_hidden_states=True).hidden_states[1][0]  # [T, H] after layer 1
    compared = unverified = 0
    for positions, root, states, tokens in stored:
        for i, (p, t) in enumerate(zip(positions[0].tolist(), tokens[0].tolist())):
            if p >= ref.shape[1] or t != int(ref[0, p]):
                break  # past here the round's tokens are not the decoded ones
            torch.testing.assert_close(states[0, 0, i], truth[p], rtol=1e-4, atol=1e-4)
            compared += 1
            unverified += p > int(root[0])
    assert len(stored) > 6 and compared >= len(stored) and unverified > len(stored) // 2, (compared, unverified)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_many_steps_per_sync_equal_hf(device):
    # Three steps per host sync on the CPU; on CUDA, captured graphs of eight. Selection, the
    # chunk-mean update and every top level run with no host sync in between.
    from heads_util import eagle, noisy

    model = make_tiny("llama", num_layers=3, vocab_size=64, init_range=1.0).to(device)
    ids, mask = (t.to(device) for t in ragged_batch([13, 30, 2, 19], 64, seed=3))
    ref = hf_greedy(model, ids, mask, max_new_tokens=40, eos_token_id=None)
    drafters = {"sparse": small_sparse(window=8),
                "lookup_top": Hierarchical(PromptLookup(num_tokens=3, max_ngram=2), small_sparse(num_tokens=6)),
                "draft_model_top": Hierarchical(DraftModel(noisy(copy.deepcopy(model), scale=0.02), num_tokens=3),
                                                small_sparse(num_tokens=6, window=8)),
                "eagle_top": Hierarchical(eagle(model, num_tokens=2), small_sparse(num_tokens=6, window=8))}
    graphs = dict(cuda_graphs=True) if device == "cuda" else dict(chunk_steps=3)
    for name, drafter in drafters.items():
        out = specdec.wrap(model, drafter=drafter, **graphs).generate(
            ids, attention_mask=mask, max_new_tokens=40, pad_token_id=0, eos_token_id=None, do_sample=False,
            return_dict_in_generate=True)
        assert torch.equal(out.sequences, ref), (device, name)


def test_bad_options_are_refused():
    from heads_util import eagle, medusa

    with pytest.raises(ValueError, match="window"):
        SparseSelfDraft(window=0)
    tiny = make_tiny("llama")
    with pytest.raises(ValueError, match="tree_width=1"):
        Hierarchical(DraftModel(tiny, num_tokens=2, tree_width=2), SparseSelfDraft())
    with pytest.raises(ValueError, match="schedule='constant'"):
        Hierarchical(DraftModel(tiny, num_tokens=2, schedule="adaptive"), SparseSelfDraft())
    with pytest.raises(ValueError, match="num_branches=1"):
        Hierarchical(PromptLookup(num_branches=2), SparseSelfDraft())
    with pytest.raises(ValueError, match="without tree_topk"):
        Hierarchical(EagleHead(eagle(tiny).head, tree_topk=2, tree_depth=2), SparseSelfDraft())
    with pytest.raises(ValueError, match="PromptLookup, DraftModel or EagleHead, got MedusaHeads"):
        Hierarchical(medusa(tiny), SparseSelfDraft())
    with pytest.raises(ValueError, match="middle drafter"):
        Hierarchical(PromptLookup(), PromptLookup())
    with pytest.raises(ValueError, match="sliding-window"):
        generate(make_tiny("mistral", sliding_window=4), SparseSelfDraft(), *ragged_batch([9], 256), n=4)
    assert isinstance(make_drafter("triforce", window=8), Hierarchical)


@pytest.mark.parametrize("params", PARAMS, ids=["t1", "t0.7_k5_p0.9"])
@pytest.mark.parametrize("kind", ["sparse", "hierarchical", "draft_model_top", "eagle_top"])
def test_sampling_preserves_target(params, kind):
    from heads_util import eagle

    target = make_tiny("llama", vocab_size=8, init_range=0.15, seed=11)
    torch.manual_seed(4321)
    sparse = SparseSelfDraft(num_tokens=3, sink=1, window=2, chunk=2, top_chunks=1)  # the 7-token prompt is cut
    tops = {"hierarchical": lambda: PromptLookup(num_tokens=2, max_ngram=2),
            # a draft model of other weights: its q is a real distribution, unlike lookup's point masses
            "draft_model_top": lambda: DraftModel(make_tiny("llama", vocab_size=8, init_range=0.15, seed=12),
                                                  num_tokens=2),
            "eagle_top": lambda: eagle(target, num_tokens=2)}
    drafter = sparse if kind == "sparse" else Hierarchical(tops[kind](), sparse, rounds=2)
    counts = sampled_joint(specdec.wrap(target, drafter=drafter), params)
    assert chi2_pvalue(counts, exact_joint(target, params)) > 1e-3


def test_triforce_config_builds_the_hierarchy():
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from specdec.drafters import build_drafter

    with initialize_config_module("specdec.conf", version_base=None):
        tri = compose("generate", overrides=["drafter=triforce", "drafter.window=32"]).drafter
        sparse = compose("generate", overrides=["drafter=sparse_self"]).drafter
    tri = build_drafter(OmegaConf.to_container(tri, resolve=True))
    assert isinstance(tri, Hierarchical) and isinstance(tri.top, PromptLookup) and tri.middle.window == 32
    assert tri.num_nodes == 8 and tri.rounds == 2
    sparse = build_drafter(OmegaConf.to_container(sparse, resolve=True))
    assert isinstance(sparse, SparseSelfDraft) and sparse.budget == 4 + 256 + 8 * 16


def long_prompt(tok, tokens=4000):
    """About ``tokens`` tokens of the standard library's own source, then a question about it."""
    import inspect
    import json.decoder
    import textwrap

    source = inspect.getsource(textwrap) + inspect.getsource(json.decoder)
    ids = tok(source).input_ids[:tokens]
    return tok.decode(ids) + "\n\n# Question: what does the function dedent above do? Answer:\n"


@pytest.mark.slow
def test_smollm2_4k_prompt_greedy_equality(smollm2):
    model, tok = smollm2
    enc = tok([long_prompt(tok)], return_tensors="pt")
    assert enc.input_ids.shape[1] > 3900
    kw = dict(attention_mask=enc.attention_mask, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    ref = model.generate(enc.input_ids, **kw)
    sparse = Recording(num_tokens=4, sink=4, window=256, chunk=16, top_chunks=8)
    sparse.seen = []
    middle = Recording(num_tokens=6, sink=4, window=256, chunk=16, top_chunks=8)
    middle.seen = []
    for name, drafter in {"sparse": sparse, "triforce": Hierarchical(PromptLookup(num_tokens=3), middle)}.items():
        out = specdec.wrap(model, drafter=drafter).generate(enc.input_ids, **kw, return_dict_in_generate=True)
        assert torch.equal(out.sequences, ref), f"{name} differs from HF greedy on a 4K-token prompt"
        print(f"{name}: tau={out.spec_stats.tau:.2f} acceptance={out.spec_stats.acceptance_rate:.2f}")
        assert_sparse(drafter if name == "sparse" else middle, sparse.budget)

"""Greedy speculative decoding must equal plain HF greedy decoding, token for token (fp32)."""
import re

import pytest
import torch
from tiny import ARCHS, char_tokenizer, hf_greedy, make_tiny, ragged_batch

import specdec
from specdec.drafters import CopySpec, DraftModel, DynamicExit, LayerSkip, PromptLookup, RestDrafter, Swift
from specdec.gate import DraftGate
from specdec.step import Decoder

HOST = ("copyspec", "rest", "swift", "del")  # drafters whose proposal needs the host: one step per sync


def drafters_for(model, arch):
    from specdec.datastore import Datastore

    store = Datastore.from_documents([list(range(3, 60)) * 2], vocab_size=model.config.vocab_size)
    return {
        "none": None,
        "layerskip": LayerSkip(exit_layer=1, num_tokens=3),
        "kangaroo": LayerSkip.kangaroo(exit_layer=1, num_tokens=4, stop_threshold=0.3),
        "copyspec": CopySpec(gamma=2, num_tokens=5, fallback=PromptLookup(num_tokens=3), device=False),
        "copyspec_device": CopySpec(gamma=2, num_tokens=5, fallback=PromptLookup(num_tokens=3)),
        "rest": RestDrafter(store, num_nodes=6, max_depth=3),
        "swift": Swift(skip_ratio=0.5, num_tokens=3, window=4, max_evals=3),
        "del": DynamicExit(num_tokens=3, exit_layers=[1]),
        "lookup": PromptLookup(num_tokens=4, max_ngram=3),
        "draft_model": DraftModel(make_tiny(arch, seed=1), num_tokens=3),
        "draft_model_adaptive": DraftModel(make_tiny(arch, seed=2), num_tokens=4, schedule="adaptive"),
        "self_draft": DraftModel(model, num_tokens=4),  # accepts everything: long accepted runs
        "draft_tree": DraftModel(make_tiny(arch, seed=1), num_tokens=3, tree_width=3, tree_nodes=10),
        "self_draft_tree": DraftModel(model, num_tokens=4, tree_width=2, tree_nodes=8),
        "lookup_tree": PromptLookup(num_tokens=3, max_ngram=3, num_branches=3),
    }


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("lengths", [[7], [3, 9, 1, 6]], ids=["batch1", "batch4_ragged"])
@pytest.mark.parametrize("steps", [1, 3], ids=["per_step", "3_per_sync"])
def test_greedy_equals_hf(arch, lengths, steps):
    """Every drafter through the one driver, one step per sync and three (graphs off)."""
    model = make_tiny(arch)
    ids, mask = ragged_batch(lengths, model.config.vocab_size, seed=len(lengths))
    ref = hf_greedy(model, ids, mask, max_new_tokens=24, eos_token_id=None)
    for name, drafter in drafters_for(model, arch).items():
        if steps > 1 and name in HOST:
            continue
        out = specdec.wrap(model, drafter=drafter, chunk_steps=steps).generate(
            ids, attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=0, eos_token_id=None,
            return_dict_in_generate=True)
        assert torch.equal(out.sequences, ref), f"{arch}/{name} differs from HF greedy"
        stats = out.spec_stats
        assert stats.new_tokens == [24] * len(lengths)  # max_new_tokens is exact
        assert all(sum(r) == 24 for r in stats.accepted_lengths)
        if name == "self_draft":
            assert stats.tau > 4.0 and stats.acceptance_rate > 0.9
        if name == "self_draft_tree":  # the draft is the target: deep paths are accepted
            assert stats.tau > 3.0
        if name == "none":
            assert stats.tau == 1.0 and stats.draft_forwards == 0


def test_lookup_accepts_on_repetitive_model():
    # A 16-token one-layer model falls into loops, so n-gram lookup gets real acceptances.
    model = make_tiny("llama", vocab_size=16, init_range=1.0, num_layers=1)
    ids, mask = ragged_batch([6, 2, 11, 4], 16, seed=3)
    ref = hf_greedy(model, ids, mask, max_new_tokens=60, eos_token_id=None)
    out = specdec.wrap(model, drafter=PromptLookup(num_tokens=6, max_ngram=2)).generate(
        ids, attention_mask=mask, max_new_tokens=60, pad_token_id=0, eos_token_id=None, return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref)
    assert out.spec_stats.tau > 1.3
    assert out.spec_stats.num_steps < 60


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_eos_inside_accepted_run(arch):
    model = make_tiny(arch)
    ids, mask = ragged_batch([5, 8], model.config.vocab_size, seed=7)
    free = hf_greedy(model, ids, mask, max_new_tokens=20, eos_token_id=None)[:, ids.shape[1]:]
    # Pick as EOS a token that row 0 first emits at position 7: with a self-draft of 4 tokens
    # per step, position 7 lies inside the second step's accepted run.
    eos = None
    for pos in range(6, 9):
        tok = int(free[0, pos])
        if tok not in free[0, :pos].tolist():
            eos = tok
            break
    assert eos is not None
    ref = hf_greedy(model, ids, mask, max_new_tokens=20, eos_token_id=eos)
    out = specdec.wrap(model, drafter=DraftModel(model, num_tokens=4)).generate(
        ids, attention_mask=mask, max_new_tokens=20, pad_token_id=0, eos_token_id=eos, return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref)
    assert out.spec_stats.new_tokens[0] == pos + 1  # stopped right after EOS, EOS kept
    assert out.spec_stats.tau > 1.5  # the stop really happened mid-run


@pytest.mark.parametrize("chunked", [False, True], ids=["per_step", "pipelined_chunks"])
def test_stop_strings_match_hf(chunked):
    tok = char_tokenizer()
    model = make_tiny("llama", vocab_size=len(tok), init_range=0.5)
    prompts = ["the cat sat", "a dog"]
    refs = []
    for text in prompts:  # HF batch-1 references (see the note below)
        enc = tok([text], return_tensors="pt")
        free = hf_greedy(model, enc.input_ids, max_new_tokens=30, eos_token_id=None)[0, enc.input_ids.shape[1]:]
        refs.append((enc.input_ids, tok.decode(free)))
    stop = refs[0][1][9:12]  # a string row 0 completes mid-generation
    expected = [hf_greedy(model, ids, max_new_tokens=30, eos_token_id=None, stop_strings=[stop], tokenizer=tok)
                [0, ids.shape[1]:].tolist() for ids, _ in refs]
    assert len(expected[0]) == 12 and tok.decode(expected[0]).endswith(stop)
    # Batch 1 against HF directly, then a left-padded batch of both rows against the per-row
    # references. (HF 5.23's own batched generate did not stop row 0 at the stop string in this
    # setting, so the batched reference is built row by row.)
    enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left")
    for drafter in (PromptLookup(num_tokens=4), DraftModel(model, num_tokens=4)):
        spec = specdec.wrap(model, drafter=drafter, **({"chunk_steps": 4, "pipeline": True} if chunked else {}))
        one = spec.generate(refs[0][0], max_new_tokens=30, pad_token_id=0, eos_token_id=None, stop_strings=[stop],
                            tokenizer=tok)
        assert one[0, refs[0][0].shape[1]:].tolist() == expected[0]
        out = spec.generate(enc.input_ids, attention_mask=enc.attention_mask, max_new_tokens=30, pad_token_id=0,
                            eos_token_id=None, stop_strings=[stop], tokenizer=tok)
        new = out[:, enc.input_ids.shape[1]:].tolist()
        for row, exp in zip(new, expected):
            assert row[: len(exp)] == exp and all(t == 0 for t in row[len(exp):])


def test_lookup_branches_raise_tau_and_stay_exact():
    model = make_tiny("llama", vocab_size=16, init_range=1.0, num_layers=1)
    ids, mask = ragged_batch([6, 2, 11, 4], 16, seed=3)
    ref = hf_greedy(model, ids, mask, max_new_tokens=60, eos_token_id=None)
    taus = []
    for branches in (1, 4):
        out = specdec.wrap(model, drafter=PromptLookup(num_tokens=4, max_ngram=2, num_branches=branches)).generate(
            ids, attention_mask=mask, max_new_tokens=60, pad_token_id=0, eos_token_id=None,
            return_dict_in_generate=True)
        assert torch.equal(out.sequences, ref)
        taus.append(out.spec_stats.tau)
    assert taus[1] > taus[0]


def test_adaptive_gamma_grows_on_full_acceptance_and_shrinks_on_rejection():
    model = make_tiny("llama")
    ids = torch.tensor([[5, 6, 7, 8]])
    good = DraftModel(model, num_tokens=6, schedule="adaptive")  # the target itself: always accepted
    specdec.wrap(model, drafter=good).generate(ids, max_new_tokens=30, pad_token_id=0, eos_token_id=None)
    assert int(good.gamma) == 6
    bad = DraftModel(make_tiny("llama", seed=5), num_tokens=6, schedule="adaptive")
    out = specdec.wrap(model, drafter=bad).generate(ids, max_new_tokens=30, pad_token_id=0, eos_token_id=None,
                                                     return_dict_in_generate=True)
    assert int(bad.gamma) == 1 and out.spec_stats.tau < 1.5


def test_batch_size_policy_switches_drafting_off_and_stays_exact():
    model = make_tiny("llama")
    ids, mask = ragged_batch([3, 9, 1, 6], model.config.vocab_size, seed=4)
    eos = int(hf_greedy(model, ids, mask, max_new_tokens=4, eos_token_id=None)[1, -1])  # row 1 stops early
    ref = hf_greedy(model, ids, mask, max_new_tokens=20, eos_token_id=eos)
    spec = specdec.wrap(model, drafter=DraftModel(model, num_tokens=3), max_draft_batch=3)
    out = spec.generate(ids, attention_mask=mask, max_new_tokens=20, pad_token_id=0, eos_token_id=eos,
                        return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref)
    stats = out.spec_stats
    # Steps with four active rows run without a draft; once the first row is done, three remain
    # and drafting resumes.
    first_done = min(len(r) for r in stats.accepted_lengths)
    assert stats.undrafted_steps == first_done and stats.draft_forwards > 0
    assert all(n == 1 for r in stats.accepted_lengths for n in r[:first_done])
    assert stats.num_steps < 20


def test_draft_gate_pauses_with_a_doubling_backoff():
    gate = DraftGate(min_tau=1.5, window=4, backoff=8, max_backoff=16)
    assert gate.want(1)
    gate.record(True, 4, kept=4 * 2 * 1, row_steps=4 * 2)   # τ 1.0 over the window: pause 8 steps
    assert gate.paused == 1 and not gate.want(1)
    for _ in range(7):
        gate.record(False, 1, kept=2, row_steps=2)
        assert not gate.want(1)
    gate.record(False, 1, kept=2, row_steps=2)
    assert gate.want(1)                                      # the 8 steps are over: try again
    gate.record(True, 2, kept=2, row_steps=2)                # half a window: no verdict yet
    assert gate.want(1)
    gate.record(True, 2, kept=2, row_steps=2)                # τ 1.0 again: the backoff doubled
    gate.record(False, 15, kept=15, row_steps=15)
    assert not gate.want(1) and gate.paused == 2
    gate.record(False, 1, kept=1, row_steps=1)
    assert gate.want(1)
    gate.record(True, 4, kept=4 * 3, row_steps=4)            # τ 3: pays, the backoff resets
    assert gate.want(1) and gate.backoff == 8
    gate.record(True, 4, kept=4, row_steps=4)
    assert gate.skip == 8 and gate.backoff == 16
    gate.record(True, 4, kept=4, row_steps=4)                # (a paused caller would not record this)
    assert gate.backoff == 16                                # capped at max_backoff
    # The batch cap applies on its own; with both off the gate always drafts.
    assert not DraftGate(max_draft_batch=2).want(3) and DraftGate(max_draft_batch=2).want(2)
    off = DraftGate()
    off.record(True, 100, kept=100, row_steps=100)
    assert off.want(64) and off.paused == 0
    with pytest.raises(ValueError, match="min_tau must be >= 1"):
        specdec.wrap(make_tiny("llama"), drafter=PromptLookup(3), min_tau=0.5)


@pytest.mark.parametrize("chunk_steps,pipeline", [(None, False), (4, False), (4, True)])
def test_min_tau_pauses_a_drafter_that_does_not_pay_and_stays_exact(chunk_steps, pipeline):
    # Prompt lookup on a random model's output: its copies are rarely accepted, so windows fall
    # below min_tau=1.5 and drafting pauses; the tokens stay HF's. Same in the chunked loop.
    model = make_tiny("llama", vocab_size=32, init_range=1.0, num_layers=1)
    ids, mask = ragged_batch([6, 2, 11, 4], 32, seed=3)
    ref = hf_greedy(model, ids, mask, max_new_tokens=60, eos_token_id=None)

    def run(min_tau):
        out = specdec.wrap(model, drafter=PromptLookup(num_tokens=4, max_ngram=2), chunk_steps=chunk_steps,
                           min_tau=min_tau, pipeline=pipeline).generate(ids, attention_mask=mask, max_new_tokens=60, pad_token_id=0,
                                                     eos_token_id=None, return_dict_in_generate=True)
        assert torch.equal(out.sequences, ref)
        return out.spec_stats

    free, gated = run(None), run(1.5)
    assert free.undrafted_steps == free.draft_pauses == 0 and free.tau < 1.5
    assert gated.draft_pauses >= 1 and 0 < gated.undrafted_steps < gated.num_steps
    assert gated.num_steps - gated.undrafted_steps < free.num_steps  # fewer drafted steps
    assert gated.draft_forwards == free.draft_forwards == 0  # lookup runs no draft forwards
    # Rows that reached 60 tokens sooner missed the last undrafted steps; none ran more than all,
    # and only a last chunk's tail may go unused by every row.
    top = max(gated.undrafted_by_row)
    assert gated.undrafted_steps - (chunk_steps or 1) < top <= gated.undrafted_steps
    assert min(gated.undrafted_by_row) > 0
    if chunk_steps:
        assert gated.undrafted_steps % chunk_steps == 0
    # An undrafted step offers nothing and keeps one token.
    for row in range(4):
        idle = [(g, p) for g, p in zip(gated.accepted_lengths[row], gated.proposed[row]) if p == 0]
        assert len(idle) >= gated.undrafted_by_row[row] and all(g == 1 for g, _ in idle)


def test_min_tau_never_pauses_a_drafter_that_pays():
    model = make_tiny("llama")
    ids, mask = ragged_batch([3, 9], model.config.vocab_size, seed=4)
    out = specdec.wrap(model, drafter=DraftModel(model, num_tokens=3), min_tau=2.0).generate(
        ids, attention_mask=mask, max_new_tokens=24, pad_token_id=0, eos_token_id=None, return_dict_in_generate=True)
    assert torch.equal(out.sequences, hf_greedy(model, ids, mask, max_new_tokens=24, eos_token_id=None))
    assert out.spec_stats.undrafted_steps == out.spec_stats.draft_pauses == 0 and out.spec_stats.tau == 4.0


@pytest.mark.parametrize("chunk_steps,pipeline", [(None, False), (4, False), (4, True)])
def test_draft_model_catches_up_after_undrafted_steps(chunk_steps, pipeline):
    # The target drafting for itself accepts every token, but only if its draft cache holds the
    # tokens committed while drafting was off: resync() feeds them when drafting resumes.
    model = make_tiny("llama")
    ids, mask = ragged_batch([3, 9, 1, 6], model.config.vocab_size, seed=4)
    eos = int(hf_greedy(model, ids, mask, max_new_tokens=4, eos_token_id=None)[1, -1])  # row 1 stops early
    ref = hf_greedy(model, ids, mask, max_new_tokens=40, eos_token_id=eos)
    out = specdec.wrap(model, drafter=DraftModel(model, num_tokens=3), max_draft_batch=3, chunk_steps=chunk_steps,
                       pipeline=pipeline).generate(
        ids, attention_mask=mask, max_new_tokens=40, pad_token_id=0, eos_token_id=eos, return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref)
    stats = out.spec_stats
    first = stats.undrafted_steps
    assert first > 0
    for row, (lengths, new) in enumerate(zip(stats.accepted_lengths, stats.new_tokens)):
        drafted = lengths[first:-1]   # the last step may be cut by max_new_tokens or EOS
        assert all(n == 4 for n in drafted), (row, lengths)


@pytest.mark.parametrize("pipeline", [False, True])
@pytest.mark.parametrize("chunk_steps", [3, 8])
@pytest.mark.parametrize("drafter", ["none", "lookup", "lookup_branches"])
def test_chunked_loop_equals_hf(chunk_steps, drafter, pipeline):
    # Several steps per host sync: rows that finish mid-chunk run on and are cut on the host.
    model = make_tiny("llama", vocab_size=16, init_range=1.0, num_layers=1)
    ids, mask = ragged_batch([6, 2, 11, 4], 16, seed=3)
    d = {"none": None, "lookup": PromptLookup(num_tokens=6, max_ngram=2),
         "lookup_branches": PromptLookup(num_tokens=3, max_ngram=2, num_branches=2)}[drafter]
    ref = hf_greedy(model, ids, mask, max_new_tokens=45, eos_token_id=None)
    out = specdec.wrap(model, drafter=d, chunk_steps=chunk_steps, pipeline=pipeline).generate(
        ids, attention_mask=mask, max_new_tokens=45, pad_token_id=0, eos_token_id=None, return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref)
    stats = out.spec_stats
    assert stats.num_steps % chunk_steps == 0  # whole chunks
    assert all(sum(g) == 45 for g in stats.accepted_lengths)  # per-row counts are cut exactly
    if d is not None:
        assert stats.tau > 1.3


@pytest.mark.parametrize("drafter", ["draft_model", "self_draft", "layerskip"])
def test_chunked_loop_with_model_drafters_equals_hf(drafter):
    # Model drafters whose drafting is static-shape device work run inside the chunk too.
    from specdec.drafters import LayerSkip

    model = make_tiny("qwen2", vocab_size=32, init_range=1.0, num_layers=3)
    ids, mask = ragged_batch([6, 2, 11], 32, seed=5)
    d = {"draft_model": DraftModel(make_tiny("qwen2", vocab_size=32, init_range=1.0, seed=3), num_tokens=3),
         "self_draft": DraftModel(model, num_tokens=3),
         "layerskip": LayerSkip(exit_layer=2, num_tokens=3)}[drafter]
    assert d.spec.device_only
    ref = hf_greedy(model, ids, mask, max_new_tokens=30, eos_token_id=None)
    out = specdec.wrap(model, drafter=d, chunk_steps=4).generate(
        ids, attention_mask=mask, max_new_tokens=30, pad_token_id=0, eos_token_id=None, return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref)
    assert out.spec_stats.num_steps % 4 == 0   # it ran in whole chunks
    if drafter == "self_draft":
        assert out.spec_stats.tau > 3.0   # the target drafting for itself: every draft accepted


def test_drafters_declare_whether_they_need_the_host():
    """Device-only drafters (adaptive γ and Kangaroo halting by masking, trees) may run many steps
    per sync; host ones refuse it, and cuda_graphs, naming the drafter and the option."""
    model = make_tiny("llama", num_layers=3)
    for d in (DraftModel(model, num_tokens=3, schedule="adaptive"), DraftModel(model, num_tokens=3, tree_width=2),
              LayerSkip.kangaroo(exit_layer=1), PromptLookup(num_tokens=3)):
        assert d.spec.device_only, d
        specdec.wrap(model, drafter=d, chunk_steps=4)
    for d in (CopySpec(device=False), Swift(), DynamicExit(num_tokens=3)):
        assert not d.spec.device_only or isinstance(d, DynamicExit)  # DEL decides after binding
        with pytest.raises(ValueError, match=f"chunk_steps.*{type(d).__name__}"):
            specdec.wrap(model, drafter=d, chunk_steps=4)
        with pytest.raises(ValueError, match=f"{type(d).__name__} cannot run under cuda_graphs=True"):
            specdec.wrap(model, drafter=d, cuda_graphs=True)


def test_not_a_drafter_is_refused():
    class Loose:
        num_nodes = 3

        def propose(self, state):
            return None
    with pytest.raises(TypeError, match="Loose is not a Drafter"):
        specdec.wrap(make_tiny("llama"), drafter=Loose())


@pytest.mark.parametrize("pipeline", [False, True])
def test_chunked_loop_stops_at_eos_mid_chunk(pipeline):
    model = make_tiny("qwen3")
    ids, mask = ragged_batch([5, 8], model.config.vocab_size, seed=7)
    free = hf_greedy(model, ids, mask, max_new_tokens=20, eos_token_id=None)[:, ids.shape[1]:]
    eos = next(int(free[0, p]) for p in range(5, 12) if int(free[0, p]) not in free[0, :p].tolist())
    ref = hf_greedy(model, ids, mask, max_new_tokens=20, eos_token_id=eos)
    out = specdec.wrap(model, chunk_steps=8, pipeline=pipeline).generate(
        ids, attention_mask=mask, max_new_tokens=20, pad_token_id=0, eos_token_id=eos, return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref)
    assert out.spec_stats.new_tokens[0] < 12  # row 0 stopped inside a chunk


def count_launches(spec, monkeypatch) -> list[bool]:
    """Record the drafting flag of every chunk the engine launches."""
    launched = []
    real = Decoder.run

    def spy(self, draft):
        launched.append(draft)
        return real(self, draft)
    monkeypatch.setattr(Decoder, "run", spy)
    return launched


@pytest.mark.parametrize("pipeline", [False, True])
def test_pipeline_queues_one_chunk_ahead(pipeline, monkeypatch):
    # Pipelined, the chunk after the one being read is already queued: a batch that ends at EOS
    # has launched exactly one chunk more than it needed (counted in num_steps, idle in
    # idle_steps); one that ends at max_new_tokens launched none in vain. Tokens equal HF's either way.
    model = make_tiny("llama", vocab_size=32, init_range=1.0, num_layers=1)
    ids, mask = ragged_batch([6, 2, 11], 32, seed=3)
    free = hf_greedy(model, ids, mask, max_new_tokens=40, eos_token_id=None)[:, ids.shape[1]:]
    eos = next(t for t in range(32) if all(t in row[10:30] for row in free.tolist()))
    spec = specdec.wrap(model, drafter=PromptLookup(num_tokens=3, max_ngram=2), chunk_steps=4, pipeline=pipeline)
    launched = count_launches(spec, monkeypatch)
    for eos_id, new, wasted in ((eos, 40, 1), (None, 24, 0)):
        launched.clear()
        ref = hf_greedy(model, ids, mask, max_new_tokens=new, eos_token_id=eos_id)
        out = spec.generate(ids, attention_mask=mask, max_new_tokens=new, pad_token_id=0, eos_token_id=eos_id,
                            return_dict_in_generate=True)
        assert torch.equal(out.sequences, ref)
        assert len(launched) * 4 == out.spec_stats.num_steps  # every launched step is counted
        idle = out.spec_stats.idle_steps  # the last chunk's tail, plus a queued chunk in vain
        assert (idle >= 4) == bool(wasted and pipeline) and idle < 8


@pytest.mark.parametrize("pipeline", [False, True])
def test_batch_size_policy_in_the_chunked_loop(pipeline):
    # The same policy, decided per chunk: while all four rows run, chunks go undrafted; once one
    # row stops, the three left draft again. Output stays exactly HF's.
    model = make_tiny("llama", vocab_size=32, init_range=1.0, num_layers=1)
    ids, mask = ragged_batch([6, 2, 11, 4], 32, seed=3)
    free = hf_greedy(model, ids, mask, max_new_tokens=40, eos_token_id=None)[:, ids.shape[1]:]

    def firsts(t):  # where each row first emits t, sorted
        return sorted(next((i for i, x in enumerate(row) if x == t), 99) for row in free.tolist())
    # An EOS that one row emits early and every other row much later (or never).
    eos = next(t for t in range(32) if firsts(t)[0] <= 8 and firsts(t)[1] >= firsts(t)[0] + 12)
    ref = hf_greedy(model, ids, mask, max_new_tokens=40, eos_token_id=eos)
    out = specdec.wrap(model, drafter=PromptLookup(num_tokens=4, max_ngram=2), chunk_steps=4, max_draft_batch=3,
                       pipeline=pipeline).generate(ids, attention_mask=mask, max_new_tokens=40, pad_token_id=0,
                                                   eos_token_id=eos, return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref)
    stats = out.spec_stats
    assert 0 < stats.undrafted_steps < stats.num_steps and stats.undrafted_steps % 4 == 0
    assert stats.draft_forwards == 0 and stats.undrafted_steps < stats.num_steps  # lookup: no draft forwards
    first = stats.undrafted_steps  # the undrafted chunks come first, while all four rows run
    assert all(n == 1 for r in stats.accepted_lengths for n in r[:first])
    assert max(n for r in stats.accepted_lengths for n in r[first:]) > 1


@pytest.mark.parametrize("arch", ARCHS)
def test_fused_projections_give_the_same_numbers(arch):
    """Merged q/k/v and gate/up weights: identical logits, and HF generate on the same model
    (whose modules now read views of the merged weights) is unchanged."""
    from specdec.runner import ModelRunner

    model = make_tiny(arch, attention_bias=True) if arch != "qwen3" else make_tiny(arch)
    ids, mask = ragged_batch([5, 9, 7], model.config.vocab_size, seed=2)
    ref = hf_greedy(model, ids, mask, max_new_tokens=16, eos_token_id=None)
    n = ids.shape[1]
    slots = torch.arange(n).expand(3, n)
    causal = torch.ones(n, n, dtype=torch.bool).tril().expand(3, n, n)
    logits = {}
    for fuse in (False, True):
        runner = ModelRunner(model, fuse=fuse)
        logits[fuse] = runner.forward(runner.new_cache(3, 32), ids, slots, slots, causal, view_len=n).logits
    attn = model.model.layers[0].self_attn
    fused_weight = model._specdec_fused.qkv[0][0]
    assert attn.k_proj.weight.data_ptr() == fused_weight[attn.q_proj.weight.shape[0]:].data_ptr()  # a view
    assert torch.equal(logits[False], logits[True])
    assert torch.equal(hf_greedy(model, ids, mask, max_new_tokens=16, eos_token_id=None), ref)
    out = specdec.wrap(model, drafter=PromptLookup(num_tokens=3), fuse=True).generate(
        ids, attention_mask=mask, max_new_tokens=16, pad_token_id=0, eos_token_id=None)
    assert torch.equal(out, ref)
    assert ModelRunner(model, fuse=True).fused is model._specdec_fused  # fused once per model
    model.double()   # modules get fresh tensors: the next wrap fuses again rather than read stale weights
    ref64 = hf_greedy(model, ids, mask, max_new_tokens=16, eos_token_id=None)
    out = specdec.wrap(model).generate(ids, attention_mask=mask, max_new_tokens=16, pad_token_id=0, eos_token_id=None)
    assert torch.equal(out, ref64) and model._specdec_fused.qkv[0][0].dtype == torch.float64


def test_fusing_refuses_wrapped_projections():
    from peft import LoraConfig, get_peft_model

    from specdec.runner import ModelRunner

    model = get_peft_model(make_tiny("llama"), LoraConfig(r=2, target_modules=["q_proj"]))
    base = model.base_model.model
    with pytest.raises(ValueError, match="self_attn.q_proj is .*not a plain torch.nn.Linear.*fuse=False"):
        ModelRunner(base, fuse=True)
    assert ModelRunner(base, fuse=None).fused is None   # the default quietly keeps HF's own layers


def test_reserve_sizes_the_cache_for_later_calls():
    model = make_tiny("llama")
    ids, mask = ragged_batch([4, 7], model.config.vocab_size, seed=1)
    spec = specdec.wrap(model, drafter=PromptLookup(num_tokens=3), chunk_steps=4)
    spec.engine.reserve(batch=2, max_length=200)
    out = spec.generate(ids, attention_mask=mask, max_new_tokens=10, pad_token_id=0, eos_token_id=None)
    assert torch.equal(out, hf_greedy(model, ids, mask, max_new_tokens=10, eos_token_id=None))
    assert spec.engine._decoder.state.capacity >= 200 + 4 * 4  # the reserved length plus a chunk's growth


@pytest.mark.parametrize("chunk_steps", [1, 4])
def test_static_decoding_equals_hf_and_reuses_one_decoder(chunk_steps, monkeypatch):
    """What cuda_graphs and compile run, on the CPU: steps over the whole cache and the prefill in
    fixed, padded chunks (here of 4 tokens). Tokens stay HF's; prompts of new lengths reuse the
    same Decoder (its graphs and compiled kernels), since nothing depends on the prompt's length."""
    import specdec.step

    monkeypatch.setattr(specdec.step, "PREFILL_CHUNK", 4)
    monkeypatch.setattr(specdec.engine.SpecEngine, "static", property(lambda self: True))
    model = make_tiny("qwen2", vocab_size=32, init_range=1.0, num_layers=2)
    spec = specdec.wrap(model, drafter=PromptLookup(num_tokens=3, max_ngram=2), chunk_steps=chunk_steps,
                        cache_len=256)
    decoders = set()
    for lengths, new in (([6, 2, 11], 30), ([9, 3, 14], 5), ([1, 1, 40], 12)):
        ids, mask = ragged_batch(lengths, 32, seed=5)
        ref = hf_greedy(model, ids, mask, max_new_tokens=new, eos_token_id=None)
        out = spec.generate(ids, attention_mask=mask, max_new_tokens=new, pad_token_id=0, eos_token_id=None)
        assert torch.equal(out, ref), lengths
        dec = spec.engine._decoder
        assert dec.static and dec.view_for(0) == dec.state.capacity == 512   # cache_len, rounded up to 512
        decoders.add(id(dec))
    assert len(decoders) == 1


def test_compiled_cache_write_touches_only_the_written_slots():
    """Under torch.compile, ``KVCache.update`` writes in place: no generated kernel runs over the
    whole buffer (a ``scatter_`` there became a full copy, a scatter and a full copy back)."""
    from torch._inductor.utils import run_and_get_code

    from specdec.cache import KVCache

    batch, heads, slots_total, dim = 2, 2, 4096, 16
    cache = KVCache(num_layers=1, batch=batch, num_kv_heads=heads, head_dim=dim, max_len=slots_total,
                    dtype=torch.float32, device="cpu")

    def write(k, v, slots):
        cache.write_slots = slots
        kb, _ = cache.update(k, v, 0)
        return kb[:, :, :1].sum()

    torch._dynamo.reset()
    k = torch.randn(batch, heads, 3, dim)
    slots = torch.tensor([[4, 5, 6], [9, 10, 11]])
    _, code = run_and_get_code(torch.compile(write, dynamic=False), k, k + 1, slots)
    assert torch.equal(cache.k[0][1, :, 9:12], k[1]) and torch.equal(cache.v[0][0, :, 4:7], k[0] + 1)
    # Loop extents of the generated kernels (C++ loops on CPU, xnumel/rnumel in Triton).
    text = "\n".join(code)
    extents = {int(n) for n in re.findall(r"<static_cast<int64_t>\((\d+)L\)", text)}
    extents |= {int(n) for n in re.findall(r"[xr]numel = (\d+)", text)}
    assert extents, "no generated loops found: the check below would be empty"
    assert max(extents) <= batch * heads * 3 * dim, sorted(extents)   # the written slots, not the buffer

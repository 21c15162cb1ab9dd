"""CopySpec: the rolling-hash index, the merge with a fallback tree, and lossless greedy decoding."""
import functools
import random

import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf
from tiny import ARCHS, hf_greedy, make_tiny, ragged_batch

import specdec
from specdec.drafters import DraftModel, PromptLookup, VocabularyMismatchError, build_drafter
from specdec.drafters import copyspec
from specdec.drafters.base import DecodeContext, DraftSpec, Drafter
from specdec.drafters.copyspec import BASE, MODULUS, CopySpec, GramIndex
from specdec.verifiers.acceptance import SamplingParams
from specdec.verifiers.tree import DraftTree


# ---------------------------------------------------------------- the index

def test_index_on_a_literal_sequence():
    idx = GramIndex(gamma=2)
    idx.extend([5, 6, 7, 5, 6])
    # Grams with a known continuation: "5 6" -> 2, "6 7" -> 3, "7 5" -> 4; the suffix "5 6" is not in yet.
    assert idx.table == {idx.hash([5, 6]): 2, idx.hash([6, 7]): 3, idx.hash([7, 5]): 4}
    assert idx.hash([5, 6]) == (5 * BASE + 6) % MODULUS and idx.roll == idx.hash([5, 6])
    assert idx.match() == 2 and idx.copy(2, 2) == [7, 5]
    assert idx.copy(2, 4) == [7, 5, 6, 7]               # past the end: period 3
    assert idx.copy(2, 4, periodic=False) == [7, 5, 6]
    idx.extend([9])
    assert idx.table[idx.hash([5, 6])] == 5            # the latest occurrence wins
    assert idx.match() is None                         # "6 9" never occurred before
    loop = GramIndex(gamma=2)
    loop.extend([4, 4, 4])
    assert loop.match() == 2 and loop.copy(2, 3) == [4, 4, 4]
    assert GramIndex(gamma=3).match() is None           # shorter than γ


def test_incremental_updates_equal_recomputation():
    rng = random.Random(0)
    tokens = [rng.randrange(6) for _ in range(300)]
    whole = GramIndex(gamma=3)
    whole.extend(tokens)
    pieces, at = GramIndex(gamma=3), 0
    while at < len(tokens):
        step = rng.randrange(0, 9)
        pieces.extend(tokens[at: at + step])
        at = min(at + step, len(tokens))
        assert pieces.roll == pieces.hash(tokens[max(0, at - 3): at])   # the suffix hash, rolled
    assert pieces.table == whole.table and pieces.roll == whole.roll
    # From scratch: each gram's entry is the index after its last occurrence that has a continuation.
    latest = {tuple(tokens[j - 3: j]): j for j in range(3, len(tokens))}
    assert {whole.hash(list(g)): j for g, j in latest.items()} == whole.table


def test_hash_collisions_never_give_a_wrong_match():
    idx = GramIndex(gamma=2, modulus=7)   # 7 buckets: most grams collide
    rng = random.Random(1)
    tokens = []
    for _ in range(200):
        tokens.append(rng.randrange(20))
        idx.extend(tokens[-1:])
        j = idx.match()
        if j is not None:
            assert tokens[j - 2: j] == tokens[-2:]      # a match is always a real occurrence
    # "a" and "b" share a bucket; "b" is new, so its lookup hits "a"'s entry and must be refused.
    a, b = next(([x, y], [u, v]) for x in range(4, 9) for y in range(4, 9) for u in range(4, 9) for v in range(4, 9)
                if [x, y] != [u, v] and idx.hash([x, y]) == idx.hash([u, v]))
    clash = GramIndex(gamma=2, modulus=7)
    clash.extend(a + [0] + b)
    assert clash.roll in clash.table and clash.match() is None


# ---------------------------------------------------------------- the merged tree

class FixedDrafter(Drafter):
    """A fallback that always offers the same tree; counts calls."""

    def __init__(self, tree: DraftTree, stateless: bool):
        self.tree, self.stateless = tree, stateless
        self.spec = DraftSpec(num_nodes=tree.num_nodes)
        self.num_nodes = tree.num_nodes
        self.calls = self.observed = 0

    def propose(self, ctx):
        self.calls += 1
        return self.tree

    def observe(self, ctx, outcome):
        self.observed += 1


def context(rows: list[list[int]]) -> DecodeContext:
    """Left-padded committed tokens for ``rows``, with two spare slots."""
    width = max(map(len, rows))
    tokens = torch.zeros(len(rows), width + 2, dtype=torch.long)
    for r, row in enumerate(rows):
        tokens[r, width - len(row): width] = torch.tensor(row)
    start = torch.tensor([width - len(row) for row in rows])
    return DecodeContext(target=None, tokens=tokens, seq_len=torch.full((len(rows),), width), start=start,
                         params=SamplingParams(), max_seq_len=width, capacity=width + 2)


def test_merge_gives_copies_a_chain_and_other_rows_the_fallback_tree():
    # Fallback: two branches of two nodes (4 nodes) with a q; the copy budget is 6 nodes.
    fb_tokens = torch.tensor([[40, 41, 42, 43]] * 2)
    fb = DraftTree.branches(fb_tokens.view(2, 2, 2), torch.ones(2, 2, 2, dtype=torch.bool),
                            q=torch.full((2, 4, 50), 1 / 50))
    drafter = CopySpec(gamma=2, num_tokens=6, fallback=FixedDrafter(fb, stateless=False), device=False)
    assert drafter.num_nodes == 6
    ctx = context([[9, 1, 2, 3, 4, 5, 6, 7, 1, 2], [11, 12, 13]])   # row 0 repeats "1 2"; row 1 does not
    drafter.begin(ctx)
    tree = drafter.propose(ctx)
    assert tree.tokens.shape == tree.parents.shape == tree.valid.shape == (2, 6) and tree.q.shape == (2, 6, 50)
    assert tree.tokens[0].tolist() == [3, 4, 5, 6, 7, 1] and tree.valid[0].all()
    assert tree.parents[0].tolist() == [-1, 0, 1, 2, 3, 4]
    assert torch.equal(tree.q[0], torch.nn.functional.one_hot(tree.tokens[0], 50).float())   # point masses
    assert tree.tokens[1, :4].tolist() == [40, 41, 42, 43] and tree.parents[1].tolist() == [-1, 0, -1, 2, -1, -1]
    assert tree.valid[1].tolist() == [True] * 4 + [False] * 2                               # padding
    assert torch.equal(tree.q[1, :4], fb.q[1])
    anc, depth = tree.compile()
    assert depth[1, :4].tolist() == [1, 2, 1, 2]


def test_fallback_calls_stateless_versus_stateful():
    fb = DraftTree.chain(torch.tensor([[7, 8]]))
    ctx = context([[1, 2, 3, 1, 2]])   # always a copy
    for stateless, calls in ((True, 0), (False, 1)):
        inner = FixedDrafter(fb, stateless=stateless)
        drafter = CopySpec(gamma=2, num_tokens=3, fallback=inner, device=False)
        drafter.begin(ctx)
        tree = drafter.propose(ctx)
        drafter.observe(ctx, None)
        assert tree.tokens[0].tolist() == [3, 1, 2] and tree.valid[0].tolist() == [True, True, True]
        assert inner.calls == inner.observed == calls
    # No match and no fallback: nothing to verify but the root (on CPU the unused nodes are cut).
    drafter = CopySpec(gamma=2, num_tokens=4, device=False)
    ctx = context([[1, 2, 3, 4], [5, 6]])
    drafter.begin(ctx)
    assert drafter.propose(ctx).num_nodes == 0


def test_device_match_equals_the_host_index():
    """The device mode's vectorised match finds the same latest occurrence and copies the same
    tokens (periodically past the end) as the host's rolling-hash index, on random histories."""
    rng = random.Random(3)
    drafted = 0
    for trial in range(40):
        rows = [[rng.randrange(4) for _ in range(rng.randint(1, 14))] for _ in range(3)]
        ctx = context(rows)
        host, dev = CopySpec(gamma=2, num_tokens=5, device=False), CopySpec(gamma=2, num_tokens=5)
        assert dev.device and dev.spec.device_only and not host.spec.device_only
        host.begin(ctx)
        dev.begin(ctx)
        want, got = host.propose(ctx), dev.propose(ctx)
        for r in range(3):
            w = want.tokens[r][want.valid[r]].tolist() if want.num_nodes else []
            assert got.tokens[r][got.valid[r]].tolist() == w, (trial, rows[r])
            drafted += len(w)
    assert drafted > 0


def test_device_mode_refuses_what_needs_the_host():
    with pytest.raises(ValueError, match="memory=True.*device=False"):
        CopySpec(memory=True, device=True)
    from specdec.drafters import Swift

    with pytest.raises(ValueError, match="Swift needs the host.*device=False"):
        CopySpec(fallback=Swift(), device=True)
    assert not CopySpec(memory=True).device and not CopySpec(fallback=Swift()).device


def test_built_from_the_hydra_config():
    with initialize_config_module("specdec.conf", version_base=None):
        cfg = compose("generate", overrides=["drafter=copyspec"])
        bare = compose("generate", overrides=["drafter=copyspec", "drafter.fallback=null", "drafter.num_tokens=8"])
    drafter = build_drafter(OmegaConf.to_container(cfg.drafter, resolve=True))
    assert isinstance(drafter, CopySpec) and isinstance(drafter.fallback, PromptLookup)
    assert drafter.num_nodes == max(drafter.num_tokens, drafter.fallback.num_nodes)
    drafter = build_drafter(OmegaConf.to_container(bare.drafter, resolve=True))
    assert drafter.fallback is None and drafter.num_nodes == 8
    with pytest.raises(ValueError, match="gamma"):
        CopySpec(gamma=0)


# ---------------------------------------------------------------- lossless decoding, tiny models

def drafters_for(arch):
    return {
        "copy": CopySpec(gamma=2, num_tokens=8),
        "copy+lookup": CopySpec(gamma=2, num_tokens=8, fallback=PromptLookup(num_tokens=4, max_ngram=2)),
        "copy+draft": CopySpec(gamma=2, num_tokens=8, fallback=DraftModel(make_tiny(arch, seed=1), num_tokens=3)),
        "copy+draft_tree": CopySpec(gamma=2, num_tokens=4, fallback=DraftModel(
            make_tiny(arch, seed=1), num_tokens=3, tree_width=3, tree_nodes=10)),
        "copy+config": CopySpec(gamma=3, fallback={"_target_": "specdec.drafters.PromptLookup", "num_tokens": 4}),
    }


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("lengths", [[7], [3, 9, 1, 6]], ids=["batch1", "batch4_ragged"])
@pytest.mark.parametrize("steps", [1, 3], ids=["per_step", "device_3_per_sync"])
def test_greedy_equals_hf(arch, lengths, steps):
    """Device mode (the default) at one and three steps per sync; the host mode is tested below."""
    model = make_tiny(arch)
    ids, mask = ragged_batch(lengths, model.config.vocab_size, seed=len(lengths))
    ref = hf_greedy(model, ids, mask, max_new_tokens=24, eos_token_id=None)
    for name, drafter in drafters_for(arch).items():
        assert drafter.device
        out = specdec.wrap(model, drafter=drafter, chunk_steps=steps).generate(
            ids, attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=0, eos_token_id=None,
            return_dict_in_generate=True)
        assert torch.equal(out.sequences, ref), f"{arch}/{name} differs from HF greedy"
        assert out.spec_stats.new_tokens == [24] * len(lengths)


def repetitive_model():
    """A 16-token one-layer model that falls into loops: copies get long accepted runs."""
    return make_tiny("llama", vocab_size=16, init_range=1.0, num_layers=1)


@pytest.mark.parametrize("fallback", ["none", "lookup", "draft_model"])
def test_copies_are_accepted_on_a_repetitive_model(fallback):
    model = repetitive_model()
    ids, mask = ragged_batch([6, 2, 11, 4], 16, seed=3)
    ref = hf_greedy(model, ids, mask, max_new_tokens=60, eos_token_id=9)   # rows 0 and 3 stop early
    inner = {"none": None, "lookup": PromptLookup(num_tokens=3, max_ngram=2),
             "draft_model": DraftModel(make_tiny("llama", vocab_size=16, init_range=1.0, num_layers=1, seed=4),
                                       num_tokens=3)}[fallback]
    for device in (False, True):
        drafter = CopySpec(gamma=2, num_tokens=12, fallback=inner, device=device)
        out = specdec.wrap(model, drafter=drafter).generate(
            ids, attention_mask=mask, max_new_tokens=60, pad_token_id=0, eos_token_id=9, return_dict_in_generate=True)
        assert torch.equal(out.sequences, ref), device
        assert out.spec_stats.tau > 1.3 and (device or drafter.copied_steps > 0)
    assert max(max(r) for r in out.spec_stats.accepted_lengths) >= 8   # a long copied run was accepted


def test_collisions_cost_drafts_not_correctness(monkeypatch):
    model = repetitive_model()
    ids, mask = ragged_batch([6, 2, 11, 4], 16, seed=3)
    ref = hf_greedy(model, ids, mask, max_new_tokens=40, eos_token_id=None)
    monkeypatch.setattr(copyspec, "GramIndex", functools.partial(GramIndex, modulus=3))
    out = specdec.wrap(model, drafter=CopySpec(gamma=3, num_tokens=8, device=False)).generate(
        ids, attention_mask=mask, max_new_tokens=40, pad_token_id=0, eos_token_id=None, return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref)


def test_sampling_with_a_draft_model_fallback_runs():
    """Copied rows carry one-hot q next to the draft model's q; the output keeps its shape."""
    model = repetitive_model()
    ids, mask = ragged_batch([6, 2, 11, 4], 16, seed=3)
    drafter = CopySpec(gamma=2, num_tokens=6, fallback=DraftModel(
        make_tiny("llama", vocab_size=16, init_range=1.0, num_layers=1, seed=4), num_tokens=3))
    out = specdec.wrap(model, drafter=drafter).generate(
        ids, attention_mask=mask, max_new_tokens=30, do_sample=True, temperature=0.8, pad_token_id=0,
        eos_token_id=None, return_dict_in_generate=True)
    assert out.spec_stats.new_tokens == [30] * 4 and out.spec_stats.lossless
    # A step kept more than the draft model's 3 tokens + 1: a copy was accepted under sampling.
    assert max(max(r) for r in out.spec_stats.accepted_lengths) > 4


def test_memory_lets_a_second_call_copy_the_first_answer():
    model = make_tiny("llama")
    ids, mask = ragged_batch([7, 5], model.config.vocab_size, seed=11)
    ref = hf_greedy(model, ids, mask, max_new_tokens=40, eos_token_id=None)
    taus = {}
    for memory in (False, True):
        spec = specdec.wrap(model, drafter=CopySpec(gamma=3, num_tokens=10, memory=memory))
        for call in (1, 2):   # the same prompts twice: the second answer is in the memory
            out = spec.generate(ids, attention_mask=mask, max_new_tokens=40, pad_token_id=0, eos_token_id=None,
                                return_dict_in_generate=True)
            assert torch.equal(out.sequences, ref)
            taus[memory, call] = out.spec_stats.tau
    assert taus[False, 2] == taus[False, 1] == taus[True, 1]
    assert taus[True, 2] > 3.0 > taus[True, 1]   # 40 tokens in 4 steps: 10 copied + 1 bonus, four times over


def test_fallback_vocabulary_is_checked_at_wrap():
    model = make_tiny("llama")
    with pytest.raises(VocabularyMismatchError):
        specdec.wrap(model, drafter=CopySpec(fallback=DraftModel(make_tiny("llama", vocab_size=128))))


# ---------------------------------------------------------------- the real SmolLM2

@pytest.mark.parametrize("batch", [1, 4])
def test_smollm2_greedy_equality(smollm2, batch):
    from test_real_models import PROMPTS, assert_equals_hf_greedy, chat_batch, first_layers

    model, tok = smollm2
    enc = chat_batch(tok, PROMPTS[:batch])
    kw = dict(attention_mask=enc.attention_mask, max_new_tokens=32, do_sample=False, pad_token_id=tok.pad_token_id)
    drafters = {"copy": CopySpec(), "copy+lookup": CopySpec(fallback=PromptLookup(num_tokens=4)),
                "copy+draft": CopySpec(fallback=DraftModel(first_layers(model, 2), num_tokens=3))}
    assert_equals_hf_greedy(model, enc, kw, drafters)


def test_smollm2_copies_an_earlier_answer_in_the_chat(smollm2):
    """Turn 2 asks for turn 1's answer again: the answer is in the prompt, so whole runs are copied."""
    model, tok = smollm2
    messages = [{"role": "user", "content": "Fix the bug:\n\ndef mean(xs):\n    return sum(xs) / len(x)\n"},
                {"role": "assistant", "content": "```python\ndef mean(xs):\n    return sum(xs) / len(xs)\n```\n\n"
                                                 "The function divided by `len(x)`, but the list is called `xs`."},
                {"role": "user", "content": "Repeat your previous answer exactly, word for word."}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    enc = tok(text, return_tensors="pt", add_special_tokens=False)
    kw = dict(attention_mask=enc.attention_mask, max_new_tokens=32, do_sample=False, pad_token_id=tok.pad_token_id)
    ref = model.generate(enc.input_ids, **kw)
    out = specdec.wrap(model, drafter=CopySpec()).generate(enc.input_ids, return_dict_in_generate=True, **kw)
    assert torch.equal(out.sequences, ref)
    assert out.spec_stats.tau > 3.0

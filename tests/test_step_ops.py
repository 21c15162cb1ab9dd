"""A drafted step issues few ops beyond a plain one: the aten-op count of one step, by phase
(``specdec.perf.count_step_ops``), as a CPU proxy for kernel launches on a launch-bound GPU.

Invariants: a decoder layer issues the same ops whether it verifies one token or a chain of
eight; nothing outside the layers grows with the layer count (masks, layout, acceptance and
commit are built once per step); a step has no host sync; and a lookup step of 8 tokens issues
at most ``EXTRA`` ops beyond a plain step, besides its own drafting. Trees of a fixed shape
(whose structure is cached) are accepted exactly as the same trees compiled on the device.
"""
import pytest
import torch
from tiny import make_tiny

import specdec
from specdec.drafters import EagleHead, PromptLookup
from specdec.drafters.heads import EagleHeadModel
from specdec.perf import count_step_ops
from specdec.verifiers.acceptance import GreedyAcceptance, SamplingParams, SpeculativeSampling, TypicalAcceptance
from specdec.verifiers.tree import DraftTree

# Ops a greedy lookup step (a chain of 8) may issue beyond a plain step, its drafting aside.
# Measured: 9 (judging the nodes, and the proposal's depth for the statistics); slack for 3 more.
EXTRA = 12
PROMPT = torch.tensor([[5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 7]])
OUTSIDE_LAYERS = ("layout", "mask", "forward", "accept", "commit", "bookkeeping")


def step_ops(model, drafter):
    spec = specdec.wrap(model, drafter=drafter)
    spec.generate(PROMPT, max_new_tokens=6, pad_token_id=0, eos_token_id=None)
    return count_step_ops(spec.engine._decoder)


@pytest.fixture(scope="module")
def counts():
    """Op counts of one step for no drafter and lookup(8), on 2- and 4-layer tiny llamas."""
    out = {}
    for layers in (2, 4):
        model = make_tiny("llama", num_layers=layers)
        out[layers] = {"none": step_ops(model, None), "lookup": step_ops(model, PromptLookup(num_tokens=8))}
    return out


def test_a_lookup_step_costs_few_ops_beyond_a_plain_one(counts):
    plain, lookup = counts[2]["none"], counts[2]["lookup"]
    drafted = lookup.total - lookup.by_phase()["draft"]
    assert plain.by_phase()["draft"] == 0
    assert drafted <= plain.total + EXTRA, (drafted, plain.total, lookup.extra_over(plain))


def test_layers_issue_the_same_ops_for_one_token_and_a_chain(counts):
    for layers, rows in counts.items():
        plain, lookup = rows["none"], rows["lookup"]
        for phase in ("layers", "kv write", "attention"):
            assert lookup.ops.get(phase) == plain.ops.get(phase), (layers, phase)
        assert lookup.ops["attention"] == {"specdec.tree_attention.default": layers}  # one kernel call a layer


def test_nothing_outside_the_layers_grows_with_the_layer_count(counts):
    for name in ("none", "lookup"):
        two, four = counts[2][name].by_phase(), counts[4][name].by_phase()
        for phase in OUTSIDE_LAYERS + ("draft",):
            assert two[phase] == four[phase], (name, phase, two[phase], four[phase])
        assert counts[4][name].ops["layers"].total() == 2 * counts[2][name].ops["layers"].total()


def test_steps_never_wait_for_the_host(counts):
    model = make_tiny("llama", num_layers=2)
    head = EagleHead(EagleHeadModel.from_target(model, (0, 1)), num_tokens=4)
    for ops in [*counts[2].values(), step_ops(model, head)]:
        assert ops.syncs == {}, ops.syncs


def _generic(tree: DraftTree) -> DraftTree:
    """The same tree with its parents as data, compiled on the device like a dynamic tree."""
    out = DraftTree(tokens=tree.tokens, parents=tree.parents.clone(), valid=tree.valid, q=tree.q)
    assert not out.known_forest and not out.is_chain
    return out


def _fixed_shape_trees(batch: int, vocab: int, g: torch.Generator):
    tok = torch.randint(0, vocab, (batch, 2, 3), generator=g)
    yield DraftTree.chain(tok[:, 0], torch.rand(batch, 3, generator=g) > 0.2)
    yield DraftTree.branches(tok, torch.rand(batch, 2, 3, generator=g) > 0.2)
    yield DraftTree.from_paths([[0, 1, 2], [0, 3], [4, 5]], tok.reshape(batch, 6))
    yield DraftTree.empty(batch, "cpu")


@pytest.mark.parametrize("rule", [GreedyAcceptance(), TypicalAcceptance()])
def test_fixed_shape_trees_accept_as_compiled_ones(rule):
    """Cached structure (ancestors, depth, chain shortcuts) gives the outcome of the device-compiled tree."""
    g = torch.Generator().manual_seed(0)
    vocab, batch = 4, 5  # a small vocabulary: drafts often match, so paths of every depth occur
    depths = set()
    for _ in range(40):
        for tree in _fixed_shape_trees(batch, vocab, g):
            logits = torch.randn(batch, 1 + tree.num_nodes, vocab, generator=g) * 4
            fast, slow = rule.accept(logits, tree, SamplingParams()), rule.accept(logits, _generic(tree), SamplingParams())
            assert torch.equal(fast.accept_len, slow.accept_len) and torch.equal(fast.path, slow.path)
            assert torch.equal(fast.next_token, slow.next_token)
            (t1, c1), (t2, c2) = fast.emitted(), slow.emitted()
            assert torch.equal(c1, c2)
            for row, n in enumerate(c1.tolist()):
                assert t1[row, :n].tolist() == t2[row, :n].tolist()
            among, offsets = tree.rooted()
            among2, offsets2 = _generic(tree).rooted()
            assert torch.equal(among, among2) and torch.equal(offsets, offsets2)
            assert torch.equal(tree.max_depth(), _generic(tree).max_depth())
            depths.update(fast.accept_len.tolist())
    assert depths == {0, 1, 2, 3}


def test_chain_path_and_emitted_tokens_literal():
    tree = DraftTree.chain(torch.tensor([[5, 7, 9], [5, 7, 9]]))
    logits = torch.full((2, 4, 10), -1.0)
    for row, preds in enumerate([[5, 7, 1, 3], [5, 2, 9, 4]]):  # row 0 accepts 5 7; row 1 accepts 5
        logits[row, torch.arange(4), torch.tensor(preds)] = 1.0
    out = GreedyAcceptance().accept(logits, tree, SamplingParams())
    assert out.accept_len.tolist() == [2, 1]
    assert out.path.tolist() == [[0, 1, -1], [0, -1, -1]]
    tokens, count = out.emitted()
    assert count.tolist() == [3, 2]
    assert tokens[0, :3].tolist() == [5, 7, 1] and tokens[1, :2].tolist() == [5, 2]


@pytest.mark.parametrize("lenience", [1.0, 0.5])
@pytest.mark.parametrize("with_q", [False, True])
def test_chain_sampling_equals_the_tree_walk_draw_for_draw(with_q, lenience):
    """Speculative sampling on a chain (all nodes judged at once) keeps and draws exactly what the
    node-by-node tree walk does with the same random numbers."""
    rule, params = SpeculativeSampling(lenience), SamplingParams(do_sample=True, temperature=0.7, top_p=0.9)
    g = torch.Generator().manual_seed(1)
    vocab, batch, n = 5, 6, 4
    seen = set()
    for trial in range(60):
        q = torch.rand(batch, n, vocab, generator=g).softmax(dim=-1) if with_q else None
        tokens = torch.randint(0, vocab, (batch, n), generator=g)
        tree = DraftTree.chain(tokens, torch.rand(batch, n, generator=g) > 0.15, q=q)
        logits = torch.randn(batch, n + 1, vocab, generator=g) * 2
        logits[:, :n] += 4 * torch.nn.functional.one_hot(tokens, vocab) * (trial % 2)  # often keep them all
        torch.manual_seed(trial)
        fast = rule.accept(logits, tree, params)
        torch.manual_seed(trial)
        slow = rule.accept(logits, _generic(tree), params)
        assert torch.equal(fast.accept_len, slow.accept_len) and torch.equal(fast.path, slow.path)
        assert torch.equal(fast.next_token, slow.next_token)
        seen.update(fast.accept_len.tolist())
    assert seen == set(range(n + 1))


def test_writing_into_a_fixed_trees_parents_makes_it_an_ordinary_tree():
    """A fixed-shape tree keeps its own parents: writing into them neither changes other trees of
    that shape nor goes unchecked (the step then marks the tree on the device)."""
    bad = DraftTree.chain(torch.tensor([[1, 2, 3]] * 2))
    assert bad.known_forest and bad.is_chain
    bad.parents[1, 2] = 2
    assert not bad.known_forest and bad.malformed().tolist() == [False, True]
    fresh = DraftTree.chain(torch.tensor([[1, 2, 3]]))
    assert fresh.parents.tolist() == [[-1, 0, 1]] and fresh.known_forest
    with torch.inference_mode():  # no version counter there: the shape is trusted as built
        assert DraftTree.chain(torch.tensor([[1, 2]])).is_chain

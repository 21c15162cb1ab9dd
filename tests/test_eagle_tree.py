"""EagleHead's EAGLE-2 dynamic tree (`TreeSearch`): exact, ancestor-closed, static, lossless.

- Greedy output equals HF greedy on every tiny architecture, batch 1 and ragged batch 4, one
  step per sync and three, and the tree is really used (siblings and deep paths are accepted).
- On literal logits the search keeps exactly the N best candidates of the EAGLE-2 expansion,
  every frontier forward sees exactly its fed ancestors, and the result is an ancestor-closed
  forest of exactly N nodes.
- Speculative sampling with the tree keeps the target's distribution (chi-square).
- Bad (tree_topk, tree_depth, tree_nodes) raise, naming the argument.
"""
import math

import pytest
import torch
from heads_util import AUX, generate, noisy
from test_sampling import PARAMS, V, chi2_pvalue, exact_joint, sampled_joint
from tiny import ARCHS, hf_greedy, make_tiny, ragged_batch

import specdec
from specdec.drafters import EagleHead
from specdec.drafters.heads import EagleHeadModel
from specdec.drafters.tree_search import TreeSearch, top_children
from specdec.verifiers.acceptance import SamplingParams

TREE = dict(tree_topk=4, tree_depth=3, tree_nodes=10)
VOCAB = 24  # a small vocabulary: random heads guess often enough for trees to be accepted


def eagle_tree(model, vocab=None, **tree):
    return EagleHead(noisy(EagleHeadModel.from_target(model, AUX, draft_vocab=vocab)), **(tree or TREE))


def watching(drafter):
    """Record every proposed tree and every accepted path."""
    trees, paths, propose, observe = [], [], drafter.propose, drafter.observe
    drafter.propose = lambda state: trees.append(propose(state)) or trees[-1]
    drafter.observe = lambda state, outcome: (paths.append(outcome.path[:, :3].clone()), observe(state, outcome))
    return trees, paths


def assert_forest(tree, n):
    """Static N nodes per row; parents earlier (or the root); every valid node's parent is valid."""
    b = tree.tokens.shape[0]
    assert tree.tokens.shape == (b, n) and tree.parents.shape == (b, n)
    idx = torch.arange(n)
    assert ((tree.parents >= -1) & (tree.parents < idx)).all()
    parent_valid = torch.where(tree.parents >= 0, tree.valid.gather(1, tree.parents.clamp(min=0)), True)
    assert (parent_valid | ~tree.valid).all()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("lengths", [[7], [3, 9, 1, 6]], ids=["batch1", "batch4_ragged"])
@pytest.mark.parametrize("steps", [1, 3], ids=["per_step", "3_per_sync"])
def test_tree_greedy_equals_hf(arch, lengths, steps):
    """Full and reduced draft vocabulary; every proposed tree is a forest of exactly N nodes."""
    model = make_tiny(arch, vocab_size=VOCAB)
    ids, mask = ragged_batch(lengths, VOCAB, seed=len(lengths))
    ref = hf_greedy(model, ids, mask, max_new_tokens=24, eos_token_id=None)
    drafters = {"tree": eagle_tree(model), "tree_vocab": eagle_tree(model, torch.arange(4, VOCAB, 2))}
    for name, drafter in drafters.items():
        trees, _ = watching(drafter)
        out = generate(model, drafter, ids, mask, chunk_steps=steps)
        assert torch.equal(out.sequences, ref), f"{arch}/{name} differs from HF greedy"
        if name == "tree":  # (the reduced vocabulary lacks half the tokens and may never hit)
            assert out.spec_stats.tau > 1.0, "the tree was never accepted: the test would not see a wrong tree"
        for tree in trees:
            assert_forest(tree, TREE["tree_nodes"])


def test_tree_accepts_siblings_and_deep_paths():
    """The kept tree matters: some step accepts a root child other than node 0 (the chain's
    first token), and some steps accept two and three nodes (vocabulary 8: random heads hit)."""
    model = make_tiny("llama", vocab_size=8)
    ids, mask = ragged_batch([3, 9, 1, 6], 8, seed=4)
    drafter = eagle_tree(model, tree_topk=4, tree_depth=3, tree_nodes=20)
    _, paths = watching(drafter)
    out = generate(model, drafter, ids, mask, n=40)
    assert torch.equal(out.sequences, hf_greedy(model, ids, mask, max_new_tokens=40, eos_token_id=None))
    paths = torch.cat(paths)
    assert (paths[:, 0] > 0).any() and (paths[:, 1] >= 0).any() and (paths[:, 2] >= 0).any()


class LiteralStep:
    """A drafter forward whose logits depend only on (fed token, position): ``table[pos, token]``.
    Records each call's mask so the test can check what every frontier node saw."""

    def __init__(self, table):
        self.table, self.calls = table, []

    def __call__(self, tokens, hidden, positions, slots, mask, view):
        self.calls.append((tokens.clone(), positions.clone(), slots.clone(), mask.clone()))
        return self.table[positions, tokens], hidden


def reference(root, table, base, k, depth, n):
    """EAGLE-2 by hand, one row: the candidates' (cumulative log-prob, token path), best n."""
    logp = table.log_softmax(dim=-1)
    cands, level = [], [(float(s), (int(t),)) for s, t in zip(*root.log_softmax(-1).topk(k))]
    cands += level
    for d in range(1, depth):
        frontier = sorted(level, key=lambda c: -c[0])[:k]
        level = [(s + float(ls), path + (int(t),)) for s, path in frontier
                 for ls, t in zip(*logp[base + d, path[-1]].topk(k))]
        cands += level
    return sorted(cands, key=lambda c: -c[0])[:n]


@pytest.mark.parametrize("k, depth, n", [(2, 2, 3), (3, 4, 12), (1, 3, 3), (4, 3, 36)])
def test_search_keeps_the_best_forest(k, depth, n):
    """Random literal logits, two rows at different lengths: the kept nodes are the reference's
    best n (same cumulative log-probs and token paths), numbered parents-first; frontier node
    of depth d is fed at position root + d and sees the row's prefix, its d - 1 fed ancestors
    and itself, nothing else."""
    torch.manual_seed(k * 100 + depth)
    vocab, b = 9, 2
    table = torch.randn(32, vocab, vocab) * 2  # [position, fed token, next token]
    root = torch.randn(b, 1, vocab) * 2
    seq_len, start = torch.tensor([6, 11]), torch.tensor([2, 0])
    search, step = TreeSearch(k, depth, n), LiteralStep(table)
    greedy = SamplingParams()
    view = int(seq_len.max()) + search.scratch
    tree = search.run(top_children(root, greedy, k, None, vocab), None, step, seq_len, start, view,
                      lambda lg, paths: top_children(lg, greedy, k, None, vocab))
    # Tracking paths (for the logits processors) changes nothing, and each expanded node's path
    # is its parent's path and then the token fed for it.
    tracked, seen = LiteralStep(table), []
    again = search.run(top_children(root, greedy, k, None, vocab), None, tracked, seq_len, start, view,
                       lambda lg, paths: seen.append(paths) or top_children(lg, greedy, k, None, vocab),
                       track_paths=True)
    assert torch.equal(again.tokens, tree.tokens) and torch.equal(again.parents, tree.parents)
    for level, (paths, (fed, *_)) in enumerate(zip(seen, tracked.calls), start=1):
        assert (paths.length == level).all() and torch.equal(paths.tokens[..., -1], fed)
        for row in range(b):
            before = {tuple(p) for p in seen[level - 2].tokens[row].tolist()} if level > 1 else {()}
            assert all(tuple(p[:-1]) in before for p in paths.tokens[row].tolist())
    assert_forest(tree, n)
    assert len(step.calls) == depth - 1
    for row in range(b):
        base = int(seq_len[row] - 1 - start[row])
        want = reference(root[row, 0], table, base, k, depth, n)
        got = []
        for i in range(n):
            path, node = [], i
            while node >= 0:
                path.insert(0, int(tree.tokens[row, node]))
                node = int(tree.parents[row, node])
            logp = float(root[row, 0].log_softmax(-1)[path[0]])
            logp += sum(float(table[base + d].log_softmax(-1)[path[d - 1], path[d]]) for d in range(1, len(path)))
            got.append((logp, tuple(path)))
        assert sorted(p for _, p in got) == sorted(p for _, p in want)
        assert all(math.isclose(a, b, abs_tol=1e-4) for (a, _), (b, _) in zip(sorted(got), sorted(want)))
        assert (torch.diff(tree.depth[row]) >= 0).all()  # parents first: by depth, then by rank
        for level, (_, positions, slots, mask) in enumerate(step.calls, start=1):
            assert (positions[row] == base + level).all()
            assert (slots[row] == seq_len[row] + (level - 1) * k + torch.arange(k)).all()
            committed = torch.arange(seq_len[row]) >= start[row]
            assert torch.equal(mask[row, :, :seq_len[row]], committed.expand(k, -1))
            assert (mask[row, :, seq_len[row]:].sum(dim=1) == level).all()
            assert mask[row, torch.arange(k), slots[row]].all()


def test_bad_tree_arguments_raise():
    head = EagleHeadModel.from_target(make_tiny("llama"), AUX)
    for kwargs, match in [(dict(tree_topk=0), "tree_topk must be"),
                          (dict(tree_topk=2, tree_depth=0), "tree_depth must"),
                          (dict(tree_topk=2, tree_nodes=0), "tree_nodes must"),
                          (dict(tree_topk=2, tree_depth=2, tree_nodes=7), "exceeds the 6 candidates"),
                          (dict(tree_topk=1, tree_depth=3, tree_nodes=4), "exceeds the 3 candidates"),
                          (dict(tree_depth=3), "need tree_topk"), (dict(tree_nodes=5), "need tree_topk"),
                          (dict(tree_topk=2.5), "tree_topk must be an integer")]:
        with pytest.raises(ValueError, match=match):
            EagleHead(head, **kwargs)
    small = EagleHeadModel.from_target(make_tiny("llama"), AUX, draft_vocab=torch.arange(4, 7))
    with pytest.raises(ValueError, match="exceeds the draft vocabulary"):
        EagleHead(small, tree_topk=4)
    drafter = EagleHead(head, num_tokens=5, tree_topk=3)
    assert (drafter.search.depth, drafter.search.nodes) == (5, 15)  # documented defaults
    assert drafter.spec.num_nodes == 15 and drafter.spec.scratch_slots == 12 and drafter.spec.device_only
    assert EagleHead(head, num_tokens=5).search is None  # the chain stays the default


@pytest.fixture(scope="module")
def small_target():
    return make_tiny("llama", vocab_size=V, init_range=0.15, seed=11)


@pytest.mark.parametrize("params", PARAMS, ids=["t1", "t0.7_k5_p0.9"])
@pytest.mark.parametrize("kind", ["tree", "tree_vocab"])
def test_tree_sampling_preserves_target(small_target, params, kind):
    """The first two sampled tokens follow the target with the tree drafting (q per node, the
    distribution its siblings were drawn from without replacement), also with a reduced draft
    vocabulary, and with top-k/top-p leaving fewer tokens than tree_topk (invalid nodes)."""
    torch.manual_seed(4321)
    vocab = torch.tensor([1, 3, 5, 6]) if kind == "tree_vocab" else None
    drafter = eagle_tree(small_target, vocab, tree_topk=3, tree_depth=2, tree_nodes=6)
    counts = sampled_joint(specdec.wrap(small_target, drafter=drafter, chunk_steps=2), params)
    assert chi2_pvalue(counts, exact_joint(small_target, params)) > 1e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("compile", [False, True], ids=["graphed", "compiled"])
def test_tree_inside_captured_steps_equals_hf(compile):
    model = make_tiny("qwen3", vocab_size=VOCAB)
    drafter = eagle_tree(model)
    model, _ = model.cuda(), drafter.head.cuda()
    ids, mask = (t.cuda() for t in ragged_batch([5, 12, 3], VOCAB, seed=1))
    ref = hf_greedy(model, ids, mask, max_new_tokens=40, eos_token_id=None)
    spec = specdec.wrap(model, drafter=drafter, cuda_graphs=True, compile=compile)
    out = spec.generate(ids, attention_mask=mask, max_new_tokens=40, pad_token_id=0, eos_token_id=None,
                        return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref) and out.spec_stats.num_steps % 8 == 0


def test_width_one_tree_is_the_chain():
    """tree_topk=1 keeps one child per node: the tree must be the chain of tree_depth, draft for
    draft (same head slots, positions, masks and states as the chain, which matches training)."""
    model = make_tiny("qwen2", vocab_size=VOCAB)
    ids, mask = ragged_batch([4, 10, 2], VOCAB, seed=6)
    head, drafted = noisy(EagleHeadModel.from_target(model, AUX)), []
    for kwargs in (dict(num_tokens=3), dict(tree_topk=1, tree_depth=3, tree_nodes=3)):
        drafter = EagleHead(head, **kwargs)
        trees, _ = watching(drafter)
        generate(model, drafter, ids, mask, n=20, chunk_steps=2)
        drafted.append(torch.stack([t.tokens for t in trees]))
        assert all(t.parents.tolist() == [[-1, 0, 1]] * 3 for t in trees)
    assert torch.equal(drafted[0], drafted[1])


def test_eagle_config_takes_tree_arguments(tmp_path):
    """drafter=eagle drafter.tree_topk=... builds the tree drafter through Hydra; the keys default to a chain."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from specdec.drafters import build_drafter

    target = make_tiny("llama")
    EagleHeadModel.from_target(target, (1, 1, 1)).save_pretrained(tmp_path / "head")
    built = []
    for extra in ([], ["drafter.tree_topk=3", "drafter.tree_depth=2", "drafter.tree_nodes=7"]):
        with initialize_config_module("specdec.conf", version_base=None):
            cfg = compose("generate", overrides=["drafter=eagle", f"drafter.folder={tmp_path / 'head'}",
                                                 "model.device=cpu", *extra])
        built.append(build_drafter(OmegaConf.to_container(cfg.drafter, resolve=True), target=target))
    assert built[0].search is None and built[0].spec.num_nodes == 4
    assert (built[1].search.topk, built[1].search.depth, built[1].spec.num_nodes) == (3, 2, 7)

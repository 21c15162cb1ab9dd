"""Seeded fuzz tests, in the default (not slow) run: a few hundred cases in well under a minute.

- Random forests (and chains, branches and path templates) compile to the ancestors, depths and
  paths a brute-force walk over the parent pointers gives, greedy acceptance keeps what a
  brute-force walk keeps, and every parents array that is not a forest is refused.
- Random prompts, batch sizes, prompt lengths, ``max_new_tokens`` and EOS ids decode greedily,
  for every drafter on tiny models of every architecture, to exactly HF greedy ``generate``.

Each case is seeded from ``SPECDEC_FUZZ_SEED`` (default 0) and its own name, so a failure names
the case that reproduces it. ``SPECDEC_FUZZ_SCALE=10`` runs ten times the cases (locally, not in CI).
"""
import os
import random
import zlib

import pytest
import torch
from test_engine import HOST, drafters_for
from heads_util import eagle, medusa
from tiny import ARCHS, hf_greedy, make_tiny

import specdec
from specdec.verifiers import DraftTree, GreedyAcceptance, SamplingParams
from specdec.verifiers.tree import MalformedDraftTree

pytestmark = pytest.mark.fuzz
SEED = int(os.environ.get("SPECDEC_FUZZ_SEED", "0"))
SCALE = int(os.environ.get("SPECDEC_FUZZ_SCALE", "1"))


def rng_for(*name) -> random.Random:
    return random.Random(zlib.crc32(repr((SEED,) + name).encode()))


# ---------------------------------------------------------------- trees against brute force
def chain_to_root(parents: list[int], i: int) -> list[int]:
    """Node i and its ancestors, root side first, by walking the parent pointers."""
    path = []
    while i >= 0:
        path.append(i)
        i = parents[i]
    return path[::-1]


def brute_greedy(parents, tokens, valid, pred):
    """(accepted path, next token): the deepest node (lowest index among the deepest) whose whole
    root path is valid and matches the target's argmax ``pred`` at each parent (``pred[0]`` at
    the root, ``pred[1 + j]`` after node j)."""
    best: list[int] = []
    for i in range(len(parents)):
        path = chain_to_root(parents, i)
        if all(valid[j] and tokens[j] == pred[parents[j] + 1] for j in path) and len(path) > len(best):
            best = path
    return best, pred[best[-1] + 1] if best else pred[0]


def random_tree(rng: random.Random, batch: int, n: int, vocab: int):
    """A DraftTree of one of the four constructors, and its rows' parents as lists."""
    kind = rng.choice(["parents", "chain", "branches", "paths"])
    tokens = torch.tensor([[rng.randrange(vocab) for _ in range(n)] for _ in range(batch)], dtype=torch.long)
    valid = torch.tensor([[rng.random() < 0.85 for _ in range(n)] for _ in range(batch)], dtype=torch.bool)
    if kind == "chain":
        tree = DraftTree.chain(tokens, valid)
    elif kind == "branches" and n:
        k = rng.choice([d for d in range(1, n + 1) if n % d == 0])
        tree = DraftTree.branches(tokens.view(batch, n // k, k), valid.view(batch, n // k, k))
    elif kind == "paths":
        parents = [rng.randrange(-1, i) for i in range(n)]
        leaves = [i for i in range(n) if i not in parents]
        tree = DraftTree.from_paths([chain_to_root(parents, leaf) for leaf in leaves], tokens)
        assert tree.parents[0].tolist() == parents  # the template gives back the forest it lists
    else:
        parents = torch.tensor([[rng.randrange(-1, i) if i else -1 for i in range(n)] for _ in range(batch)],
                               dtype=torch.long)
        tree = DraftTree(tokens=tokens, parents=parents, valid=valid)
    return tree


def test_random_trees_compile_and_accept_like_brute_force():
    for case in range(400 * SCALE):
        rng = rng_for("tree", case)
        batch, n, vocab = rng.randint(1, 4), rng.randint(0, 12), rng.randint(2, 5)
        tree = random_tree(rng, batch, n, vocab)
        # The target's argmax at the root and after each node; a draft token often equals it.
        pred = torch.randint(0, vocab, (batch, n + 1), generator=torch.Generator().manual_seed(case))
        match = torch.rand(batch, n, generator=torch.Generator().manual_seed(case + 1)) < 0.7
        tokens = torch.where(match, pred.gather(1, tree.parents + 1), tree.tokens)
        tree = DraftTree(tokens=tokens, parents=tree.parents, valid=tree.valid)
        anc, depth = tree.compile()
        logits = torch.randn(batch, n + 1, vocab) * 0.1 + 5.0 * torch.nn.functional.one_hot(pred, vocab)
        out = GreedyAcceptance().accept(logits, tree, SamplingParams())
        emitted, count = out.emitted()
        for b in range(batch):
            parents, toks, valid = tree.parents[b].tolist(), tokens[b].tolist(), tree.valid[b].tolist()
            for i in range(n):
                up = chain_to_root(parents, i)
                assert anc[b, i].nonzero().flatten().tolist() == sorted(up), (case, b, i)
                assert depth[b, i] == len(up), (case, b, i)
                assert tree.path_to(torch.tensor([i] * batch), n)[b].tolist() == up + [-1] * (n - len(up))
            path, nxt = brute_greedy(parents, toks, valid, pred[b].tolist())
            assert out.accept_len[b] == len(path), (case, b)
            assert out.path[b].tolist() == path + [-1] * (n - len(path)), (case, b)
            assert out.next_token[b] == nxt, (case, b)
            assert emitted[b, : count[b]].tolist() == [toks[j] for j in path] + [nxt], (case, b)


def test_random_parents_are_refused_unless_a_forest():
    refused = 0
    for case in range(300 * SCALE):
        rng = rng_for("parents", case)
        batch, n = rng.randint(1, 3), rng.randint(1, 8)
        parents = [[rng.randint(-2, n) if rng.random() < 0.15 else rng.randrange(-1, i) if i else -1
                    for i in range(n)] for _ in range(batch)]
        forest = all(-1 <= p < i for row in parents for i, p in enumerate(row))
        p = torch.tensor(parents)
        args = dict(tokens=torch.zeros_like(p), parents=p, valid=torch.ones_like(p, dtype=torch.bool))
        if forest:
            DraftTree(**args)
            continue
        refused += 1
        row = next(b for b, r in enumerate(parents) if any(not -1 <= q < i for i, q in enumerate(r)))
        with pytest.raises(MalformedDraftTree, match=f"row {row}: node"):
            DraftTree(**args)
        # What the step checks on a GPU, where construction checks nothing on the host.
        tree = DraftTree.chain(args["tokens"])
        tree.parents = p
        assert tree.malformed().tolist() == [any(not -1 <= q < i for i, q in enumerate(r)) for r in parents]
    assert refused > 50


# ---------------------------------------------------------------- end to end against HF greedy
_MODELS: dict = {}
_DRAFTERS: dict = {}
HEADS = {"eagle": lambda m: eagle(m), "eagle_vocab64": lambda m: eagle(m, 4, torch.arange(4, 256, 4)),
         "medusa": lambda m: medusa(m),
         "medusa_wide": lambda m: medusa(m, 2, [[i] for i in range(4)] + [[0, 0], [1, 0]])}
NAMES = list(drafters_for(make_tiny("llama", num_layers=2), "llama")) + list(HEADS)


def model_for(arch):
    if arch not in _MODELS:
        _MODELS[arch] = make_tiny(arch)
    return _MODELS[arch]


def drafter_for(arch, name):
    """One drafter per (architecture, name), reused across cases as a user's would be."""
    if (arch, name) not in _DRAFTERS:
        model = model_for(arch)
        _DRAFTERS[(arch, name)] = HEADS[name](model) if name in HEADS else drafters_for(model, arch)[name]
    return _DRAFTERS[(arch, name)]


def random_prompts(rng: random.Random, vocab: int):
    """Left-padded ``(ids, mask)``: 1-4 rows of 1-12 tokens, random or a short repeated pattern
    (which gives lookup and copy drafters something to find)."""
    lengths = [rng.randint(1, 12) for _ in range(rng.randint(1, 4))]
    t = max(lengths)
    ids, mask = torch.zeros(len(lengths), t, dtype=torch.long), torch.zeros(len(lengths), t, dtype=torch.long)
    for r, n in enumerate(lengths):
        if rng.random() < 0.5:
            row = [rng.randrange(4, vocab) for _ in range(n)]
        else:
            pattern = [rng.randrange(4, vocab) for _ in range(rng.randint(1, 4))]
            row = (pattern * n)[:n]
        ids[r, t - n:], mask[r, t - n:] = torch.tensor(row), 1
    return ids, mask


EOS_KINDS = ("none", "emitted", "two", "never")


def random_eos(rng: random.Random, kind: str, model, ids, mask, max_new):
    """EOS ids of one ``kind``: None; a token the free greedy run emits before its last token (so
    some row stops early); two tokens it emits (one of them early); a token it never emits."""
    if kind == "none":
        return None
    free = hf_greedy(model, ids, mask, max_new_tokens=max_new, eos_token_id=None)[:, ids.shape[1]:]
    seen = sorted(set(free.flatten().tolist()))
    if kind == "never":
        return next(t for t in range(3, model.config.vocab_size) if t not in seen)
    early = sorted(set(free[:, : max_new - 1].flatten().tolist())) or seen
    first = rng.choice(early)
    return first if kind == "emitted" else [first, rng.choice(seen)]


@pytest.mark.parametrize("name", NAMES)
def test_random_greedy_decodes_equal_hf(name):
    for case in range(8 * SCALE):
        rng = rng_for("e2e", name, case)
        arch = rng.choice(ARCHS)
        model = model_for(arch)
        ids, mask = random_prompts(rng, model.config.vocab_size)
        max_new = rng.randint(1, 20)
        eos = random_eos(rng, EOS_KINDS[case % 4], model, ids, mask, max_new)
        steps = 1 if name in HOST else rng.choice([1, 3])
        where = f"case {case} ({name}, {arch}, batch {ids.shape[0]}, max_new {max_new}, eos {eos}, {steps}/sync)"
        ref = hf_greedy(model, ids, mask, max_new_tokens=max_new, eos_token_id=eos)
        out = specdec.wrap(model, drafter=drafter_for(arch, name), chunk_steps=steps).generate(
            ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False, pad_token_id=0, eos_token_id=eos,
            return_dict_in_generate=True)
        assert torch.equal(out.sequences, ref), f"{where} differs from HF greedy"
        stops = {eos} if isinstance(eos, int) else set(eos or [])
        for r, new in enumerate(out.spec_stats.new_tokens):  # each row ends at its first EOS or at max_new
            row = ref[r, ids.shape[1]:].tolist()
            first = next((j + 1 for j, t in enumerate(row) if t in stops), max_new)
            assert new == first, f"{where}: row {r} kept {new} tokens, HF {first}"
        if EOS_KINDS[case % 4] in ("emitted", "two") and max_new > 1:
            assert min(out.spec_stats.new_tokens) < max_new, f"{where}: no row stopped at EOS"

"""PromptLookup's drafts against a plain-Python statement of its ranking rule."""
import random

import pytest
import torch

from specdec.drafters import PromptLookup
from specdec.drafters.base import DecodeContext


def reference(row: list[int], seq: int, start: int, width: int, k: int, max_n: int, min_n: int, m: int):
    """Rows of (tokens, valid) per branch. Candidates: every earlier occurrence (ending at e, with a
    token after it, inside the row's real text) of the last n committed tokens, for the longest
    such n in [min_n, max_n]; ranked by n, then by having k tokens after it, then by recency."""
    cands = []
    for e in range(width):
        if e + 1 >= seq:
            continue
        best = 0
        for n in range(min_n, max_n + 1):
            if n > width - 1 or e - n + 1 < start or seq - n < start:
                break
            if row[e - n + 1: e + 1] == row[seq - n: seq]:
                best = n
        if best:
            cands.append(((best, e + 1 + k <= seq, e - best + 1), e + 1))
    cands.sort(reverse=True)
    out = []
    for _, cont in cands[:m]:
        out.append(([row[min(cont + t, width - 1)] for t in range(k)], [cont + t < seq for t in range(k)]))
    while len(out) < m:
        out.append((None, [False] * k))
    return out


@pytest.mark.parametrize("k,max_n,min_n,m", [(8, 3, 1, 1), (4, 3, 2, 1), (3, 2, 1, 3), (5, 4, 1, 2)])
def test_drafts_follow_the_ranking_rule(k, max_n, min_n, m):
    rng = random.Random(k * 100 + max_n * 10 + m)
    for trial in range(40):
        b, width = 3, rng.randint(4, 40)
        vocab = rng.choice([3, 5, 9])   # small vocabularies repeat n-grams often
        tokens = torch.tensor([[rng.randrange(vocab) for _ in range(width + 8)] for _ in range(b)])
        seq = torch.tensor([rng.randint(1, width) for _ in range(b)])
        start = torch.tensor([rng.randint(0, int(s) - 1) for s in seq])
        ctx = DecodeContext(target=None, tokens=tokens, seq_len=seq, start=start, params=None, max_seq_len=width,
                            capacity=tokens.shape[1], cache=None)
        tree = PromptLookup(num_tokens=k, max_ngram=max_n, min_ngram=min_n, num_branches=m).propose(ctx)
        got_tokens, got_valid = tree.tokens.view(b, m, k), tree.valid.view(b, m, k)
        for r in range(b):
            want = reference(tokens[r, :width].tolist(), int(seq[r]), int(start[r]), width, k, max_n, min_n, m)
            for j, (toks, valid) in enumerate(want):
                chain = [v and all(valid[: t + 1]) for t, v in enumerate(valid)]   # a chain stops at its first gap
                assert got_valid[r, j].tolist() == chain, (trial, r, j)
                if toks is not None:
                    assert [t for t, v in zip(got_tokens[r, j].tolist(), chain) if v] == \
                           [t for t, v in zip(toks, chain) if v], (trial, r, j)


def test_compiled_propose_equals_eager():
    """``compile`` (what the engine calls with ``compile=True``) puts the same function under
    Inductor: identical drafts on random contexts of one static width."""
    rng = random.Random(7)
    drafter = PromptLookup(num_tokens=4, max_ngram=3, num_branches=2)
    fast = PromptLookup(num_tokens=4, max_ngram=3, num_branches=2)
    fast.compile(None)
    assert fast._match_fn is not fast._match
    compiled = fast.propose
    b, width, drafted = 3, 32, 0
    for trial in range(6):
        tokens = torch.tensor([[rng.randrange(5) for _ in range(width + 8)] for _ in range(b)])
        seq = torch.tensor([rng.randint(2, width) for _ in range(b)])
        start = torch.tensor([rng.randint(0, int(s) - 1) for s in seq])
        ctx = DecodeContext(target=None, tokens=tokens, seq_len=seq, start=start, params=None, max_seq_len=width,
                            capacity=tokens.shape[1], cache=None)
        want, got = drafter.propose(ctx), compiled(ctx)
        drafted += int(want.valid.sum())
        assert torch.equal(got.valid, want.valid), trial
        assert torch.equal(got.tokens[got.valid], want.tokens[want.valid]), trial
        assert torch.equal(got.parents, want.parents), trial
    assert drafted > 0   # the contexts did produce drafts to compare

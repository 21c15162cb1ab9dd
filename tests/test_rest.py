"""REST retrieval drafting: suffix-array search, trie building, the index on disk, and greedy equality."""
import json
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf
from tiny import char_tokenizer, hf_greedy, make_tiny, ragged_batch

import specdec
from specdec.datastore import Datastore, datastore_main, vocab_fingerprint
from specdec.drafters import VocabularyMismatchError, build_drafter
from specdec.drafters.rest import RestDrafter, build_trie, context_continuations

SMOL = "zoo:smollm2-135m-instruct"

# ---------------------------------------------------------------------- suffix array search
#          doc 0        doc 1     doc 2
DOCS = [[1, 2, 3, 4], [2, 3, 5], [9, 2, 3, 4, 6]]


def occurrences(tokens, query):
    """Brute force: start positions of ``query`` in ``tokens``."""
    m = len(query)
    return [i for i in range(len(tokens) - m + 1) if list(tokens[i:i + m]) == list(query)]


def count(ds, query):
    lo, hi = ds.find(query)
    return hi - lo


def test_literal_corpus_search():
    ds = Datastore.from_documents(DOCS, vocab_size=10)
    assert ds.tokens.tolist() == [1, 2, 3, 4, 10, 2, 3, 5, 10, 9, 2, 3, 4, 6, 10]  # 10: separator
    lo, hi = ds.find([2, 3])
    assert hi - lo == 3
    assert hi - lo == len(occurrences(ds.tokens, [2, 3]))
    assert count(ds, [2, 3, 4]) == 2 and count(ds, [3, 2]) == 0 and count(ds, [4, 10]) == 1
    # Continuations after "2 3", two tokens each, stopped at the separator (-1).
    conts = ds.continuations(lo, hi, offset=2, depth=2)
    assert sorted(map(tuple, conts.tolist())) == [(4, -1), (4, 6), (5, -1)]
    # Longest suffix of "7 9 2 3" in the corpus is "9 2 3" (doc 2); "7 9 2 3" is not there.
    m, lo, hi = ds.longest_match([7, 9, 2, 3], min_len=1, max_len=8)
    assert (m, hi - lo) == (3, 1)
    assert ds.continuations(lo, hi, offset=m, depth=3).tolist() == [[4, 6, -1]]
    assert ds.longest_match([7, 9, 2, 3], min_len=1, max_len=2)[0] == 2  # capped by max_len
    assert ds.longest_match([7, 8], min_len=1, max_len=8) == (0, 0, 0)  # 8 never occurs
    assert ds.longest_match([4, 9, 2], min_len=2, max_len=8)[0] == 2  # "9 2", not "4 9 2"


def test_search_matches_brute_force_on_random_corpus():
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 4, rng.integers(1, 40)).tolist() for _ in range(20)]
    ds = Datastore.from_documents(docs, vocab_size=4)
    toks = ds.tokens.tolist()
    # The suffix array sorts the suffixes.
    assert ds.suffixes.tolist() == sorted(range(len(toks)), key=lambda i: toks[i:])
    for _ in range(200):
        query = rng.integers(0, 4, rng.integers(1, 6)).tolist()
        lo, hi = ds.find(query)
        assert hi - lo == len(occurrences(toks, query)), query
        assert all(toks[s:s + len(query)] == query for s in ds.suffixes[lo:hi])
        context = rng.integers(0, 4, 12).tolist()
        m, lo, hi = ds.longest_match(context, 1, 8)
        assert m == max([k for k in range(1, 9) if occurrences(toks, context[-k:])], default=0)
        if m:  # the continuations are what follows each occurrence, cut at the separator
            want = Counter()
            for s in occurrences(toks, context[-m:]):
                after = toks[s + m:s + m + 3]
                after = after[:after.index(4)] if 4 in after else after
                want[tuple(after + [-1] * (3 - len(after)))] += 1
            assert Counter(map(tuple, ds.continuations(lo, hi, m, 3).tolist())) == want


def test_sampled_continuations_keep_proportions():
    # 900 occurrences of "1 2", 100 of "1 3": a 100-match sample must keep about 9:1.
    ds = Datastore.from_documents([[1, 2]] * 900 + [[1, 3]] * 100, vocab_size=4)
    lo, hi = ds.find([1])
    conts = ds.continuations(lo, hi, offset=1, depth=1, max_matches=100)
    assert conts.shape == (100, 1)
    assert Counter(conts[:, 0].tolist()) == {2: 90, 3: 10}


# ---------------------------------------------------------------------- trie
def test_trie_literal():
    trie = build_trie(np.array([[7, 8], [7, 9], [7, 8]]), num_nodes=8)
    assert trie.tokens.tolist() == [7, 8, 9]
    assert trie.parents.tolist() == [-1, 0, 0]
    assert trie.weights.tolist() == [3, 2, 1]
    # Budget 3 over "7 8" x2, "7 9", "5": keeps 7 (3), 7-8 (2), then 5 (1, shallower than 7-9).
    trie = build_trie(np.array([[7, 8], [7, 9], [7, 8], [5, -1]]), num_nodes=3)
    paths = {tuple(path_of(trie, i)) for i in range(len(trie))}
    assert paths == {(7,), (7, 8), (5,)}


def path_of(trie, i):
    path = []
    while i >= 0:
        path.append(int(trie.tokens[i]))
        i = int(trie.parents[i])
    return path[::-1]


@pytest.mark.parametrize("budget", [1, 5, 16, 200])
def test_trie_invariants(budget):
    rng = np.random.default_rng(budget)
    conts = rng.integers(0, 3, (60, 5))
    conts[rng.random(60) < 0.2, 3:] = -1  # some rows end early
    trie = build_trie(conts, budget)
    n = len(trie)
    prefix_counts = Counter(tuple(r[:d]) for r in conts.tolist() for d in range(1, 6) if r[d - 1] >= 0)
    assert n == min(budget, len(prefix_counts))
    assert all(trie.parents[i] < i for i in range(n))  # parents before children
    siblings = [(int(p), int(t)) for p, t in zip(trie.parents, trie.tokens)]
    assert len(set(siblings)) == n  # no duplicate siblings
    kept = [tuple(path_of(trie, i)) for i in range(n)]
    assert [trie.weights[i] for i in range(n)] == [prefix_counts[k] for k in kept]  # counts are exact
    dropped = [c for k, c in prefix_counts.items() if k not in set(kept)]
    assert not dropped or min(trie.weights) >= max(dropped)  # the most frequent prefixes are kept


def test_weighted_trie_mixes_sources():
    # Datastore: "5 6" x3, "7" x1 (weight 1/4 each); own text: "7 8" once, weighing 1.
    conts = np.array([[5, 6], [5, 6], [5, 6], [7, -1], [7, 8]])
    trie = build_trie(conts, num_nodes=2, weights=[0.25, 0.25, 0.25, 0.25, 1.0])
    assert [path_of(trie, i) for i in range(2)] == [[7], [7, 8]]  # 1.25 and 1.0 beat 0.75
    assert trie.weights.tolist() == [1.25, 1.0]


def test_context_continuations():
    assert context_continuations([1, 2, 3, 1, 2], 1, 4, 2).tolist() == [[3, 1]]  # "1 2" recurs once
    assert context_continuations([4, 1, 4, 2, 4], 1, 4, 3).tolist() == [[1, 4, 2], [2, 4, -1]]  # "4" twice
    assert context_continuations([1, 2, 3], 1, 4, 2).shape == (0, 2)  # "3" never recurs
    assert context_continuations([5, 5], 2, 4, 2).shape == (0, 2)  # too short for min_len 2


# ---------------------------------------------------------------------- index on disk
def test_save_load_round_trip(tmp_path):
    ds = Datastore.from_documents(DOCS, vocab_size=10, tokenizer="literal")
    path = ds.save(tmp_path / "idx")
    assert path.name == "idx.npz" and (tmp_path / "idx.json").is_file()
    back = Datastore.load(tmp_path / "idx.npz")
    assert back.tokens.tolist() == ds.tokens.tolist()
    assert back.suffixes.tolist() == ds.suffixes.tolist()
    assert back.meta == ds.meta and back.meta["tokenizer"] == "literal"
    assert back.find([2, 3]) == ds.find([2, 3])
    assert back.nbytes == 6 * len(ds.tokens)  # 16-bit tokens, 32-bit suffix array
    wide = Datastore.from_documents(DOCS, vocab_size=100_000)
    assert wide.nbytes == 8 * len(wide.tokens) and wide.find([2, 3]) == ds.find([2, 3])
    with pytest.raises(FileNotFoundError, match="specdec-datastore build"):
        Datastore.load(tmp_path / "missing.npz")


def test_vocabulary_mismatch(tmp_path):
    model = make_tiny("llama")  # 256 tokens
    big = RestDrafter(Datastore.from_documents(DOCS, vocab_size=49152, tokenizer=SMOL))
    with pytest.raises(VocabularyMismatchError, match="specdec-datastore build --tokenizer"):
        specdec.wrap(model, drafter=big)
    small = RestDrafter(Datastore.from_documents(DOCS, vocab_size=10))  # 10 of 256: another tokenizer
    with pytest.raises(VocabularyMismatchError, match="10-token vocabulary"):
        specdec.wrap(model, drafter=small)
    # An index built with another tokenizer is refused by fingerprint.
    tok_dir = tmp_path / "chars"
    char_tokenizer().save_pretrained(tok_dir)
    Datastore.from_documents(DOCS, vocab_size=73, tokenizer=str(tok_dir),
                             vocab_fingerprint=vocab_fingerprint(char_tokenizer())).save(tmp_path / "chars.npz")
    assert RestDrafter.from_index(tmp_path / "chars.npz", tokenizer=str(tok_dir)).datastore.vocab_size == 73
    with pytest.raises(VocabularyMismatchError, match="rebuild it"):
        RestDrafter.from_index(tmp_path / "chars.npz", tokenizer=SMOL)


# ---------------------------------------------------------------------- greedy equality, tiny model
@pytest.mark.parametrize("lengths", [[7], [3, 9, 1, 6]], ids=["batch1", "batch4_ragged"])
def test_greedy_equals_hf_tiny(lengths):
    model = make_tiny("llama")
    v = model.config.vocab_size
    ids, mask = ragged_batch(lengths, v, seed=len(lengths))
    ref = hf_greedy(model, ids, mask, max_new_tokens=24, eos_token_id=None)
    # Corpus: what the model itself writes after these prompts (longer than the test decodes),
    # once verbatim and once with every 5th token changed, so the tries branch and some drafts fail.
    longer = hf_greedy(model, ids, mask, max_new_tokens=40, eos_token_id=None)[:, ids.shape[1]:].tolist()
    noisy = [[(t + 1) % v if i % 5 == 4 else t for i, t in enumerate(row)] for row in longer]
    own = Datastore.from_documents(longer + noisy, vocab_size=v)
    rng = np.random.default_rng(0)
    unrelated = Datastore.from_documents([rng.integers(0, v, 50).tolist() for _ in range(20)], vocab_size=v)
    rest = dict(min_suffix=1, context_weight=0.0)  # datastore only, so tau measures retrieval
    for name, drafter, min_tau in [
            ("own", RestDrafter(own, num_nodes=12, max_depth=6, **rest), 2.0),
            ("noisy_only", RestDrafter(Datastore.from_documents(noisy, vocab_size=v), num_nodes=6, max_depth=6,
                                       **rest), 1.0),
            ("unrelated", RestDrafter(unrelated, num_nodes=8, **rest), 0.0),
            ("unrelated+context", RestDrafter(unrelated, num_nodes=8), 0.0)]:
        out = specdec.wrap(model, drafter=drafter).generate(
            ids, attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=0, eos_token_id=None,
            return_dict_in_generate=True)
        assert torch.equal(out.sequences, ref), f"{name} differs from HF greedy"
        assert out.spec_stats.new_tokens == [24] * len(lengths)
        assert out.spec_stats.tau > min_tau, (name, out.spec_stats.tau)


def test_budget_and_padding_in_propose():
    model = make_tiny("llama")
    ids, mask = ragged_batch([3, 9, 1, 6], 256, seed=4)
    longer = hf_greedy(model, ids, mask, max_new_tokens=30, eos_token_id=None)[:, ids.shape[1]:].tolist()
    drafter = RestDrafter(Datastore.from_documents(longer, vocab_size=256), num_nodes=5, max_depth=3)
    spec = specdec.wrap(model, drafter=drafter)
    trees = []
    propose = drafter.propose
    drafter.propose = lambda ctx: trees.append(propose(ctx)) or trees[-1]
    spec.generate(ids, attention_mask=mask, max_new_tokens=12, pad_token_id=0, eos_token_id=None)
    assert trees and any(t.valid.any() for t in trees)
    for tree in trees:
        assert tree.tokens.shape == (4, 5)  # static budget
        idx = torch.arange(5)
        assert (tree.parents < idx).all()
        assert ((tree.parents == -1) | tree.valid.gather(1, tree.parents.clamp(min=0))).all()  # valid parent
        assert (tree.parents[~tree.valid] == -1).all()
        assert (tree.depth * tree.valid).max() <= 3


# ---------------------------------------------------------------------- greedy equality, SmolLM2
@pytest.fixture(scope="module")
def humaneval_index(tmp_path_factory):
    path = tmp_path_factory.mktemp("rest") / "humaneval.npz"
    assert datastore_main(["build", "--tokenizer", SMOL, "--source", "humaneval", "--out", str(path)]) == 0
    return path


def documents(ds):
    """The documents of a datastore, separators dropped."""
    parts = np.split(ds.tokens.astype(np.int64), np.flatnonzero(ds.tokens == ds.separator) + 1)
    return [p[p != ds.separator].tolist() for p in parts if (p != ds.separator).any()]


@pytest.mark.parametrize("batch", [1, 4])
def test_smollm2_greedy_equality(smollm2, humaneval_index, batch):
    from test_real_models import PROMPTS, chat_batch

    model, tok = smollm2
    enc = chat_batch(tok, PROMPTS[:batch])
    kw = dict(attention_mask=enc.attention_mask, max_new_tokens=32, do_sample=False, pad_token_id=tok.pad_token_id)
    ref = model.generate(enc.input_ids, **kw)
    # Corpus: HumanEval, plus the model's own answers verbatim and with every 6th token changed,
    # so retrieval finds long matches whose tries hold a right and a wrong branch.
    humaneval = Datastore.load(humaneval_index)
    answers = [row[row != tok.pad_token_id].tolist() for row in ref[:, enc.input_ids.shape[1]:]]
    noisy = [[(t + 1) % len(tok) if i % 6 == 5 else t for i, t in enumerate(row)] for row in answers]
    own = Datastore.from_documents(documents(humaneval)[:40] + answers + noisy, vocab_size=humaneval.vocab_size)
    drafters = [("own_answers", RestDrafter(own, num_nodes=16, max_depth=8, min_suffix=2, context_weight=0.0))]
    if batch == 1:  # HumanEval plus the row's own text (the defaults): fewer matches, more rejections
        drafters.append(("humaneval", RestDrafter.from_index(humaneval_index, tokenizer=SMOL, num_nodes=16)))
    for name, drafter in drafters:
        out = specdec.wrap(model, drafter=drafter).generate(enc.input_ids, return_dict_in_generate=True, **kw)
        assert torch.equal(out.sequences, ref), f"{name} differs from HF greedy at batch {batch}"
        if name == "own_answers":
            assert out.spec_stats.tau > 2.0, out.spec_stats.tau


# ---------------------------------------------------------------------- build command and config
def test_build_command_writes_a_loadable_index(tmp_path, capsys):
    out = tmp_path / "he.npz"
    assert datastore_main(["build", "--tokenizer", SMOL, "--source", "humaneval", "--max-tokens", "3000",
                           "--out", str(out)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    ds = Datastore.load(out)
    assert 2000 < ds.num_tokens <= 3000
    assert f"{ds.num_tokens:,} tokens" in last and "MiB" in last
    assert ds.meta["tokenizer"] == SMOL and ds.meta["source"] == "humaneval" and ds.vocab_size == 49152
    assert ds.tokens[-1] == ds.separator and (ds.tokens[:-1] <= ds.separator).all()
    assert RestDrafter.from_index(out, tokenizer=SMOL).datastore.num_tokens == ds.num_tokens


def test_build_command_as_module_on_local_files(tmp_path):
    (tmp_path / "a.txt").write_text("def add(a, b):\n    return a + b\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_CACHE=str(tmp_path / "hf"))
    done = subprocess.run([sys.executable, "-m", "specdec.datastore", "build", "--tokenizer", SMOL, "--source", "files",
                           "--data-files", str(tmp_path / "a.txt"), "--out", str(tmp_path / "idx.npz")],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert "tokenising" in done.stderr  # the progress bar
    ds = Datastore.load(tmp_path / "idx.npz")
    assert done.stdout.strip().splitlines()[-1].startswith(f"{ds.num_tokens:,} tokens, 1 documents")
    assert ds.meta["num_documents"] == 1 and ds.num_tokens >= 10


def test_json_chat_files(tmp_path):
    from specdec.datastore import load_texts

    rows = [{"text": [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello"}]},
            {"text": [{"role": "user", "content": "plain"}]}]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert load_texts("files", [str(tmp_path / "chat.jsonl")])["text"] == ["hi there\nhello", "plain"]
    with pytest.raises(ValueError, match="--text-field"):
        load_texts("files", [str(tmp_path / "chat.jsonl")], text_field="body")


def test_config_builds_an_auto_index(tmp_path, monkeypatch):
    monkeypatch.setattr("specdec.datastore.index_cache_dir", lambda: tmp_path / "datastore")
    with initialize_config_module("specdec.conf", version_base=None):
        cfg = compose("bench", overrides=["drafter=rest", "drafter.index=auto:humaneval", "drafter.max_tokens=4000"])
    assert cfg.drafter.tokenizer == cfg.model.spec == SMOL
    drafter = build_drafter(OmegaConf.to_container(cfg.drafter, resolve=True))
    assert isinstance(drafter, RestDrafter) and drafter.num_nodes == cfg.drafter.num_nodes
    assert drafter.datastore.meta["source"] == "humaneval" and drafter.datastore.num_tokens <= 4000
    assert list((tmp_path / "datastore").glob("*humaneval*.npz"))  # cached for the next run

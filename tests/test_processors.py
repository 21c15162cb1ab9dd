"""HF's logits processors under speculation: greedy output equals HF ``generate`` with the same
options, sampling keeps the processed target distribution, each tree node is processed with its
own path, and every option specdec does not implement is refused by name.

The draft is processed like the target (`specdec.drafters.draw`): every drafter that scores
tokens picks them, and forms its ``q``, from logits processed with the draft position's own
prefix. So no draft ever proposes a banned token or a repeated n-gram, and a draft equal to the
target keeps everything it proposes under a strong repetition penalty."""
import dataclasses
from collections import Counter

import pytest
import torch
from heads_util import noisy
from test_sampling import PROMPT, V, chi2_pvalue
from tiny import hf_greedy, make_tiny, ragged_batch
from transformers import (GenerationConfig, LogitsProcessorList, MinPLogitsWarper, NoBadWordsLogitsProcessor,
                          NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor)

import specdec
from specdec.drafters import (DraftModel, EagleHead, Hierarchical, KangarooAdapter, LayerSkip, MedusaHeads,
                              PromptLookup, Rapid, SparseSelfDraft)
from specdec.drafters.heads import EagleHeadModel, MedusaHeadsModel
from specdec.drafters.kangaroo_adapter import KangarooAdapterModel
from specdec.verifiers import DraftTree
from specdec.verifiers.processors import LogitsOptions, process_logits

VOCAB = 64
OPTIONS = {
    "repetition_penalty": dict(repetition_penalty=1.5),
    "repetition_penalty_below_1": dict(repetition_penalty=0.7),
    "min_new_tokens": dict(min_new_tokens=14, eos_token_id=[2, 5]),
    "suppress_tokens": dict(suppress_tokens=[4, 9, 17]),
    "bad_words_ids": dict(bad_words_ids=[[11], [7, 8], [20, 21, 22]]),
    "no_repeat_ngram_size_1": dict(no_repeat_ngram_size=1),
    "no_repeat_ngram_size_2": dict(no_repeat_ngram_size=2),
    "no_repeat_ngram_size_3": dict(no_repeat_ngram_size=3),
    "all_at_once": dict(repetition_penalty=1.2, no_repeat_ngram_size=3, bad_words_ids=[[7, 8]], suppress_tokens=[4],
                        min_new_tokens=6, eos_token_id=2),
}


@pytest.fixture(scope="module")
def model():
    return make_tiny("llama", vocab_size=VOCAB, init_range=0.3)


AUX = (0, 1, 1)  # EAGLE aux layers of the 2-layer target: the embedding output and layer 1 twice


def drafter(kind, model):
    sparse = dict(sink=2, window=4, chunk=3, top_chunks=2)
    return {
        "none": lambda: None,
        "lookup": lambda: PromptLookup(num_tokens=4),
        # The target drafting for itself: processed like the target, its drafts are kept whole; drafting
        # from the raw logits, long drafts that verification must cut at the right node.
        "draft_model": lambda: DraftModel(model, num_tokens=4),
        "raw_self_draft": lambda: UnprocessedDraft(model, num_tokens=4),
        "draft_tree": lambda: DraftModel(model, num_tokens=3, tree_width=2, tree_nodes=6),
        "lookup_branches": lambda: PromptLookup(num_tokens=3, num_branches=2),
        # Drafters with their own scores (processed draft q): heads, early exits, sparse and short contexts.
        "layer_skip": lambda: LayerSkip(exit_layer=1, num_tokens=3),
        "eagle": lambda: EagleHead(noisy(EagleHeadModel.from_target(model, AUX)), num_tokens=3),
        "eagle_reduced_vocab": lambda: EagleHead(
            noisy(EagleHeadModel.from_target(model, AUX, draft_vocab=torch.arange(1, VOCAB, 2))), num_tokens=3),
        "eagle_tree_reduced_vocab": lambda: EagleHead(
            noisy(EagleHeadModel.from_target(model, AUX, draft_vocab=torch.arange(0, VOCAB, 2))), tree_topk=2,
            tree_depth=3, tree_nodes=6),
        "medusa": lambda: MedusaHeads(noisy(MedusaHeadsModel.from_target(model, 3))),
        "kangaroo": lambda: KangarooAdapter(noisy(KangarooAdapterModel.from_target(model, 1)), num_tokens=3),
        "sparse_self": lambda: SparseSelfDraft(num_tokens=3, **sparse),
        "rapid": lambda: Rapid(num_tokens=3, context_tokens=12, chunk=4, recent_tokens=4, query_tokens=4),
        "hierarchical": lambda: Hierarchical(PromptLookup(num_tokens=3, max_ngram=2),
                                             SparseSelfDraft(num_tokens=6, **sparse), rounds=2),
    }[kind]()


KINDS = ["none", "lookup", "draft_model", "raw_self_draft", "draft_tree", "lookup_branches", "layer_skip", "eagle",
         "eagle_reduced_vocab", "eagle_tree_reduced_vocab", "medusa", "kangaroo", "sparse_self", "rapid",
         "hierarchical"]
_HF: dict = {}


def hf_rows(model, ids, mask, max_new, **kwargs):
    """HF greedy per row, each prompt on its own (no padding); computed once per setting."""
    key = (id(model), str(ids.device), ids.cpu().numpy().tobytes(), mask.cpu().numpy().tobytes(), max_new,
           repr(sorted(kwargs.items())))
    if key not in _HF:
        out = []
        for r in range(ids.shape[0]):
            n = int(mask[r].sum())
            out.append(hf_greedy(model, ids[r:r + 1, ids.shape[1] - n:], max_new_tokens=max_new, **kwargs)[0, n:])
        _HF[key] = out
    return _HF[key]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_greedy_with_processors_equals_hf(model, name, kind):
    """Batch 1 and a ragged batch of 4: token for token HF's greedy output with the same options,
    which differs from plain greedy (the option is really applied)."""
    kwargs, max_new = OPTIONS[name], 20
    ids, mask = ragged_batch([6, 11, 3, 8], VOCAB, seed=1)
    spec = specdec.wrap(model, drafter=drafter(kind, model))
    want = hf_rows(model, ids, mask, max_new, **kwargs)
    plain = hf_rows(model, ids, mask, max_new, eos_token_id=kwargs.get("eos_token_id"))
    assert any(not torch.equal(w, p) for w, p in zip(want, plain)), "the option changes nothing on these prompts"
    got = spec.generate(ids, attention_mask=mask, max_new_tokens=max_new, pad_token_id=0, **kwargs)
    for r in range(4):
        assert got[r, ids.shape[1]:][: len(want[r])].tolist() == want[r].tolist(), f"row {r}"
    one = spec.generate(ids[1:2, -11:], max_new_tokens=max_new, pad_token_id=0, **kwargs)
    assert one[0, 11:][: len(want[1])].tolist() == want[1].tolist()


def recording(drafter):
    """Every proposal of every live row: (committed tokens, the token path of each valid node)."""
    seen, propose = [], drafter.propose

    def record(state):
        tree = propose(state)
        for r in range(tree.batch):
            if not state.active[r]:
                continue
            paths = []
            for i in range(tree.num_nodes):
                path, j = [], i
                while j >= 0:
                    path.insert(0, int(tree.tokens[r, j]))
                    j = int(tree.parents[r, j])
                if tree.valid[r, i]:
                    paths.append(path)
            seen.append((state.tokens[r, state.start[r]:state.seq_len[r]].tolist(), paths))
        return tree
    drafter.propose = record
    return seen


def repeats_a_bigram(seq: list[int]) -> bool:
    """Whether ``seq``'s last bigram already occurred earlier in it."""
    return len(seq) >= 3 and any(seq[i:i + 2] == seq[-2:] for i in range(len(seq) - 2))


# Drafters whose tokens come from their own (processed) scores; each proposes freely when unprocessed.
SCORED = ["draft_model", "draft_tree", "layer_skip", "eagle_reduced_vocab", "eagle_tree_reduced_vocab", "medusa",
          "kangaroo", "sparse_self"]


@pytest.mark.parametrize("kind", SCORED)
def test_drafts_never_propose_what_the_processed_target_bans(model, kind):
    """bad_words_ids=[[t]], t the token this drafter proposes most without options: processed,
    no proposal holds t. no_repeat_ngram_size=2: no proposed node completes a bigram that its
    prefix (committed tokens, then its path) already holds, while unprocessed drafts do."""
    ids, mask = ragged_batch([6, 11, 3, 8], VOCAB, seed=1)
    args = dict(attention_mask=mask, max_new_tokens=24, pad_token_id=0, eos_token_id=None)
    d = drafter(kind, model)
    plain = recording(d)
    specdec.wrap(model, drafter=d).generate(ids, **args)
    counts = Counter(t for _, paths in plain for path in paths for t in path)
    t = counts.most_common(1)[0][0]
    assert any(repeats_a_bigram(c + p[:k]) for c, paths in plain for p in paths for k in range(1, len(p) + 1))

    d = drafter(kind, model)
    banned = recording(d)
    specdec.wrap(model, drafter=d).generate(ids, bad_words_ids=[[t]], **args)
    assert banned and all(t not in path for _, paths in banned for path in paths), f"{kind} proposed {t}"

    d = drafter(kind, model)
    ngram = recording(d)
    specdec.wrap(model, drafter=d).generate(ids, no_repeat_ngram_size=2, **args)
    bad = [(c, p) for c, paths in ngram for p in paths if repeats_a_bigram(c + p)]
    assert ngram and not bad, f"{kind} proposed a repeated bigram: {bad[:1]}"


class UnprocessedDraft(DraftModel):
    """The draft as it was before its q was processed: it drafts from the raw logits (a test
    double, to show what processing the draft buys)."""

    def propose(self, state):
        saved = state.params
        state.params = dataclasses.replace(saved, processors=LogitsOptions())
        try:
            return super().propose(state)
        finally:
            state.params = saved


@pytest.mark.parametrize("sampling", [False, True], ids=["greedy", "sampling"])
def test_a_draft_equal_to_the_target_keeps_everything_under_repetition_penalty(model, sampling):
    """DraftModel(target): processed like the target, its draft is the target's own choice
    (greedy) or its own distribution (q = p, sampling), so every step keeps all 4 tokens and the
    bonus one (the last step of a row may be cut by max_new_tokens). Drafting from the raw
    logits, as before, loses most of that under the same penalty."""
    ids, mask = ragged_batch([6, 11, 3, 8], VOCAB, seed=1)
    args = dict(attention_mask=mask, max_new_tokens=41, pad_token_id=0, eos_token_id=None, repetition_penalty=4.0,
                do_sample=sampling, top_k=0, return_dict_in_generate=True)
    torch.manual_seed(0)
    stats = specdec.wrap(model, drafter=DraftModel(model, num_tokens=4)).generate(ids, **args).spec_stats
    # (Under sampling, draft and verification forwards differ in float rounding: p / q is 1 within ~1e-6.)
    assert all(set(row[:-1]) == {5} for row in stats.accepted_lengths), stats.accepted_lengths
    torch.manual_seed(0)
    raw = specdec.wrap(model, drafter=UnprocessedDraft(model, num_tokens=4)).generate(ids, **args).spec_stats
    assert raw.tau < stats.tau - 1.0, (raw.tau, stats.tau)


def random_forest(g: torch.Generator, n: int):
    parents = [-1] + [int(torch.randint(-1, i, (1,), generator=g)) for i in range(1, n)]
    return parents


@pytest.mark.parametrize("seed", range(6))
def test_each_node_is_processed_with_its_own_path(seed):
    """Against HF's processors run on the brute-force sequence of every node: committed tokens,
    then the node's ancestors, then the node."""
    g = torch.Generator().manual_seed(seed)
    b, n, vocab, cap = 2, 7, 12, 24
    tokens = torch.randint(3, 7, (b, cap), generator=g)  # a small alphabet: n-grams repeat
    start, seq_len = torch.tensor([4, 9]), torch.tensor([15, 18])
    parents = torch.tensor([random_forest(g, n) for _ in range(b)])
    tree = DraftTree(tokens=torch.randint(3, 7, (b, n), generator=g), parents=parents,
                     valid=torch.ones(b, n, dtype=torch.bool))
    logits = torch.randn(b, n + 1, vocab, generator=g)
    words = [[5], [4, 6], [3, 3, 5]]
    opts = LogitsOptions(repetition_penalty=1.7, no_repeat_ngram_size=3, bad_words_ids=tuple(map(tuple, words)))
    got = process_logits(logits, opts, tree, tokens, seq_len, start, seq_len)
    hf = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.7), NoRepeatNGramLogitsProcessor(3),
                              NoBadWordsLogitsProcessor(words, eos_token_id=2)])
    for r in range(b):
        committed = tokens[r, start[r]: seq_len[r]].tolist()
        for pos in range(n + 1):
            path, i = [], pos - 1
            while i >= 0:
                path.insert(0, int(tree.tokens[r, i]))
                i = int(parents[r, i])
            want = hf(torch.tensor([committed + path]), logits[r, pos: pos + 1].clone())[0]
            assert torch.equal(got[r, pos], want), f"row {r} position {pos}"


def test_num_return_sequences_repeats_rows_like_hf(model):
    """HF expands every prompt row ``num_return_sequences`` times (sampling only; greedy refuses, as
    in HF). With top_k=1 the draws are deterministic, so the output must equal HF's exactly."""
    ids, mask = ragged_batch([5, 8], VOCAB, seed=2)
    spec = specdec.wrap(model, drafter=PromptLookup(num_tokens=3))
    args = dict(attention_mask=mask, max_new_tokens=10, pad_token_id=0, eos_token_id=None, do_sample=True, top_k=1)
    got = spec.generate(ids, num_return_sequences=3, **args)
    assert got.shape == (6, ids.shape[1] + 10)
    assert torch.equal(got, model.generate(ids, num_return_sequences=3, **args))
    assert torch.equal(got, hf_greedy(model, ids.repeat_interleave(3, 0), attention_mask=mask.repeat_interleave(3, 0),
                                      max_new_tokens=10, eos_token_id=None))
    torch.manual_seed(0)
    sampled = spec.generate(ids, num_return_sequences=4, **dict(args, top_k=0))
    assert sampled.shape[0] == 8 and torch.equal(sampled[:, : ids.shape[1]], ids.repeat_interleave(4, 0))
    assert len({tuple(r) for r in sampled[:4, ids.shape[1]:].tolist()}) > 1  # the copies are drawn on their own
    with pytest.raises(ValueError, match="num_return_sequences"):
        spec.generate(ids, attention_mask=mask, max_new_tokens=4, num_return_sequences=2)


def test_qwen_style_generation_config_runs_bare(model):
    """A generation_config like Qwen2.5-Instruct's (sampling, repetition penalty, two EOS ids)."""
    qwen = GenerationConfig(bos_token_id=1, do_sample=True, eos_token_id=[2, 3], pad_token_id=0,
                            repetition_penalty=1.1, temperature=0.7, top_k=20, top_p=0.8)
    model.generation_config, saved = qwen, model.generation_config
    try:
        spec = specdec.wrap(model, drafter=PromptLookup(num_tokens=3))
        ids = torch.tensor([[5, 6, 7, 5, 6]])
        out = spec.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8)
        assert out.shape[0] == 1 and torch.equal(out[0, :5], ids[0]) and out.shape[1] > 5
        greedy = spec.generate(input_ids=ids, max_new_tokens=12, do_sample=False)
        assert torch.equal(greedy, model.generate(ids, max_new_tokens=12, do_sample=False))
    finally:
        model.generation_config = saved


@pytest.mark.parametrize("kwargs, words", [
    (dict(dola_layers="high"), "dola_layers"),
    (dict(token_healing=True), "token_healing"),
    (dict(top_h=0.5), "top_h"),
    (dict(renormalise_logits=True), "renormalise_logits"),
    (dict(use_mtp=True), "use_mtp"),
    (dict(remove_invalid_values=True), "remove_invalid_values"),
    (dict(max_time=0), "max_time"),
])
def test_unimplemented_options_are_refused(model, kwargs, words):
    spec = specdec.wrap(model, drafter=PromptLookup())
    with pytest.raises((specdec.UnsupportedGenerationOption, ValueError), match=words):
        spec.generate(torch.tensor([[5, 6]]), max_new_tokens=4, **kwargs)


def test_option_set_in_the_generation_config_is_refused(model):
    spec = specdec.wrap(model, drafter=PromptLookup())
    with pytest.raises(specdec.UnsupportedGenerationOption, match="dola_layers"):
        spec.generate(torch.tensor([[5, 6]]), generation_config=GenerationConfig(dola_layers="low", max_new_tokens=3))


def test_bad_token_ids_are_refused(model):
    spec = specdec.wrap(model)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        spec.generate(torch.tensor([[5, 6]]), max_new_tokens=4, suppress_tokens=[VOCAB])
    with pytest.raises(ValueError, match="bad_words_ids"):
        spec.generate(torch.tensor([[5, 6]]), max_new_tokens=4, bad_words_ids=[[]])


def test_max_time_stops_early_with_a_valid_prefix(model):
    """A max_time that has already passed stops every row at the first host sync."""
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    spec = specdec.wrap(model, drafter=PromptLookup(num_tokens=3))
    full = spec.generate(ids, max_new_tokens=60, pad_token_id=0, eos_token_id=None)
    out = spec.generate(ids, max_new_tokens=60, pad_token_id=0, eos_token_id=None, max_time=1e-9,
                        return_dict_in_generate=True)
    kept = out.spec_stats.new_tokens
    assert 1 <= min(kept) and max(kept) < 60 and out.spec_stats.num_steps == 1
    for r in range(2):
        assert torch.equal(out.sequences[r, : 3 + kept[r]], full[r, : 3 + kept[r]])


def processed_joint(model, penalty: float, min_p: float) -> torch.Tensor:
    """P(t1, t2 | prompt) from HF's own processors (repetition penalty, then min-p), [V, V]."""
    procs = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(penalty)] if penalty != 1.0 else [])
    if min_p:
        procs.append(MinPLogitsWarper(min_p))
    with torch.no_grad():
        ids = torch.tensor([PROMPT])
        p1 = procs(ids, model(ids).logits[:, -1]).softmax(-1)[0]
        seqs = torch.cat([ids.repeat(V, 1), torch.arange(V).unsqueeze(1)], dim=1)
        p2 = procs(seqs, model(seqs).logits[:, -1]).softmax(-1)
    return p1.unsqueeze(1) * p2


def sampling_drafter(kind, target):
    """The drafters of tests/test_sampling.py, plus ones whose processed q matters most: the
    target drafting for itself (q equals the processed p) and a reduced-vocabulary EAGLE tree."""
    from test_sampling import drafter_for
    if kind == "self_draft":
        return DraftModel(target, num_tokens=3)
    if kind == "eagle_tree_reduced_vocab":
        head = noisy(EagleHeadModel.from_target(target, AUX, draft_vocab=torch.arange(0, V, 2)), scale=0.3)
        return EagleHead(head, tree_topk=2, tree_depth=2, tree_nodes=4)
    return None if kind == "none" else drafter_for(kind)


@pytest.mark.parametrize("penalty, min_p", [(1.8, 0.0), (1.0, 0.3)], ids=["repetition_penalty", "min_p"])
@pytest.mark.parametrize("kind", ["draft_model", "self_draft", "draft_tree", "layerskip", "eagle_tree_reduced_vocab",
                                  "lookup_branches", "none"])
def test_sampling_keeps_the_processed_distribution(penalty, min_p, kind):
    """Sampling with processed draft q keeps the processed target distribution (chi-square on
    the first two tokens), for drafters with q (chains, trees, early exit, a reduced vocabulary)."""
    target = make_tiny("llama", vocab_size=V, init_range=0.15, seed=11)
    torch.manual_seed(4321)
    spec = specdec.wrap(target, drafter=sampling_drafter(kind, target))
    ids = torch.tensor([PROMPT]).repeat(6000, 1)
    out = spec.generate(ids, max_new_tokens=2, do_sample=True, top_k=0, repetition_penalty=penalty, min_p=min_p,
                        pad_token_id=0, eos_token_id=None)
    t1, t2 = out[:, len(PROMPT)], out[:, len(PROMPT) + 1]
    counts = torch.bincount(t1 * V + t2, minlength=V * V).view(V, V).double()
    exact = processed_joint(target, penalty, min_p)
    assert chi2_pvalue(counts, exact) > 1e-3
    # The same test rejects the unprocessed target: the option matters and the test has power.
    assert chi2_pvalue(counts, processed_joint(target, 1.0, 0.0)) < 1e-6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["lookup", "draft_model", "draft_tree", "layer_skip"])
def test_processors_inside_captured_graphs(kind):
    """Processed verification and processed drafts (chains, tree search paths) captured whole."""
    model = make_tiny("llama", vocab_size=VOCAB, init_range=0.3).cuda()
    ids, mask = ragged_batch([6, 11, 3, 8], VOCAB, seed=1)
    kwargs = OPTIONS["all_at_once"]
    want = hf_rows(model, ids.cuda(), mask.cuda(), 20, **kwargs)
    spec = specdec.wrap(model, drafter=drafter(kind, model), cuda_graphs=True)
    got = spec.generate(ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=20, pad_token_id=0, **kwargs)
    for r in range(4):
        assert got[r, ids.shape[1]:][: len(want[r])].tolist() == want[r].tolist(), f"row {r}"


@pytest.mark.parametrize("kind", ["lookup", "draft_tree"])
def test_processors_over_several_steps_per_sync(model, kind):
    """chunk_steps=3: the processors read the prefix from the device buffers, steps after steps."""
    kwargs = OPTIONS["all_at_once"]
    ids, mask = ragged_batch([6, 11, 3, 8], VOCAB, seed=1)
    want = hf_rows(model, ids, mask, 20, **kwargs)
    spec = specdec.wrap(model, drafter=drafter(kind, model), chunk_steps=3)
    got = spec.generate(ids, attention_mask=mask, max_new_tokens=20, pad_token_id=0, **kwargs)
    for r in range(4):
        assert got[r, ids.shape[1]:][: len(want[r])].tolist() == want[r].tolist(), f"row {r}"


@pytest.mark.zoo
def test_smollm2_processors_equal_hf_batched(smollm2):
    """A real model and HF's own padded batch (HF leaves the left padding out of the penalty)."""
    from test_real_models import PROMPTS, assert_equals_hf_greedy, chat_batch, first_layers
    model, tok = smollm2
    enc = chat_batch(tok, PROMPTS)
    kw = dict(attention_mask=enc.attention_mask, max_new_tokens=24, do_sample=False, pad_token_id=tok.pad_token_id,
              repetition_penalty=1.1, no_repeat_ngram_size=3)
    assert_equals_hf_greedy(model, enc, kw, {
        "lookup": PromptLookup(num_tokens=6, max_ngram=3),
        "draft_tree": DraftModel(first_layers(model, 6), num_tokens=3, tree_width=3, tree_nodes=12),
    })

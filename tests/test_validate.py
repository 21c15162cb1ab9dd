"""Bad input to generate, bad model output under sampling and malformed draft trees fail loudly:
each error names the problem and the fix; nothing returns silently wrong tokens."""
import pytest
import torch
from tiny import hf_greedy, make_tiny, ragged_batch

import specdec
from specdec.drafters import DraftModel, Drafter, DraftSpec, PromptLookup
from specdec.verifiers import DraftTree

IDS = torch.tensor([[5, 6, 7, 8]])


@pytest.fixture(scope="module")
def model():
    return make_tiny("llama")


def gen(model, ids=IDS, **kwargs):
    kwargs.setdefault("max_new_tokens", 4)
    kwargs.setdefault("pad_token_id", 0)
    kwargs.setdefault("eos_token_id", None)
    return specdec.wrap(model, drafter=PromptLookup(num_tokens=3)).generate(ids, **kwargs)


# ---------------------------------------------------------------- generate's inputs
@pytest.mark.parametrize("ids, error, words", [
    (IDS.float() + 0.7, TypeError, r"input_ids must hold integer token ids, got dtype torch\.float32"),
    (IDS.double(), TypeError, "integer token ids"),
    (IDS.bool(), TypeError, "integer token ids"),
    (IDS[0], TypeError, r"\[batch, length\].*unsqueeze\(0\)"),
    ([[5, 6, 7]], TypeError, r"\[batch, length\] integer tensor, got list"),
    (IDS + 300, ValueError, r"input_ids\[0, 0\] = 305 is outside the model's vocabulary of 256 ids"),
    (torch.tensor([[5, -1, 7]]), ValueError, r"input_ids\[0, 1\] = -1 is outside"),
])
def test_bad_input_ids(model, ids, error, words):
    with pytest.raises(error, match=words):
        gen(model, ids)


def test_float_ids_are_refused_where_they_used_to_be_truncated(model):
    """The old path cast 5.7 to 5 and decoded a prompt the caller never wrote."""
    with pytest.raises(TypeError, match="truncated"):
        gen(model, IDS.float() + 0.7)
    assert gen(model, IDS).shape == (1, 8)  # the same ids as integers decode


def test_padding_may_hold_any_value_real_tokens_may_not(model):
    ids, mask = ragged_batch([2, 4], model.config.vocab_size)
    padded = ids.clone()
    padded[0, :2] = -100  # padding (mask 0) is never embedded: any filler is fine, as in HF's masks
    out = gen(model, padded, attention_mask=mask)
    assert torch.equal(out[:, ids.shape[1]:], gen(model, ids, attention_mask=mask)[:, ids.shape[1]:])
    padded[1, 0] = 256  # a real token (mask 1) outside the vocabulary
    with pytest.raises(ValueError, match=r"input_ids\[1, 0\] = 256 is outside"):
        gen(model, padded, attention_mask=mask)


@pytest.mark.parametrize("mask, error, words", [
    (torch.ones(1, 3, dtype=torch.long), ValueError,
     r"attention_mask has shape \(1, 3\) but input_ids has shape \(1, 4\)"),
    (torch.ones(2, 4, dtype=torch.long), ValueError, r"attention_mask has shape \(2, 4\)"),
    (torch.tensor([[0, 1, 2, 1]]), ValueError, r"attention_mask\[0, 2\] is 2; a mask holds 1 for real tokens"),
    (torch.tensor([[0.0, 0.5, 1.0, 1.0]]), ValueError, r"attention_mask\[0, 1\] is 0\.5"),
    ([[1, 1, 1, 1]], TypeError, "attention_mask must be a tensor"),
])
def test_bad_attention_mask(model, mask, error, words):
    with pytest.raises(error, match=words):
        gen(model, attention_mask=mask)


def test_float_and_bool_masks_of_zeros_and_ones_are_accepted(model):
    mask = torch.tensor([[0, 1, 1, 1]])
    ref = gen(model, attention_mask=mask)
    assert torch.equal(gen(model, attention_mask=mask.float()), ref)
    assert torch.equal(gen(model, attention_mask=mask.bool()), ref)


@pytest.mark.parametrize("kwargs, words", [
    (dict(max_new_tokens=2.5), r"max_new_tokens must be a whole number of tokens, got 2\.5 \(float\)"),
    (dict(max_new_tokens="8"), r"max_new_tokens must be a whole number of tokens, got '8' \(str\)"),
    (dict(max_new_tokens=True), "max_new_tokens must be a whole number"),
    (dict(max_new_tokens=None, max_length=9.0), "max_length must be a whole number"),
])
def test_non_integer_lengths(model, kwargs, words):
    with pytest.raises(TypeError, match=words):
        gen(model, **kwargs)


def test_integer_like_lengths_and_hf_default_length(model):
    ref = gen(model, max_new_tokens=5)
    assert torch.equal(gen(model, max_new_tokens=torch.tensor(5)), ref)
    import numpy as np

    assert torch.equal(gen(model, max_new_tokens=np.int64(5)), ref)
    # Neither max_new_tokens nor max_length: HF's default max_length (20, prompt included).
    assert torch.equal(gen(model, max_new_tokens=None), hf_greedy(model, IDS, eos_token_id=None))
    with pytest.raises(ValueError, match="max_length=3 leaves no room for new tokens after a prompt of 4"):
        gen(model, max_new_tokens=None, max_length=3)


@pytest.mark.parametrize("pad", [256, -1])
def test_pad_token_outside_vocabulary(model, pad):
    with pytest.raises(ValueError, match=rf"pad_token_id={pad} is not a token id of the model \(0 \.\. 255\)"):
        gen(model, pad_token_id=pad)


def test_error_classes():
    from specdec.validate import InvalidGenerateInput, InvalidGenerateInputType, InvalidLogits

    assert issubclass(InvalidGenerateInputType, TypeError) and issubclass(InvalidGenerateInputType, ValueError)
    assert issubclass(InvalidGenerateInput, ValueError)
    assert issubclass(InvalidLogits, RuntimeError)  # what HF's torch.multinomial raises


# ---------------------------------------------------------------- NaN / inf logits under sampling
class PoisonAfter:
    """Make the model's logits ``value`` at every position whose input token is ``token`` (a
    forward pre-hook on the embedding records the ids; a hook on the LM head rewrites its output).
    Both HF's forward and specdec's runner call these two modules, so both see the same logits."""

    def __init__(self, model, token: int, value: float):
        self.token, self.value, self.ids = token, value, None
        self.handles = [model.get_input_embeddings().register_forward_pre_hook(self._record),
                        model.lm_head.register_forward_hook(self._poison)]

    def _record(self, module, args):
        self.ids = args[0]

    def _poison(self, module, args, out):
        at = self.ids[:, -out.shape[1]:] == self.token  # [B, Q]: HF's LM head sees the last positions only
        if self.value == float("-inf"):
            return torch.where(at.unsqueeze(-1), torch.full_like(out, self.value), out)
        one = torch.arange(out.shape[-1], device=out.device) == 9  # NaN or +inf in one entry is enough
        return torch.where(at.unsqueeze(-1) & one, torch.full_like(out, self.value), out)

    def remove(self):
        for h in self.handles:
            h.remove()


def first_new_token(model, ids, max_new=16):
    """(position k, token) of the first greedy token that appears nowhere earlier, with k >= 3."""
    free = hf_greedy(model, ids, max_new_tokens=max_new, eos_token_id=None)[0, ids.shape[1]:].tolist()
    for k, tok in enumerate(free):
        if k >= 3 and tok not in ids[0].tolist() + free[:k]:
            return k, tok
    raise AssertionError("no fresh token in the free run")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "all_-inf"])
def test_invalid_logits_raise_under_sampling_where_hf_does(value):
    """Token T's logits are poisoned. Sampling with top_k=1 follows the greedy path, so the call
    that emits T last never samples after it and succeeds, and one more token raises, in HF and
    specdec alike, for every drafter and with several steps per sync. A drafted but rejected T
    (lookup proposes tokens before the target emits them) must not raise."""
    model = make_tiny("llama")
    k, tok = first_new_token(model, IDS)
    poison = PoisonAfter(model, tok, value)
    try:
        sample = dict(do_sample=True, top_k=1, pad_token_id=0, eos_token_id=None)
        ok = model.generate(IDS, max_new_tokens=k + 1, **sample)
        assert ok[0, -1] == tok
        with pytest.raises(RuntimeError, match="probability tensor contains either `inf`, `nan` or element < 0"):
            model.generate(IDS, max_new_tokens=k + 3, **sample)
        drafters = {"none": (None, 1), "lookup": (PromptLookup(num_tokens=4, max_ngram=2), 1),
                    "lookup_chunked": (PromptLookup(num_tokens=4, max_ngram=2), 3),
                    "draft_model": (DraftModel(make_tiny("llama", seed=1), num_tokens=3), 3)}
        for name, (drafter, steps) in drafters.items():
            spec = specdec.wrap(model, drafter=drafter, chunk_steps=steps)
            assert torch.equal(spec.generate(IDS, max_new_tokens=k + 1, **sample), ok), name
            with pytest.raises(RuntimeError, match=rf"logits for row 0 at new token {k + 1} hold NaN or \+inf"):
                spec.generate(IDS, max_new_tokens=k + 3, **sample)
    finally:
        poison.remove()


def test_invalid_logits_under_greedy_decode_as_hf_does():
    """HF's greedy argmax takes NaN logits without complaint (it picks the NaN); so does specdec."""
    model = make_tiny("llama")
    k, tok = first_new_token(model, IDS)
    poison = PoisonAfter(model, tok, float("nan"))
    try:
        ref = hf_greedy(model, IDS, max_new_tokens=k + 4, eos_token_id=None)
        out = specdec.wrap(model, drafter=PromptLookup(num_tokens=3)).generate(
            IDS, max_new_tokens=k + 4, pad_token_id=0, eos_token_id=None)
        assert torch.equal(out, ref)
    finally:
        poison.remove()


def test_invalid_logits_in_one_row_name_that_row():
    model = make_tiny("llama")
    k, tok = first_new_token(model, IDS)
    ids = torch.cat([torch.tensor([[9, 10, 11, 12]]), IDS])  # row 1 is IDS: it reaches T at new token k
    poison = PoisonAfter(model, tok, float("nan"))
    try:
        with pytest.raises(RuntimeError, match=rf"row 1 at new token {k + 1}"):
            specdec.wrap(model).generate(ids, max_new_tokens=k + 3, do_sample=True, top_k=1, pad_token_id=0,
                                         eos_token_id=None)
    finally:
        poison.remove()


def literal_logits(rows):
    """``[B, 1 + N, 4]`` logits, position j of row b NaN where ``rows[b][j]`` is 'x', else finite."""
    out = torch.zeros(len(rows), len(rows[0]), 4)
    for b, row in enumerate(rows):
        for j, c in enumerate(row):
            if c == "x":
                out[b, j, 1] = float("nan")
    return out


def test_step_faults_mark_the_first_bad_draw_on_the_accepted_path():
    from specdec.validate import TREE_FAULT, step_faults

    tree = DraftTree.chain(torch.tensor([[1, 2, 3]] * 4))
    #                         root n0   n1   n2      accepted path
    logits = literal_logits([["x", ".", ".", "."],   # [0, 1]: the root draw is bad -> draw 0
                             [".", ".", "x", "."],   # [0, 1]: after node 1 (draw 2) is bad
                             [".", ".", ".", "x"],   # [0, 1]: node 2 is rejected: never a draw
                             [".", "x", "x", "."]])  # []: only the root is a draw
    path = torch.tensor([[0, 1, -1], [0, 1, -1], [0, 1, -1], [-1, -1, -1]])
    assert step_faults(tree, logits, path, True, 1.0).tolist() == [1, 3, 0, 0]
    assert step_faults(tree, logits, path, False, 1.0).tolist() == [0, 0, 0, 0]  # greedy draws nothing
    huge = torch.zeros(1, 1, 4)
    huge[0, 0, 2] = 3e38  # finite, but over a temperature of 0.1 it overflows to +inf, as in HF's warper
    assert step_faults(DraftTree.empty(1, "cpu"), huge, torch.zeros(1, 0, dtype=torch.long), True, 0.1).tolist() == [1]
    bad = DraftTree.chain(torch.tensor([[1, 2, 3]] * 2))
    bad.parents[1, 2] = 2  # past the constructor's check (as on a GPU, where nothing is checked on the host)
    assert step_faults(bad, torch.zeros(2, 4, 4), path[:2], True, 1.0).tolist() == [0, TREE_FAULT]


def test_host_raises_only_for_draws_a_row_reaches():
    from specdec.driver import Rows
    from specdec.validate import InvalidLogits

    def rows():
        return Rows([[5]], max_new_tokens=5, eos_ids={2})

    # Step 0 keeps 3 tokens, EOS (2) among them at draw 1; step 1 has a bad draw: never reached.
    r = rows()
    assert r.take(0, [3, 2], [2, 2], [0, 1], [7, 2, 8, 9, 9], True) == (1, 2)
    assert r.generated == [[7, 2]]
    # The bad draw is draw 2 of step 0 (fault 3); max_new_tokens ends the row at draw 1.
    r = Rows([[5]], max_new_tokens=2, eos_ids=set())
    r.take(0, [3], [3], [3], [7, 8, 9], True)
    assert r.generated == [[7, 8]]
    # Reached: two tokens kept, then the bad draw.
    r = rows()
    with pytest.raises(InvalidLogits, match="row 0 at new token 2"):
        r.take(0, [3], [3], [3], [7, 8, 9], True)


# ---------------------------------------------------------------- DraftTree parents
@pytest.mark.parametrize("parents, words", [
    ([[-1, 1, 1]], "node 1 has parent 1, a self-loop"),
    ([[-1, 2, 1]], r"node 1 has parent 2, a cycle 1 -> 2 -> 1"),
    ([[1, 0, 1]], r"node 0 has parent 1, a cycle 0 -> 1 -> 0"),
    ([[-1, 2, -1]], r"node 1 has parent 2, a forward reference \(the parent comes after its child\)"),
    ([[-1, 2, 2]], r"node 1 has parent 2, leading into the cycle 2 -> 2"),
    ([[-1, 0, 5]], r"node 2 has parent 5, out of range \(nodes are 0 \.\. 2, and -1 is the root\)"),
    ([[-3, 0, 1]], "node 0 has parent -3, out of range"),
    ([[-1, 0, 1], [-1, 0, 2]], "row 1: node 2 has parent 2, a self-loop"),
])
def test_parents_that_are_not_a_forest(parents, words):
    """Today these compiled silently with wrong depths, or failed with a raw IndexError."""
    from specdec.verifiers.tree import MalformedDraftTree

    p = torch.tensor(parents)
    with pytest.raises(MalformedDraftTree, match=words) as err:
        DraftTree(tokens=torch.zeros_like(p), parents=p, valid=torch.ones_like(p, dtype=torch.bool))
    assert "each node's parent must be -1 (the root) or an earlier node" in str(err.value)
    assert isinstance(err.value, ValueError)


def test_float_parents_are_refused():
    with pytest.raises(ValueError, match=r"DraftTree.parents must hold integer indices, got dtype torch.float32"):
        DraftTree(tokens=torch.zeros(1, 2, dtype=torch.long), parents=torch.tensor([[-1.0, 0.0]]),
                  valid=torch.ones(1, 2, dtype=torch.bool))


class TamperingDrafter(Drafter):
    """Builds a valid chain, then breaks it in place: the tree the step sees was never checked on
    the host, like a tree built on a GPU."""

    spec = DraftSpec(num_nodes=3)

    def __init__(self, parents, row=0, after=0):
        self.parents, self.row, self.after, self.calls = parents, row, after, 0

    def propose(self, state):
        b = state.tokens.shape[0]
        tree = DraftTree.chain(torch.full((b, 3), 7, dtype=torch.long))
        if self.calls >= self.after:
            tree.parents[self.row] = torch.tensor(self.parents)
        self.calls += 1
        return tree


@pytest.mark.parametrize("steps", [1, 3], ids=["per_step", "3_per_sync"])
def test_engine_refuses_a_tree_broken_after_its_check(model, steps):
    from specdec.verifiers.tree import MalformedDraftTree

    ids, mask = ragged_batch([3, 5], model.config.vocab_size)
    spec = specdec.wrap(model, drafter=TamperingDrafter([-1, 2, 1], row=1, after=2), chunk_steps=steps)
    with pytest.raises(MalformedDraftTree, match=r"DraftTree for row 1 \(after \d+ new tokens\) is not a forest"):
        spec.generate(ids, attention_mask=mask, max_new_tokens=12, pad_token_id=0, eos_token_id=None)
    # Changed in place into another forest (two children of the root, one grandchild): still exact.
    spec = specdec.wrap(model, drafter=TamperingDrafter([-1, -1, 1], row=1, after=2), chunk_steps=steps)
    out = spec.generate(ids, attention_mask=mask, max_new_tokens=12, pad_token_id=0, eos_token_id=None)
    assert torch.equal(out, hf_greedy(model, ids, mask, max_new_tokens=12, eos_token_id=None))


# ---------------------------------------------------------------- the same marks inside captured steps
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
def test_captured_sampling_raises_for_invalid_logits_only_where_reached():
    """Eight steps per sync in one CUDA graph, pipelined: the mark is set on the device and read
    with the run's results, never synced inside it."""
    model = make_tiny("llama").cuda()
    ids = IDS.cuda()
    k, tok = first_new_token(model, ids)
    poison = PoisonAfter(model, tok, float("nan"))
    try:
        sample = dict(do_sample=True, top_k=1, pad_token_id=0, eos_token_id=None)
        ok = model.generate(ids, max_new_tokens=k + 1, **sample)
        for drafter in (None, PromptLookup(num_tokens=4, max_ngram=2)):
            spec = specdec.wrap(model, drafter=drafter, cuda_graphs=True)
            assert torch.equal(spec.generate(ids, max_new_tokens=k + 1, **sample), ok)
            with pytest.raises(RuntimeError, match=rf"row 0 at new token {k + 1} hold NaN"):
                spec.generate(ids, max_new_tokens=k + 3, **sample)
    finally:
        poison.remove()


class BrokenOnDevice(Drafter):
    """A chain whose row 1 points node 1 at node 2, on the GPU (no host check at construction)."""

    spec = DraftSpec(num_nodes=3)

    def __init__(self):
        self.bad = None

    def propose(self, state):
        dev = state.tokens.device
        if self.bad is None:  # made in the warm-up before capture: no host copy inside the graph
            self.bad = torch.tensor([-1, 2, 1], device=dev)
        tree = DraftTree.chain(torch.full((state.tokens.shape[0], 3), 7, dtype=torch.long, device=dev))
        tree.parents[1] = self.bad
        return tree


@cuda
def test_captured_steps_refuse_a_malformed_tree():
    from specdec.verifiers.tree import MalformedDraftTree

    model = make_tiny("llama").cuda()
    ids, mask = (t.cuda() for t in ragged_batch([3, 5], model.config.vocab_size))
    spec = specdec.wrap(model, drafter=BrokenOnDevice(), cuda_graphs=True)
    with pytest.raises(MalformedDraftTree, match="DraftTree for row 1 .* is not a forest"):
        spec.generate(ids, attention_mask=mask, max_new_tokens=12, pad_token_id=0, eos_token_id=None)

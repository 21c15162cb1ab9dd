"""Compile once: with ``compile=True``, a warm wrapper meets a new prompt length without
compiling anything new (issue 15 item 4), for the drafters whose host-side catch-up over the
prompt has shapes that follow the prompt length (head drafters, the Kangaroo adapter). That
catch-up runs eager; the per-step forwards are the compiled ones.

On the CPU the compiled step is inductor's C++ code, so these are real compiles (marked slow:
each takes a minute or so on two cores).
"""
import pytest
import torch
from heads_util import AUX, noisy
from tiny import hf_greedy, make_tiny, ragged_batch

import specdec
from specdec.drafters import EagleHead, KangarooAdapter, PromptLookup
from specdec.drafters.heads import EagleHeadModel
from specdec.drafters.kangaroo_adapter import KangarooAdapterModel


def drafter(kind, model):
    if kind == "eagle":
        return EagleHead(noisy(EagleHeadModel.from_target(model, AUX)), num_tokens=3)
    if kind == "eagle_tree":
        return EagleHead(noisy(EagleHeadModel.from_target(model, AUX)), tree_topk=2, tree_depth=2, tree_nodes=4)
    if kind == "kangaroo":
        return KangarooAdapter(noisy(KangarooAdapterModel.from_target(model, 1)), num_tokens=3)
    return PromptLookup(num_tokens=3, max_ngram=2)


def frames() -> int:
    from torch._dynamo.utils import counters

    return sum(counters["frames"].values())


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["eagle", "eagle_tree", "kangaroo", "lookup"])
def test_new_prompt_lengths_compile_nothing(kind):
    torch._dynamo.reset()
    model = make_tiny("llama", num_layers=2)
    spec = specdec.wrap(model, drafter=drafter(kind, model), compile=True, chunk_steps=2)
    seen = []
    for i, lengths in enumerate(([5, 11], [17, 3], [29, 8])):
        ids, mask = ragged_batch(lengths, model.config.vocab_size, seed=i)
        ref = hf_greedy(model, ids, mask, max_new_tokens=12, eos_token_id=None)
        out = spec.generate(ids, attention_mask=mask, max_new_tokens=12, pad_token_id=0, eos_token_id=None)
        assert torch.equal(out, ref), (kind, lengths)
        seen.append(frames())
    assert seen[0] > 0, "nothing was compiled: the test would not notice a recompile"
    assert seen[1] == seen[0] and seen[2] == seen[0], f"{kind}: frames compiled per call {seen}"

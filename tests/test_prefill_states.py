"""Head drafters read the prompt's hidden states from the target's own prefill.

``DraftSpec.prefill_hidden``: the prefill collects ``spec.hidden_layers`` chunk by chunk and hands
them to ``observe_prefill`` (inside the captured prefill on CUDA), so ``begin`` runs no second
target forward over the prompt. Invariants, on the chunked (static) prefill that the compiled and
captured paths use, with prompts longer than several chunks and ragged rows:

- greedy output equals HF greedy;
- every draft equals the draft of the old path (``begin`` re-running the target over the prompt);
- ``begin`` calls the target's forward zero times on the new path (and some on the old one).
"""
import dataclasses

import pytest
import torch
from heads_util import eagle, generate, medusa, recording
from tiny import hf_greedy, make_tiny, ragged_batch

from specdec.engine import SpecEngine
from specdec.step import PREFILL_CHUNK


def run(model, drafter, ids, mask, prefill_hidden, monkeypatch):
    """Generate through the static (chunked) prefill; returns (output, drafts, target forwards in begin)."""
    if not prefill_hidden:
        drafter.spec = dataclasses.replace(drafter.spec, prefill_hidden=False)
    seen = recording(drafter)
    calls = {"in_begin": False, "n": 0}
    begin = drafter.begin

    def counted_begin(state):
        forward = state.target.forward

        def counting(*a, **k):
            calls["n"] += 1
            return forward(*a, **k)
        state.target.forward = counting
        try:
            begin(state)
        finally:
            del state.target.forward  # the instance attribute goes; the class method shows again
    drafter.begin = counted_begin
    monkeypatch.setattr(SpecEngine, "static", property(lambda self: True))
    out = generate(model, drafter, ids, mask, n=20, chunk_steps=2)
    return out, [d for _, d in seen], calls["n"]


@pytest.mark.parametrize("kind", ["eagle", "medusa"])
def test_prefill_gives_heads_the_prompt_states(kind, monkeypatch):
    model = make_tiny("llama")
    lengths = [2 * PREFILL_CHUNK + 45, PREFILL_CHUNK + 3]  # three chunks, and a row whose prompt ends mid-chunk
    ids, mask = ragged_batch(lengths, model.config.vocab_size, seed=5)
    ref = hf_greedy(model, ids, mask, max_new_tokens=20, eos_token_id=None)
    def make():  # the same random-init head twice (the heads' own init draws from the global RNG)
        torch.manual_seed(0)
        return (eagle if kind == "eagle" else medusa)(model)
    new, new_drafts, new_calls = run(model, make(), ids, mask, True, monkeypatch)
    old, old_drafts, old_calls = run(model, make(), ids, mask, False, monkeypatch)
    assert torch.equal(new.sequences, ref) and torch.equal(old.sequences, ref)
    assert new_calls == 0 and old_calls > 0, (new_calls, old_calls)
    assert len(new_drafts) == len(old_drafts) > 0
    for a, b in zip(new_drafts, old_drafts):
        assert torch.equal(a, b)

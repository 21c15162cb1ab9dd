"""Head drafters read the prompt's hidden states from the target's own prefill.

``DraftSpec.prefill_hidden``: the prefill collects ``spec.hidden_layers`` chunk by chunk and hands
them to ``observe_prefill`` (inside the captured prefill on CUDA), so ``begin`` runs no second
target forward over the prompt. Invariants, on the chunked (static) prefill that the compiled and
captured paths use, with prompts longer than several chunks and ragged rows:

- greedy output equals HF greedy;
- every draft equals the draft of the old path (``begin`` re-running the target over the prompt);
- ``begin`` calls the target's forward zero times on the new path (and some on the old one);
- the EAGLE head's and the Kangaroo adapter's K/V over the prompt, written inside the prefill,
  equal the old path's.
"""
import dataclasses

import pytest
import torch
from heads_util import eagle, generate, kangaroo, medusa, recording
from tiny import hf_greedy, make_tiny, ragged_batch

from test_sparse_kv import small_sparse

from specdec.drafters import Hierarchical
from specdec.engine import SpecEngine
from specdec.step import PREFILL_CHUNK


def run(model, drafter, ids, mask, prefill_hidden, monkeypatch):
    """Generate through the static (chunked) prefill; returns (output, drafts, target forwards in begin)."""
    if not prefill_hidden:
        drafter.spec = dataclasses.replace(drafter.spec, prefill_hidden=False)
    seen = recording(drafter)
    calls = {"n": 0, "cache": None}
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
        if calls["cache"] is None and getattr(drafter, "cache", None) is not None:
            calls["cache"] = [t.clone() for t in drafter.cache.k + drafter.cache.v]  # the head's K/V after begin
    drafter.begin = counted_begin
    monkeypatch.setattr(SpecEngine, "static", property(lambda self: True))
    out = generate(model, drafter, ids, mask, n=20, chunk_steps=2)
    return out, [d for _, d in seen], calls["n"], calls["cache"]


MAKERS = {"eagle": eagle, "medusa": medusa, "kangaroo": lambda model: kangaroo(model, scale=0.3),
          # TriForce's hierarchy with an EAGLE head on top: the head's prompt states come from the prefill too
          "eagle_over_sparse": lambda model: Hierarchical(eagle(model), small_sparse(num_tokens=7, window=12), rounds=2)}


@pytest.mark.parametrize("kind", sorted(MAKERS))
def test_prefill_gives_heads_the_prompt_states(kind, monkeypatch):
    model = make_tiny("llama")
    lengths = [2 * PREFILL_CHUNK + 45, PREFILL_CHUNK + 3]  # three chunks, and a row whose prompt ends mid-chunk
    ids, mask = ragged_batch(lengths, model.config.vocab_size, seed=5)
    ref = hf_greedy(model, ids, mask, max_new_tokens=20, eos_token_id=None)
    def make():  # the same random-init head twice (the heads' own init draws from the global RNG)
        torch.manual_seed(0)
        return MAKERS[kind](model)
    new, new_drafts, new_calls, new_kv = run(model, make(), ids, mask, True, monkeypatch)
    old, old_drafts, old_calls, old_kv = run(model, make(), ids, mask, False, monkeypatch)
    assert torch.equal(new.sequences, ref) and torch.equal(old.sequences, ref)
    assert new_calls == 0 and old_calls > 0, (new_calls, old_calls)
    assert len(new_drafts) == len(old_drafts) > 0
    for a, b in zip(new_drafts, old_drafts):
        assert torch.equal(a, b)
    if kind in ("eagle", "kangaroo"):  # the head's own K/V over the prompt: [B, H, S, D] per layer, K then V
        width = max(lengths) + 1  # the engine's width: one slot of padding (lookback 1)
        # Kangaroo: every committed prompt slot; EAGLE: those begin fed (token j over feature j - 1),
        # which stop ``window`` slots before the root (propose rewrites those).
        end = width - 1 - (make().window if kind == "eagle" else 0)
        real = torch.zeros(len(lengths), width - 1, dtype=torch.bool)
        for r, n in enumerate(lengths):
            real[r, width - n: end] = True  # right-aligned: slots start .. width - 2, the root at width - 1
        for a, b in zip(new_kv, old_kv):
            a, b = a[:, :, :width - 1].transpose(1, 2)[real], b[:, :, :width - 1].transpose(1, 2)[real]
            assert a.abs().max() > 0
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)

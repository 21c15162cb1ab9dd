"""The host driver wastes no run: a pipelined run is queued only when some row will still need it.

A drafter that keeps many tokens per step finishes a row in fewer steps than the one-token-per-step
guess; the driver must predict that from what it measured, so the steps it launched past the
last step any row used stay below one run. Greedy output stays HF's.
"""
import pytest
import torch
from tiny import hf_greedy, make_tiny, ragged_batch
from test_engine import count_launches as engine_launches

import specdec
from specdec.drafters import DraftModel, PromptLookup

RUN = 8  # chunk_steps


def count_launches(monkeypatch) -> list[bool]:
    """The drafting flag of every run of steps the engine launches (read back or not)."""
    return engine_launches(None, monkeypatch)


def repetitive():
    """A model whose greedy text settles into one repeated token, and a prompt already in that
    loop: prompt lookup copies it and keeps a whole draft almost every step."""
    model = make_tiny("llama", vocab_size=32, init_range=1.0)
    ids = torch.tensor([[5, 9, 7, 25, 2, 18, 1, 0, 0, 0, 0]])
    return model, ids, torch.ones_like(ids), PromptLookup(num_tokens=8, max_ngram=3)


def self_draft(lengths):
    """The target drafting for itself: every draft token is accepted (τ = num_tokens + 1)."""
    model = make_tiny("llama")
    ids, mask = ragged_batch(lengths, model.config.vocab_size, seed=4)
    return model, ids, mask, DraftModel(model, num_tokens=4)


@pytest.mark.parametrize("case", ["lookup_batch1", "self_draft_batch1", "self_draft_batch4_ragged"])
def test_no_run_is_queued_past_the_last_token(case, monkeypatch):
    model, ids, mask, drafter = {"lookup_batch1": repetitive, "self_draft_batch1": lambda: self_draft([7]),
                                 "self_draft_batch4_ragged": lambda: self_draft([3, 9, 1, 6])}[case]()
    new = 100
    ref = hf_greedy(model, ids, mask, max_new_tokens=new, eos_token_id=None)
    launched = count_launches(monkeypatch)
    out = specdec.wrap(model, drafter=drafter, chunk_steps=RUN, pipeline=True).generate(
        ids, attention_mask=mask, max_new_tokens=new, pad_token_id=0, eos_token_id=None, return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref)
    stats = out.spec_stats
    assert stats.tau > 3  # several tokens per step: one token a step would overestimate the steps left
    used = max(len(r) for r in stats.accepted_lengths)  # the last step some row still needed
    assert len(launched) * RUN - used < RUN  # at most the tail of the last run goes unused
    assert stats.num_steps == len(launched) * RUN  # every launched step is counted
    assert stats.idle_steps == stats.num_steps - used


def test_a_run_is_queued_while_rows_still_need_it(monkeypatch):
    # The prediction must not turn pipelining off: a long plain decode queues the next run at
    # every read but the last, so it launches exactly the runs it needs and wastes none.
    model = make_tiny("llama")
    ids, mask = ragged_batch([3, 9], model.config.vocab_size, seed=4)
    launched = count_launches(monkeypatch)
    queued = []
    real = specdec.driver.Driver._launch

    def spy(self, draft, upper):
        queued.append(len(self.queue))  # 1: queued behind a run not yet read
        return real(self, draft, upper)
    monkeypatch.setattr(specdec.driver.Driver, "_launch", spy)
    out = specdec.wrap(model, chunk_steps=RUN, pipeline=True).generate(
        ids, attention_mask=mask, max_new_tokens=6 * RUN, pad_token_id=0, eos_token_id=None,
        return_dict_in_generate=True)
    assert torch.equal(out.sequences, hf_greedy(model, ids, mask, max_new_tokens=6 * RUN, eos_token_id=None))
    assert len(launched) == 6 and out.spec_stats.idle_steps == 0
    assert queued == [0] + [1] * 5  # every run after the first was queued ahead

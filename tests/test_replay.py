"""Replaying a drafter over recorded greedy outputs (specdec.bench.replay) predicts the engine."""
import pytest
from tiny import make_tiny, ragged_batch

import specdec
from specdec.bench.replay import accepted_length, replay_steps
from specdec.drafters import CopySpec, DraftModel, PromptLookup


def test_accepted_length_follows_the_matching_path():
    # root -> a -> b, and a sibling branch root -> a' -> c: the truth "a b x" keeps 2.
    tokens, parents, valid = [5, 6, 7, 8], [-1, 0, -1, 2], [True, True, True, True]
    assert accepted_length(tokens, parents, valid, [5, 6, 9]) == 2
    assert accepted_length(tokens, parents, valid, [7, 8, 1]) == 2   # the second branch
    assert accepted_length(tokens, parents, valid, [7, 6]) == 1      # b hangs under a, not a'
    assert accepted_length(tokens, parents, [True, False, True, True], [5, 6]) == 1   # invalid nodes never count
    assert accepted_length(tokens, parents, valid, [1]) == 0


DRAFTERS = {
    "lookup": lambda: PromptLookup(num_tokens=4, max_ngram=2),
    "lookup-3-branches": lambda: PromptLookup(num_tokens=4, max_ngram=2, num_branches=3),
    "copyspec": lambda: CopySpec(gamma=2, num_tokens=6),
    "copyspec+lookup": lambda: CopySpec(gamma=3, num_tokens=6, fallback=PromptLookup(num_tokens=3, max_ngram=2)),
}


@pytest.mark.parametrize("name", list(DRAFTERS))
def test_replay_predicts_the_engines_step_count(name):
    """The engine's greedy steps equal the replay's over the engine's own output: these drafters
    see only committed tokens, so the recorded output fixes every proposal."""
    model = make_tiny("llama", vocab_size=16, init_range=1.0, num_layers=1)
    ids, mask = ragged_batch([6, 2, 11], 16, seed=3)
    accepted = 0
    for row in range(ids.shape[0]):
        prompt = ids[row][mask[row].bool()].unsqueeze(0)
        drafter = DRAFTERS[name]()
        out = specdec.wrap(model, drafter=drafter).generate(
            prompt, max_new_tokens=40, pad_token_id=0, eos_token_id=None, return_dict_in_generate=True)
        new = out.sequences[0, prompt.shape[1]:].tolist()
        steps = replay_steps(DRAFTERS[name](), prompt[0].tolist(), new)
        assert steps == out.spec_stats.num_steps, row
        accepted += out.spec_stats.num_steps < len(new)   # the drafter did get tokens accepted here
    assert accepted >= 1


def test_replay_refuses_stateful_drafters_and_empty_prompts():
    model = make_tiny("llama", vocab_size=16, num_layers=1)
    with pytest.raises(ValueError, match="keeps state that the tokens do not fix"):
        replay_steps(DraftModel(model, num_tokens=2), [1, 2], [3])
    with pytest.raises(ValueError, match="keeps state that the tokens do not fix"):
        replay_steps(CopySpec(memory=True), [1, 2], [3])   # earlier calls' rows are not in the tokens
    with pytest.raises(ValueError, match="non-empty prompt"):
        replay_steps(PromptLookup(), [], [3])
    assert replay_steps(PromptLookup(), [4], []) == 0

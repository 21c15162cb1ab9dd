"""Replaying a drafter over recorded greedy outputs (specdec.bench.replay) predicts the engine."""
import pytest
from tiny import make_tiny, ragged_batch

import specdec
from specdec.bench.replay import accepted_length, replay_steps
from specdec.drafters import DraftModel, PromptLookup


def test_accepted_length_follows_the_matching_path():
    # root -> a -> b, and a sibling branch root -> a' -> c: the truth "a b x" keeps 2.
    tokens, parents, valid = [5, 6, 7, 8], [-1, 0, -1, 2], [True, True, True, True]
    assert accepted_length(tokens, parents, valid, [5, 6, 9]) == 2
    assert accepted_length(tokens, parents, valid, [7, 8, 1]) == 2   # the second branch
    assert accepted_length(tokens, parents, valid, [7, 6]) == 1      # b hangs under a, not a'
    assert accepted_length(tokens, parents, [True, False, True, True], [5, 6]) == 1   # invalid nodes never count
    assert accepted_length(tokens, parents, valid, [1]) == 0


@pytest.mark.parametrize("branches", [1, 3])
def test_replay_predicts_the_engines_step_count(branches):
    """The engine's greedy steps with prompt lookup equal the replay's over its own output: the
    drafter sees only committed tokens, so the recorded output fixes every proposal."""
    model = make_tiny("llama", vocab_size=16, init_range=1.0, num_layers=1)
    ids, mask = ragged_batch([6, 2, 11], 16, seed=3)
    checked = 0
    for row in range(ids.shape[0]):
        prompt = ids[row][mask[row].bool()].unsqueeze(0)
        drafter = PromptLookup(num_tokens=4, max_ngram=2, num_branches=branches)
        out = specdec.wrap(model, drafter=drafter).generate(
            prompt, max_new_tokens=40, pad_token_id=0, eos_token_id=None, return_dict_in_generate=True)
        new = out.sequences[0, prompt.shape[1]:].tolist()
        steps = replay_steps(drafter, prompt[0].tolist(), new)
        assert steps == out.spec_stats.num_steps, row
        checked += out.spec_stats.num_steps < len(new)   # lookup did accept something here
    assert checked >= 1


def test_replay_refuses_stateful_drafters_and_empty_prompts():
    model = make_tiny("llama", vocab_size=16, num_layers=1)
    with pytest.raises(ValueError, match="keeps state between steps"):
        replay_steps(DraftModel(model, num_tokens=2), [1, 2], [3])
    with pytest.raises(ValueError, match="non-empty prompt"):
        replay_steps(PromptLookup(), [], [3])
    assert replay_steps(PromptLookup(), [4], []) == 0

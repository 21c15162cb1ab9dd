"""Long-prompt inputs: lengths in range, deterministic, needle placed; Rapid answers a needle
prompt exactly as plain greedy decoding does."""
import pytest
import torch
from tiny import char_tokenizer, make_tiny

import specdec
from specdec.bench.long_prompts import NEEDLE_QUESTION, haystack, long_prompts, needle_prompt
from specdec.drafters import Rapid


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def count(tok, text):
    return len(tok(text, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("needle", [False, True])
def test_lengths_in_range_and_deterministic(tok, needle):
    prompts = long_prompts([512, 2048], per_length=2, seed=3, tokenizer=tok, needle=needle)
    assert [p.category for p in prompts] == [f"{'needle' if needle else 'long'}_{n}" for n in (512, 512, 2048, 2048)]
    for p, n in zip(prompts, (512, 512, 2048, 2048)):
        assert 0.97 * n <= count(tok, p.turns[0]) <= 1.03 * n
    assert prompts == long_prompts([512, 2048], per_length=2, seed=3, tokenizer=tok, needle=needle)
    assert prompts != long_prompts([512, 2048], per_length=2, seed=4, tokenizer=tok, needle=needle)
    assert len({p.turns[0] for p in prompts}) == 4


def test_estimated_lengths_without_tokenizer():
    text = long_prompts([4096], per_length=1)[0].turns[0]
    assert 4096 * 3.2 * 0.97 <= len(text) <= 4096 * 3.2 * 1.03
    assert haystack(1000) == haystack(1000) and haystack(1000, seed=1) != haystack(1000)


@pytest.mark.parametrize("depth", [0.1, 0.5, 0.9])
def test_needle_sits_at_its_depth(tok, depth):
    text, answer = needle_prompt(2000, depth, seed=1, tokenizer=tok)
    where = text.index(answer) / len(text)
    assert abs(where - depth) < 0.05
    assert text.endswith(NEEDLE_QUESTION)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="depth"):
        needle_prompt(1000, 1.5)
    with pytest.raises(ValueError, match="lengths"):
        long_prompts([100])


def test_needle_answer_with_rapid_equals_plain_greedy(tok):
    """Char-level tiny target, 1.5K-token needle prompt, Rapid over a 128-token context."""
    model = make_tiny("llama", vocab_size=73, max_position_embeddings=4096, seed=2)
    text, _ = needle_prompt(1500, 0.5, seed=2, tokenizer=tok)
    ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    plain = specdec.wrap(model).generate(ids, **kw)
    rapid = Rapid(num_tokens=3, context_tokens=128, chunk=32)
    fast = specdec.wrap(model, drafter=rapid).generate(ids, **kw)
    assert torch.equal(fast, plain)
    assert max(rapid.context_lengths) <= 128 < ids.shape[1]

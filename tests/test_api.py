"""wrap/generate behave like HF generate, and bad input fails loudly with a fix in the message."""
import pytest
import torch
from tiny import char_tokenizer, hf_greedy, make_tiny, ragged_batch
from transformers import GenerationConfig, TextStreamer

import specdec
from specdec.drafters import DraftModel, PromptLookup, VocabularyMismatchError, make_drafter
from specdec.runner import UnsupportedModelError


@pytest.fixture(scope="module")
def model():
    return make_tiny("llama")


def test_returns_hf_types_and_forwards_attributes(model):
    spec = specdec.wrap(model, drafter=PromptLookup(num_tokens=3))
    ids = torch.tensor([[5, 6, 7]])
    out = spec.generate(ids, max_new_tokens=5, pad_token_id=0, eos_token_id=None)
    assert isinstance(out, torch.Tensor) and out.shape == (1, 8)
    d = spec.generate(input_ids=ids, max_new_tokens=5, pad_token_id=0, eos_token_id=None, return_dict_in_generate=True)
    assert torch.equal(d.sequences, out)
    stats = d.spec_stats
    assert stats.verify_forwards == stats.num_steps and set(stats.times) == {"draft", "verify", "accept", "commit", "host"}
    assert stats.to_dict()["tau"] == stats.tau and stats.lossless
    assert spec.config is model.config and spec.device == model.device  # forwarded attributes


def test_generation_config_and_max_length(model):
    ids = torch.tensor([[5, 6, 7, 8]])
    gc = GenerationConfig(max_new_tokens=6, do_sample=False, pad_token_id=0)
    spec = specdec.wrap(model, drafter="lookup")
    assert torch.equal(spec.generate(ids, generation_config=gc), hf_greedy(model, ids, generation_config=gc))
    # Without max_new_tokens, max_length bounds the total length as in HF.
    assert spec.generate(ids, max_length=10, pad_token_id=0, eos_token_id=None).shape[1] == 10


def test_attention_mask_inferred_from_padding(model):
    ids, mask = ragged_batch([3, 6], model.config.vocab_size)
    spec = specdec.wrap(model, drafter=PromptLookup())
    explicit = spec.generate(ids, attention_mask=mask, max_new_tokens=8, pad_token_id=0, eos_token_id=None)
    inferred = spec.generate(ids, max_new_tokens=8, pad_token_id=0, eos_token_id=None)
    assert torch.equal(explicit, inferred)


def test_right_padded_prompts_are_repacked(model):
    ids, mask = ragged_batch([3, 6], model.config.vocab_size)
    right = torch.zeros_like(ids)
    rmask = torch.zeros_like(mask)
    for r in range(2):
        real = ids[r][mask[r].bool()]
        right[r, : len(real)] = real
        rmask[r, : len(real)] = 1
    spec = specdec.wrap(model, drafter=PromptLookup())
    left = spec.generate(ids, attention_mask=mask, max_new_tokens=8, pad_token_id=0, eos_token_id=None)
    out = spec.generate(right, attention_mask=rmask, max_new_tokens=8, pad_token_id=0, eos_token_id=None)
    assert torch.equal(out[:, ids.shape[1]:], left[:, ids.shape[1]:])


def test_streamer_receives_every_token():
    tok = char_tokenizer()
    model = make_tiny("llama", vocab_size=len(tok))

    class Collect(TextStreamer):
        def __init__(self):
            super().__init__(tok)
            self.text = ""

        def on_finalized_text(self, text, stream_end=False):
            self.text += text

    ids = tok(["hello"], return_tensors="pt").input_ids
    streamer = Collect()
    out = specdec.wrap(model, drafter=DraftModel(model, num_tokens=3)).generate(
        ids, max_new_tokens=12, pad_token_id=0, eos_token_id=None, streamer=streamer)
    assert streamer.text == tok.decode(out[0])


@pytest.mark.parametrize("kwargs, words", [
    (dict(num_beams=2), "num_beams"),
    (dict(encoder_repetition_penalty=1.3), "encoder_repetition_penalty"),
    (dict(output_scores=True), "output_scores"),
    (dict(typical_p=0.5, do_sample=True), "typical_p"),
    (dict(logits_processor=[object()]), "logits_processor"),
    (dict(not_an_option=1), "not_an_option"),
])
def test_unsupported_generate_options(model, kwargs, words):
    spec = specdec.wrap(model, drafter=PromptLookup())
    with pytest.raises(specdec.UnsupportedGenerationOption, match=words):
        spec.generate(torch.tensor([[5, 6]]), max_new_tokens=4, **kwargs)


@pytest.mark.parametrize("ids, mask, kwargs, words", [
    (torch.zeros(1, 0, dtype=torch.long), None, {}, "empty prompt"),
    (torch.tensor([[0, 0], [5, 6]]), torch.tensor([[0, 0], [1, 1]]), {}, r"empty prompt in row\(s\) \[0\]"),
    (torch.tensor([[5, 6]]), None, dict(max_new_tokens=0), "max_new_tokens"),
    (torch.tensor([[5, 6]]), None, dict(max_new_tokens=-3), "max_new_tokens"),
    (torch.tensor([[5, 6]]), None, dict(max_new_tokens=5000), "exceeds the model's context"),
    (torch.tensor([[5, 6]]), None, dict(do_sample=True, temperature=0.0), "temperature must be > 0"),
    (torch.tensor([[5, 6]]), None, dict(stop_strings=["x"]), "needs the tokenizer"),
])
def test_bad_input_raises_clear_errors(model, ids, mask, kwargs, words):
    spec = specdec.wrap(model, drafter=PromptLookup())
    kwargs.setdefault("max_new_tokens", 4)
    with pytest.raises(ValueError, match=words):
        spec.generate(ids, attention_mask=mask, pad_token_id=0, **kwargs)


def test_vocabulary_mismatch(model):
    other = make_tiny("llama", vocab_size=300)
    with pytest.raises(VocabularyMismatchError, match="vocabulary"):
        specdec.wrap(model, drafter=DraftModel(other))


def test_unknown_drafter_name(model):
    with pytest.raises(ValueError, match="unknown drafter 'medusa-xl'.*lookup"):
        specdec.wrap(model, drafter="medusa-xl")
    assert make_drafter("none") is None


def test_unsupported_architecture():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedModelError, match="gpt2.*llama, qwen2, qwen3, mistral"):
        specdec.wrap(gpt2)


def test_bad_input_loses_nothing(model):
    """A failed call leaves the wrapper usable: the next good call still equals HF."""
    spec = specdec.wrap(model, drafter=PromptLookup())
    with pytest.raises(ValueError):
        spec.generate(torch.tensor([[5, 6]]), max_new_tokens=0)
    ids = torch.tensor([[5, 6, 7]])
    good = spec.generate(ids, max_new_tokens=6, pad_token_id=0, eos_token_id=None)
    assert torch.equal(good, hf_greedy(model, ids, max_new_tokens=6, eos_token_id=None))


def test_cuda_graphs_need_a_cuda_model(model):
    with pytest.raises(ValueError, match="cuda_graphs=True needs the model on a CUDA device"):
        specdec.wrap(model, cuda_graphs=True)


def test_compile_options_are_checked_at_wrap_time(model):
    """``compile`` takes Inductor options as a dict; a misspelt one fails at wrap, naming it."""
    with pytest.raises(ValueError, match=r"unknown Inductor option\(s\) \['coordinate_decent_tuning'\]"):
        specdec.wrap(model, compile={"coordinate_decent_tuning": True})
    with pytest.raises(TypeError, match="compile must be a bool or a dict"):
        specdec.wrap(model, compile="max-autotune")
    spec = specdec.wrap(model, compile={"coordinate_descent_tuning": True})
    assert spec.engine.compile == {"coordinate_descent_tuning": True}


def test_more_padding_than_the_longest_row_needs(model):
    """Input padded wider than its longest row (plus the drafter's lookback) is packed, not refused."""
    ids = torch.tensor([[0, 0, 0, 0] + list(range(5, 14)), [0] * 10 + [7, 8, 9]])
    mask = (ids != 0).long()
    spec = specdec.wrap(model, drafter=PromptLookup(num_tokens=3))
    out = spec.generate(ids[:, 4:], attention_mask=mask[:, 4:], max_new_tokens=6, pad_token_id=0, eos_token_id=None)
    wide = spec.generate(ids, attention_mask=mask, max_new_tokens=6, pad_token_id=0, eos_token_id=None)
    assert torch.equal(wide[:, 4:], out) and torch.equal(out, hf_greedy(model, ids[:, 4:], mask[:, 4:], max_new_tokens=6,
                                                                                  eos_token_id=None))

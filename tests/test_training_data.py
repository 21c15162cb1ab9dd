"""Training data: chat formatting, response masks, batch layout, the batch stream, sources,
and drafts built from the target's layers."""
import json

import pytest
import torch
from omegaconf import OmegaConf
from test_training_helpers import byte_tokenizer
from tiny import make_tiny

from specdec.training.data import (batch_indices, fixed_batch, format_example, join_responses, load_examples,
                                   pad_prompts, resolve_path)
from specdec.training.evaluate import response_logits
from specdec.training.models import draft_from_layers


def test_chat_format_splits_prompt_and_response():
    tok = byte_tokenizer()
    ex = format_example(tok, "hi", "hello")
    assert tok.decode(ex.prompt) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(ex.response) == "hello<|im_end|>\n"
    plain = format_example(tok, "hi", "hello", chat=False)
    assert tok.decode(plain.prompt) == "hi" and tok.decode(plain.response) == "hello<|im_end|>"
    system = format_example(tok, "hi", system="be brief")
    assert tok.decode(system.prompt).startswith("<|im_start|>system\nbe brief<|im_end|>\n") and system.response is None


def test_join_responses_keeps_tokens_up_to_first_eos():
    ids, mask = pad_prompts([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    batch = join_responses(ids, mask, torch.tensor([[9, 2, 9, 2], [9, 9, 9, 9]]), eos_ids=[2], pad_id=0)
    assert batch.prompt_len == 3
    assert batch.response_mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]  # eos kept, text after it dropped
    assert batch.input_ids[0].tolist() == [5, 6, 7, 9, 2, 0, 0]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 4, 4], [0, 0, 0, 1, 2, 3, 4]]


def test_response_logits_predict_response_tokens():
    """Column j of response_logits is the model's prediction for response token j, padding or not."""
    model = make_tiny("llama", vocab_size=64)
    ids, mask = pad_prompts([[5, 6, 7], [8]], pad_id=0)
    batch = join_responses(ids, mask, torch.tensor([[9, 10], [11, 2]]), eos_ids=[2], pad_id=0)
    logits = response_logits(model, batch)                       # [2, 2, V]
    alone = model(torch.tensor([[8, 11, 2]])).logits              # row 1 without its padding
    assert torch.allclose(logits[1], alone[0, 0:2], atol=1e-4)


def test_fixed_batch_layout():
    tok = byte_tokenizer()
    batch = fixed_batch([format_example(tok, "a", "xy"), format_example(tok, "bcd", "z")], tok.pad_token_id)
    width = batch.input_ids.shape[1] - batch.prompt_len
    assert batch.response_mask.sum(1).tolist() == [4, 3]  # "xy" / "z" + <|im_end|> + "\n"
    for row, text in enumerate(["xy<|im_end|>\n", "z<|im_end|>\n"]):
        response = batch.input_ids[row, batch.prompt_len:][batch.response_mask[row].bool()]
        assert tok.decode(response) == text and width == 4
    with pytest.raises(ValueError, match="response_field"):
        fixed_batch([format_example(tok, "a")], 0)


def test_batch_stream_is_deterministic_and_shards():
    n, b = 10, 2
    epoch = [i for k in range(5) for i in batch_indices(n, b, k, seed=3)]
    assert sorted(epoch) == list(range(n))            # one epoch sees every example once
    assert batch_indices(n, b, 7, seed=3) == batch_indices(n, b, 7, seed=3)
    assert epoch != [i for k in range(5) for i in batch_indices(n, b, k + 5, seed=3)]  # reshuffled


def test_sources_in_every_format(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    tok = byte_tokenizer()
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"q": f"question {i}"}) for i in range(3)))
    (tmp_path / "b.txt").write_text("line one\nline two\n")
    pq.write_table(pa.table({"q": ["parquet row"]}), tmp_path / "c.parquet")
    cfg = OmegaConf.create({"sources": [
        {"path": str(tmp_path / "a.jsonl"), "prompt_field": "q", "limit": 2},
        {"path": str(tmp_path / "b.txt"), "template": "Say: {prompt}"},
        {"path": str(tmp_path / "c.parquet"), "prompt_field": "q"}],
        "chat": False, "max_prompt_tokens": 13})
    texts = [tok.decode(e.prompt) for e in load_examples(cfg, tok)]
    assert texts == ["question 0", "question 1", "Say: line one", "Say: line two", "parquet row"]
    cfg.max_prompt_tokens = 10  # drops the longer prompts
    assert [tok.decode(e.prompt) for e in load_examples(cfg, tok)] == ["question 0", "question 1"]


def test_bundled_prompt_sets():
    tok = byte_tokenizer()
    assert resolve_path("pkg://specdec.training/data/chat.jsonl").endswith("chat.jsonl")
    cfg = OmegaConf.load(resolve_path("pkg://specdec.conf/data/code_chat.yaml"))
    cfg.max_prompt_tokens = 100_000
    examples = load_examples(cfg, tok)
    assert len(examples) == 164 + 60  # HumanEval + the chat set, each with a reference response
    assert all(e.response for e in examples)


def test_draft_from_layers_is_an_early_exit():
    target = make_tiny("qwen2", vocab_size=64, num_layers=3)
    draft = draft_from_layers(target, [0, 2])
    assert draft.config.num_hidden_layers == 2 and len(draft.config.layer_types) == 2
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        inner = target.model
        h = inner.embed_tokens(ids)
        pos = inner.rotary_emb(h, torch.arange(4)[None])
        for i in (0, 2):
            h = inner.layers[i](h, position_embeddings=pos, attention_mask=None, position_ids=torch.arange(4)[None])
            h = h[0] if isinstance(h, tuple) else h
        expected = target.lm_head(inner.norm(h))
        assert torch.allclose(draft(ids).logits, expected, atol=1e-4)
    for p in draft.parameters():  # the draft owns its weights: training it cannot touch the target
        p.data.add_(1.0)
    assert not torch.allclose(draft(ids).logits, expected, atol=1e-2)
    assert torch.allclose(target.lm_head.weight, make_tiny("qwen2", vocab_size=64, num_layers=3).lm_head.weight)
    with pytest.raises(ValueError, match="distinct indices"):
        draft_from_layers(target, [0, 3])


def test_stdlib_corpus_is_seeded_balanced_and_loads_through_datasets():
    """corpus:stdlib gives distinct prompts of all six kinds, the same for the same seed, and
    none of them is a built-in benchmark prompt."""
    from specdec.bench.prompts import builtin
    from specdec.training.corpus import CATEGORIES, corpus_rows

    rows = corpus_rows(120, seed=1)
    assert len(rows) == 120 and len({r["prompt"] for r in rows}) == 120
    counts = {c: sum(r["category"] == c for r in rows) for c in CATEGORIES}
    assert min(counts.values()) >= 10, counts
    assert rows == corpus_rows(120, seed=1) and rows != corpus_rows(120, seed=2)
    bench = {t for p in builtin() for t in p.turns}
    assert not bench & {r["prompt"] for r in rows}
    cfg = OmegaConf.create({"sources": [{"path": "corpus:stdlib", "size": 12, "seed": 1, "prompt_field": "prompt"}],
                            "chat": False, "max_prompt_tokens": 10**6})
    assert len(load_examples(cfg, byte_tokenizer())) == 12
    with pytest.raises(ValueError, match="corpus:stdlib"):
        load_examples(OmegaConf.create({"sources": [{"path": "corpus:other"}], "max_prompt_tokens": 9}),
                      byte_tokenizer())

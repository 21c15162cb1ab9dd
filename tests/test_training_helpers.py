"""Shared helpers for the training tests: a byte-level chat tokenizer and tiny model folders.

No tests live here. Everything is built from scratch in a few milliseconds, no hub needed.
"""
import json
from pathlib import Path

from tiny import make_tiny

# ids 0-3 match make_tiny's pad (0), bos (1) and eos (2); bytes follow from id 4.
SPECIALS = ["<pad>", "<s>", "<|im_end|>", "<|im_start|>"]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
VOCAB = 320  # 4 specials + 256 bytes, rounded up

PROMPTS = ["add two numbers", "sort a list", "hello there", "what is rain", "name a color",
           "count to five", "reverse a word", "say yes", "pick a fruit", "greet me",
           "tell a joke", "list three pets", "spell cat", "draw a line", "sum of digits",
           "is it sunny", "find the max", "why is grass green", "a short poem", "the best tea"]


def byte_tokenizer():
    """A fast tokenizer over raw bytes with a ChatML chat template (vocabulary of 260)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    vocab.update({ch: len(SPECIALS) + i for i, ch in enumerate(sorted(alphabet))})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="<|im_end|>", chat_template=CHATML)


def save_tiny(folder: Path, num_layers: int = 2, hidden: int = 64, seed: int = 0, **overrides) -> Path:
    """A tiny Llama plus the byte tokenizer, saved as an HF folder."""
    model = make_tiny("llama", vocab_size=VOCAB, num_layers=num_layers, hidden=hidden, seed=seed, **overrides)
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 0
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


def write_prompts(path: Path, prompts=PROMPTS, with_responses: bool = True) -> Path:
    with path.open("w") as f:
        for p in prompts:
            f.write(json.dumps({"prompt": p, "response": p[::-1]} if with_responses else {"prompt": p}) + "\n")
    return path


def tiny_overrides(tmp: Path, target: Path, prompts: Path, **extra) -> list[str]:
    """Hydra overrides for a run that takes a few seconds on one CPU core."""
    values = {
        "model.spec": str(target), "model.dtype": "float32", "model.device": "cpu",
        "output_dir": str(tmp / "run"), "data": "files",
        "data.sources.0.path": str(prompts), "data.sources.0.prompt_field": "prompt",
        "data.sources.0.response_field": "response", "data.eval_size": 4,
        "method.draft.layers": 1, "method.responses.max_new_tokens": 8, "method.responses.on_policy": 0.5,
        "steps": 2, "batch_size": 2, "save_every": 0, "optim.warmup_steps": 0, "optim.lr": 1e-3,
        "eval.every": 0, "eval.batch_size": 4, "eval.max_new_tokens": 8, "eval.tau_prompts": 0,
        "logger": "none",
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]

"""Prompt data for training drafters: sources through `datasets`, chat formatting, batches.

A source is a local jsonl/json/text/parquet/csv file (``pkg://package/path`` names a file shipped
inside an installed package), a folder, or a hub id. Each row becomes an `Example`: the
chat-formatted prompt ending in the assistant's generation prompt, and optionally a fixed
response ending in the end-of-turn token. A `Batch` lays prompts left-padded and responses
right-padded, so every row's response starts at the same column and the loss can cover exactly
the response tokens.

This module knows tokenizers and tensors; it knows nothing about models or training.
"""
import functools
import importlib.resources
import random
from dataclasses import dataclass
from pathlib import Path

import torch

_BUILDERS = {".jsonl": "json", ".json": "json", ".txt": "text", ".text": "text",
             ".parquet": "parquet", ".csv": "csv"}


@dataclass
class Example:
    prompt: list[int]                  # token ids of the formatted prompt, generation prompt included
    response: list[int] | None = None  # token ids of a fixed response, end-of-turn included


@dataclass
class Batch:
    input_ids: torch.Tensor       # [B, P + R] prompts left-padded to P, responses right-padded to R
    attention_mask: torch.Tensor  # [B, P + R] 1 on real tokens
    response_mask: torch.Tensor   # [B, R] 1 on the response tokens that the loss and α cover
    prompt_len: int               # P: column where every response starts

    @property
    def position_ids(self) -> torch.Tensor:  # [B, P + R] positions that skip the left padding
        return (self.attention_mask.long().cumsum(-1) - 1).clamp(min=0)

    def to(self, device) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device),
                     self.response_mask.to(device), self.prompt_len)


def resolve_path(path: str) -> str:
    """Turn ``pkg://package/relative/path`` into a file path; other paths pass through."""
    if not path.startswith("pkg://"):
        return path
    package, _, rel = path[len("pkg://"):].partition("/")
    return str(importlib.resources.files(package).joinpath(rel))


def load_rows(source) -> "datasets.Dataset":  # noqa: F821
    """Load one source (a mapping with ``path`` and optional ``name``/``split``) with `datasets`."""
    import datasets

    if str(source["path"]).startswith("corpus:"):
        return datasets.Dataset.from_list(_corpus(str(source["path"]), source.get("size") or 6000,
                                                  source.get("seed") or 0))
    path = resolve_path(str(source["path"]))
    split = source.get("split") or "train"
    local = Path(path)
    if local.is_file():
        suffixes = [s for s in local.suffixes if s not in (".gz", ".bz2", ".xz", ".zst")]
        builder = _BUILDERS.get(suffixes[-1] if suffixes else "")
        if builder is None:
            raise ValueError(f"cannot tell the format of {path}; use one of {sorted(_BUILDERS)}")
        return datasets.load_dataset(builder, data_files=str(local), split="train")
    return datasets.load_dataset(path, source.get("name"), split=split)


def _corpus(path: str, size: int, seed: int) -> list[dict]:
    from .corpus import corpus_rows

    if path != "corpus:stdlib":
        raise ValueError(f"unknown corpus {path!r}; the built-in one is corpus:stdlib")
    return corpus_rows(int(size), int(seed))


def format_example(tokenizer, prompt: str, response: str | None = None,
                   system: str | None = None, chat: bool = True) -> Example:
    """Tokenize one prompt (and fixed response) the way the model sees it at generation time.

    With ``chat`` and a tokenizer that has a chat template, the prompt becomes a user turn
    followed by the assistant's generation prompt, and the response is what the template adds
    for the assistant turn (its text plus the end-of-turn marker). Otherwise the prompt is plain
    text and the response ends with the eos token.

    Example:
        With a ChatML template, prompt "hi" and response "hello" give prompt tokens for
        "<|im_start|>user\\nhi<|im_end|>\\n<|im_start|>assistant\\n" and response tokens for
        "hello<|im_end|>\\n".
    """
    if chat and tokenizer.chat_template:
        messages = ([{"role": "system", "content": system}] if system else [])
        messages.append({"role": "user", "content": prompt})
        prompt_text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        if response is None:
            return Example(prompt_ids)
        full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": response}],
                                             tokenize=False)
        tail = full[len(prompt_text):] if full.startswith(prompt_text) else response + tokenizer.eos_token
        return Example(prompt_ids, tokenizer(tail, add_special_tokens=False)["input_ids"])
    prompt_ids = tokenizer(prompt)["input_ids"]
    if response is None:
        return Example(prompt_ids)
    return Example(prompt_ids, tokenizer(response, add_special_tokens=False)["input_ids"]
                   + [tokenizer.eos_token_id])


def load_examples(data_cfg, tokenizer) -> list[Example]:
    """Every source of ``data_cfg.sources`` in order, formatted; over-long prompts are dropped."""
    examples = []
    for source in data_cfg.sources:
        rows = load_rows(source)
        limit = source.get("limit")
        if limit is not None:
            rows = rows.select(range(min(limit, len(rows))))
        field, response_field = source.get("prompt_field") or "text", source.get("response_field")
        template = source.get("template") or "{prompt}"
        for row in rows:
            text = row[field]
            if not text or not text.strip():
                continue
            response = row[response_field] if response_field else None
            example = format_example(tokenizer, template.replace("{prompt}", text), response,
                                     system=data_cfg.get("system"), chat=data_cfg.get("chat", True))
            if len(example.prompt) <= data_cfg.max_prompt_tokens:
                examples.append(example)
    if not examples:
        raise ValueError("the data sources gave no prompts (check paths, prompt_field and max_prompt_tokens)")
    return examples


def split_examples(examples: list, eval_size: int, seed: int) -> tuple[list, list]:
    """(train, held-out): a seeded shuffle holds out ``eval_size`` examples, at most half."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = min(eval_size, len(examples) // 2)
    return [examples[i] for i in order[n_eval:]], [examples[i] for i in order[:n_eval]]


def batch_indices(n: int, batch_size: int, index: int, seed: int) -> list[int]:
    """Example indices of batch ``index`` in an endless stream that reshuffles every epoch.

    The stream is a pure function of (seed, index), so a resumed run sees the same batches, and
    process r of W taking batches r, r + W, r + 2W, ... gives each process its own share.
    """
    positions = (divmod(pos, n) for pos in range(index * batch_size, (index + 1) * batch_size))
    return [_epoch_order(n, seed, epoch)[offset] for epoch, offset in positions]


@functools.lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return tuple(order)


def pad_prompts(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists: (input_ids [B, P], attention_mask [B, P])."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[row, width - len(p):] = 1
    return ids, mask


def join_responses(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, responses: torch.Tensor,
                   eos_ids: list[int], pad_id: int) -> Batch:
    """Append generated responses [B, R]; each keeps its tokens up to and including its first eos."""
    is_eos = torch.isin(responses, torch.tensor(eos_ids, device=responses.device))  # [B, R]
    after_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0                      # [B, R]
    keep = ~after_eos
    responses = responses.masked_fill(after_eos, pad_id)
    return Batch(torch.cat([prompt_ids, responses], dim=1),
                 torch.cat([prompt_mask, keep.long()], dim=1), keep.long(), prompt_ids.shape[1])


def fixed_batch(examples: list[Example], pad_id: int, max_tokens: int | None = None) -> Batch:
    """Examples with their fixed responses (cut to ``max_tokens``), right-padded after column P."""
    if any(e.response is None for e in examples):
        raise ValueError("responses.off_policy=fixed needs a response_field in every data source")
    prompt_ids, prompt_mask = pad_prompts([e.prompt for e in examples], pad_id)
    cut = [e.response[:max_tokens] for e in examples]
    width = max(len(r) for r in cut)
    responses = torch.full((len(examples), width), pad_id, dtype=torch.long)
    keep = torch.zeros((len(examples), width), dtype=torch.long)
    for row, r in enumerate(cut):
        responses[row, :len(r)] = torch.tensor(r, dtype=torch.long)
        keep[row, :len(r)] = 1
    return Batch(torch.cat([prompt_ids, responses], dim=1), torch.cat([prompt_mask, keep], dim=1),
                 keep, prompt_ids.shape[1])

"""The target's own responses to the training prompts: generated once, batched, cached as token ids.

Self-distillation data for draft heads (as Medusa-2 and EAGLE-3 regenerate theirs): every
training prompt gets one response from the frozen target, and the pairs are stored in a single
safetensors file of int64 tensors (no pickles):

    prompt_tokens [Σ prompt lengths]      prompt_offsets [N + 1]      (row r is tokens[off[r]:off[r+1]])
    response_tokens [Σ response lengths]  response_offsets [N + 1]

with the generation settings in the file's string metadata. Several processes each generate
their share (prompts r, r + W, ...) into a part file, and the main process merges the parts.
A cache made for other prompts is refused, naming the file. Hidden states are never cached.
"""
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .data import Example
from .evaluate import generate_responses


def pack(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (tokens [Σ len], offsets [N + 1])."""
    lengths = torch.tensor([0] + [len(r) for r in rows], dtype=torch.long)
    tokens = torch.tensor([t for r in rows for t in r], dtype=torch.long)
    return tokens, lengths.cumsum(0)


def unpack(tokens: torch.Tensor, offsets: torch.Tensor) -> list[list[int]]:
    bounds = offsets.tolist()
    return [tokens[a:b].tolist() for a, b in zip(bounds[:-1], bounds[1:])]


def save_examples(path: Path, examples: list[Example], meta: dict, index: list[int] | None = None) -> None:
    """Write prompt/response pairs (and optionally their row indices) to ``path``, atomically."""
    prompt_tokens, prompt_offsets = pack([e.prompt for e in examples])
    response_tokens, response_offsets = pack([e.response for e in examples])
    tensors = {"prompt_tokens": prompt_tokens, "prompt_offsets": prompt_offsets,
               "response_tokens": response_tokens, "response_offsets": response_offsets}
    if index is not None:
        tensors["index"] = torch.tensor(index, dtype=torch.long)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={k: str(v) for k, v in meta.items()})
    tmp.replace(path)


def load_examples_file(path: Path) -> tuple[list[Example], dict, list[int] | None]:
    """(examples, metadata, row indices or None) from a `save_examples` file."""
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata() or {}
    prompts = unpack(tensors["prompt_tokens"], tensors["prompt_offsets"])
    responses = unpack(tensors["response_tokens"], tensors["response_offsets"])
    index = tensors["index"].tolist() if "index" in tensors else None
    return [Example(p, r) for p, r in zip(prompts, responses)], meta, index


def generate_all(target, prompts: list[list[int]], pad_id: int, eos_ids: list[int], resp) -> list[list[int]]:
    """The target's response to each prompt (its eos included), ``resp.batch_size`` prompts at a time.

    Prompts are batched by length to keep left padding short; results come back in input order.
    """
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[int] | None] = [None] * len(prompts)
    for start in range(0, len(order), resp.batch_size):
        rows = order[start:start + resp.batch_size]
        batch = generate_responses(target, [prompts[i] for i in rows], pad_id, eos_ids, resp.max_new_tokens,
                                   resp.do_sample, resp.temperature)
        generated = batch.input_ids[:, batch.prompt_len:].cpu()
        for row, i in enumerate(rows):
            out[i] = generated[row][batch.response_mask[row].bool().cpu()].tolist()
    return out


def cached_responses(acc, target, examples: list[Example], pad_id: int, eos_ids: list[int], resp,
                     path: Path, seed: int) -> list[Example]:
    """``examples`` with the target's responses, from ``path`` or generated into it first."""
    path = Path(path)
    meta = {"max_new_tokens": resp.max_new_tokens, "do_sample": resp.do_sample,
            "temperature": resp.temperature, "seed": seed}
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        rank, world = acc.process_index, acc.num_processes
        mine = list(range(rank, len(examples), world))
        torch.manual_seed(seed * 1_000_003 + rank)
        with acc.autocast():
            responses = generate_all(target, [examples[i].prompt for i in mine], pad_id, eos_ids, resp)
        part = path.with_name(f"{path.stem}.part{rank}of{world}.safetensors")
        save_examples(part, [Example(examples[i].prompt, r) for i, r in zip(mine, responses)], meta, mine)
        acc.wait_for_everyone()
        if acc.is_main_process:
            _merge_parts(path, world, meta)
        acc.wait_for_everyone()
    cached, _, _ = load_examples_file(path)
    if [e.prompt for e in cached] != [e.prompt for e in examples]:
        raise ValueError(f"{path} holds responses to other prompts; delete it or set method.responses.cache "
                         "to another file")
    return cached


def _merge_parts(path: Path, world: int, meta: dict) -> None:
    rows: dict[int, Example] = {}
    parts = [path.with_name(f"{path.stem}.part{r}of{world}.safetensors") for r in range(world)]
    for part in parts:
        examples, _, index = load_examples_file(part)
        rows.update(zip(index, examples))
    save_examples(path, [rows[i] for i in range(len(rows))], meta)
    for part in parts:
        part.unlink()

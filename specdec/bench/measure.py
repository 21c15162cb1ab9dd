"""Timed decoding of prompts, turn by turn, through one generate method.

A *method* is the engine without a drafter (the baseline), the engine with a drafter, or HF's
own ``generate``. ``decode`` runs one method over a batch of prompts: turn t of every prompt
that has one goes in one ``generate`` call, and later turns see the method's own earlier
answers. This module knows nothing about configs, files or reports.

Glossary:
    step             one engine iteration: propose, verify, accept, commit.
    accepted length  tokens one step emits: the accepted draft tokens plus the bonus (or
                     recovered) token, so at least 1. τ is its mean over steps.
    acceptance rate  α, the share of drafted tokens that the target accepted.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from specdec.bench.prompts import Prompt, render

PHASES = ("draft", "verify", "accept", "commit", "host")


@dataclass
class Generated:
    """What one ``generate`` call returned, reduced to what the benchmark reads."""
    sequences: torch.Tensor          # [B, T + new], left-padded prompt then new tokens
    new_tokens: list[int]            # [B] tokens generated per row, EOS included
    stats: object | None = None      # the engine's spec_stats; None for HF generate


Method = Callable[[torch.Tensor, torch.Tensor], Generated]  # (input_ids, attention_mask) -> ...


@dataclass
class Decoded:
    """One method's answer to one prompt, over all of its turns."""
    output_ids: list[list[int]] = field(default_factory=list)   # [turns][new tokens]
    answers: list[str] = field(default_factory=list)            # [turns] decoded text
    prompt_tokens: list[int] = field(default_factory=list)      # [turns] input length
    wall_time: float = 0.0           # seconds; at batch > 1, this row's equal share of each call
    turn_wall_time: list[float] = field(default_factory=list)   # [turns] the same, per turn
    accepted_lengths: list[int] | None = None   # [steps] tokens emitted per step; None for HF
    turn_steps: list[int] | None = None         # [turns] engine steps per turn; None for HF
    draft_tokens: int = 0            # draft tokens offered to the target, over all steps
    undrafted_steps: int = 0         # this row's steps that the draft policies ran without a draft
    idle_steps: float = 0.0          # its calls' steps no row used (SpecStats.idle_steps), this row's equal share
    times: dict[str, float] = field(default_factory=dict)       # phase -> seconds (row share)
    lossless: bool | None = None
    peak_bytes: int | None = None    # CUDA: the most memory_allocated rose above its level before a call,
                                     # over this row's calls (the whole batch's call); None elsewhere
    memory: dict | None = None       # the engine's spec_stats.memory of the last call (budget, plan)

    @property
    def new_tokens(self) -> int:
        return sum(len(ids) for ids in self.output_ids)

    @property
    def steps(self) -> int | None:
        return None if self.accepted_lengths is None else len(self.accepted_lengths)

    @property
    def tau(self) -> float | None:
        if not self.accepted_lengths:
            return None
        return sum(self.accepted_lengths) / len(self.accepted_lengths)

    @property
    def turn_new_tokens(self) -> list[int]:
        return [len(ids) for ids in self.output_ids]

    @property
    def turn_tau(self) -> list[float | None] | None:
        """τ of each turn: the mean accepted length over that turn's steps."""
        if self.turn_steps is None:
            return None
        out, first = [], 0
        for steps in self.turn_steps:
            lengths = self.accepted_lengths[first: first + steps]
            out.append(sum(lengths) / steps if steps else None)
            first += steps
        return out

    @property
    def turn_tokens_per_s(self) -> list[float]:
        return [n / t if t > 0 else 0.0 for n, t in zip(self.turn_new_tokens, self.turn_wall_time)]

    @property
    def acceptance_rate(self) -> float | None:
        """Accepted draft tokens (each step's emitted tokens less its bonus token) over offered ones."""
        if not self.draft_tokens:
            return None
        return (sum(self.accepted_lengths) - len(self.accepted_lengths)) / self.draft_tokens

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_time if self.wall_time > 0 else 0.0

    def histogram(self) -> list[int]:
        """``hist[k]`` is the number of steps that emitted k tokens (``hist[0]`` is always 0)."""
        lengths = self.accepted_lengths or []
        hist = [0] * (max(lengths, default=0) + 1)
        for n in lengths:
            hist[n] += 1
        return hist


def engine_method(spec, **gen_kwargs) -> Method:
    """``spec.generate`` of a wrapped model (with or without a drafter) as a Method."""
    def run(input_ids, attention_mask):
        out = spec.generate(input_ids=input_ids, attention_mask=attention_mask,
                            return_dict_in_generate=True, **gen_kwargs)
        stats = out.spec_stats
        return Generated(out.sequences, [int(n) for n in stats.new_tokens], stats)
    return run


def hf_method(model, eos_token_id, **gen_kwargs) -> Method:
    """HF's own ``model.generate`` as a Method; new tokens end at the first EOS."""
    eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)

    def run(input_ids, attention_mask):
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask,
                             eos_token_id=eos_token_id, return_dict_in_generate=True, **gen_kwargs)
        new = out.sequences[:, input_ids.shape[1]:].tolist()
        lengths = [next((i + 1 for i, t in enumerate(row) if t in eos), len(row)) for row in new]
        return Generated(out.sequences, lengths)
    return run


def decode(method: Method, prompts: Sequence[Prompt], tokenizer, device: torch.device,
           seed: int = 0) -> list[Decoded]:
    """Answer every turn of ``prompts`` with ``method``, batching the rows that have turn t.

    The tokenizer must pad on the left. Before turn t's call the RNG is seeded with
    ``seed + t``, so two methods that sample see the same seeds.
    """
    results = [Decoded() for _ in prompts]
    for turn in range(max(len(p.turns) for p in prompts)):
        active = [i for i, p in enumerate(prompts) if turn < len(p.turns)]
        texts = [render(tokenizer, prompts[i].turns[: turn + 1], results[i].answers) for i in active]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        input_ids, attention_mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        torch.manual_seed(seed + turn)
        base = _memory_mark(device)
        start = time.perf_counter()
        out = method(input_ids, attention_mask)
        _sync(device)
        share = (time.perf_counter() - start) / len(active)
        peak = _memory_peak(device, base)
        prompt_len = input_ids.shape[1]
        for row, i in enumerate(active):
            ids = out.sequences[row, prompt_len: prompt_len + out.new_tokens[row]].tolist()
            res = results[i]
            res.output_ids.append(ids)
            res.answers.append(tokenizer.decode(ids, skip_special_tokens=True))
            res.prompt_tokens.append(int(attention_mask[row].sum()))
            res.wall_time += share
            res.turn_wall_time.append(share)
            if peak is not None:
                res.peak_bytes = max(peak, res.peak_bytes or 0)
            if out.stats is not None:
                _add_engine_stats(res, out.stats, row, len(active))
    return results


def first_divergence(a: Sequence[Sequence[int]], b: Sequence[Sequence[int]]) -> dict | None:
    """Where two multi-turn outputs first differ: ``{"turn", "index"}``, or None if equal.

    Example:
        first_divergence([[5, 6, 7]], [[5, 6, 9]])  # {"turn": 0, "index": 2}
        first_divergence([[5, 6]], [[5, 6, 2]])     # {"turn": 0, "index": 2}: one stopped early
    """
    for turn, (x, y) in enumerate(zip(a, b)):
        index = next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), None)
        if index is None and len(x) != len(y):
            index = min(len(x), len(y))
        if index is not None:
            return {"turn": turn, "index": index}
    if len(a) != len(b):
        return {"turn": min(len(a), len(b)), "index": 0}
    return None


# Mantissa bits of each float type: the spacing of representable values near x is 2^(e - bits).
_MANTISSA = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23, torch.float64: 52}
# A divergence counts as a near-tie when the target's top-2 logits there are at most this many
# units of the model dtype's resolution apart (docs/RESULTS.md records the gaps seen on GPUs).
NEAR_TIE_ULPS = 2.0


def resolution(x: float, dtype: torch.dtype) -> float:
    """The spacing of ``dtype`` values at ``x`` (one ulp), e.g. ``resolution(1.0, torch.bfloat16)``
    is 2^-7 and ``resolution(3.0, torch.bfloat16)`` is 2^-6."""
    if dtype not in _MANTISSA:
        raise ValueError(f"no resolution known for {dtype}")
    if x == 0:
        return torch.finfo(dtype).tiny
    return 2.0 ** (math.floor(math.log2(abs(x))) - _MANTISSA[dtype])


def tie_measure(logits: Tensor, parted, dtype: torch.dtype) -> dict:
    """Where two greedy outputs part, how close a tie it was in ``logits`` (the next-token logits):
    the top-2 ``gap`` and the ``ulp`` of ``dtype`` at the top logit, ``gap_ulps``, whether the
    ``parted`` tokens are the top two (``top2``), how far below the top logit the lower of them
    lies (``parted_ulps``; a None token, an output that had already stopped, is skipped), and
    ``near_tie``: that within ``NEAR_TIE_ULPS``."""
    logits = logits.float()
    values, top = logits.topk(2)
    gap = float(values[0] - values[1])
    ulp = resolution(float(values[0]), dtype)
    below = max(float(values[0] - logits[t]) for t in parted if t is not None) / ulp
    return {"gap": gap, "ulp": ulp, "gap_ulps": gap / ulp, "top2": set(parted) <= set(top.tolist()),
            "parted_ulps": below, "near_tie": below <= NEAR_TIE_ULPS}


@torch.no_grad()
def divergence_gap(model, tokenizer, prompt: Prompt, base: Decoded, drafted: Decoded, divergence: dict,
                   device: torch.device) -> dict:
    """Is a greedy divergence a near-tie? The target's own logits where the outputs part.

    Runs the model once (plain HF forward, in its dtype) over turn ``divergence["turn"]`` of
    ``prompt``, rendered with the baseline's earlier answers, plus the baseline's tokens before
    ``divergence["index"]``. Returns the top-2 logit ``gap``, the dtype's resolution ``ulp`` at the
    top logit, ``gap_ulps``, the two tokens that parted (``baseline_token``, ``drafter_token``),
    whether they are the top two (``top2``), how far below the top logit the lower of the two lies
    (``parted_ulps``), and ``near_tie``: both parted tokens within ``NEAR_TIE_ULPS`` of the top
    logit. Three-way ties happen (the parted tokens can be the 2nd and 3rd of three logits within
    an ulp of each other), so "top two" alone is too strict. A divergence that is not
    a near-tie is a bug, not rounding.
    """
    turn, index = divergence["turn"], divergence["index"]
    text = render(tokenizer, prompt.turns[: turn + 1], base.answers[:turn])
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + base.output_ids[turn][:index]
    logits = model(torch.tensor([ids], device=device)).logits[0, -1]

    def pick(out: list[list[int]]) -> int | None:   # None: that output stopped before the index
        return out[turn][index] if index < len(out[turn]) else None

    parted = {pick(base.output_ids), pick(drafted.output_ids)}
    # In the model's dtype, even if HF upcasts its logits.
    return {"turn": turn, "index": index, "baseline_token": pick(base.output_ids),
            "drafter_token": pick(drafted.output_ids), **tie_measure(logits, parted, model.dtype)}


def _add_engine_stats(res: Decoded, stats, row: int, rows: int) -> None:
    """Fold one call's spec_stats for batch row ``row`` (of ``rows`` active) into ``res``."""
    lengths = [int(n) for n in stats.accepted_lengths[row]]
    res.accepted_lengths = (res.accepted_lengths or []) + lengths
    res.turn_steps = (res.turn_steps or []) + [len(lengths)]
    res.draft_tokens += sum(int(n) for n in stats.proposed[row])
    res.undrafted_steps += int(stats.undrafted_by_row[row])
    res.idle_steps += stats.idle_steps / rows
    for phase, seconds in stats.times.items():
        res.times[phase] = res.times.get(phase, 0.0) + float(seconds) / rows
    res.lossless = bool(stats.lossless) if res.lossless is None else res.lossless and bool(stats.lossless)
    memory = getattr(stats, "memory", None)
    if memory is not None:
        res.memory = {k: v for k, v in memory.items() if k != "peak_bytes"}


def _memory_mark(device: torch.device) -> int | None:
    """Before a call: sync, reset CUDA's peak counter and return what is allocated (None off CUDA)."""
    _sync(device)
    if device.type != "cuda":
        return None
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def _memory_peak(device: torch.device, base: int | None) -> int | None:
    """After a call (synced): how far allocated memory rose above ``base`` at its peak."""
    return None if base is None else torch.cuda.max_memory_allocated(device) - base


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)

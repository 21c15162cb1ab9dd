"""Drafting's extra device memory, computed from the drafter's spec and the models' configs, and
the choice of a drafter configuration that fits ``wrap(..., memory_budget=bytes)`` (after SpecMemo).

Extra memory is what a drafted call holds beyond plain decoding of the same batch:

- target KV slots the steps reach past the prompt and new tokens: ``max(N, scratch) + steps * (N + 1)``
  per row (``N = spec.num_nodes``), times the bytes of one KV slot (2 x layers x KV heads x head dim
  x dtype size);
- verification buffers per row: fp32 logits of N nodes, the tree mask of ``N + 1`` queries over the
  cache, the exported hidden states of ``spec.hidden_layers``;
- the drafter's own buffers, ``drafter.memory_bytes(batch, cache_len, new_tokens)``: a draft
  model's or a head's KV cache and logits.

The terms hold at the call's peak because nothing else drafting-only is live there: the eager
prefill frees its inputs (a width-squared mask) before the drafter's own prefill runs, whose
activations are then no larger than the target's were, and decode state holds no reference
cycle, so a Decoder or draft cache being replaced is freed before the new one is allocated.

``fit`` walks the drafter's ``budget_configs()`` from the largest extra memory down and applies
the first that fits; at a larger batch every term grows, so each row gets a smaller configuration.
If even the smallest does not fit it raises, naming the budget and that minimum.

It knows byte counts and drafter knobs, not decoding.
"""
from __future__ import annotations

from dataclasses import dataclass

def kv_slot_bytes(runner) -> int:
    """Bytes of one token's keys and values over every layer of ``runner``'s model."""
    c = runner.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    return 2 * c.num_hidden_layers * kv_heads * head_dim * runner.dtype.itemsize


def extra_bytes(drafter, target, batch: int, cache_len: int, new_tokens: int, chunk_steps: int = 1) -> int:
    """Drafting's extra device bytes for ``batch`` rows of ``cache_len`` slots (module docstring)."""
    spec = drafter.spec
    n = spec.num_nodes
    if n == 0:
        return 0
    c = target.config
    slots = max(n, spec.scratch_slots) + chunk_steps * (n + 1)
    per_row = (slots * kv_slot_bytes(target) + n * c.vocab_size * 4 + (n + 1) * (cache_len + slots)
               + len(spec.hidden_layers) * (n + 1) * c.hidden_size * target.dtype.itemsize)
    return batch * per_row + drafter.memory_bytes(batch, cache_len, new_tokens)


@dataclass(frozen=True)
class MemoryPlan:
    """The configuration ``fit`` chose, and its analytic extra memory."""

    budget: int  # bytes
    batch: int
    config: dict  # the knobs passed to drafter.configure (empty: the drafter as built)
    extra_bytes: int  # analytic extra memory of that configuration at this batch

    def to_dict(self) -> dict:
        return dict(budget=self.budget, batch=self.batch, config=dict(self.config), extra_bytes=self.extra_bytes,
                    per_row_bytes=self.extra_bytes // max(1, self.batch))


def fit(drafter, target, budget: int, batch: int, cache_len: int, new_tokens: int, chunk_steps: int = 1) -> MemoryPlan:
    """Configure ``drafter`` with its largest configuration whose extra memory fits ``budget``.

    Example: ``fit(Rapid(num_tokens=8, context_tokens=4096), runner, 64 << 20, 4, 6000, 256)``
    might settle on ``{"num_tokens": 8, "context_tokens": 1024}``.
    """
    sized = []
    for config in drafter.budget_configs():
        drafter.configure(**config)
        sized.append((extra_bytes(drafter, target, batch, cache_len, new_tokens, chunk_steps), config))
    sized.sort(key=lambda s: -s[0])
    for need, config in sized:
        if need <= budget:
            drafter.configure(**config)
            return MemoryPlan(budget, batch, config, need)
    need, config = sized[-1]
    drafter.configure(**config)
    raise MemoryError(
        f"memory_budget={budget} bytes is below the {need} bytes that {drafter.name}'s smallest drafting "
        f"configuration {config or '(as built)'} needs at batch {batch} and {cache_len} cache slots; raise "
        "memory_budget, lower the batch or max_new_tokens, or pass memory_budget=None")


class Meter:
    """Peak memory of one generate call, for ``spec_stats.memory``.

    On CUDA ``peak_bytes`` is ``torch.cuda.max_memory_allocated`` over the call minus what was
    allocated when it began (the whole call: target cache and activations included). On other
    devices nothing is measured and ``peak_bytes`` is the analytic extra memory of drafting."""

    def __init__(self, engine, budget: int | None, batch: int, longest: int, new_tokens: int):
        import torch

        self.torch, self.cuda = torch, engine.runner.device.type == "cuda"
        cache_len = engine._capacity(longest + engine._pad(), new_tokens, batch)
        drafter, before = engine.drafter, engine.drafter.spec
        if budget is None:
            self.plan = MemoryPlan(0, batch, {}, extra_bytes(drafter, engine.runner, batch, cache_len, new_tokens,
                                                              engine.chunk_steps))
        else:
            self.plan = fit(drafter, engine.runner, budget, batch, cache_len, new_tokens, engine.chunk_steps)
        if drafter.spec != before and engine._decoder is not None:
            engine._decoder.release()  # its buffers were sized for the previous configuration:
            engine._decoder = None  # freed now (a Decoder holds no reference cycle), before the call allocates
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(engine.runner.device)
            self.base = torch.cuda.memory_allocated(engine.runner.device)
        self.budget, self.device = budget, engine.runner.device

    def report(self) -> dict:
        out = self.plan.to_dict()
        out["budget"] = self.budget
        out["measured"] = self.cuda
        out["peak_bytes"] = (self.torch.cuda.max_memory_allocated(self.device) - self.base if self.cuda
                             else self.plan.extra_bytes)
        return out

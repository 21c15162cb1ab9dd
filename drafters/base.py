"""The Drafter protocol and the DecodeContext the engine hands to drafters.

A drafter proposes a DraftTree after each row's root (the last committed token); the engine
verifies it with one target forward and tells the drafter what was kept. Drafters own whatever
state they need (a draft model's cache, n-gram tables, an adaptive length); the engine owns the
target's cache and the committed tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from torch import Tensor

from specdec.verifiers.acceptance import SamplingParams, StepOutcome
from specdec.verifiers.tree import DraftTree


@dataclass
class DecodeContext:
    """Read-only view of the decoding state at the start of a step."""

    target: "object"  # specdec.runner.ModelRunner of the target model
    tokens: Tensor  # [B, L] committed tokens, left padded; row b's root is tokens[b, seq_len[b] - 1]
    seq_len: Tensor  # [B] committed tokens per row, padding included
    start: Tensor  # [B] index of each row's first real token
    params: SamplingParams
    max_seq_len: int  # host copy of seq_len.max()
    capacity: int  # L, the token buffer's length
    step: int = 0
    # The target's KVCache. Self-drafters (LayerSkip and kin) read the committed K/V from it and
    # write their draft tokens' K/V into its scratch slots (>= seq_len - 1), which the verification
    # step overwrites; they must leave ``cache.lengths`` at ``seq_len - 1`` when they return.
    cache: "object" = None


@runtime_checkable
class Drafter(Protocol):
    """Anything with these members can draft for the engine.

    ``num_nodes`` is the static per-row node budget of every tree ``propose`` returns.
    """

    num_nodes: int

    def begin(self, ctx: DecodeContext) -> None: ...

    def propose(self, ctx: DecodeContext) -> DraftTree: ...

    def observe(self, outcome: StepOutcome) -> None: ...


class VocabularyMismatchError(ValueError):
    """The drafter's vocabulary is not the target's."""

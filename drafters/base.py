"""The drafter contract: a DraftSpec each drafter declares once, the Drafter base class, NullDrafter.

A drafter proposes a DraftTree after each row's root (the last committed token); the engine
verifies it with one target forward and tells the drafter what was kept. Drafters own whatever
state they need (a draft model's cache, an adaptive length); the engine owns the target's cache
and the committed tokens (``specdec.state.DecodeState``).

The engine reads a drafter's ``spec`` and calls the five methods below; it never probes for
other attributes. A drafter whose ``spec.device_only`` is True keeps ``propose`` and ``observe``
pure device work over static shapes (no ``.item()``, no Python branch on a tensor value): the
engine then runs many steps per host sync, captured in one CUDA graph on CUDA. Otherwise the
engine runs one step per sync, eagerly, and ``wrap(..., cuda_graphs=True)`` refuses it.
"""
from __future__ import annotations

from dataclasses import dataclass

from specdec.state import DecodeState
from specdec.verifiers.acceptance import StepOutcome
from specdec.verifiers.tree import DraftTree

DecodeContext = DecodeState  # the name drafters used before the state became one dataclass


@dataclass(frozen=True, kw_only=True)
class DraftSpec:
    """What the engine needs to know about a drafter, declared once.

    Example: prompt lookup of 8 tokens declares ``DraftSpec(num_nodes=8)``; a 4-token draft
    model chain ``DraftSpec(num_nodes=4, forwards_per_step=4)``.
    """

    num_nodes: int  # static node budget per row and step: every tree propose returns has N nodes
    lookback: int = 2  # committed tokens it re-reads (the engine left-pads so they exist)
    scratch_slots: int = 0  # cache slots past the root its own drafting writes (tree exploration)
    device_only: bool = True  # propose/observe are capturable device work (many steps per sync)
    hidden_layers: tuple[int, ...] = ()  # target layer counts whose outputs verification exports
    forwards_per_step: int = 0  # draft forwards in one drafted step (statistics)

    def __post_init__(self) -> None:
        if self.num_nodes < 0 or self.lookback < 1 or self.scratch_slots < 0 or self.forwards_per_step < 0:
            raise ValueError(f"invalid DraftSpec {self}: num_nodes, scratch_slots and forwards_per_step must be "
                             ">= 0 and lookback >= 1")
        if any(e < 1 for e in self.hidden_layers):
            raise ValueError(f"hidden_layers are layer counts (>= 1), got {self.hidden_layers}")


class Drafter:
    """Base class of every drafter: the protocol with its defaults.

    ``spec`` is the DraftSpec (a property when it depends on the target, fixed by ``bind``).
    ``bind(target)`` is called once by ``wrap`` with the target's ModelRunner: check that the
    drafter fits it (vocabulary, layer count, device) and raise a clear error otherwise.
    ``begin(state)`` after each prefill; ``propose(state)`` once per drafted step;
    ``observe(state, outcome)`` after each drafted step's commit; ``resync(state, since)`` when
    drafting resumes after undrafted steps, with the committed length the pause began at.
    """

    spec: DraftSpec

    def bind(self, target) -> None:
        pass

    def begin(self, state: DecodeState) -> None:
        pass

    def propose(self, state: DecodeState) -> DraftTree:
        raise NotImplementedError

    def observe(self, state: DecodeState, outcome: StepOutcome) -> None:
        pass

    def resync(self, state: DecodeState, since: int) -> None:
        pass

    def compile(self, options: dict | None) -> None:
        """``wrap(..., compile=True)``: compile the draft phase's own forwards with the target's.
        Drafters with nothing of their own to compile (their work is traced with the step) keep
        this default."""

    def budget_configs(self) -> list[dict]:
        """The knob settings ``configure`` accepts, for ``wrap(..., memory_budget=...)``
        (``specdec.memory.fit``). Default: only the drafter as built."""
        return [{}]

    def configure(self, **knobs) -> None:
        """Apply one of ``budget_configs()``; called between generate calls, never mid-call."""
        if knobs:
            raise ValueError(f"{self.name} has no memory knobs; got {sorted(knobs)}")

    def memory_bytes(self, batch: int, cache_len: int, new_tokens: int) -> int:
        """Device bytes of the drafter's own buffers (a draft KV cache, head caches) for ``batch``
        rows, a target cache of ``cache_len`` slots and ``new_tokens`` to generate. Default 0."""
        return 0

    @property
    def name(self) -> str:
        return type(self).__name__


class NullDrafter(Drafter):
    """No draft: every step verifies the root alone, which is plain autoregressive decoding."""

    spec = DraftSpec(num_nodes=0)

    def propose(self, state: DecodeState) -> DraftTree:
        return DraftTree.empty(state.tokens.shape[0], state.tokens.device)

    @property
    def name(self) -> str:
        return "none"


class VocabularyMismatchError(ValueError):
    """The drafter's vocabulary is not the target's."""

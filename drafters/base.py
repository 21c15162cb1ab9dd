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

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

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
    # The prefill collects ``hidden_layers`` too and hands them to ``observe_prefill`` chunk by
    # chunk (inside the captured prefill), so ``begin`` need not run the target over the prompt again.
    prefill_hidden: bool = False

    def __post_init__(self) -> None:
        if self.num_nodes < 0 or self.lookback < 1 or self.scratch_slots < 0 or self.forwards_per_step < 0:
            raise ValueError(f"invalid DraftSpec {self}: num_nodes, scratch_slots and forwards_per_step must be "
                             ">= 0 and lookback >= 1")
        if any(e < 1 for e in self.hidden_layers):
            raise ValueError(f"hidden_layers are layer counts (>= 1), got {self.hidden_layers}")


class Drafter:
    """Base class of every drafter: the protocol with its defaults.

    The engine calls, per ``generate`` call: ``begin`` after the prefill, then per drafted
    step ``propose`` -> (verify, accept, commit) -> ``observe``; ``resync`` when drafting resumes
    after undrafted steps. ``bind`` runs once, at ``wrap``. Subclasses override ``propose`` and
    whatever else they need; the defaults do nothing.

    Under ``cuda_graphs=True`` the Python bodies of ``propose`` and ``observe`` run only while a
    step is captured; every later step replays the recorded kernels. So a device-only drafter
    keeps its per-step state in tensors it updates in place, never in Python attributes.

    Example: ``specdec.wrap(model, drafter=PromptLookup(num_tokens=8))``; the README's "Write your
    own drafter" section has a complete small drafter.
    """

    spec: DraftSpec  # a property when it depends on the target (fixed by ``bind``)

    def bind(self, target) -> None:
        """Called once by ``wrap``, before ``spec`` is read, with the target's
        ``specdec.runner.ModelRunner`` (its ``model``, ``config``, ``device``, layers).

        Check here that the drafter fits the target (vocabulary, layer count, device, dtype) and
        raise a clear error naming the mismatch (``VocabularyMismatchError`` for vocabularies).
        Drafters that read the target (self-drafts, heads) keep the runner."""

    def begin(self, state: DecodeState) -> None:
        """Called after every prefill, before the first step, with the call's fresh state.

        ``state.tokens[b, state.start[b]:state.seq_len[b]]`` are row b's prompt tokens (left
        padded, ``[B, L]`` long); the target's cache holds all of them but the last (the root).
        Reset per-call state here and build any cache of your own over the prompt. The engine
        may call ``begin`` twice for one call (again after capturing CUDA graphs, whose warm-up
        ran steps), so it must not depend on being called once."""

    def reserve(self, state: DecodeState) -> None:
        """Called before the prefill when ``spec.prefill_hidden`` is set: allocate (or keep) the
        buffers ``observe_prefill`` writes, sized by ``state``'s batch and capacity. A captured
        prefill graph writes into them for as long as it lives, so keep them while the sizes hold."""

    def observe_prefill(self, state: DecodeState, slots: Tensor, layer_hidden: Tensor) -> None:
        """With ``spec.prefill_hidden``: called for each prefill chunk with its cache ``slots``
        ``[B, C]`` (long; the same for every row) and ``layer_hidden`` ``[E, B, C, H]``, the target's
        states after each of ``spec.hidden_layers`` at those slots. Queries past the prompt (the
        last chunk is padded) and at left padding give garbage that must never be read. Device
        work only: under CUDA graphs this runs inside the captured prefill. ``begin`` then sees
        ``state.prompt_states`` true."""

    def propose(self, state: DecodeState) -> DraftTree:
        """Return the draft for every row, hanging off its root (``state.tokens[b, seq_len[b] - 1]``).

        Shapes are static: ``tokens``, ``parents`` and ``valid`` are ``[B, spec.num_nodes]``
        (``q``, if given, ``[B, N, V]`` float: the distribution each node's token was drawn from;
        None means point masses). Rows with nothing to propose mark their nodes invalid. Read
        committed tokens only up to ``state.max_seq_len`` (a static bound on every row's
        ``seq_len``). With ``spec.device_only`` this is device work: no ``.item()``, no Python
        branch on a tensor's value, no shapes that depend on data."""
        raise NotImplementedError

    def observe(self, state: DecodeState, outcome: StepOutcome) -> None:
        """Called after each drafted step's commit with what the target kept.

        ``outcome.accept_len`` ``[B]`` counts accepted draft nodes, ``outcome.path`` ``[B, N]``
        lists them root-down (-1 padded), ``outcome.next_token`` ``[B]`` is the bonus or recovered
        token (the new root). ``state`` is already committed: ``seq_len`` includes those tokens,
        and ``state.hidden`` ``[E, B, N + 1, H]`` holds the target's hidden states after each of
        ``spec.hidden_layers`` at the root and every node. Frozen rows (``state.active == 0``)
        gained nothing. Adapt here (draft length, tree width, halting, your own cache's
        rollback); under ``spec.device_only`` on the device only."""

    def resync(self, state: DecodeState, since: int) -> None:
        """Called when drafting resumes after undrafted steps (``max_draft_batch``, ``min_tau``),
        before the next ``propose``. ``since`` is the committed length (padding included, as
        ``state.seq_len``) of the shortest live row when the pause began: tokens from there to
        ``state.seq_len`` were committed without this drafter seeing them. A drafter with its
        own cache re-reads them; one that reads the token buffer each step keeps this no-op."""

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


@dataclass(frozen=True)
class ChainConstants:
    """Index and mask tensors a drafter's per-step loop reads: the same every step, so made once."""

    offsets: Tensor  # [K] long, 0 .. K - 1: a chain position's offset from the root's slot
    causal: Tensor  # [B, K, K] bool, lower triangular: K tokens fed at once, each seeing those before it
    alone: Tensor  # [B, 1, 1] bool, True: one token fed alone sees itself (among, and the tree kernel's mask)


@functools.cache  # never evicted: a captured CUDA graph reads these tensors for as long as it lives
def chain_constants(batch: int, length: int, device: torch.device) -> ChainConstants:
    """``ChainConstants`` for ``batch`` rows and chains of ``length``, on ``device``.

    Built from host lists, so a CUDA-graph capture (which may not copy from the host) can only
    reuse them, never make them: the step's warm-up run makes them first."""
    tril = [[j <= i for j in range(length)] for i in range(length)]
    return ChainConstants(offsets=torch.tensor(list(range(length)), dtype=torch.long, device=device),
                          causal=torch.tensor(tril, dtype=torch.bool, device=device).expand(batch, length, length),
                          alone=torch.tensor([[[True]]], device=device).expand(batch, 1, 1))


class VocabularyMismatchError(ValueError):
    """The drafter's vocabulary is not the target's."""

"""SpecEngine: prefill, then propose -> verify -> accept -> commit until every row stops.

The step lives in ``specdec.step`` (device work only), the host loop in ``specdec.driver``
(stopping rules, streaming, statistics), the drafting policy in ``specdec.gate``. There is one
step and one driver: eager decoding is the same driver with one step per sync and no graphs,
and decoding without a drafter is the NullDrafter case of the same step, so every benchmark's
baseline runs through exactly this code.

The engine knows the runner, the Decoder, drafters' specs and acceptance rules; not tokenizers
or HF generation options (``specdec.api`` translates those).
"""
from __future__ import annotations

import threading
import time
import weakref
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from specdec.drafters.base import DraftSpec, Drafter, NullDrafter
from specdec.driver import Driver, Rows
from specdec.gate import DraftGate, RunCosts
from specdec.runner import ModelRunner
from specdec.stats import PhaseTimer, SpecStats
from specdec.step import PREFILL_CHUNK, Decoder, check_compile
from specdec.verifiers.acceptance import SamplingParams, make_acceptance

CACHE_LEN = 2048  # default cache slots per row with cuda_graphs or compile: prompts up to this never recapture
_LOCKS: "weakref.WeakKeyDictionary[object, threading.RLock]" = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


@dataclass
class EngineOutput:
    generated: list[list[int]]  # [B][new tokens] per row, EOS included when hit
    stats: SpecStats


def left_pack(input_ids: Tensor, attention_mask: Tensor, width: int, pad: int) -> tuple[Tensor, Tensor]:
    """Right-align each row's real tokens in a ``[B, width]`` buffer. Returns (buffer, start).

    Works for left or right padded input: only positions where the mask is 1 are kept.
    """
    b, t = input_ids.shape
    real = attention_mask.bool()
    lengths = real.sum(dim=1)
    order = real.long().argsort(dim=1, stable=True)  # stable: padding first, real tokens in order
    packed = input_ids.gather(1, order)[:, max(0, t - width):]  # more padding columns than width: drop them
    buf = torch.full((b, width), pad, dtype=input_ids.dtype, device=input_ids.device)
    buf[:, width - packed.shape[1]:] = packed
    start = width - lengths
    pos = torch.arange(width, device=input_ids.device).unsqueeze(0)
    buf = torch.where(pos >= start.unsqueeze(1), buf, torch.full_like(buf, pad))
    return buf, start


def _lock(drafter) -> threading.RLock:
    """One lock per drafter object: wrappers that share a drafter (and its state) take turns."""
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(drafter, threading.RLock())


class SpecEngine:
    """Speculative decoding over one target model.

    Example::

        engine = SpecEngine(model, drafter=PromptLookup(num_tokens=4))
        out = engine.generate(input_ids, attention_mask, max_new_tokens=64,
                              params=SamplingParams(), eos_ids={2}, pad_id=0)
    """

    def __init__(self, model, drafter: Drafter | None = None, acceptance: str | None = None, attention: str = "auto",
                 max_draft_batch: int | None = None, cuda_graphs: bool = False, chunk_steps: int | None = None,
                 compile: bool | dict = False, fuse: bool | None = None, min_tau: float | str | None = None,
                 pipeline: bool | None = None, cache_len: int | None = None):
        self.runner = ModelRunner(model, attention=attention, fuse=fuse)
        self.drafter = drafter if drafter is not None else NullDrafter()
        if not isinstance(self.drafter, Drafter):
            raise TypeError(f"{type(self.drafter).__name__} is not a Drafter: subclass specdec.drafters.Drafter")
        self.drafter.bind(self.runner)
        spec = self.drafter.spec
        if not isinstance(spec, DraftSpec):
            raise TypeError(f"{type(self.drafter).__name__}.spec must be a DraftSpec, got {type(spec).__name__}")
        name = self.drafter.name
        if cuda_graphs and not spec.device_only:
            raise ValueError(f"{name} cannot run under cuda_graphs=True: its proposal needs the host every step "
                             "(spec.device_only is False); pass cuda_graphs=False")
        if cuda_graphs and self.runner.device.type != "cuda":
            raise ValueError("cuda_graphs=True needs the model on a CUDA device")
        if chunk_steps is not None and (chunk_steps < 1 or (chunk_steps > 1 and not spec.device_only)):
            raise ValueError(f"chunk_steps must be >= 1, and 1 for {name}, whose proposal needs the host every "
                             f"step; got {chunk_steps}")
        # Steps per host sync: 8 with cuda_graphs (one captured graph per run), else 1.
        self.chunk_steps = chunk_steps if chunk_steps is not None else (8 if cuda_graphs else 1)
        self.cuda_graphs = cuda_graphs
        self.compile = check_compile(compile)  # the target's forward, and the drafter's own (Drafter.compile)
        # Queue the next run before reading the last one back (default: on with cuda_graphs).
        self.pipeline = cuda_graphs if pipeline is None else pipeline
        if cache_len is not None and cache_len < 1:
            raise ValueError(f"cache_len must be a positive number of slots, got {cache_len}")
        self.cache_len = cache_len
        self.max_draft_batch, self.min_tau = max_draft_batch, min_tau
        DraftGate(max_draft_batch, min_tau)  # checks the values now, at wrap time
        self._costs: dict[tuple, RunCosts] = {}  # (batch, capacity, rule) -> measured step costs (min_tau="auto")
        self.acceptance_name = acceptance
        self.lock = _lock(self.drafter)
        self._decoder: Decoder | None = None
        self._reserved: tuple[int, int] | None = None  # (batch, capacity) set by reserve()

    @property
    def static(self) -> bool:
        """Whether steps use one fixed cache view (graphs or compile): nothing recompiles per prompt."""
        return self.cuda_graphs or bool(self.compile)

    def reserve(self, batch: int, max_length: int) -> None:
        """Size the cache of ``batch``-row calls for ``max_length`` tokens (prompt plus new ones), so
        later calls up to that length reuse it and never capture or compile again."""
        self._reserved = (batch, self._capacity(max_length + self._pad(), 0, batch=None))

    def _pad(self) -> int:
        """Extra left padding so every row has the drafter's ``lookback`` committed slots."""
        return max(1, self.drafter.spec.lookback - 1)

    def _capacity(self, width: int, max_new: int, batch: int | None) -> int:
        """Cache slots for prompts of ``width`` and ``max_new`` new tokens: plus the step's reach,
        the root's slot, and the runs a finished row may go on for (two when pipelined)."""
        spec = self.drafter.spec
        runs = 2 if self.pipeline else 1
        need = width + max_new + max(spec.num_nodes, spec.scratch_slots) + 1 + runs * self.chunk_steps * (spec.num_nodes + 1)
        if self._reserved is not None and self._reserved[0] == batch:
            need = max(need, self._reserved[1])
        if not self.static:
            return max(need, self.cache_len or 0)
        need = max(need, -(-width // PREFILL_CHUNK) * PREFILL_CHUNK + 1, self.cache_len or CACHE_LEN)
        return -(-need // 512) * 512

    def _rule(self, params: SamplingParams):
        name = self.acceptance_name or ("speculative" if params.do_sample else "greedy")
        if name == "greedy" and params.do_sample:
            raise ValueError("acceptance='greedy' needs do_sample=False; sampling uses acceptance='speculative'")
        return make_acceptance(name)

    def _decoder_for(self, batch: int, capacity: int, rule) -> Decoder:
        dec = self._decoder
        if dec is None or dec.state.tokens.shape[0] != batch or dec.state.capacity < capacity:
            if dec is not None:
                dec.release()  # its graphs go now, not whenever the GC finds them (maybe mid-capture)
            # Drop the old state before allocating the new one, so the two are never live together.
            dec = self._decoder = None
            dec = Decoder(self.runner, self.drafter, rule, batch, capacity, self.chunk_steps, self.cuda_graphs,
                          compile=self.compile, static=self.static)
            self._decoder = dec
        dec.rule = rule
        return dec

    def step_profile(self, reps: int = 50) -> dict[str, float] | None:
        """Device milliseconds per step, by phase (draft, verify, accept, commit), at the state the
        last call left (CUDA graphs only; None before any such call)."""
        dec = self._decoder
        if dec is None or not dec.graphs or dec.state.params is None:
            return None
        with self.lock:
            return dec.phase_times(draft=True, reps=reps)

    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Tensor, max_new_tokens: int, params: SamplingParams,
                 eos_ids: set[int], pad_id: int, stop_fn: Callable[[int, list[int]], bool] | None = None,
                 on_tokens: Callable[[int, list[int]], None] | None = None,
                 max_time: float | None = None) -> EngineOutput:
        """Decode up to ``max_new_tokens`` per row. ``stop_fn(row, row_tokens)`` may end a row early
        (row_tokens are the real prompt tokens plus everything generated); ``on_tokens(row, new)``
        sees each step's kept tokens (streaming). ``max_time``: seconds from the call's start after which
        every row stops at the next host sync (as HF's MaxTimeCriteria, checked per sync, not per
        token). Calls on one engine (or sharing a drafter) take turns."""
        with self.lock:
            wall0 = time.perf_counter()
            rule, dev = self._rule(params), self.runner.device
            input_ids, attention_mask = input_ids.to(dev).long(), attention_mask.to(dev)
            b, width = input_ids.shape[0], int(attention_mask.sum(dim=1).max()) + self._pad()
            dec = self._decoder_for(b, self._capacity(width, max_new_tokens, b), rule)
            packed, start = left_pack(input_ids, attention_mask, width, pad_id)
            dec.load(packed, start, width, params)  # prefill: every committed token but the root
            self._begin(dec)
            prefill_time = time.perf_counter() - wall0
            rows = Rows([r[s:] for r, s in zip(packed.tolist(), start.tolist())], max_new_tokens, eos_ids,
                        stop_fn, on_tokens, deadline=None if max_time is None else wall0 + max_time)
            timer = PhaseTimer(dev)
            costs = self._costs.setdefault((b, dec.state.capacity, rule.name), RunCosts())
            gate = DraftGate(self.max_draft_batch, self.min_tau, window=max(8, dec.steps), costs=costs)
            steps, drafted = Driver(dec, gate, rows, timer).run(width, self.pipeline)
            wall = time.perf_counter() - wall0
            return EngineOutput(rows.generated, self._stats(rows, rule, gate, steps, drafted, timer.result(
                wall - prefill_time), wall, prefill_time))

    def _begin(self, dec: Decoder) -> None:
        """The drafter's ``begin``; the first call of a batch size and rule captures its step
        graphs here (drafting, and undrafted when a policy may pause drafting), then begins again,
        since the capture's warm-up moved the drafter's own state."""
        self.drafter.begin(dec.state)
        variants = (True, False) if dec.k and (self.max_draft_batch is not None or self.min_tau is not None) else (True,)
        if dec.prepare(variants):
            self.drafter.begin(dec.state)

    def _stats(self, rows: Rows, rule, gate: DraftGate, steps: int, drafted: int, times, wall, prefill) -> SpecStats:
        spec, b = self.drafter.spec, len(rows.active)
        drafting = spec.num_nodes > 0
        return SpecStats(accepted_lengths=rows.gained, proposed=rows.offered, new_tokens=[len(g) for g in rows.generated],
                         num_steps=steps, draft_forwards=drafted * spec.forwards_per_step, verify_forwards=steps,
                         times=times, wall_time=wall, lossless=rule.lossless, acceptance=rule.name,
                         drafter=self.drafter.name, prefill_time=prefill,
                         undrafted_steps=steps - drafted if drafting else 0,
                         idle_steps=steps - max(map(len, rows.gained)),
                         draft_pauses=gate.paused if drafting else 0,
                         undrafted_by_row=rows.undrafted if drafting else [0] * b)

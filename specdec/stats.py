"""SpecStats: what one generate call measured, and the phase timer that feeds it.

τ (tau) is the mean number of tokens a row gains per target forward: accepted draft tokens
plus the bonus/recovered token, averaged over the steps in which the row was still generating.
The acceptance rate is accepted draft tokens over proposed draft tokens (for a tree, the
proposal of a step is its deepest valid path).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch

PHASES = ("draft", "verify", "accept", "commit", "host")


@dataclass
class SpecStats:
    """Statistics of one ``generate`` call: ``out.spec_stats`` with ``return_dict_in_generate=True``.

    B is the batch (prompt rows after ``num_return_sequences``); a *step* is one target forward
    over every live row's root and draft nodes. A row's steps end at the step that finished it.

    Example, one row, three steps that kept 3, 1 and 2 tokens after drafts 4, 4 and 2 deep::

        accepted_lengths = [[3, 1, 2]]   proposed = [[4, 4, 2]]   new_tokens = [6]
        tau = 6 / 3 = 2.0                acceptance_rate = (2 + 0 + 1) / (4 + 4 + 2) = 0.3
    """

    # [B][steps] int: tokens row b kept at each of its steps: accepted draft tokens plus the
    # bonus/recovered one (1 for an undrafted step), fewer when the row stopped inside the step.
    accepted_lengths: list[list[int]]
    # [B][steps] int: depth of the deepest valid draft path row b was offered at each step
    # (the chain length for a chain; 0 for an undrafted step).
    proposed: list[list[int]]
    new_tokens: list[int]  # [B] int: tokens generated per row, EOS included
    num_steps: int  # steps (target forwards) the call launched, counted once for the whole batch
    # draft forwards: drafted steps x ``spec.forwards_per_step`` (0 for lookup-style drafters)
    draft_forwards: int
    verify_forwards: int  # target forwards after the prefill (= num_steps)
    # seconds per phase, after the prefill: draft, verify, accept, commit (device time via CUDA
    # events on CUDA, host clock elsewhere) and host (the rest: syncs, stopping rules, streaming)
    times: dict[str, float]
    wall_time: float  # seconds, the whole call, prefill included
    lossless: bool = True  # False under a lossy acceptance rule (relaxed, typical)
    acceptance: str = "greedy"  # the acceptance rule that ran: greedy, speculative, relaxed, typical
    drafter: str = "none"  # the drafter's name (``Drafter.name``); "none" for plain decoding
    prefill_time: float = 0.0  # seconds from the call's start to the end of the prefill and ``begin``
    undrafted_steps: int = 0  # steps the draft policies (max_draft_batch, min_tau) ran without a draft
    # steps of ``num_steps`` that no row used: after every row had stopped (the tail of the last
    # run, and a pipelined run queued before the rows were seen to stop). = num_steps - the
    # longest row of ``accepted_lengths``.
    idle_steps: int = 0
    draft_pauses: int = 0  # times min_tau paused drafting after a window that did not pay
    undrafted_by_row: list[int] | None = None  # [B] int: each row's own steps that ran without a draft
    # specdec.memory.Meter's report (bytes): the budget, the drafter configuration chosen under it,
    # the analytic ``extra_bytes`` of drafting, ``peak_bytes`` (the call's rise in
    # ``torch.cuda.max_memory_allocated`` on CUDA, else the analytic extra) and ``measured``
    memory: dict | None = None

    @property
    def tau(self) -> float:
        """τ, mean tokens kept per row per step: sum of ``accepted_lengths`` over row-steps.
        1.0 is plain decoding; a drafter pays only when τ exceeds its step's cost ratio."""
        steps = sum(len(r) for r in self.accepted_lengths)
        return sum(map(sum, self.accepted_lengths)) / steps if steps else 0.0

    @property
    def acceptance_rate(self) -> float:
        """α in [0, 1]: accepted draft tokens over offered draft depth, pooled over rows and steps
        (each step's bonus/recovered token is not a draft token and is left out)."""
        offered = sum(map(sum, self.proposed))
        accepted = sum(sum(a) - len(a) for a in self.accepted_lengths)
        return accepted / offered if offered else 0.0

    @property
    def tokens_per_second(self) -> float:
        """All rows' new tokens over ``wall_time`` (prefill included), in tokens per second."""
        return sum(self.new_tokens) / self.wall_time if self.wall_time > 0 else 0.0

    def to_dict(self) -> dict:
        """The fields plus ``tau``, ``acceptance_rate`` and ``tokens_per_second``, JSON-ready."""
        d = asdict(self)
        d.update(tau=self.tau, acceptance_rate=self.acceptance_rate, tokens_per_second=self.tokens_per_second)
        return d

    def summary(self) -> str:
        """One line for people: drafter, τ, α, steps, tokens, throughput and phase times."""
        t = ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in self.times.items())
        return (f"drafter={self.drafter} tau={self.tau:.2f} acceptance={self.acceptance_rate:.2%} "
                f"steps={self.num_steps} new_tokens={sum(self.new_tokens)} "
                f"tok/s={self.tokens_per_second:.1f} lossless={self.lossless} [{t}]")


@dataclass
class PhaseTimer:
    """Accumulates time per phase. On CUDA it records events and reads them once at the end,
    so timing adds no host sync to the decode loop."""

    device: torch.device
    totals: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    _events: list = field(default_factory=list)
    _t: float = 0.0
    _mark = None

    def __post_init__(self):
        self.cuda = self.device.type == "cuda"

    def start(self) -> None:
        self._mark = self._now()

    def lap(self, phase: str):
        """Close ``phase``; returns its span, for ``seconds`` (two events on CUDA, seconds elsewhere)."""
        now = self._now()
        if self.cuda:
            span = (self._mark, now)
            self._events.append((phase, *span))
        else:
            span = now - self._mark
            self.totals[phase] += span
        self._mark = now
        return span

    def seconds(self, span) -> float:
        """A span's seconds. On CUDA its events must have completed (the caller waited on later
        work), so reading them adds no sync."""
        return span[0].elapsed_time(span[1]) / 1e3 if self.cuda else span

    def _now(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def result(self, wall: float) -> dict[str, float]:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            for phase, a, b in self._events:
                self.totals[phase] += a.elapsed_time(b) / 1e3
            self._events.clear()
        timed = sum(v for k, v in self.totals.items() if k != "host")
        self.totals["host"] += max(0.0, wall - timed)
        return dict(self.totals)

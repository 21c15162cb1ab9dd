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
    accepted_lengths: list[list[int]]  # [B][steps]: tokens each row gained per step
    proposed: list[list[int]]  # [B][steps]: draft tokens each row was offered per step
    new_tokens: list[int]  # [B]
    num_steps: int
    draft_forwards: int
    verify_forwards: int
    times: dict[str, float]  # seconds per phase: draft, verify, accept, commit, host
    wall_time: float
    lossless: bool = True
    acceptance: str = "greedy"
    drafter: str = "none"
    prefill_time: float = 0.0
    undrafted_steps: int = 0  # steps the draft policies (max_draft_batch, min_tau) ran without a draft
    draft_pauses: int = 0  # times min_tau paused drafting after a window that did not pay
    undrafted_by_row: list[int] | None = None  # [B]: each row's own steps that ran without a draft
    # specdec.memory.Meter's report: budget, chosen config, analytic extra_bytes, peak_bytes, measured
    memory: dict | None = None

    @property
    def tau(self) -> float:
        steps = sum(len(r) for r in self.accepted_lengths)
        return sum(map(sum, self.accepted_lengths)) / steps if steps else 0.0

    @property
    def acceptance_rate(self) -> float:
        offered = sum(map(sum, self.proposed))
        accepted = sum(sum(a) - len(a) for a in self.accepted_lengths)
        return accepted / offered if offered else 0.0

    @property
    def tokens_per_second(self) -> float:
        return sum(self.new_tokens) / self.wall_time if self.wall_time > 0 else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(tau=self.tau, acceptance_rate=self.acceptance_rate, tokens_per_second=self.tokens_per_second)
        return d

    def summary(self) -> str:
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

    def lap(self, phase: str) -> None:
        now = self._now()
        if self.cuda:
            self._events.append((phase, self._mark, now))
        else:
            self.totals[phase] += now - self._mark
        self._mark = now

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

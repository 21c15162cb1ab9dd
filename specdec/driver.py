"""The host driver: runs the Decoder ``n`` steps per sync and applies the stopping rules.

The one piece of host code of a decode. Per run of steps it reads back, in a single copy, what
each row gained, what it was offered, the step's fault marks and the new tokens; then it applies
EOS, ``max_new_tokens`` and stop strings row by row, streams, and records statistics. A fault
(``specdec.validate.step_faults``) raises only at a step and draw the row still reaches. A row that stopped is frozen on
the device from the next run on.

With ``pipeline`` the next run is queued before the host reads the current one back (over
pinned memory, waiting on an event, not the stream), so the device never idles on the host. A
row that stops in the run being read has already gone through the queued one too; its extra
tokens are cut like any others. The queued run drafts as the one before it did: a change of the
gate's decision (which may need a drafter's ``resync``) waits until everything is read back. No
run is queued once every live row is likely to reach ``max_new_tokens`` in the one running,
judged, high, from the tokens each row kept in its earlier runs (``Driver._reach``).

Steps are counted as they are launched, so a queued run that no row needed counts in
``SpecStats.num_steps``, and with the tail of the last run in ``SpecStats.idle_steps``.

It knows the Decoder's buffers and host lists; not models, drafters' insides or tokenizers.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from specdec.gate import DraftGate
from specdec.stats import PhaseTimer
from specdec.validate import raise_fault


@dataclass
class Rows:
    """Host records of every row, and the rules that stop it."""

    prompts: list[list[int]]  # [B][real prompt tokens]
    max_new_tokens: int
    eos_ids: set[int]
    stop_fn: Callable[[int, list[int]], bool] | None = None  # (row, prompt + generated) -> stop
    on_tokens: Callable[[int, list[int]], None] | None = None  # (row, newly kept tokens): streaming
    deadline: float | None = None  # time.perf_counter() after which every row stops (max_time)
    generated: list[list[int]] = field(default_factory=list)  # [B][new tokens], EOS included
    gained: list[list[int]] = field(default_factory=list)  # [B][steps] tokens kept per step
    offered: list[list[int]] = field(default_factory=list)  # [B][steps] draft depth offered per step
    undrafted: list[int] = field(default_factory=list)  # [B] the row's steps that ran without a draft
    active: list[bool] = field(default_factory=list)  # [B]

    def __post_init__(self) -> None:
        b = len(self.prompts)
        self.generated, self.gained, self.offered = [[] for _ in range(b)], [[] for _ in range(b)], [[] for _ in range(b)]
        self.undrafted, self.active = [0] * b, [True] * b

    def take(self, r: int, gains: list[int], offers: list[int], faults: list[int], new: list[int],
             drafted: bool) -> tuple[int, int]:
        """Apply one run's results to row ``r``; returns (steps it was live in, tokens it kept).
        Raises for a fault (``validate.step_faults``) at a step, and draw, the row still reaches."""
        pos = steps = kept = 0
        for cnt, offer, fault in zip(gains, offers, faults):
            keep = 0
            if fault < 0:
                raise_fault(fault, r, len(self.generated[r]))
            for tok in new[pos: pos + cnt]:
                if fault == keep + 1:
                    raise_fault(fault, r, len(self.generated[r]))
                self.generated[r].append(tok)
                keep += 1
                if self._stops(r, tok):
                    self.active[r] = False
                    break
            pos += cnt
            steps += 1
            kept += keep
            self.undrafted[r] += int(not drafted)
            self.gained[r].append(keep)
            self.offered[r].append(offer)
            if self.on_tokens is not None and keep:
                self.on_tokens(r, self.generated[r][-keep:])
            if not self.active[r]:
                break
        return steps, kept

    def _stops(self, r: int, tok: int) -> bool:
        return (tok in self.eos_ids or len(self.generated[r]) >= self.max_new_tokens
                or (self.stop_fn is not None and self.stop_fn(r, self.prompts[r] + self.generated[r])))


@dataclass
class Queued:
    drafted: bool
    packed: Tensor  # [B, 3S + growth] gained, offered, faults, new tokens (host memory once the copy lands)
    done: object = None  # torch.cuda.Event of the device-to-host copy, or None on CPU
    span: object = None  # PhaseTimer.lap's span of the run: its cost, read once the copy has landed


class Driver:
    """Example: ``steps, drafted = Driver(decoder, gate, rows, timer).run(width, pipeline=True)``."""

    def __init__(self, decoder, gate: DraftGate, rows: Rows, timer: PhaseTimer):
        self.dec, self.gate, self.rows, self.timer = decoder, gate, rows, timer
        self.queue: list[Queued] = []
        self.steps = self.drafted = 0  # steps launched, and drafted ones (read back or not)
        self.runs: list[list[int]] = [[] for _ in rows.active]  # [B][runs] tokens kept in each whole drafted run

    def run(self, width: int, pipeline: bool) -> tuple[int, int]:
        """Decode until every row stops. Returns (steps, drafted steps) launched: a queued run
        that no row needed counts too, since the device ran it."""
        rows, dec = self.rows, self.dec
        seq_host = [width] * len(rows.active)
        while any(rows.active):
            if not self.queue:
                dec.state.max_seq_len = max(seq_host)  # what a resync reads up to
                self._launch(self.gate.decide(dec.drafter, dec.state, rows.active, seq_host), max(seq_host))
            if pipeline and len(self.queue) == 1 and self._worth_queueing():
                self._launch(self.queue[0].drafted, max(seq_host) + dec.growth)  # rows may grow by a run
            was = list(rows.active)
            self._read(self.queue.pop(0), seq_host)
            if rows.deadline is not None and time.perf_counter() > rows.deadline:
                rows.active = [False] * len(rows.active)  # max_time: stop at this sync, as HF's MaxTimeCriteria
            if rows.active != was:  # freeze stopped rows from the next launch on
                flags = torch.tensor(rows.active, dtype=torch.long, pin_memory=dec.state.tokens.is_cuda)
                dec.state.active.copy_(flags, non_blocking=True)
        return self.steps, self.drafted

    def _read(self, run: Queued, seq_host: list[int]) -> None:
        """Apply one run's results to every live row, and tell the gate what it kept and cost."""
        rows, s = self.rows, self.dec.steps
        if run.done is not None:
            run.done.synchronize()  # the copy, and so the run and its timing events, are done
        host = run.packed.tolist()
        kept = row_steps = 0
        for r, live in enumerate(list(rows.active)):
            if not live:
                continue
            gains = host[r][:s]
            n, k = rows.take(r, gains, host[r][s: 2 * s], host[r][2 * s: 3 * s], host[r][3 * s:],
                             run.drafted or not self.dec.k)
            row_steps, kept = row_steps + n, kept + k
            seq_host[r] += sum(gains)
            if run.drafted and n == s and rows.active[r]:  # a whole run: what the row keeps per run
                self.runs[r].append(k)
        cost = self.timer.seconds(run.span) if self.gate.auto else None
        self.gate.record(run.drafted, s, kept, row_steps, cost=cost)

    def _worth_queueing(self) -> bool:
        """Whether to queue the next run before the one in flight is read: only while some live
        row will still need tokens after it (``_reach`` guesses what the run in flight gives it).
        The queued run drafts as the one in flight, so nothing is queued when the gate's choice
        changes."""
        rows, running = self.rows, self.queue[0]
        pending = 0 if running.drafted else self.dec.steps  # a pause's steps in flight
        if self.dec.k and self.gate.want(sum(rows.active), pending) != running.drafted:
            return False
        return any(live and len(gen) + self._reach(r, running.drafted) < rows.max_new_tokens
                   for r, (live, gen) in enumerate(zip(rows.active, rows.generated)))

    def _reach(self, r: int, drafted: bool) -> int:
        """Tokens row ``r`` is guessed to keep in a run: ``s`` undrafted (one a step, exactly);
        drafted, the mean plus two standard deviations of its earlier whole drafted runs, once it
        has two (before that, the most a run can keep). High on purpose: a run queued for
        nothing costs ``s`` whole steps, one not queued only a host round trip."""
        dec, seen = self.dec, self.runs[r]
        if not (drafted and dec.k):
            return dec.steps
        if len(seen) < 2:
            return dec.growth
        mean = sum(seen) / len(seen)
        spread = math.sqrt(sum((x - mean) ** 2 for x in seen) / len(seen))
        return min(dec.growth, max(dec.steps, math.ceil(mean + 2 * spread)))

    def _launch(self, draft: bool, upper: int) -> None:
        dec = self.dec
        state = dec.state
        self.timer.start()
        before = state.seq_len.clone()
        state.max_seq_len = upper
        gained, offered = dec.run(draft)
        span = self.timer.lap("verify")  # propose, verify, accept and commit all run inside; step_profile splits them
        self.steps += dec.steps
        self.drafted += dec.steps if draft else 0
        grow = torch.arange(dec.growth, device=before.device)
        new = state.tokens.gather(1, (before.unsqueeze(1) + grow).clamp(max=state.capacity - 1))
        packed, done = torch.cat([gained.T, offered.T, dec.faults.T, new], dim=1), None
        if packed.is_cuda:  # copy back without waiting on the stream (a queued run may follow)
            host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
            host.copy_(packed, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            packed = host
        self.queue.append(Queued(draft, packed, done, span))
